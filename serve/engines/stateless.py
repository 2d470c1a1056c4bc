"""The stateless engine (classify, and later the GAN/VAE samplers): runtime + dynamic batcher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from model_registry import Batching, Manifest
from serve.batching import BatchRecord, DynamicBatcher
from serve.metrics import EngineStats, ModelMetrics
from serve.runtimes import Runtime


class GoldenMismatch(RuntimeError):
    """The artifact's output on the stored golden inputs differs from the stored outputs."""


class StatelessEngine:
    def __init__(self, name: str, version: int, manifest: Manifest, runtime: Runtime,
                 batching: Batching, metrics: ModelMetrics):
        self.name, self.version, self.manifest = name, version, manifest
        self.runtime, self.metrics = runtime, metrics
        self.batcher = DynamicBatcher(runtime.run, batching.max_batch_size, batching.max_queue_delay_ms,
                                      batching.max_queue_size, on_batch=self._record,
                                      name=f"{name}-{version}")

    def _record(self, batch: BatchRecord) -> None:
        self.metrics.batch_done(batch.rows, batch.compute_s, batch.queue_waits)
        self.metrics.queue_depth.set(self.batcher.queue_depth)

    def check_golden(self, version_dir: Path) -> float:
        """Replay the stored golden inputs; returns the max abs error or raises GoldenMismatch."""
        if not self.manifest.golden:
            raise GoldenMismatch("the manifest names no golden file")
        tensors = load_file(str(version_dir / self.manifest.golden))
        inputs = {s.name: tensors[f"input.{s.name}"] for s in self.manifest.signature.inputs}
        got = self.runtime.run(inputs)
        tolerance = max((p.tolerance for p in self.manifest.parity), default=1e-4)
        worst = 0.0
        for spec in self.manifest.signature.outputs:
            expected = tensors[f"output.{spec.name}"]
            if got[spec.name].shape != expected.shape:
                raise GoldenMismatch(f"output {spec.name!r} has shape {got[spec.name].shape}, golden {expected.shape}")
            worst = max(worst, float(np.max(np.abs(got[spec.name].astype(np.float64) - expected))))
        if not worst <= tolerance:
            raise GoldenMismatch(f"golden outputs differ by {worst:.3g} (tolerance {tolerance})")
        return worst

    def start(self) -> None:
        self.batcher.start()

    async def infer(self, inputs: dict[str, np.ndarray], rows: int, deadline: float | None) -> dict[str, np.ndarray]:
        self.metrics.queue_depth.set(self.batcher.queue_depth + 1)
        return await self.batcher.submit(inputs, rows, deadline)

    def stats(self) -> EngineStats:
        return self.metrics.stats

    @property
    def in_flight(self) -> int:
        return self.batcher.in_flight

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        await self.batcher.close(drain_timeout_s)
