"""The token scheduler: it only keeps books (vLLM's split: schedule -> execute -> update).

Rows are slots of the engine's state (KV cache, SSM state, hidden state): `max_rows` of them,
each holding up to `max_len` tokens. Running requests always occupy rows 0..n-1 (dense), so
the runner can hand the model a contiguous slice of the state; when a request leaves, the
last running row moves into its hole (`StepPlan.moves`) and the freed tail rows are reset.

Each step, rows admitted this step feed their whole prompt (prefill) and sample their first
token; rows that ran before feed the token they sampled last (decode). New requests join
between steps; finished ones leave at the next schedule. A request that does not fit waits.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any


class RequestStatus(IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_ABORTED = 4

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(eq=False)
class TokenRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    # sampling a token in this set finishes the request with "stop" (the token is kept out of the text)
    stop_token_ids: frozenset[int] = frozenset()
    arrival: float = field(default_factory=time.perf_counter)
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    # state row while running, else None
    row: int | None = None
    # engine-side data (sampler, detokenizer, event sink); the scheduler never reads it
    payload: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class StepPlan:
    # (src, dst): copy state row src into dst before executing (compaction after departures)
    moves: list[tuple[int, int]]
    # rows that no request holds any more; the runner resets them
    freed_rows: list[int]
    # requests that run at rows 0..len(decode)-1 and feed their last sampled token
    decode: list[TokenRequest]
    # requests admitted this step, at the rows after the decode rows, feeding their whole prompt
    prefill: list[TokenRequest]

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


@dataclass(frozen=True)
class ContextRefusal:
    """Why a sequence cannot run in a row: the request field the caller must change ("prompt" or
    "max_tokens") and a message that says so."""

    param: str
    message: str


def refuse_context(prompt_tokens: int, max_tokens: int, max_len: int) -> ContextRefusal | None:
    """The one "fits the context" rule, asked by the OpenAI routes (a 400), the engine (before it
    queues) and the scheduler (before it books): a non-empty prompt, at least one token to
    generate, prompt + max_tokens within a row of `max_len` tokens. None when it fits."""
    if prompt_tokens < 1:
        return ContextRefusal("prompt", "empty prompt: it has no tokens after tokenization")
    if prompt_tokens >= max_len:
        return ContextRefusal("prompt", f"prompt is {prompt_tokens} tokens; the context of this model is {max_len} "
                                        "tokens (prompt + at least one generated token must fit): shorten it to "
                                        f"at most {max_len - 1} tokens")
    if max_tokens < 1:
        return ContextRefusal("max_tokens", f"max_tokens must be >= 1, got {max_tokens}")
    if prompt_tokens + max_tokens > max_len:
        return ContextRefusal("max_tokens", f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds "
                                            f"the context of {max_len} tokens: lower max_tokens to at most "
                                            f"{max_len - prompt_tokens}, or shorten the prompt")
    return None


class TokenScheduler:
    def __init__(self, max_rows: int, max_len: int, max_prefill_tokens: int = 4096):
        self.max_rows, self.max_len, self.max_prefill_tokens = max_rows, max_len, max_prefill_tokens
        self.waiting: deque[TokenRequest] = deque()
        self.running: list[TokenRequest] = []          # index == row
        self._by_id: dict[str, TokenRequest] = {}

    def add_request(self, request: TokenRequest) -> None:
        """Queue a request; ValueError when it could never fit a row."""
        refusal = refuse_context(len(request.prompt_ids), request.max_tokens, self.max_len)
        if refusal is not None:
            raise ValueError(refusal.message)
        if request.request_id in self._by_id:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self._by_id[request.request_id] = request

    def finish(self, request_id: str, status: RequestStatus) -> None:
        """End a request early (abort, or a stop string the engine found); its row frees next schedule."""
        request = self._by_id.get(request_id)
        if request is None or request.status.is_finished:
            return
        if request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
            self._by_id.pop(request_id)
        request.status = status

    def get(self, request_id: str) -> TokenRequest | None:
        """A request that is waiting or running."""
        return self._by_id.get(request_id)

    def has_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def schedule(self) -> StepPlan:
        """Free finished rows (compacting), admit waiting requests, and say what runs this step."""
        moves, freed = self._compact()
        decode = list(self.running)
        prefill: list[TokenRequest] = []
        budget = self.max_prefill_tokens
        while self.waiting and len(self.running) < self.max_rows:
            nxt = self.waiting[0]
            if prefill and len(nxt.prompt_ids) > budget:
                break                                   # the first admission always fits, however long
            self.waiting.popleft()
            nxt.status, nxt.row = RequestStatus.RUNNING, len(self.running)
            self.running.append(nxt)
            prefill.append(nxt)
            budget -= len(nxt.prompt_ids)
        return StepPlan(moves, freed, decode, prefill)

    def update_from_output(self, plan: StepPlan, sampled: dict[str, int]) -> list[TokenRequest]:
        """Append each request's sampled token; returns the requests that finished this step."""
        finished = []
        for request in (*plan.decode, *plan.prefill):
            if request.status.is_finished:             # aborted or stopped while the step ran
                continue
            token = sampled[request.request_id]
            if token in request.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
            else:
                request.output_ids.append(token)
                if len(request.output_ids) >= request.max_tokens or request.num_tokens >= self.max_len:
                    request.status = RequestStatus.FINISHED_LENGTH
            if request.status.is_finished:
                finished.append(request)
        return finished

    def _compact(self) -> tuple[list[tuple[int, int]], list[int]]:
        """Drop finished requests from `running`, filling holes from the tail."""
        old_count = len(self.running)
        survivors = [r for r in self.running if not r.status.is_finished]
        for r in self.running:
            if r.status.is_finished:
                r.row = None
                self._by_id.pop(r.request_id, None)
        new_count = len(survivors)
        holes = [i for i in range(new_count) if self.running[i].status.is_finished]
        tail = [r for r in self.running[new_count:] if not r.status.is_finished]
        moves = []
        for hole, request in zip(holes, tail):
            moves.append((request.row, hole))
            self.running[hole], request.row = request, hole
        self.running = self.running[:new_count]
        return moves, list(range(new_count, old_count))
