"""The token engine: continuous (iteration-level) batching for autoregressive models.

    plan = scheduler.schedule()          # books: who prefills, who decodes, which rows move or free
    tokens = runner.sample(plan, samplers)   # the model's step over the state slots (KV cache or recurrent
                                             # state), then each request's sampler: same seed, same text, any batch
    finished = scheduler.update_from_output(plan, tokens)

The loop runs on the engine's own thread (ONNX Runtime releases the GIL); requests arrive
through a thread-safe inbox between steps and their events go back to the asyncio loop once per
step. A request whose client went away is aborted and its row is freed at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import numpy as np

from model_registry import Manifest
from serve.batching import Closed, QueueFull
from serve.engines.base import TokenState
from serve.engines.step_loop import StepLoop
from serve.errors import ServeError
from serve.metrics import EngineStats, TokenMetrics
from serve.runtimes import Runtime
from serve.scheduler import FINISH_REASON, RequestStatus, StepPlan, TokenRequest, TokenScheduler, refuse_context
from training.sampling import Sampled, Sampler, SamplingParams



@dataclass
class GenerationRequest:
    """What the API asks of the engine for one sequence."""

    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)      # stop strings (excluded from the text)
    ignore_eos: bool = False


@dataclass
class TokenEvent:
    """One sampled token as the client sees it."""

    token: int | None            # None on a closing event that carries no token
    text: str                    # new text since the previous event (may be "" while a char is incomplete)
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None   # "stop" | "length" | "abort" on the last event


class _Stream:
    """Engine-side companion of a request: sampler, detokenizer, stop strings, event sink."""

    def __init__(self, req: GenerationRequest, tokenizer, loop: asyncio.AbstractEventLoop, sink: asyncio.Queue):
        self.sampler = Sampler(req.params)
        self.decoder = tokenizer.decode_stream()
        self.stop = req.stop
        self.hold = max((len(s) for s in req.stop), default=1) - 1   # chars held back: may start a stop string
        self.text = ""          # everything decoded so far
        self.cut = False        # a stop string ended the text
        self.sent = 0           # chars of `text` already emitted
        self.loop, self.sink = loop, sink
        self.last_token_at: float | None = None

    def add_token(self, token: int) -> bool:
        """Decode one token; True when a stop string now ends the text (which is cut before it)."""
        self.text += self.decoder.step(token)
        for s in self.stop:
            cut = self.text.find(s, max(0, self.sent - len(s)))
            if cut >= 0:
                self.text, self.cut = self.text[:cut], True
                return True
        return False

    def delta(self, final: bool) -> str:
        if final and not self.cut:
            self.text += self.decoder.flush()       # an incomplete character at the very end
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], end
        return out


def _deliver(deliveries: list[tuple[asyncio.Queue, TokenEvent]]) -> None:
    """On the event loop: hand each stream its event."""
    for sink, event in deliveries:
        sink.put_nowait([event])


def _decode_ids(plan: StepPlan) -> np.ndarray:
    """(n, 1): each decoding row's last token."""
    return np.array([[r.output_ids[-1]] for r in plan.decode], np.int64)


def _prefill_ids(plan: StepPlan) -> tuple[np.ndarray, list[int]]:
    """(p, T) right-padded prompts of the fresh rows, and their lengths."""
    lengths = [len(r.prompt_ids) for r in plan.prefill]
    ids = np.zeros((len(lengths), max(lengths)), np.int64)
    for i, r in enumerate(plan.prefill):
        ids[i, : lengths[i]] = r.prompt_ids
    return ids, lengths


class TokenRunner:
    """Executes a StepPlan: the model's step over the engine's state (KV slots or recurrent
    state slots, see `serve.engines.base.TokenState`); returns last-position logits.

    Two kinds of state, one runner: numpy slots in host memory with a numpy runtime (ONNX
    Runtime; the default), or device-resident slots (serve/engines/device_slots.py, whose
    `device` is a torch.device) with a torch step (serve/engines/device_runtime.py) that takes
    and returns tensors on that device."""

    def __init__(self, runtime: Runtime, state: TokenState):
        self.runtime, self.state = runtime, state
        self.device = getattr(state, "device", None)     # a torch.device: the state lives there
        # device-resident state: decode at bucketed batch sizes, as CUDA graphs on a GPU
        # (serve/engines/decode_graphs.py; set by the factory); None: the plain step
        self.decode_graphs = None

    def apply_moves(self, plan: StepPlan) -> None:
        for src, dst in plan.moves:
            self.state.move(src, dst)
        if plan.freed_rows:
            self.state.reset_rows(plan.freed_rows)

    def sample(self, plan: StepPlan, samplers: list[Sampler]) -> dict[str, Sampled]:
        """request id -> its next token, drawn by its own sampler (`samplers` in the plan's order,
        decode rows first). With device-resident state the logits stay on the device and are
        sampled there (serve/engines/device_sampling.py): only the ids and the asked
        log-probabilities come back."""
        rows = (*plan.decode, *plan.prefill)
        if self.device is not None:
            from serve.engines.device_sampling import sample_rows

            return {r.request_id: s for r, s in zip(rows, sample_rows(self._device_logits(plan), samplers))}
        logits = self.execute(plan)
        return {r.request_id: sampler.sample(logits[r.request_id]) for r, sampler in zip(rows, samplers)}

    def execute(self, plan: StepPlan) -> dict[str, np.ndarray]:
        """request id -> logits (V,) of its last fed position, on the host."""
        if self.device is not None:
            host = self._device_logits(plan).cpu().numpy()                         # one copy back
            return {r.request_id: host[i] for i, r in enumerate((*plan.decode, *plan.prefill))}
        out: dict[str, np.ndarray] = {}
        if plan.decode:
            n = len(plan.decode)
            res = self.runtime.run({"ids": _decode_ids(plan), **self.state.decode_feeds(n)})
            self.state.decode_done(n, res)
            logits = res["logits"]                                                  # (n, 1, V)
            for i, r in enumerate(plan.decode):
                out[r.request_id] = logits[i, 0]
        if plan.prefill:
            first = plan.prefill[0].row
            ids, lengths = _prefill_ids(plan)
            res = self.runtime.run({"ids": ids, **self.state.prefill_feeds(first, lengths)})
            self.state.prefill_done(first, res, lengths)
            # a step returns logits at every fed position (the decoder) or at each row's last only
            # (the recurrent families: (n, 1, V))
            every = res["logits"].shape[1] == ids.shape[1]
            for i, r in enumerate(plan.prefill):
                out[r.request_id] = res["logits"][i, lengths[i] - 1 if every else 0]
        return out

    def _device_logits(self, plan: StepPlan):
        """The step over device-resident state: the fed ids go to the device, the step and the
        state writes run there; returns the rows' last-position logits (n, V) on the device,
        decode rows first."""
        import torch

        device, run = self.device, self.runtime.run_tensors
        picked: list[torch.Tensor] = []                     # (rows, V) blocks, decode rows first
        if plan.decode:
            n = len(plan.decode)
            ids = torch.from_numpy(_decode_ids(plan)).to(device, non_blocking=True)
            if self.decode_graphs is not None:
                res = self.decode_graphs.step(ids, self.state.decode_feeds)
            else:
                res = run({"ids": ids, **self.state.decode_feeds(n)})
            self.state.decode_done(n, res)
            picked.append(res["logits"][:, 0])                                             # (n, V)
        if plan.prefill:
            first = plan.prefill[0].row
            ids, lengths = _prefill_ids(plan)
            res = run({"ids": torch.from_numpy(ids).to(device, non_blocking=True),
                       **self.state.prefill_feeds(first, lengths)})
            self.state.prefill_done(first, res, lengths)
            logits = res["logits"]
            if logits.shape[1] == ids.shape[1]:           # every fed position (the decoder): each row's last
                last = torch.from_numpy(np.asarray(lengths, np.int64) - 1).to(device, non_blocking=True)
                picked.append(logits[torch.arange(len(lengths), device=device), last])
            else:                                         # the recurrent families: (p, 1, V) already
                picked.append(logits[:, 0])
        return picked[0] if len(picked) == 1 else torch.cat(picked)


class TokenEngine(StepLoop):
    """One (model, version) of kind `tokens`: scheduler + runner + samplers on one thread."""

    api = "openai"
    cancellable = True     # a client that leaves aborts its sequences

    def __init__(self, name: str, version: int, manifest: Manifest, runtime: Runtime, tokenizer,
                 slots: TokenState, metrics: TokenMetrics, max_waiting: int = 1024):
        super().__init__()
        self.name, self.version, self.manifest = name, version, manifest
        self.tokenizer, self.metrics = tokenizer, metrics
        self.max_len = slots.max_len
        self.scheduler = TokenScheduler(max_rows=slots.rows, max_len=slots.max_len)
        self.runner = TokenRunner(runtime, slots)
        self.max_waiting = max_waiting
        self.max_queue_wait_s = float("inf")     # model.json's batching.max_queue_wait_ms (reconfigure)
        self._ids = itertools.count()
        # running mean of a sequence's time in a row (first step to last): a row frees every
        # mean_service_s / rows seconds, which bounds the waiting queue by time
        self.mean_service_s = 0.0
        self._began: dict[str, float] = {}     # request id -> its first step (engine thread)

    # ---- asyncio side -------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        super().start()

    def admit(self, deadline: float) -> contextlib.nullcontext:
        """Refuse a new sequence now (QueueFull, Closed) when `generate` would: the OpenAI routes
        ask before validating and tokenizing (serve/api/token_admission.py). Nothing is held:
        `generate` checks again."""
        self._check_admission()
        return contextlib.nullcontext()

    def reconfigure(self, batching) -> None:
        """Sequences run in the continuous batch (max_num_seqs), not in model.json's batches: only
        the waiting queue's bounds apply (max_queue_size sequences, max_queue_wait_ms)."""
        self.max_waiting = batching.max_queue_size
        self.max_queue_wait_s = batching.max_queue_wait_ms / 1000.0

    def expected_wait_s(self, ahead: int) -> float:
        """How long a sequence with `ahead` sequences waiting before it waits for a row."""
        return (ahead + 1) * self.mean_service_s / self.scheduler.max_rows

    def _check_admission(self) -> None:
        """A new sequence is refused (QueueFull, with the time until it would be admitted) when
        every row is busy and the waiting queue is full, by count or by expected wait; running
        sequences are never touched."""
        if self._closing:
            raise Closed("model is shutting down")
        ahead = self._pending - self.scheduler.max_rows
        if ahead < 0:
            return
        wait = self.expected_wait_s(ahead)
        if ahead >= self.max_waiting:
            raise QueueFull(retry_after_s=wait)
        if wait > self.max_queue_wait_s:
            raise QueueFull(retry_after_s=wait - self.max_queue_wait_s)

    def bind(self, body: bytes, header_length: str | None, settings, batching) -> None:
        raise ServeError(400, f"model {self.name!r} generates tokens: use POST /v1/completions or "
                              "/v1/chat/completions")

    async def generate(self, req: GenerationRequest) -> AsyncIterator[list[TokenEvent]]:
        """Queue one sequence; yields its events step by step until the last one (finish_reason set)."""
        try:
            self._check_admission()
        except QueueFull:
            self.metrics.request_done(429, 0.0)     # refused at once; the early refusals count themselves
            raise
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue = asyncio.Queue()
        request = TokenRequest(f"{self.name}-{next(self._ids)}", list(req.prompt_ids), req.max_tokens,
                               frozenset() if req.ignore_eos else frozenset({self.tokenizer.eos_id}))
        request.payload = _Stream(req, self.tokenizer, loop, sink)
        self._refuse_impossible(request)
        self._pending += 1
        self._inbox.put(("add", request))
        finished = False
        try:
            while not finished:
                events = await sink.get()
                if isinstance(events, BaseException):
                    raise events
                finished = events[-1].finish_reason is not None
                yield events
        finally:
            self._pending -= 1
            if not finished:                       # the consumer went away: free the row next step
                self._inbox.put(("abort", request.request_id))

    def _refuse_impossible(self, request: TokenRequest) -> None:
        """Refuse at once what could never run (the scheduler asks the same rule, later)."""
        refusal = refuse_context(len(request.prompt_ids), request.max_tokens, self.max_len)
        if refusal is not None:
            raise ValueError(refusal.message)

    def stats(self) -> EngineStats:
        return self.metrics.stats

    # ---- engine thread (StepLoop hooks) ---------------------------------------------------------
    def _has_work(self) -> bool:
        return self.scheduler.has_requests()

    def _add(self, request: TokenRequest) -> None:
        self.scheduler.add_request(request)

    def _reject(self, request: TokenRequest, exc: Exception) -> None:
        stream: _Stream = request.payload
        stream.loop.call_soon_threadsafe(stream.sink.put_nowait, exc)

    def _abort(self, request_id: str) -> None:
        request = self.scheduler.get(request_id)
        if request is not None and not request.status.is_finished:
            self.scheduler.finish(request_id, RequestStatus.FINISHED_ABORTED)
            self.metrics.finished("abort", time.perf_counter() - request.arrival)
            self._began.pop(request_id, None)

    def _step(self) -> None:
        plan = self.scheduler.schedule()
        self.runner.apply_moves(plan)
        self.metrics.scheduler_state(self.scheduler.num_running, self.scheduler.num_waiting, self.scheduler.max_rows)
        if plan.empty:
            return
        started = time.perf_counter()
        sampled = self.runner.sample(plan, [r.payload.sampler for r in (*plan.decode, *plan.prefill)])
        self.scheduler.update_from_output(plan, {i: s.token for i, s in sampled.items()})
        now = time.perf_counter()
        self.metrics.step_done(len(plan.decode) + len(plan.prefill), now - started)
        for request in plan.prefill:
            self.metrics.admitted(len(request.prompt_ids), started - request.arrival)
            self._began[request.request_id] = started
        deliveries = [self._emit(r, sampled[r.request_id], now) for r in (*plan.decode, *plan.prefill)]
        # one hop to the event loop per step, not per sequence (each hop is a wake-up syscall)
        self._loop.call_soon_threadsafe(_deliver, [d for d in deliveries if d is not None])

    def _emit(self, request: TokenRequest, sample: Sampled, now: float) -> tuple[asyncio.Queue, TokenEvent] | None:
        """The event this token makes for its stream (None for an aborted request)."""
        if request.status == RequestStatus.FINISHED_ABORTED:
            return None
        stream: _Stream = request.payload
        kept = sample.token not in request.stop_token_ids     # an end-of-text token is not part of the text
        if kept and stream.add_token(sample.token):
            self.scheduler.finish(request.request_id, RequestStatus.FINISHED_STOPPED)
        finish = FINISH_REASON[request.status] if request.status.is_finished else None
        event = TokenEvent(sample.token if kept else None, stream.delta(final=finish is not None),
                           sample.logprob if kept else None, sample.top if kept else [], finish)
        self.metrics.token_emitted(stream, now, request.arrival)
        if finish is not None:
            self.metrics.finished(finish, now - request.arrival)
            self._served(request.request_id, now)
        return stream.sink, event

    def _served(self, request_id: str, now: float) -> None:
        began = self._began.pop(request_id, None)
        if began is not None:
            self.mean_service_s = (now - began if not self.mean_service_s
                                   else 0.8 * self.mean_service_s + 0.2 * (now - began))

    def _fail_everything(self, exc: Exception) -> None:
        now = time.perf_counter()
        for request in [*self.scheduler.running, *self.scheduler.waiting]:
            if request.status == RequestStatus.FINISHED_ABORTED:
                continue                 # its caller has gone
            stream: _Stream = request.payload
            # a request that finished in a step that then failed may not have had its last event
            stream.loop.call_soon_threadsafe(stream.sink.put_nowait, exc)
            if not request.status.is_finished:
                self.metrics.request_done(503, now - request.arrival)

    def _reset(self) -> None:
        """Empty books, and the rows the running requests held zeroed (a step may have half-written them)."""
        old = self.scheduler
        self.scheduler = TokenScheduler(old.max_rows, old.max_len, old.max_prefill_tokens)
        self._began.clear()
        if old.running:
            self.runner.state.reset_rows(list(range(len(old.running))))
        self.metrics.scheduler_state(0, 0, old.max_rows)
