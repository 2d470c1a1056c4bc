"""Live sequences of one model: the hidden state the server keeps between a sequence's requests.

Triton's sequence batcher semantics over KServe v2 request parameters (`sequence_id`,
`sequence_start`, `sequence_end`; core src/sequence_batch_scheduler.cc):
  - a start opens the sequence; a start for an id that is already live restarts it (Triton logs
    "The previous sequence did not end before this sequence start. Previous sequence will be
    terminated early." and goes on with the new one);
  - a request for an id that was never started, has ended or has expired is refused (Triton:
    "must specify the START flag on the first request of the sequence");
  - an end frees the state after its request; a sequence idle for longer than the timeout is
    freed (Triton's `max_sequence_idle_microseconds`).
Unlike Triton, a sequence is pinned to the version it started on: one store serves every
version of a model, and each entry records its version.

The store only keeps books: it runs no model and is touched only on the event loop. The state
of a sequence is replaced whole after a request succeeds (`update`), so a request that fails
leaves what was stored as it was.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

SequenceId = int | str


class UnknownSequence(KeyError):
    """No live sequence has this id (never started, ended, or expired)."""

    def __init__(self, sequence_id: SequenceId, why: str):
        super().__init__(sequence_id)
        self.sequence_id, self.why = sequence_id, why

    def __str__(self) -> str:
        return f"sequence {self.sequence_id!r} is {self.why}; its first request must set sequence_start"


class TooManySequences(RuntimeError):
    """Starting another sequence would exceed the store's limit."""


@dataclass(eq=False)
class LiveSequence:
    id: SequenceId
    version: int                            # the version it started on; its requests go there
    state: dict[str, np.ndarray]            # name -> per-row state (e.g. (layers, hidden)) after `steps`
    steps: int = 0                          # time steps consumed so far
    last_used: float = 0.0                  # clock time of its last request
    # one request of a sequence at a time, in arrival order
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def state_bytes(self) -> int:
        return sum(a.nbytes for a in self.state.values())


class SequenceStore:
    """id -> LiveSequence for one model, with idle expiry and per-version counts."""

    def __init__(self, idle_timeout_s: float, max_sequences: int, clock: Callable[[], float] = time.monotonic,
                 workers: int = 1):
        self.idle_timeout_s, self.max_sequences, self.clock = idle_timeout_s, max_sequences, clock
        # in a server of several worker processes this store is one worker's (serve/workers.py)
        self._elsewhere = "" if workers <= 1 else (
            f" here (this server runs {workers} worker processes, and a sequence's state lives in the one that "
            "started it: send all of a sequence's requests over one keep-alive connection)")
        self._live: dict[SequenceId, LiveSequence] = {}
        self._counts: dict[int, list[int]] = {}      # version -> [live sequences, state bytes, expired so far]

    def start(self, sequence_id: SequenceId, version: int, state: dict[str, np.ndarray], steps: int) -> LiveSequence:
        """Open a sequence with the state after its first request; an existing one with the id is replaced."""
        self.check_room(sequence_id)
        old = self._live.get(sequence_id)
        if old is not None:
            self._forget(old)
        seq = LiveSequence(sequence_id, version, state, steps, self.clock())
        self._live[sequence_id] = seq
        self._count(seq, +1)
        return seq

    def check_room(self, sequence_id: SequenceId) -> None:
        """TooManySequences if starting `sequence_id` would exceed the limit (idle ones are freed first)."""
        if sequence_id in self._live or len(self._live) < self.max_sequences:
            return
        self.expire()
        if len(self._live) >= self.max_sequences:
            raise TooManySequences(f"{self.max_sequences} sequences are live; end some or wait for idle ones "
                                   f"to expire ({self.idle_timeout_s:g} s)")

    def get(self, sequence_id: SequenceId) -> LiveSequence:
        """The live sequence with this id; UnknownSequence if there is none (an idle one expires here)."""
        seq = self._live.get(sequence_id)
        if seq is None:
            raise UnknownSequence(sequence_id, "not live (never started, ended or expired)" + self._elsewhere)
        if self.clock() - seq.last_used > self.idle_timeout_s and not seq.lock.locked():
            self._forget(seq, expired=True)
            raise UnknownSequence(sequence_id, f"expired after {self.idle_timeout_s:g} s idle")
        return seq

    def is_live(self, seq: LiveSequence) -> bool:
        """Whether `seq` is still the live sequence of its id (not restarted, ended or expired)."""
        return self._live.get(seq.id) is seq

    def update(self, seq: LiveSequence, state: dict[str, np.ndarray], steps: int) -> bool:
        """Store the state after a successful request; False (and nothing stored) if the sequence
        was restarted, ended or expired meanwhile."""
        if self._live.get(seq.id) is not seq:
            return False
        self._count(seq, -1)
        seq.state, seq.steps, seq.last_used = state, seq.steps + steps, self.clock()
        self._count(seq, +1)
        return True

    def end(self, seq: LiveSequence) -> None:
        """Free a sequence after its last request (nothing if it is no longer the live one)."""
        if self._live.get(seq.id) is seq:
            self._forget(seq)

    def expire(self, version: int | None = None) -> list[SequenceId]:
        """Free every sequence (of `version`, or any) idle for longer than the timeout; their ids."""
        now = self.clock()
        idle = [s for s in self._live.values() if now - s.last_used > self.idle_timeout_s
                and not s.lock.locked() and (version is None or s.version == version)]
        for seq in idle:
            self._forget(seq, expired=True)
        return [s.id for s in idle]

    def drop_version(self, version: int) -> int:
        """Free every sequence of a version (it is being unloaded); how many there were."""
        gone = [s for s in self._live.values() if s.version == version]
        for seq in gone:
            self._forget(seq)
        return len(gone)

    def counts(self, version: int) -> tuple[int, int]:
        """(live sequences, bytes of their state) of one version."""
        live, nbytes, _ = self._counts.get(version, (0, 0, 0))
        return live, nbytes

    def expired(self, version: int) -> int:
        """Sequences of `version` freed by the idle timeout so far."""
        return self._counts.get(version, (0, 0, 0))[2]

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, sequence_id: SequenceId) -> bool:
        return sequence_id in self._live

    def _forget(self, seq: LiveSequence, expired: bool = False) -> None:
        del self._live[seq.id]
        self._count(seq, -1)
        self._counts[seq.version][2] += expired

    def _count(self, seq: LiveSequence, sign: int) -> None:
        entry = self._counts.setdefault(seq.version, [0, 0, 0])
        entry[0] += sign
        entry[1] += sign * seq.state_bytes
