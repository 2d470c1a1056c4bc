"""Builds engines that need more than a runtime: state slots sized from the signature, config and
settings, and the tokenizer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from model_registry import Manifest
from serve.engines.kv_slots import KVSlots
from serve.engines.state_slots import StateSlots
from serve.engines.tokens import TokenEngine
from serve.metrics import TokenMetrics
from serve.runtimes import Runtime
from serve.settings import ServeSettings

log = logging.getLogger("zooserve.tokens")


def make_token_engine(name: str, version: int, manifest: Manifest, runtime: Runtime, version_dir: Path,
                      settings: ServeSettings, metrics: TokenMetrics) -> TokenEngine:
    """A token model's engine. The step's inputs say which state it keeps: `start` + per-layer
    caches (KV slots) or `n_new` + constant-size states (recurrent slots). Rows = max_num_seqs,
    fewer when a row's state at full context would overflow `state_memory_mb`."""
    from training.tokenizer import Tokenizer

    if not manifest.tokenizer:
        raise RuntimeError("a token model's manifest must name its tokenizer")
    tokenizer = Tokenizer.from_file(version_dir / manifest.tokenizer)
    config = json.loads((version_dir / "config.json").read_text())
    model_len = int(manifest.generation.get("max_model_len") or config["block_size"])
    max_len = min(model_len, settings.max_model_len or model_len)
    inputs = [s.name for s in manifest.signature.inputs]
    budget = settings.state_memory_mb * 1024 * 1024
    if "n_new" in inputs:
        states = [s for s in manifest.signature.inputs if s.name not in ("ids", "n_new")]
        shapes = {s.name: tuple(s.shape[1:]) for s in states}
        outputs = [s.name for s in manifest.signature.outputs][1:]          # new states, in input order
        per_row = StateSlots.bytes_per_row(shapes)
        rows = _rows(settings, budget, per_row, name)
        slots = StateSlots(rows, shapes, dict(zip(shapes, outputs, strict=True)), max_len)
    elif "start" in inputs:
        dims = dict(layers=config["n_layer"], kv_heads=config["n_kv_head"], max_len=max_len,
                    head_dim=config["n_embd"] // config["n_head"])
        per_row = KVSlots.bytes_per_row(**dims)
        slots = KVSlots(rows=_rows(settings, budget, per_row, name), **dims)
    else:
        raise RuntimeError(f"{name}: the step takes neither `start` (KV cache) nor `n_new` (recurrent state)")
    log.info("%s/%s: %d sequence slots, %d state bytes per sequence at full context (%d tokens)",
             name, version, slots.rows, per_row, max_len)
    return TokenEngine(name, version, manifest, runtime, tokenizer, slots, metrics)


def _rows(settings: ServeSettings, budget: int, per_row: int, name: str) -> int:
    rows = min(settings.max_num_seqs, budget // per_row)
    if rows < 1:
        raise RuntimeError(f"{name}: one sequence's state ({per_row} bytes) exceeds state_memory_mb "
                           f"({settings.state_memory_mb} MiB)")
    return rows
