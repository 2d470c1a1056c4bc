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


class TokenState(Protocol):
    """The per-row state a token engine keeps between steps (KV cache for decoders, constant-size
    recurrent state for Mamba and the RNN LM), with the verbs the runner and scheduler need.
    Rows being decoded are always 0..n-1 (the scheduler compacts them)."""

    max_len: int        # tokens one row may hold (prompt + generated)

    @property
    def rows(self) -> int:
        """Rows (sequences) it holds at most."""

    def move(self, src: int, dst: int) -> None:
        """Row src's state into row dst."""

    def reset_rows(self, rows: list[int]) -> None:
        """Forget these rows' state."""

    def decode_feeds(self, n: int) -> dict:
        """Step inputs, besides `ids`, for decoding one token on rows 0..n-1."""

    def decode_done(self, n: int, outputs: dict) -> None:
        """Take the step's new state for rows 0..n-1."""

    def prefill_feeds(self, first_row: int, lengths: list[int]) -> dict:
        """Step inputs, besides the right-padded `ids`, for prefilling fresh rows first_row.."""

    def prefill_done(self, first_row: int, outputs: dict, lengths: list[int]) -> None:
        """Take the prefill's state for rows first_row.. (prompt lengths `lengths`)."""
