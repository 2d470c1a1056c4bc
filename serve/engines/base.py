"""What every engine offers the HTTP layer, whatever its execution pattern."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from serve.metrics import EngineStats


class Engine(Protocol):
    name: str
    version: int

    def start(self) -> None:
        """Start background work on the running event loop."""

    async def infer(self, inputs: dict[str, np.ndarray], rows: int, deadline: float | None) -> dict[str, np.ndarray]:
        """Run one validated request; raises batching errors (QueueFull, DeadlineExceeded, Closed)."""

    def stats(self) -> EngineStats:
        """Cumulative counters for the statistics endpoint."""

    @property
    def in_flight(self) -> int:
        """Requests accepted and not yet answered."""

    async def close(self, drain_timeout_s: float) -> None:
        """Refuse new work, finish what was accepted, release the runtime."""
