"""What every engine offers the repository and the HTTP layer, whatever its execution pattern,
so that routing, shadow traffic and the routes call every kind the same way.

Two request verbs, by API (`Engine.api`):
- "v2" engines (classify, sequence, sample, denoise) `bind` a v2 infer body into a `V2Call`,
  which runs once and encodes its answer;
- "openai" engines (tokens) `generate(GenerationRequest) -> AsyncIterator[list[TokenEvent]]`, a
  stream of events (serve/engines/tokens.py).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol

import numpy as np

from model_registry import Batching, Manifest
from serve.metrics import EngineStats, ModelMetrics

if TYPE_CHECKING:
    from serve.settings import ServeSettings


class V2Call(Protocol):
    """One decoded, validated v2 infer request bound to the engine that answers it."""

    engine: "Engine"
    parameters: dict        # the request's v2 parameters (timeout, sequence control, sampler knobs)
    shadowable: bool        # may run again on another version (a sequence's chunk changes its state: no)

    def pinned_version(self) -> tuple[int, str] | None:
        """(version, what) when the request must run on one version whatever the routing says (a
        chunk of a live stateful sequence runs on the version its sequence started on); else None."""

    def bound_to(self, engine: "Engine") -> "V2Call":
        """The same request bound to another version's engine (a pinned version, a shadow)."""

    async def run(self, deadline: float) -> dict[str, np.ndarray]:
        """Queue it on the engine; its output tensors."""

    def response(self, model: str, version: str, outputs: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
        """(body, headers with Content-Type) of the 200 answer."""


class Engine(Protocol):
    name: str
    version: int
    manifest: Manifest
    metrics: ModelMetrics
    api: ClassVar[Literal["v2", "openai"]]
    # requests run many steps: the routes cancel one whose client went away (two tasks per request,
    # so only where it pays)
    cancellable: ClassVar[bool]

    def bind(self, body: bytes, header_length: str | None, settings: "ServeSettings",
             batching: Batching) -> V2Call:
        """Decode and validate a v2 infer body for this engine (ServeError/V2Error 4xx when bad);
        an "openai" engine refuses with 400 naming the routes that serve it."""

    def start(self) -> None:
        """Start background work; called on the running event loop."""

    def stats(self) -> EngineStats:
        """Cumulative counters for the statistics endpoint."""

    @property
    def in_flight(self) -> int:
        """Requests accepted and not yet answered."""

    def admit(self, deadline: float) -> AbstractContextManager:
        """Refuse a request before its body is read (QueueFull with a Retry-After, or Closed) when
        the engine could not start it within model.json's max_queue_wait_ms or by `deadline`;
        shedding then costs no decoding. An admitted request holds its place until it is queued:
        the caller reads and decodes the body inside `with engine.admit(deadline):`, so that
        requests admitted at once, before any is queued, count against each other (else an empty
        queue would admit a whole flood). The queue checks again when the request is queued."""

    def reconfigure(self, batching: Batching) -> None:
        """model.json's batching changed: apply it to the queues (no reload, nothing dropped)."""

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
