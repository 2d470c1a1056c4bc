"""Builds engines that need more than a runtime: state sizes from config.json, the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from model_registry import Manifest
from serve.engines.kv_slots import KVSlots
from serve.engines.tokens import TokenEngine
from serve.metrics import TokenMetrics
from serve.runtimes import Runtime
from serve.settings import ServeSettings


def make_token_engine(name: str, version: int, manifest: Manifest, runtime: Runtime, version_dir: Path,
                      settings: ServeSettings, metrics: TokenMetrics) -> TokenEngine:
    """A decoder's token engine: KV slots sized from its config and the server settings."""
    from training.tokenizer import Tokenizer

    if manifest.family != "decoder":
        raise RuntimeError(f"no token engine for family {manifest.family!r} yet")
    config = json.loads((version_dir / "config.json").read_text())
    if not manifest.tokenizer:
        raise RuntimeError("a token model's manifest must name its tokenizer")
    tokenizer = Tokenizer.from_file(version_dir / manifest.tokenizer)
    max_len = min(config["block_size"], settings.max_model_len or config["block_size"])
    slots = KVSlots(rows=settings.max_num_seqs, layers=config["n_layer"], kv_heads=config["n_kv_head"],
                    max_len=max_len, head_dim=config["n_embd"] // config["n_head"])
    return TokenEngine(name, version, manifest, runtime, tokenizer, slots, metrics)
