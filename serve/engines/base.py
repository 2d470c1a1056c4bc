"""What every engine offers the repository and the HTTP layer, whatever its execution pattern.

The request verb differs by pattern, so it is not part of this protocol: the stateless engine
has `async infer(inputs, rows, deadline) -> outputs` (one answer per request), the token engine
`generate(GenerationRequest) -> AsyncIterator[list[TokenEvent]]` (a stream of events).
"""

from __future__ import annotations

from typing import Protocol

from model_registry import Manifest
from serve.metrics import EngineStats, ModelMetrics


class Engine(Protocol):
    name: str
    version: int
    manifest: Manifest
    metrics: ModelMetrics

    def start(self) -> None:
        """Start background work; called on the running event loop."""

    def stats(self) -> EngineStats:
        """Cumulative counters for the statistics endpoint."""

    @property
    def in_flight(self) -> int:
        """Requests accepted and not yet answered."""

    async def close(self, drain_timeout_s: float) -> None:
        """Refuse new work, finish what was accepted, release the runtime."""
