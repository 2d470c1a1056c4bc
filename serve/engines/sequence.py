"""The sequence engine (KIND "sequence": the rnn forecasters): variable-length batching and
stateful streams.

Variable length. Each request brings histories of its own length T (one `series` tensor
(B, T, 1) per request). The dynamic batcher gathers requests; a batch is right-padded to its
longest row and run once with per-row `lengths`, which the model honours: a row's forecast is
read at its last real step and its final state is the one after exactly its own steps, so a
row's answer does not depend on what it was batched with. The padded share of each execution's
time steps goes to the `zooserve_padding_ratio` histogram. Rows travel through the batcher as
one object array per request (the batcher concatenates along axis 0 and never looks inside).

Stateful sequences (Triton's sequence batcher over KServe v2 request parameters): a request with
`sequence_id` (an unsigned integer or a string; 0 and "" mean none) carries one chunk of a
stream, batch 1. `sequence_start` opens (or restarts) the sequence from zero state,
`sequence_end` frees it after the chunk. Between chunks the state lives in `SequenceStore`
(one per model, all versions), replaced only after a chunk succeeds, so streaming a series in
chunks gives the forecast of sending it whole, and a refused chunk changes nothing. Chunks of
one sequence run one at a time, in arrival order. A live sequence stays on the version it
started on: its chunks say so (`SequenceCall.pinned_version`), and the routes send them there
when the request names an alias or no version, even after the alias moved or the split changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from model_registry import Batching, Manifest
from serve.batching import BatchRecord, DynamicBatcher, Reservation
from serve.errors import ServeError
from serve.golden import GoldenMismatch
from serve.metrics import EngineStats, SequenceMetrics
from serve.runtimes import Runtime
from serve.sequence_store import LiveSequence, SequenceId, SequenceStore, TooManySequences, UnknownSequence
from serve.settings import ServeSettings
from serve.engines.stateless import decode_for
from serve.v2_codec import InferRequest, encode_infer_response
from training.parity import describe_error, max_abs_error

log = logging.getLogger("zooserve.sequence")

MAX_SEQUENCE_ID = 2**64 - 1      # Triton's correlation ids are uint64 (or strings)


def artifact_names(manifest: Manifest) -> tuple[list[str], list[str]]:
    """An artifact's inputs and outputs in order: the signature's, then (sequence kind) the server's."""
    inputs = [s.name for s in manifest.signature.inputs]
    outputs = [s.name for s in manifest.signature.outputs]
    spec = manifest.state
    if spec is None:
        if manifest.kind == "sequence":
            raise RuntimeError("a sequence model's manifest must describe its state (manifest.state)")
        return inputs, outputs
    return inputs + [spec.lengths.name] + [s.name for s in spec.inputs], outputs + [s.name for s in spec.outputs]


class SequenceRuntime:
    """A sequence artifact's runtime: `step` feeds lengths and state; `run` is the public signature
    (whole histories from zero state), which the load-time golden check replays."""

    def __init__(self, runtime: Runtime, manifest: Manifest, version_dir: Path):
        spec = manifest.state
        self.runtime, self.format, self.device = runtime, runtime.format, runtime.device
        self.series_name = manifest.signature.inputs[0].name
        self.forecast_name = manifest.signature.outputs[0].name
        self.lengths_name = spec.lengths.name
        # state input name -> (per-row shape, the output that carries it on)
        self.state = {i.name: (tuple(i.shape[1:]), o.name) for i, o in zip(spec.inputs, spec.outputs, strict=True)}
        self.tolerance = max((p.tolerance for p in manifest.parity), default=1e-4)
        self._check_stateful_golden(version_dir / manifest.golden)

    def zero_state(self, rows: int) -> dict[str, np.ndarray]:
        """The initial state of `rows` rows (zeros), keyed by input name."""
        return {name: np.zeros((rows, *shape), np.float32) for name, (shape, _) in self.state.items()}

    def step(self, series: np.ndarray, lengths: np.ndarray,
             state: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """series (B, T, 1) right-padded, lengths (B,), state {input name: (B, ...)} ->
        forecast (B, K), the state after each row's `lengths` steps (keyed by input name)."""
        out = self.runtime.run({self.series_name: series, self.lengths_name: lengths, **state})
        return out[self.forecast_name], {name: out[carried] for name, (_, carried) in self.state.items()}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The public signature: whole histories (B, T, 1) from zero state -> {forecast}."""
        series = inputs[self.series_name]
        lengths = np.full(series.shape[0], series.shape[1], np.int64)
        forecast, _ = self.step(series, lengths, self.zero_state(series.shape[0]))
        return {self.forecast_name: forecast}

    def _check_stateful_golden(self, path: Path) -> None:
        """Replay the stored stateful pair (ragged rows from a random state): forecast and final state."""
        tensors = load_file(str(path))
        if f"state_input.{self.lengths_name}" not in tensors:
            raise GoldenMismatch("the golden file holds no stateful pair (state_input.*)")
        got_forecast, got_state = self.step(tensors[f"state_input.{self.series_name}"],
                                            tensors[f"state_input.{self.lengths_name}"],
                                            {name: tensors[f"state_input.{name}"] for name in self.state})
        got = {self.forecast_name: got_forecast,
               **{carried: got_state[name] for name, (_, carried) in self.state.items()}}
        for name, value in got.items():
            expected = tensors[f"state_output.{name}"]
            if value.shape != expected.shape:
                raise GoldenMismatch(f"stateful golden output {name!r} has shape {value.shape}, "
                                     f"golden {expected.shape}")
            worst = max_abs_error(expected, value)
            if not worst <= self.tolerance:
                raise GoldenMismatch(f"stateful golden output {name!r} differs by {describe_error(worst)} "
                                     f"(tolerance {self.tolerance})")


@dataclass(frozen=True, slots=True)
class SequenceControl:
    """A request's KServe v2 sequence parameters."""

    id: SequenceId
    start: bool     # open (or restart) the sequence from zero state
    end: bool       # free it after this request


def parse_control(parameters: dict) -> SequenceControl | None:
    """The sequence parameters of a request, None when it is not part of a sequence; 400 when malformed."""
    raw = parameters.get("sequence_id")
    flags = {name: parameters.get(name, False) for name in ("sequence_start", "sequence_end")}
    for name, value in flags.items():
        if type(value) is not bool:
            raise ServeError(400, f"parameters.{name} must be a boolean, got {type(value).__name__}")
    if raw is None or raw == "" or (type(raw) is int and raw == 0):
        if flags["sequence_start"] or flags["sequence_end"]:
            raise ServeError(400, "parameters.sequence_start/sequence_end need a parameters.sequence_id")
        return None
    if type(raw) is int:
        if not 0 < raw <= MAX_SEQUENCE_ID:
            raise ServeError(400, f"parameters.sequence_id must be an unsigned 64-bit integer or a string, got {raw}")
    elif type(raw) is not str:
        raise ServeError(400, f"parameters.sequence_id must be an unsigned integer or a string, "
                              f"got {type(raw).__name__}")
    return SequenceControl(raw, flags["sequence_start"], flags["sequence_end"])


@dataclass(slots=True)
class _Row:
    """One history (or chunk) on its way through the batcher."""

    series: np.ndarray                      # (T,) float32
    state: dict[str, np.ndarray] | None     # per-row initial state of a sequence chunk; None = zeros
    carry: bool                             # return the state after the row (sequence chunks)


def _rows(rows: list[_Row]) -> np.ndarray:
    packed = np.empty(len(rows), dtype=object)
    for i, row in enumerate(rows):
        packed[i] = row
    return packed


class SequenceEngine:
    api = "v2"
    cancellable = False

    def __init__(self, name: str, version: int, manifest: Manifest, runtime: SequenceRuntime,
                 batching: Batching, store: SequenceStore, settings: ServeSettings, metrics: SequenceMetrics):
        self.name, self.version, self.manifest = name, version, manifest
        self.runtime, self.store, self.metrics = runtime, store, metrics
        self.max_len = settings.sequence_max_len
        self.batcher = DynamicBatcher(self._run_batch, batching.max_batch_size, batching.max_queue_delay_ms,
                                      batching.max_queue_size, on_batch=self._record,
                                      max_queue_wait_ms=batching.max_queue_wait_ms, name=f"{name}-{version}")
        self._padding = 0.0        # padded share of the batch just run, for _record
        self._reaper: asyncio.Task | None = None
        # read at scrape, never on the request path
        metrics.queue_depth.set_function(lambda: self.batcher.queue_depth)
        metrics.sequences_live.set_function(lambda: store.counts(version)[0])
        metrics.sequence_state_bytes.set_function(lambda: store.counts(version)[1])
        metrics.sequences_expired.set_function(lambda: store.expired(version))

    def start(self) -> None:
        """Start the batcher and the idle-sequence reaper on the running loop."""
        self.batcher.start()
        self._reaper = asyncio.get_running_loop().create_task(self._expire_forever())

    def bind(self, body: bytes, header_length: str | None, settings: ServeSettings,
             batching: Batching) -> "SequenceCall":
        request = decode_for(self.manifest, body, header_length, settings, batching)
        return SequenceCall(self, request, parse_control(request.parameters))

    def admit(self, deadline: float) -> Reservation:
        return self.batcher.admit(deadline)

    def reconfigure(self, batching: Batching) -> None:
        self.batcher.reconfigure(batching.max_batch_size, batching.max_queue_delay_ms, batching.max_queue_size,
                                batching.max_queue_wait_ms)

    async def infer(self, inputs: dict[str, np.ndarray], rows: int, deadline: float | None,
                    control: SequenceControl | None = None) -> dict[str, np.ndarray]:
        """Forecasts for a batch of whole histories, or (with `control`) for one chunk of a sequence."""
        series = self._checked(inputs[self.runtime.series_name], control)
        if control is not None:
            return await self._chunk(control, series, deadline)
        out = await self.batcher.submit({"rows": _rows([_Row(s[:, 0], None, False) for s in series])}, rows, deadline)
        return {self.runtime.forecast_name: out["forecast"]}

    async def _chunk(self, control: SequenceControl, series: np.ndarray, deadline: float | None) -> dict:
        seq = None if control.start else self._live(control.id)
        if control.start:
            try:
                self.store.check_room(control.id)
            except TooManySequences as exc:
                raise ServeError(429, str(exc), {"Retry-After": "1"}) from None
        async with (seq.lock if seq is not None else contextlib.nullcontext()):
            if seq is not None and not self.store.is_live(seq):
                raise ServeError(400, f"sequence {control.id!r} was restarted, ended or expired while this "
                                      f"request waited; its first request must set sequence_start")
            row = _Row(series[0, :, 0], seq.state if seq is not None else None, True)
            out = await self.batcher.submit({"rows": _rows([row])}, 1, deadline)
            steps = series.shape[1]
            try:
                if seq is None:
                    seq = self.store.start(control.id, self.version, out["state"][0], steps)
                else:
                    self.store.update(seq, out["state"][0], steps)
            except TooManySequences as exc:
                raise ServeError(429, str(exc), {"Retry-After": "1"}) from None
            if control.end:
                self.store.end(seq)
        return {self.runtime.forecast_name: out["forecast"]}

    def _live(self, sequence_id: SequenceId) -> LiveSequence:
        try:
            return self.store.get(sequence_id)
        except UnknownSequence as exc:
            raise ServeError(400, str(exc)) from None

    def _checked(self, series: np.ndarray, control: SequenceControl | None) -> np.ndarray:
        """Refuse what the model must not see (400 naming the problem), before anything is queued."""
        name, steps = self.runtime.series_name, series.shape[1]
        if steps == 0:
            raise ServeError(400, f"input '{name}' is empty (0 time steps); send at least one value")
        if steps > self.max_len:
            raise ServeError(400, f"input '{name}' has {steps} time steps; one request takes at most "
                                  f"{self.max_len} (ZOOSERVE_SEQUENCE_MAX_LEN)")
        if not np.isfinite(series).all():   # never let NaN/Inf into a carried state
            raise ServeError(400, f"input '{name}' contains NaN or Inf")
        if control is not None and series.shape[0] != 1:
            raise ServeError(400, f"input '{name}': a request of sequence {control.id!r} carries one series "
                                  f"(batch 1), got batch {series.shape[0]}")
        return series

    def _run_batch(self, joined: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Right-pad the rows to the longest, run once, hand back each row's forecast (and state)."""
        rows: np.ndarray = joined["rows"]
        n = len(rows)
        lengths = np.fromiter((len(r.series) for r in rows), np.int64, n)          # (N,)
        series = np.zeros((n, int(lengths.max()), 1), np.float32)                  # (N, T, 1)
        state = self.runtime.zero_state(n)
        for i, row in enumerate(rows):
            series[i, : lengths[i], 0] = row.series
            if row.state is not None:
                for name, value in row.state.items():
                    state[name][i] = value
        forecast, new = self.runtime.step(series, lengths, state)
        self._padding = 1.0 - float(lengths.sum()) / series.shape[0] / series.shape[1]
        carried = np.empty(n, dtype=object)
        for i, row in enumerate(rows):
            if row.carry:
                carried[i] = {name: value[i].copy() for name, value in new.items()}
        return {"forecast": forecast, "state": carried}

    def _record(self, batch: BatchRecord) -> None:
        self.metrics.batch_done(batch.rows, batch.compute_s, batch.queue_waits)
        self.metrics.batch_padded(self._padding)

    async def _expire_forever(self) -> None:
        """Free this version's idle sequences (a request for one also finds it expired, whatever this lags)."""
        interval = min(1.0, self.store.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(interval)
            freed = self.store.expire(self.version)
            if freed:
                log.debug("%s/%s: %d idle sequences expired", self.name, self.version, len(freed))

    def stats(self) -> EngineStats:
        """Cumulative counters for the statistics endpoint."""
        return self.metrics.stats

    @property
    def in_flight(self) -> int:
        """Requests queued or running."""
        return self.batcher.in_flight

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Stop the reaper, drain the batcher, free this version's sequences."""
        if self._reaper is not None:
            self._reaper.cancel()
        await self.batcher.close(drain_timeout_s)
        dropped = self.store.drop_version(self.version)
        if dropped:
            log.info("%s/%s unloaded with %d live sequences; they are gone", self.name, self.version, dropped)


@dataclass(frozen=True, slots=True)
class SequenceCall:
    """A decoded v2 request to a sequence model with its sequence control (None: whole histories)."""

    engine: SequenceEngine
    request: InferRequest
    control: SequenceControl | None

    @property
    def parameters(self) -> dict:
        return self.request.parameters

    @property
    def shadowable(self) -> bool:
        return self.control is None       # a chunk moves its sequence's state: it runs once

    def pinned_version(self) -> tuple[int, str] | None:
        """A chunk of a live sequence runs on the version the sequence started on (Triton refuses a
        chunk at a scheduler that never saw the sequence's start); a start goes where routing says."""
        if self.control is None or self.control.start:
            return None
        try:
            seq = self.engine.store.get(self.control.id)
        except UnknownSequence as exc:
            raise ServeError(400, str(exc)) from None
        return seq.version, f"sequence {self.control.id!r}"

    def bound_to(self, engine: SequenceEngine) -> "SequenceCall":
        return replace(self, engine=engine)

    async def run(self, deadline: float) -> dict[str, np.ndarray]:
        return await self.engine.infer(self.request.inputs, self.request.batch_size, deadline, self.control)

    def response(self, model: str, version: str, outputs: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
        datatypes = {s.name: s.datatype for s in self.engine.manifest.signature.outputs}
        return encode_infer_response(model, version, self.request.id, outputs, self.request.outputs, datatypes,
                                     on_nonfinite=self.engine.metrics.nonfinite_answer)
