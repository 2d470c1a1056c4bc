"""The kind-to-engine choice in one table (`BUILDERS`): each builder opens a verified version's
artifacts, builds its engine and replays its golden pair; and the token engine's state slots,
sized from the signature, config and settings."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from model_registry import Manifest, ModelConfig
from serve.engines.base import Engine
from serve.engines.kv_slots import KVSlots
from serve.engines.sample import make_generative_engine
from serve.engines.sequence import SequenceEngine, SequenceRuntime, artifact_names
from serve.engines.state_slots import StateSlots
from serve.engines.stateless import StatelessEngine
from serve.engines.tokens import TokenEngine
from serve.golden import check_golden
from serve.instances import choose, usable_cores
from serve.metrics import Metrics, TokenMetrics
from serve.runtimes import Runtime, open_runtime, with_device_io, with_split_prefill
from serve.sequence_store import SequenceStore
from serve.settings import ServeSettings

log = logging.getLogger("zooserve.tokens")
runtime_log = logging.getLogger("zooserve.runtime")


@dataclass
class BuildContext:
    """What a builder needs besides the version: the model's config, the server's settings and
    metrics, and the model's sequence store (shared by its versions: a sequence outlives a swap)."""

    cfg: ModelConfig
    settings: ServeSettings
    metrics: Metrics
    sequence_store: Callable[[], SequenceStore]


@dataclass
class Built:
    engine: Engine
    golden_error: float      # worst error of the golden replay (it raised if over tolerance)
    device: str              # where the runtime really runs
    prefill: str = ""        # recurrent token models: how prompts run


def build_engine(version: int, manifest: Manifest, vdir: Path, ctx: BuildContext) -> Built:
    """A verified version's engine, golden-checked (raises on any failure)."""
    builder = BUILDERS.get(manifest.kind)
    if builder is None:
        raise RuntimeError(f"kind {manifest.kind!r} has no engine in this server yet")
    return builder(version, manifest, vdir, ctx)


def _runtime(manifest: Manifest, vdir: Path, settings: ServeSettings, threads: int | None = None) -> Runtime:
    return open_runtime(vdir, manifest.format, manifest.artifacts[manifest.format],
                        *artifact_names(manifest),   # the signature's (+ lengths and state)
                        threads or settings.intra_op_threads, settings.device)


def _stateless(version: int, manifest: Manifest, vdir: Path, ctx: BuildContext) -> Built:
    instances = choose(ctx.cfg.instance_group, ctx.settings.execution_instances, ctx.settings.intra_op_threads,
                       usable_cores(), ctx.settings.workers)
    if manifest.format != "onnx" and instances.intra_op_threads != ctx.settings.intra_op_threads:
        # torch has one intra-op pool per process: the server's --threads holds for every TorchScript model
        runtime_log.warning("%s/%s: instance_group.intra_op_threads %d is for ONNX Runtime; this %s version runs with the "
                    "server's %d", ctx.cfg.name, version, instances.intra_op_threads, manifest.format,
                    ctx.settings.intra_op_threads)
        instances = replace(instances, intra_op_threads=ctx.settings.intra_op_threads)
    # TorchScript on CUDA: batches through reusable pinned host buffers, non-blocking copies
    runtime = with_device_io(_runtime(manifest, vdir, ctx.settings, instances.intra_op_threads))
    error = check_golden(manifest, runtime, vdir)
    name = ctx.cfg.name
    engine = StatelessEngine(name, version, manifest, runtime, ctx.cfg.batching, ctx.metrics.for_model(name, version),
                             instances)
    return Built(engine, error, runtime.device)


def _sequence(version: int, manifest: Manifest, vdir: Path, ctx: BuildContext) -> Built:
    runtime = SequenceRuntime(_runtime(manifest, vdir, ctx.settings), manifest, vdir)
    error = check_golden(manifest, runtime, vdir)
    name = ctx.cfg.name
    engine = SequenceEngine(name, version, manifest, runtime, ctx.cfg.batching, ctx.sequence_store(), ctx.settings,
                            ctx.metrics.for_sequence_model(name, version))
    return Built(engine, error, runtime.device)


def _tokens(version: int, manifest: Manifest, vdir: Path, ctx: BuildContext) -> Built:
    if _token_state_on_device(manifest, ctx.settings):
        return _device_tokens(version, manifest, vdir, ctx)
    runtime = with_split_prefill(_runtime(manifest, vdir, ctx.settings), manifest, vdir,
                                 ctx.settings.intra_op_threads)
    error = check_golden(manifest, runtime, vdir)
    name = ctx.cfg.name
    engine = make_token_engine(name, version, manifest, runtime, vdir, ctx.settings,
                               ctx.metrics.for_token_model(name, version))
    engine.reconfigure(ctx.cfg.batching)
    return Built(engine, error, runtime.device, getattr(runtime, "prefill", ""))


def _token_state_on_device(manifest: Manifest, settings: ServeSettings) -> bool:
    """Device-resident state when asked for, and for a TorchScript version that runs on CUDA (the
    host slots would copy each step's rows to the GPU and back). An ONNX version keeps ONNX
    Runtime (its CUDA provider is another path) unless asked."""
    if settings.token_state == "device":
        return True
    if manifest.format != "torchscript" or settings.device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def _device_tokens(version: int, manifest: Manifest, vdir: Path, ctx: BuildContext) -> Built:
    """A token engine whose state lives on the device and whose step runs there (torch)."""
    from serve.engines.device_runtime import open_step, resolve_device

    step = ctx.settings.token_step        # auto: the package's TorchScript, else the family's eager step
    device = resolve_device(ctx.settings.device)
    runtime = open_step(vdir, manifest, *artifact_names(manifest), device, ctx.settings.intra_op_threads, step)
    error = check_golden(manifest, runtime, vdir)
    name = ctx.cfg.name
    engine = make_token_engine(name, version, manifest, runtime, vdir, ctx.settings,
                               ctx.metrics.for_token_model(name, version), device=device)
    engine.reconfigure(ctx.cfg.batching)
    if device.type == "cuda" and ctx.settings.cuda_graphs:
        from serve.engines.decode_graphs import DecodeGraphs

        engine.runner.decode_graphs = DecodeGraphs(runtime.run_tensors, engine.scheduler.max_rows, capture=True)
    prefill = f"whole step: {runtime.format} on {runtime.device} (device-resident state)" if manifest.prefill else ""
    log.info("%s/%s: token state on %s, step %s%s", name, version, device, runtime.format,
             ", decode as CUDA graphs" if engine.runner.decode_graphs is not None else "")
    return Built(engine, error, runtime.device, prefill)


def _generative(version: int, manifest: Manifest, vdir: Path, ctx: BuildContext) -> Built:
    """Parts, a sampling loop, part and end-to-end goldens (serve/engines/sample.py)."""
    engine = make_generative_engine(ctx.cfg.name, version, manifest, vdir, ctx.cfg.batching, ctx.settings,
                                    ctx.metrics)
    return Built(engine, engine.golden_error, engine.device)


BUILDERS: dict[str, Callable[[int, Manifest, Path, BuildContext], Built]] = {
    "classify": _stateless,
    "sequence": _sequence,
    "tokens": _tokens,
    "sample": _generative,
    "denoise": _generative,
}


def make_token_engine(name: str, version: int, manifest: Manifest, runtime: Runtime, version_dir: Path,
                      settings: ServeSettings, metrics: TokenMetrics, device=None) -> TokenEngine:
    """A token model's engine. The step's inputs say which state it keeps: `start` + per-layer
    caches (KV slots) or `n_new` + constant-size states (recurrent slots). Rows = max_num_seqs,
    fewer when a row's state at full context would overflow `state_memory_mb`. With a torch
    `device`, the slots are torch tensors there (serve/engines/device_slots.py) and `runtime`
    must take tensors (serve/engines/device_runtime.py); else numpy slots."""
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
        if device is None:
            slots = StateSlots(rows, shapes, dict(zip(shapes, outputs, strict=True)), max_len)
        else:
            from serve.engines.device_slots import TorchStateSlots

            slots = TorchStateSlots(rows, shapes, dict(zip(shapes, outputs, strict=True)), max_len, device)
    elif "start" in inputs:
        dims = dict(layers=config["n_layer"], kv_heads=config["n_kv_head"], max_len=max_len,
                    head_dim=config["n_embd"] // config["n_head"])
        per_row = KVSlots.bytes_per_row(**dims)
        if device is None:
            slots = KVSlots(rows=_rows(settings, budget, per_row, name), **dims)
        else:
            from serve.engines.device_slots import TorchKVSlots

            slots = TorchKVSlots(rows=_rows(settings, budget, per_row, name), **dims, device=device)
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
