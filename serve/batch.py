"""Batch jobs in the OpenAI Batch file format, run in process through the server's own routes.

    zooserve batch --registry DIR -i requests.jsonl -o results.jsonl [--lines 0:1000]

Each input line is `{"custom_id", "method", "url", "body"}`, where `url` is any inference route of
the server: `POST /v2/models/{m}[/versions/{v}]/infer`, `POST /v1/completions`,
`POST /v1/chat/completions`, `GET /v1/images/{m}`. The job builds the ASGI app `zooserve serve`
runs, loads only the models its input file names (the whole file, so that every shard serves the
same models), and calls the app in process (no socket), so every route, validation and error path is
the server's own; up to `window` lines are in flight at once so that the dynamic batchers and token
engines form full batches. Every input line (blank lines aside)
gets one output line, in input order:

    {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}
    {"id", "custom_id", "response": null, "error": {"code", "message"}}

The second form is for lines that could not be sent: malformed JSON, a missing, non-string or
duplicate `custom_id` (the first line with an id keeps it; a later duplicate's record has
`custom_id: null` so that every id appears once), a method or url that is not an inference route,
a POST without an object body, or `stream: true`. A response that is not JSON (a v2 answer with
binary outputs, an image) is embedded as `{"content_type", "base64"}`.

Determinism (a rerun, a resumed run and merged shards write the same bytes):
- `id` is `batch_req_` + the first 24 hex digits of sha256("custom_id:" + custom_id), `request_id` is
  `req_` + the next 24; a line without a usable custom_id hashes "line:<n>" (its 0-based line) instead.
  The request id is the call's `x-request-id` (the server answers and logs with it), so a refusal
  in the job's log names the record it belongs to.
- A request that samples without a seed gets `seed = int(sha256("seed:" + custom_id)[:16 hex], 16) >> 1`
  (63 bits), so its answer is the same on every run; one with its own seed keeps it. That is a
  `/v1/completions` or `/v1/chat/completions` body with temperature absent or > 0 (`seed` field),
  `GET /v1/images/{m}` (`seed` query parameter), and a v2 request to a sampler model, kind `sample` or
  `denoise` (a `seed` INT64 [1] input).
- A 200 JSON body from a `/v1` route gets `id` = its own prefix + "-" + sha256("body:" + custom_id)[:24]
  (`cmpl-...`, `chatcmpl-...`) and `created` = the job's `created` (default 0; pass the same
  `--created` to every shard and rerun of one job), where the server would put a random id and the
  clock. Classifier rows do not depend on the batch they ran in, token models and samplers draw
  from per-request seeded generators; outputs were byte-identical across windows (checked: classifier
  1 to 256, decoder and Mamba with logprobs 1, 7 and 64, GAN and diffusion 1 and the default).

Resume: records are appended in input order, flushed as soon as every earlier line is written, and
fsynced in a thread (one at a time, at most every FSYNC_INTERVAL_S, and at the end), so a killed job
(even SIGKILL) leaves a prefix of the records it would write, perhaps with a torn last line. A rerun cuts
the torn line, checks that the k complete records carry the custom_ids of the first k lines of the
range (else it refuses: the output belongs to another input), skips those lines and appends the rest.
A write or fsync that fails (a full disk: ENOSPC, EDQUOT; EIO) stops the workers and ends the job with a
BatchError naming the file, the OS's reason and the records written (`zooserve batch` exits 2); nothing is
written after the failure, so the file is such a prefix too and a rerun, once there is room, resumes.

Sharding: `lines=(start, stop)` processes physical lines [start, stop) (0-based, as Python's slices, so
that shards a:b and b:c meet; messages name lines from 1, as editors do: lines 0:10 are lines 1 to 10).
A shard reads the lines before `start` only for their custom_ids, so duplicates are judged as in one whole run, and
concatenating the shards' outputs in range order gives exactly the whole run's output.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import itertools
import logging
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qsl

import orjson

from model_registry import Registry, RegistryError
from serve.settings import ServeSettings

log = logging.getLogger("zooserve.batch")

V2_INFER = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/[^/]+)?/infer")
IMAGES = re.compile(r"/v1/images/(?P<model>[^/]+)")
OPENAI_TEXT = {"/v1/completions", "/v1/chat/completions"}
SAMPLING_KINDS = ("sample", "denoise")   # v2 models whose answers follow a `seed` input
LINE_KEYS = {"custom_id", "method", "url", "body"}
# a cheap scan for the models a file mentions: the v2 and images urls' model, the OpenAI bodies' `model`
MODEL_IN_URL = re.compile(rb'"url"\s*:\s*"/v[12]/(?:models|images)/([^"/?\\]+)')
MODEL_IN_BODY = re.compile(rb'"model"\s*:\s*"([^"\\]+)"')
ROUTES = ("POST /v2/models/{m}[/versions/{v}]/infer, POST /v1/completions, POST /v1/chat/completions, "
          "GET /v1/images/{m}")
RETRIES_429 = 50          # a full queue (429) is retried, backing off 10 ms doubling to 1 s, this many times
LOAD_TIMEOUT_S = 600.0
FSYNC_INTERVAL_S = 0.1    # group commit: a machine crash loses at most this much of the records (recomputed)


class BatchError(Exception):
    """The job cannot run (its output belongs to another input, a bad range: nothing was written) or
    cannot go on (its output cannot be written: the records written stay, and a rerun resumes)."""


@dataclass
class Request:
    """One input line, checked: a request to send, or the error record it becomes."""

    number: int                          # 0-based line of the input file (messages say number + 1)
    custom_id: str | None                # None when the line has no usable, unique custom_id
    method: str = ""
    path: str = ""
    query: bytes = b""
    body: bytes = b""                    # JSON, as the route will read it
    error: tuple[str, str] | None = None  # (code, message) when the line cannot be sent

    @property
    def key(self) -> str:
        """What the record's ids derive from (the two forms cannot collide)."""
        return f"custom_id:{self.custom_id}" if self.custom_id is not None else f"line:{self.number}"


@dataclass
class BatchSummary:
    """What a job did; `statuses` counts every record of the output, earlier runs' included."""

    records: int = 0                     # records in the output for this range
    resumed: int = 0                     # of them, written by an earlier run
    statuses: Counter = field(default_factory=Counter)   # status code -> records; "error" for error records
    startup_s: float = 0.0               # building the app and loading the models
    run_s: float = 0.0                   # answering the lines
    window: int = 0                      # requests that were in flight at most


# ---- lines ------------------------------------------------------------------------------------

def parse_range(text: str | None) -> tuple[int, int | None]:
    """`"a:b"`, `"a:"`, `":b"` or None -> (start, stop), 0-based physical lines, stop exclusive."""
    if not text:
        return 0, None
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        lo, hi = int(start or 0), (int(stop) if stop else None)
    except ValueError:
        raise BatchError(f"--lines takes START:STOP, 0-based with STOP exclusive (as Python's slices: the first "
                         f"10 lines, lines 1 to 10 in an editor and in this job's messages, are 0:10), "
                         f"got {text!r}") from None
    if lo < 0 or (hi is not None and hi < lo):
        raise BatchError(f"--lines {text!r} is not a range of lines")
    return lo, hi


def derived_seed(custom_id: str) -> int:
    """The seed a sampling request without one gets: 63 bits of sha256("seed:" + custom_id)."""
    return int(_digest("seed", custom_id, 16), 16) >> 1


def _digest(purpose: str, key: str, chars: int = 24) -> str:
    return hashlib.sha256(f"{purpose}:{key}".encode()).hexdigest()[:chars]


def parse_line(raw: bytes, number: int, seen: dict[str, int], kinds: dict[str, str] | None = None) -> Request:
    """Check one line; `seen` (custom_id -> first line) gets its custom_id when the line has one.
    `kinds` (model -> kind) says which v2 models sample, so that they get a derived seed."""
    at = number + 1                      # messages count lines from 1, as editors do
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Request(number, None, error=("invalid_json", f"line {at} is not JSON: {exc}"))
    if not isinstance(doc, dict):
        return Request(number, None, error=("invalid_json", f"line {at} is not a JSON object"))
    custom_id = doc.get("custom_id")
    if custom_id is None:
        return Request(number, None, error=("missing_custom_id", f"line {at} has no custom_id"))
    if not isinstance(custom_id, str) or not custom_id:
        return Request(number, None, error=("invalid_custom_id", f"line {at}: custom_id must be a "
                                                                 f"non-empty string, got {custom_id!r}"))
    if custom_id in seen:
        return Request(number, None, error=("duplicate_custom_id", f"line {at}: custom_id {custom_id!r} "
                                                                   f"was already used on line {seen[custom_id] + 1}"))
    seen[custom_id] = number
    return _request(raw, doc, Request(number, custom_id), kinds or {})


def claim(raw: bytes, number: int, seen: dict[str, int]) -> str | None:
    """The custom_id `parse_line` would give this line (None where it gives none), claimed in `seen`."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    custom_id = doc.get("custom_id") if isinstance(doc, dict) else None
    if not isinstance(custom_id, str) or not custom_id or custom_id in seen:
        return None
    seen[custom_id] = number
    return custom_id


def _request(raw: bytes, doc: dict, req: Request, kinds: dict[str, str]) -> Request:
    """Fill method, path, query and body, or the error, from a line with a good custom_id."""
    method, url, body = doc.get("method"), doc.get("url"), doc.get("body")
    if method not in ("GET", "POST"):
        req.error = ("invalid_method", f"method {method!r} is not supported; routes: {ROUTES}")
        return req
    path, _, query = url.partition("?") if isinstance(url, str) else ("", "", "")
    v2 = V2_INFER.fullmatch(path) if method == "POST" else None
    images = IMAGES.fullmatch(path) if method == "GET" else None      # the images route takes GET only
    if not (v2 or images or (method == "POST" and path in OPENAI_TEXT)):
        req.error = ("invalid_url", f"{method} {url!r} is not an inference route; routes: {ROUTES}")
        return req
    if method == "POST" and not isinstance(body, dict):
        req.error = ("invalid_body", "a POST line needs a JSON object `body`")
        return req
    if method == "GET" and body:
        req.error = ("invalid_body", "a GET line takes no body (put parameters in the url's query)")
        return req
    req.method, req.path = method, path
    if path in OPENAI_TEXT:
        if body.get("stream"):
            req.error = ("streaming_unsupported", "stream: true is not supported in batch jobs")
            return req
        if body.get("seed") is None and body.get("temperature", 1.0) != 0:
            body = {**body, "seed": derived_seed(req.custom_id)}
        req.body = orjson.dumps(body)
    elif images:
        if method == "GET" and not any(k == "seed" for k, _ in parse_qsl(query, keep_blank_values=True)):
            query = f"{query}&seed={derived_seed(req.custom_id)}" if query else f"seed={derived_seed(req.custom_id)}"
        req.body = b""
    else:
        inputs = body.get("inputs")
        if kinds.get(v2["model"]) in SAMPLING_KINDS and isinstance(inputs, list) and \
                not any(isinstance(i, dict) and i.get("name") == "seed" for i in inputs):
            seed = {"name": "seed", "shape": [1], "datatype": "INT64", "data": [derived_seed(req.custom_id)]}
            req.body = orjson.dumps({**body, "inputs": [*inputs, seed]})
        else:
            req.body = _raw_body(raw, doc) or orjson.dumps(body)
    req.query = query.encode()
    return req


def _raw_body(raw: bytes, doc: dict) -> bytes | None:
    """The body's own JSON text, sliced out of the line, when that is certain to be exact: the line
    has only the four keys, `body` last and the others strings, and "body" occurs once (so it is the
    key: a string's inner quotes are escaped). Saves re-encoding every float of a tensor."""
    if len(doc) > 4 or next(reversed(doc)) != "body":
        return None
    for k, v in doc.items():
        if k != "body" and (k not in LINE_KEYS or type(v) is not str):
            return None
    at = raw.find(b'"body"')
    if at < 0 or raw.find(b'"body"', at + 6) >= 0:
        return None
    colon = raw.find(b":", at + 6)
    end = raw.rfind(b"}")                # the line's own closing brace: only whitespace follows it
    if colon < 0 or raw[at + 6:colon].strip() or end <= colon:
        return None
    return raw[colon + 1:end]


def _lines(path: Path, stop: int | None) -> Iterator[tuple[int, bytes]]:
    """(0-based line number, raw line) for the non-blank lines before `stop`."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f):
            if stop is not None and number >= stop:
                return
            if not raw.isspace():
                yield number, raw


def scan(path: Path, start: int, stop: int | None) -> tuple[int, set[str]]:
    """(lines in [start, stop) that get a record, names of the models the whole file mentions).
    Every shard of a file loads the same models, so that answers which list the served models
    (an unknown model's 404) are the same whichever shard writes them."""
    count, names = 0, set()
    with open(path, "rb") as f:
        for number, raw in enumerate(f):
            if not raw.isspace() and start <= number and (stop is None or number < stop):
                count += 1
            names.update(MODEL_IN_URL.findall(raw))
            names.update(m.split(b"@")[0].split(b":")[0] for m in MODEL_IN_BODY.findall(raw))
    return count, {n.decode("utf-8", "replace") for n in names}


def requests(path: Path, start: int, stop: int | None, done: list[str | None],
             kinds: dict[str, str]) -> Iterator[Request]:
    """The range's lines in order, after checking the first len(done) against the records already
    written (and skipping them); the lines before `start` only claim their custom_ids."""
    seen: dict[str, int] = {}
    index = 0
    for number, raw in _lines(path, stop):
        if number < start:
            claim(raw, number, seen)
        elif index < len(done):
            custom_id = claim(raw, number, seen)
            if custom_id != done[index]:
                raise BatchError(f"the output's record {index + 1} has custom_id {done[index]!r} but line {number + 1} "
                                 f"has {custom_id!r}: the output file was written for another input or range; "
                                 "use a new output file")
            index += 1
        else:
            yield parse_line(raw, number, seen, kinds)


# ---- records ----------------------------------------------------------------------------------

def record_ids(key: str) -> tuple[str, str]:
    """(record id, request id) of `Request.key`: 24 + 24 hex digits of sha256(key)."""
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"batch_req_{digest[:24]}", f"req_{digest[24:48]}"


def error_record(req: Request, code: str, message: str) -> bytes:
    """A line that was not sent."""
    return orjson.dumps({"id": record_ids(req.key)[0], "custom_id": req.custom_id, "response": None,
                         "error": {"code": code, "message": message}}) + b"\n"


def response_record(req: Request, status: int, content_type: bytes, body: bytes, created: int) -> bytes:
    """A line the server answered, whatever the status; the JSON body is spliced in as it came."""
    if not content_type.startswith(b"application/json"):
        body = orjson.dumps({"content_type": content_type.decode("latin-1"),
                             "base64": base64.b64encode(body).decode()})
    elif status == 200 and req.path.startswith("/v1/"):
        body = _stable_ids(body, req.custom_id, created)
    elif b"\n" in body:
        body = orjson.dumps(orjson.loads(body))
    record_id, request_id = record_ids(req.key)
    return b"".join((b'{"id":"', record_id.encode(), b'","custom_id":', orjson.dumps(req.custom_id),
                     b',"response":{"status_code":', str(status).encode(), b',"request_id":"', request_id.encode(),
                     b'","body":', body, b'},"error":null}\n'))


def _stable_ids(body: bytes, custom_id: str, created: int) -> bytes:
    """The response's random id and wall-clock `created` -> derived from the custom_id and the job."""
    doc = orjson.loads(body)
    if isinstance(doc, dict):
        if isinstance(doc.get("id"), str):
            prefix = doc["id"].split("-", 1)[0] if "-" in doc["id"] else "batch"
            doc["id"] = f"{prefix}-{_digest('body', custom_id)}"
        if "created" in doc:
            doc["created"] = created
    return orjson.dumps(doc)


def read_done(path: Path) -> tuple[list[dict], int]:
    """(the complete records of an earlier run, the byte length they take); a torn last line is
    not counted (`cut_torn_line` removes it once the records are known to match the input)."""
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    try:
        return [orjson.loads(line) for line in data[:end].splitlines()], end
    except orjson.JSONDecodeError as exc:
        raise BatchError(f"{path} holds a line that is not JSON ({exc}); it is not a batch output") from None


def cut_torn_line(path: Path, end: int) -> None:
    """Truncate `path` to `end` bytes (what a killed job left after its last complete record)."""
    if path.exists() and path.stat().st_size > end:
        log.warning("cutting a torn last line (%d bytes) off %s", path.stat().st_size - end, path)
        with open(path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())


def _status(record: dict) -> int | str:
    return "error" if record.get("response") is None else record["response"]["status_code"]


# ---- the app, in process ----------------------------------------------------------------------

async def call_app(app, req: Request, request_id: str | None = None) -> tuple[int, bytes, bytes]:
    """Send one request through the ASGI app, with `request_id` as its x-request-id (the server
    answers and logs with it); (status, content-type, body)."""
    headers = [(b"host", b"batch"), (b"content-length", str(len(req.body)).encode())]
    if request_id is not None:
        headers.append((b"x-request-id", request_id.encode()))
    if req.body:
        headers.append((b"content-type", b"application/json"))
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": req.method, "scheme": "http", "path": req.path, "raw_path": req.path.encode(),
             "query_string": req.query, "root_path": "", "headers": headers, "client": None, "server": None}
    status, content_type, chunks = 500, b"", []
    state = {"body_sent": False, "finished": None}

    async def receive() -> dict:
        if not state["body_sent"]:
            state["body_sent"] = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        # a client that stays connected until the answer is complete (routes watch for disconnects)
        state["finished"] = state["finished"] or asyncio.get_running_loop().create_future()
        await state["finished"]
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status, content_type
        if message["type"] == "http.response.start":
            status = message["status"]
            content_type = next((v for k, v in message.get("headers", ()) if k.lower() == b"content-type"), b"")
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await app(scope, receive, send)
    finally:
        if state["finished"] is not None and not state["finished"].done():
            state["finished"].set_result(None)
    return status, content_type, b"".join(chunks)


def model_configs(registry: Registry, names: set[str]) -> dict:
    """name -> ModelConfig for the registry's models among `names`."""
    configs = {}
    for name in registry.models():
        if name in names:
            try:
                configs[name] = registry.model_config(name)
            except RegistryError as exc:         # its lines get the route's answer
                log.warning("model %s: %s", name, exc)
    return configs


def default_window(configs: dict, settings: ServeSettings) -> int:
    """Twice the largest batch one of the job's models forms (one batch queues while another runs),
    64..1024: `max_batch_size`, or `max_num_seqs` for token models."""
    sizes = [settings.max_num_seqs if cfg.kind == "tokens" else cfg.batching.max_batch_size
             for cfg in configs.values()]
    return min(1024, max(64, 2 * max(sizes, default=32)))


async def _started(app) -> None:
    """Until the server's start-up load has finished."""
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while not app.state.repository.loaded:
        if time.monotonic() > deadline:
            raise BatchError(f"the server did not start in {LOAD_TIMEOUT_S:.0f} s (see the log)")
        await asyncio.sleep(0.005)


class OrderedWriter:
    """Appends records in input order: a record waits until every earlier one is written. Each
    burst is one write; fsync runs in a thread, one at a time, at most every FSYNC_INTERVAL_S
    (back-to-back fsyncs cost the event loop ~15 us per record in thread hand-offs).

    The file is unbuffered, so that after a failed write (a full disk) it holds exactly the bytes the
    OS took, a prefix of the records; the first failure is kept in `error`, nothing more is written,
    and `put` and `wait_until` raise it, which stops the workers."""

    def __init__(self, path: Path, progress):
        self.file = open(path, "ab", buffering=0)
        self.next = 0                    # sequence number of the next record to write
        self.written = 0                 # records wholly in the file (this run's)
        self.error: OSError | None = None
        self.ready: dict[int, bytes] = {}
        self.progress = progress
        self.statuses: Counter = Counter()
        self._scheduled = False
        self._closing = False
        self._dirty = False              # written since the last fsync began
        self._fsync: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_sync = 0.0
        self._waiters: list[asyncio.Future] = []

    def put(self, seq: int, record: bytes, status: int | str) -> None:
        if self.error is not None:
            raise self.error
        self.ready[seq] = record
        self.statuses[status] += 1
        if seq == self.next and not self._scheduled:    # one write per loop pass, however many finished
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._write)

    def _write(self) -> None:
        self._scheduled = False
        chunks = []
        while self.next in self.ready and self.error is None:
            chunks.append(self.ready.pop(self.next))
            self.next += 1
        if not chunks:
            return
        data, done = memoryview(b"".join(chunks)), len(chunks)
        try:
            while data:                  # an unbuffered write may take only part (the disk just filled)
                data = data[self.file.write(data):]
        except OSError as exc:
            sent = len(data.obj) - len(data)
            done = sum(end <= sent for end in itertools.accumulate(map(len, chunks)))   # the whole records
            self._fail(exc)
        self.written += done
        self._dirty = True
        self._sync()
        self.progress.update(done)
        self._wake()

    def _fail(self, exc: OSError) -> None:
        if self.error is None:           # the first failure is the cause; later ones follow from it
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _sync(self) -> None:
        """Start an fsync of what was written, unless one runs or one began under FSYNC_INTERVAL_S ago."""
        if self._fsync is not None or self._timer is not None or not self._dirty or self._closing:
            return
        loop = asyncio.get_running_loop()
        wait = self._last_sync + FSYNC_INTERVAL_S - loop.time()
        if wait > 0:
            self._timer = loop.call_later(wait, self._timer_fired)
            return
        self._dirty, self._last_sync = False, loop.time()
        self._fsync = loop.run_in_executor(None, os.fsync, self.file.fileno())
        self._fsync.add_done_callback(self._synced)

    def _timer_fired(self) -> None:
        self._timer = None
        self._sync()

    def _synced(self, future: asyncio.Future) -> None:
        self._fsync = None
        if future.exception() is not None:   # EIO, or ENOSPC where the fs allocates at writeback
            self._fail(future.exception())
        else:
            self._sync()

    async def wait_until(self, seq: int) -> None:
        """Until every record before `seq` is written; raises the write error once there is one."""
        while self.error is None and self.next < seq:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        if self.error is not None:
            raise self.error

    async def close(self) -> None:
        """Fsync what was written (also after a failure: the prefix is worth keeping) and close; a
        failure lands in `error`, as the workers' would."""
        self._closing = True             # no fsync thread starts on a file about to be closed
        if self._timer is not None:
            self._timer.cancel()
        if self._fsync is not None:
            await asyncio.wait([self._fsync])    # `_synced` takes its error
        try:
            os.fsync(self.file.fileno())
        except OSError as exc:
            self._fail(exc)
        finally:
            self.file.close()


async def _answer(app, req: Request, created: int) -> tuple[bytes, int | str]:
    """(record, status) for one request; a full queue (429) is retried."""
    if req.error is not None:
        return error_record(req, *req.error), "error"
    request_id = record_ids(req.key)[1]     # the record's, sent as the call's x-request-id
    for attempt in range(RETRIES_429 + 1):
        try:
            status, content_type, body = await call_app(app, req, request_id)
        except Exception as exc:  # noqa: BLE001 - a route that raised: this line's error, the job goes on
            log.exception("line %d (%s) failed", req.number + 1, req.custom_id)
            return error_record(req, "internal_error", f"{type(exc).__name__}: {exc}"), "error"
        if status != 429 or attempt == RETRIES_429:
            break
        await asyncio.sleep(min(1.0, 0.01 * 2 ** attempt))
    return response_record(req, status, content_type, body, created), status


def _resume(settings: ServeSettings, input_path: Path, output_path: Path, lines: tuple[int, int | None]):
    """(summary so far, configs of the models the file names, the lines left to answer or None):
    checks what an earlier run wrote against the input, then cuts its torn last line."""
    start, stop = lines
    if not input_path.is_file():
        raise BatchError(f"input {input_path} is not a file")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    total, named = scan(input_path, start, stop)
    done_records, done_bytes = read_done(output_path)
    if len(done_records) > total:
        shard = f"{start}:{'' if stop is None else stop}"
        raise BatchError(f"{output_path} has {len(done_records)} records but lines {shard} of {input_path} make "
                         f"{total}: it was written for another input or range")
    summary = BatchSummary(records=total, resumed=len(done_records),
                           statuses=Counter(_status(r) for r in done_records))
    configs = model_configs(Registry(settings.registry), named)
    todo = requests(input_path, start, stop, [r.get("custom_id") for r in done_records],
                    {name: cfg.kind for name, cfg in configs.items()})
    first = next(todo, None)             # checks every record already written against its line
    cut_torn_line(output_path, done_bytes)
    output_path.touch()
    return summary, configs, None if first is None else itertools.chain([first], todo)


async def _answer_all(app, todo: Iterator[Request], output_path: Path, summary: BatchSummary, created: int,
                      progress: bool) -> None:
    """`summary.window` workers take lines in order from `todo` and hand records to the writer."""
    from tqdm import tqdm

    window = summary.window
    bar = tqdm(total=summary.records, initial=summary.resumed, unit="req", disable=not progress, file=sys.stderr,
               desc=output_path.name)
    writer, taken = OrderedWriter(output_path, bar), itertools.count()

    async def worker() -> None:
        for req in todo:                 # one shared iterator: each line is taken once, in order
            seq = next(taken)
            record, status = await _answer(app, req, created)
            writer.put(seq, record, status)
            await writer.wait_until(seq + 1 - 4 * window)   # bound the records held back for order

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(window):
                group.create_task(worker())
    except ExceptionGroup as failed:     # the workers stop by raising the writer's error: not a bug
        rest = failed.split(lambda exc: exc is writer.error)[1]
        if rest is not None:
            raise rest
    finally:
        await writer.close()
        bar.close()
        summary.statuses.update(writer.statuses)
    if writer.error is not None:
        exc, kept = writer.error, summary.resumed + writer.written
        raise BatchError(f"cannot write {output_path}: {exc.strerror or exc} ({errno.errorcode.get(exc.errno, '?')}); "
                         f"{kept} of {summary.records} records are in it, and once that is fixed, rerunning the same "
                         "command resumes after them") from None


async def run_batch(settings: ServeSettings, input_path: Path, output_path: Path,
                    lines: tuple[int, int | None] = (0, None), window: int | None = None, created: int = 0,
                    progress: bool = True) -> BatchSummary:
    """Answer lines [start, stop) of `input_path` into `output_path`, resuming what is already there."""
    from serve.app import create_app

    began = time.perf_counter()
    if window is not None and window < 1:
        raise BatchError(f"window must be at least 1, got {window}")
    try:
        summary, configs, todo = _resume(settings, input_path, output_path, lines)
    except OSError as exc:             # the output's folder cannot be made, a file cannot be read ...
        raise BatchError(f"cannot prepare the job: {exc.filename or output_path}: "
                         f"{exc.strerror or exc}; nothing was written") from None
    if todo is None:
        return summary
    app = create_app(settings.model_copy(update={"models": sorted(configs)}))
    async with app.app.router.lifespan_context(app.app):
        await _started(app)
        summary.window = window or default_window(configs, settings)
        summary.startup_s = time.perf_counter() - began
        await _answer_all(app, todo, output_path, summary, created, progress)
        summary.run_s = time.perf_counter() - began - summary.startup_s
    return summary


def run(settings: ServeSettings, input_path: Path, output_path: Path, lines: tuple[int, int | None] = (0, None),
        window: int | None = None, created: int = 0, progress: bool = True) -> BatchSummary:
    """`run_batch` on a fresh event loop (uvloop when installed, as uvicorn picks)."""
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(run_batch(settings, input_path, output_path, lines, window, created, progress))


__all__ = ["BatchError", "BatchSummary", "Request", "call_app", "claim", "cut_torn_line", "default_window",
           "derived_seed", "model_configs", "parse_line", "parse_range", "read_done", "record_ids", "run",
           "run_batch", "scan"]
