"""The stateless engine (classify): runtime + dynamic batcher, and the v2 call every tensor-in,
tensor-out engine binds (`TensorCall`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from model_registry import Batching, Manifest
from serve.batching import BatchRecord, DynamicBatcher, Reservation
from serve.instances import Instances
from serve.metrics import EngineStats, ModelMetrics
from serve.runtimes import Runtime
from serve.v2_codec import InferRequest, decode_infer_request, encode_infer_response


@dataclass(frozen=True, slots=True)
class TensorCall:
    """A decoded v2 request of signature tensors for an engine with `infer(inputs, rows, deadline)`."""

    engine: Any
    request: InferRequest
    shadowable = True

    @property
    def parameters(self) -> dict:
        return self.request.parameters

    def pinned_version(self) -> tuple[int, str] | None:
        return None

    def bound_to(self, engine) -> "TensorCall":
        return replace(self, engine=engine)

    async def run(self, deadline: float) -> dict[str, np.ndarray]:
        return await self.engine.infer(self.request.inputs, self.request.batch_size, deadline)

    def response(self, model: str, version: str, outputs: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
        datatypes = {s.name: s.datatype for s in self.engine.manifest.signature.outputs}
        return encode_infer_response(model, version, self.request.id, outputs, self.request.outputs, datatypes,
                                     on_nonfinite=self.engine.metrics.nonfinite_answer)


def decode_for(manifest: Manifest, body: bytes, header_length: str | None, settings, batching: Batching) -> InferRequest:
    """A v2 body decoded and validated against a version's signature and batch limit."""
    sig = manifest.signature
    return decode_infer_request(body, header_length, sig.inputs, sig.outputs, batching.max_batch_size,
                                settings.allow_non_finite)


class StatelessEngine:
    api = "v2"
    cancellable = False

    def __init__(self, name: str, version: int, manifest: Manifest, runtime: Runtime,
                 batching: Batching, metrics: ModelMetrics, instances: Instances | None = None):
        self.name, self.version, self.manifest = name, version, manifest
        self.runtime, self.metrics = runtime, metrics
        # execution instances: batches run side by side on the one runtime (serve/instances.py)
        self.instances = instances or Instances(1, 1, "one")
        self.batcher = DynamicBatcher(runtime.run, batching.max_batch_size, batching.max_queue_delay_ms,
                                      batching.max_queue_size, on_batch=self._record,
                                      max_queue_wait_ms=batching.max_queue_wait_ms,
                                      name=f"{name}-{version}", instances=self.instances.count)
        metrics.queue_depth.set_function(lambda: self.batcher.queue_depth)   # read at scrape

    def _record(self, batch: BatchRecord) -> None:
        self.metrics.batch_done(batch.rows, batch.compute_s, batch.queue_waits)

    def start(self) -> None:
        self.batcher.start()

    def bind(self, body: bytes, header_length: str | None, settings, batching: Batching) -> TensorCall:
        return TensorCall(self, decode_for(self.manifest, body, header_length, settings, batching))

    def admit(self, deadline: float) -> Reservation:
        return self.batcher.admit(deadline)

    def reconfigure(self, batching: Batching) -> None:
        self.batcher.reconfigure(batching.max_batch_size, batching.max_queue_delay_ms, batching.max_queue_size,
                                batching.max_queue_wait_ms)

    async def infer(self, inputs: dict[str, np.ndarray], rows: int, deadline: float | None) -> dict[str, np.ndarray]:
        return await self.batcher.submit(inputs, rows, deadline)

    def stats(self) -> EngineStats:
        return self.metrics.stats

    @property
    def in_flight(self) -> int:
        return self.batcher.in_flight

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        await self.batcher.close(drain_timeout_s)
