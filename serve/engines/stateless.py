"""The stateless engine (classify, and later the GAN/VAE samplers): runtime + dynamic batcher."""

from __future__ import annotations

import numpy as np

from model_registry import Batching, Manifest
from serve.batching import BatchRecord, DynamicBatcher
from serve.metrics import EngineStats, ModelMetrics
from serve.runtimes import Runtime


class StatelessEngine:
    def __init__(self, name: str, version: int, manifest: Manifest, runtime: Runtime,
                 batching: Batching, metrics: ModelMetrics):
        self.name, self.version, self.manifest = name, version, manifest
        self.runtime, self.metrics = runtime, metrics
        self.batcher = DynamicBatcher(runtime.run, batching.max_batch_size, batching.max_queue_delay_ms,
                                      batching.max_queue_size, on_batch=self._record,
                                      name=f"{name}-{version}")
        metrics.queue_depth.set_function(lambda: self.batcher.queue_depth)   # read at scrape

    def _record(self, batch: BatchRecord) -> None:
        self.metrics.batch_done(batch.rows, batch.compute_s, batch.queue_waits)

    def start(self) -> None:
        self.batcher.start()

    async def infer(self, inputs: dict[str, np.ndarray], rows: int, deadline: float | None) -> dict[str, np.ndarray]:
        return await self.batcher.submit(inputs, rows, deadline)

    def stats(self) -> EngineStats:
        return self.metrics.stats

    @property
    def in_flight(self) -> int:
        return self.batcher.in_flight

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        await self.batcher.close(drain_timeout_s)
