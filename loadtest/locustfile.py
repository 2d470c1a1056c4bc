"""Locust load test for zooserve: one user class per model family served.

    loadtest/run.sh [HOST_URL] [USERS] [DURATION]          # headless, bounded, CSV under loadtest/results/
    .venv/bin/locust -f loadtest/locustfile.py --host http://127.0.0.1:8000     # web UI

Families so far:
  ClassifierUser        KServe v2 infer on the digit classifiers, a real sklearn digit per request.
  StreamingTokenUser    OpenAI /v1/completions with stream: true on the token models, three entries
                        per model (see "Streaming entries" below).
  ForecastUser          KServe v2 infer on the recurrent forecasters: whole co2 histories of random
                        lengths (batched by padding on the server), and a series streamed in chunks
                        as a stateful sequence (sequence_id, sequence_start, sequence_end). Models
                        the server does not serve are left out (checked once per user).
  GanUser, VaeUser, DiffusionUser   KServe v2 infer on the samplers: seeded labels -> images (the
                        VAE also reconstructs and encodes real digits; diffusion mixes DDIM and DDPM
                        requests of different lengths, which the denoise engine steps together).
                        A sampler the server does not serve stops its user (checked once).

Adding a family (token streaming, generators, ...) = one more `ZooserveUser` subclass with its own
`weight`, environment knobs and `@task`s; checks go through `ZooserveUser.post_json`, which fails
a request on any non-200 (429 included, with the server's message and Retry-After) and on a body
that is not JSON or fails the family's `check`. A family with data to load (sklearn digits, the
co2 series) loads it in a `prepare()` classmethod, which runs for the classes in the run before it
starts (load_data_before_the_run). Pick classes on the command line
(`locust -f loadtest/locustfile.py ClassifierUser`) or with `weight`.

Streaming entries (StreamingTokenUser, per model):
  POST "/v1/completions <model> (stream)"  the whole stream: from sending the request to the end of the
                            body (after data: [DONE]), not to the response headers, which the server
                            sends before the first token. A request like any other, in "Aggregated".
  SSE  "ttft <model>"       time to the first chunk with text, from the same start.
  SSE  "itl <model>"        inter-token latency: one sample per gap between consecutive text chunks
                            (so its req/s column is tokens/s after the first token). Locust keeps
                            percentiles in whole ms: sub-ms gaps read 0 there; Average keeps fractions.
  TTFT and ITL are not requests: they are logged straight into their own rows (request type "SSE")
  and never fired as locust request events, so they stay out of "Aggregated" (and of run.sh's summary
  line, plot.py's figure and bench/soak.py's per-minute latencies). Hence the rows of the stats table
  no longer sum to its Aggregated row: that row counts requests only.
  Events are read as they arrive (readline on "\n\n"), never in fixed-size blocks: a block read waits
  for the block to fill and would date the first token late and bunch the gaps.
  Streams ask for ignore_eos, so each is exactly ZOOSERVE_LOADTEST_MAX_TOKENS tokens long and stream
  times compare across models and runs (ZOOSERVE_LOADTEST_IGNORE_EOS=0 lets a model stop early).

Environment:
  ZOOSERVE_LOADTEST_MODELS  classifier models with optional weights, "name[:weight],..."
                            (default "mlp-digits:3,resnet-digits:1")
  ZOOSERVE_LOADTEST_TOKEN_MODELS  token models (decoders, Mamba, the char LSTM) with optional weights
                            (default "decoder-tiny:1,decoder-moe-tiny:1,mamba-tiny:1,lstm-charlm:1")
  ZOOSERVE_LOADTEST_MAX_TOKENS    max_tokens per completion (default 32)
  ZOOSERVE_LOADTEST_IGNORE_EOS    1 (default): generate max_tokens whatever the model; 0: stop at EOS
  ZOOSERVE_LOADTEST_FORECAST_MODELS  forecasters with optional weights
                            (default "lstm-forecast:1,gru-forecast:1,rnn-forecast:1")
  ZOOSERVE_LOADTEST_MAX_HISTORY   longest history or streamed series, in weeks (default 104)
  ZOOSERVE_LOADTEST_GAN_MODEL, _VAE_MODEL, _DIFFUSION_MODEL   the samplers (default gan-digits,
                            vae-digits, diffusion-digits)
  ZOOSERVE_LOADTEST_SAMPLES       images per sampler request (default 4)
  ZOOSERVE_LOADTEST_DIFFUSION_STEPS  DDIM steps per diffusion request (default 20; a DDPM request in
                            four takes 2.5 times as many)
  ZOOSERVE_LOADTEST_WAIT    seconds each user waits between requests (default 0: closed loop)
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import gevent
from locust import FastHttpUser, constant, events, task
from locust.exception import StopUser

JSON_HEADERS = {"Content-Type": "application/json"}


# ---- configuration --------------------------------------------------------------------------

def weighted_names(env_var: str, default: str) -> list[tuple[str, float]]:
    """Parse "a:3,b,c:0.5" from `env_var` (else `default`) into [(name, weight), ...]."""
    items = []
    for part in os.environ.get(env_var, default).split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition(":")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"{env_var}: weight of {name!r} is not a number: {weight!r}") from None
        if w < 0:
            raise ValueError(f"{env_var}: weight of {name!r} is negative")
        items.append((name.strip(), w))
    if not items or not any(w > 0 for _, w in items):
        raise ValueError(f"{env_var} names no model with a positive weight")
    return items


def wait_seconds() -> float:
    return float(os.environ.get("ZOOSERVE_LOADTEST_WAIT", "0"))


# ---- data -----------------------------------------------------------------------------------

_digit_bodies: list[bytes] | None = None


def digit_bodies() -> list[bytes]:
    """KServe v2 JSON bodies, one per real sklearn digit (values 0..16, shape [1, 1, 8, 8]); built once."""
    global _digit_bodies
    if _digit_bodies is None:
        from sklearn.datasets import load_digits

        images = load_digits().images.reshape(-1, 64)
        _digit_bodies = [json.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                                  "data": [float(v) for v in img]}]}).encode()
                         for img in images]
    return _digit_bodies


# ---- users ----------------------------------------------------------------------------------

class ZooserveUser(FastHttpUser):
    """Shared plumbing for every family: a JSON POST whose failures carry the server's reason."""

    abstract = True
    wait_time = constant(wait_seconds())

    @classmethod
    def prepare(cls) -> None:
        """Load the family's data (see load_data_before_the_run); on_start loads it too, once."""

    def post_json(self, path: str, body: bytes, name: str, check: Callable[[Any], str | None]) -> None:
        """POST `body` to `path` (stats grouped under `name`); `check(parsed)` returns an error or None."""
        with self.client.post(path, data=body, headers=JSON_HEADERS, name=name, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(describe_error(resp))
                return
            try:
                parsed = resp.json()
            except (ValueError, TypeError) as exc:
                resp.failure(f"200 with a body that is not JSON: {exc}")
                return
            problem = check(parsed)
            if problem:
                resp.failure(problem)
            else:
                resp.success()


def describe_error(resp) -> str:
    """One line for a non-200: status, the server's {"error": ...} message, Retry-After on a 429."""
    status = resp.status_code
    if not status:                           # connection refused/reset: no HTTP status at all
        return f"no response: {getattr(resp, 'error', None)!r}"
    try:
        message = resp.json().get("error", "")
    except Exception:  # noqa: BLE001 - not JSON: show the start of the text
        message = (resp.text or "")[:200]
    if status == 429:
        return f"429 queue full (Retry-After {resp.headers.get('Retry-After')}): {message}"
    return f"HTTP {status}: {message}"


@events.init.add_listener
def load_data_before_the_run(environment, **_kwargs) -> None:
    """Load the data of every user class in the run before it starts. Importing sklearn or statsmodels
    takes seconds, and from a user's on_start it would block every greenlet: the other users, the
    spawning (drawn as a long spawn ramp) and locust's CSV writer (a short run then ends with its
    stats CSV seconds stale)."""
    for cls in environment.user_classes or []:
        if issubclass(cls, ZooserveUser):
            cls.prepare()
    # gevent's loop caches its clock: left seconds behind by the loading, locust's --run-time timer,
    # set next, would fire that much early
    gevent.get_hub().loop.update_now()


class ClassifierUser(ZooserveUser):
    """Digit classifiers (family "classify"): one real digit per request, logits [1, 10] expected."""

    weight = 1
    models = weighted_names("ZOOSERVE_LOADTEST_MODELS", "mlp-digits:3,resnet-digits:1")

    @classmethod
    def prepare(cls) -> None:
        digit_bodies()

    def on_start(self) -> None:
        self.bodies = digit_bodies()
        self.names = [m for m, _ in self.models]
        self.weights = [w for _, w in self.models]

    @task
    def infer(self) -> None:
        model = random.choices(self.names, self.weights)[0]
        self.post_json(f"/v2/models/{model}/infer", random.choice(self.bodies),
                       name=f"/v2/models/{model}/infer", check=check_logits)


def check_logits(parsed: Any) -> str | None:
    try:
        shape = parsed["outputs"][0]["shape"]
    except (KeyError, IndexError, TypeError):
        return f"no outputs[0].shape in the response: {str(parsed)[:200]}"
    if shape != [1, 10]:
        return f"outputs[0].shape is {shape}, expected [1, 10]"
    return None


PROMPTS = ["ROMEO.", "JULIET. O Romeo, Romeo!", "HAMLET. To be, or not to be", "KING LEAR.",
           "Enter the Ghost.", "FIRST CITIZEN. Before we proceed any further, hear me speak."]


class StreamingTokenUser(ZooserveUser):
    """Token models: a streaming completion, timed to its end; fails on a non-200, an error event, a
    broken connection or a missing [DONE]. TTFT and inter-token gaps go to their own "SSE" rows."""

    weight = 1
    models = weighted_names("ZOOSERVE_LOADTEST_TOKEN_MODELS",
                            "decoder-tiny:1,decoder-moe-tiny:1,mamba-tiny:1,lstm-charlm:1")
    max_tokens = int(os.environ.get("ZOOSERVE_LOADTEST_MAX_TOKENS", "32"))
    ignore_eos = os.environ.get("ZOOSERVE_LOADTEST_IGNORE_EOS", "1") != "0"

    def on_start(self) -> None:
        self.names = [m for m, _ in self.models]
        self.weights = [w for _, w in self.models]

    @task
    def stream_completion(self) -> None:
        model = random.choices(self.names, self.weights)[0]
        body = json.dumps({"model": model, "prompt": random.choice(PROMPTS), "max_tokens": self.max_tokens,
                           "temperature": 0.8, "ignore_eos": self.ignore_eos, "stream": True}).encode()
        started = time.perf_counter()
        with self.client.post("/v1/completions", data=body, headers=JSON_HEADERS, stream=True,
                              name=f"/v1/completions {model} (stream)", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(describe_error(resp))
                return
            timing = read_sse(resp.stream, started)
            # locust stopped its clock at the headers (stream=True): the request's time is the whole stream
            resp.request_meta["response_time"] = timing.total * 1000
            resp.request_meta["response_length"] = timing.length
            if timing.ttft is not None:
                log_side_entry(self.environment, f"ttft {model}", [timing.ttft])
            log_side_entry(self.environment, f"itl {model}", timing.gaps)
            if timing.problem:
                resp.failure(timing.problem)
            else:
                resp.success()


@dataclass
class StreamTiming:
    """One stream, in seconds from `started`: the first text chunk, the gaps between text chunks, the end."""

    problem: str | None = None
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    total: float = 0.0
    text_chunks: int = 0
    length: int = 0                 # bytes of body read


def read_sse(stream, started: float) -> StreamTiming:
    """Read server-sent events to the end of the body, each as soon as it has arrived.

    `stream` is geventhttpclient's response (FastResponse.stream): its readline(sep) hands back one
    event once its blank line is in, receiving whatever the socket has; read(n) would wait for n bytes."""
    timing, done, last = StreamTiming(), False, None
    try:
        while event := stream.readline(b"\n\n"):
            now = time.perf_counter()
            timing.length += len(event)
            if not event.startswith(b"data: "):
                continue
            payload = event[6:].strip()
            if payload == b"[DONE]":
                done = True
                continue
            parsed = json.loads(payload)
            if "error" in parsed:       # read on to the end: the connection goes back to the pool whole
                timing.problem = timing.problem or f"error event: {parsed['error']}"
                continue
            if parsed.get("choices") and parsed["choices"][0].get("text"):
                timing.text_chunks += 1
                if last is None:
                    timing.ttft = now - started
                else:
                    timing.gaps.append(now - last)
                last = now
    except Exception as exc:  # noqa: BLE001 - a reset or a bad event mid-stream fails the request
        timing.problem = f"stream broken after {timing.text_chunks} text chunks: {exc!r}"
    timing.total = time.perf_counter() - started
    if timing.problem is None and not done:
        timing.problem = "stream ended without data: [DONE]"
    return timing


def log_side_entry(environment, name: str, seconds: list[float]) -> None:
    """Record timings that are not requests (TTFT, token gaps) in their own stats row, type "SSE".

    Straight into the row, not through events.request: locust adds every fired request event to the
    "Aggregated" row, where a few-ms token gap would pass for a request and drag its p50/p95 down.
    Rows are per worker and merged by the master like any other, the aggregate without them."""
    if not seconds:
        return
    entry = environment.stats.get(name, "SSE")
    for s in seconds:
        entry.log(s * 1000, 0)


# ---- forecasters (KIND "sequence") ------------------------------------------------------------

_co2: list[float] | None = None


def co2_values() -> list[float]:
    """statsmodels' weekly co2 series (ppm), gaps interpolated; loaded once."""
    global _co2
    if _co2 is None:
        from statsmodels.datasets import co2

        _co2 = [float(v) for v in co2.load_pandas().data["co2"].interpolate(method="linear")]
    return _co2


def series_body(values: list[float], **parameters) -> bytes:
    body: dict[str, Any] = {"inputs": [{"name": "series", "shape": [1, len(values), 1], "datatype": "FP32",
                                        "data": values}]}
    if parameters:
        body["parameters"] = parameters
    return json.dumps(body).encode()


def check_forecast(parsed: Any) -> str | None:
    try:
        shape = parsed["outputs"][0]["shape"]
    except (KeyError, IndexError, TypeError):
        return f"no outputs[0].shape in the response: {str(parsed)[:200]}"
    if len(shape) != 2 or shape[0] != 1:
        return f"outputs[0].shape is {shape}, expected [1, K]"
    return None


class ForecastUser(ZooserveUser):
    """Forecasters: a whole history per request (3 in 4 tasks), or a stream of chunks of one series
    under a sequence id, which the server holds the hidden state for between chunks."""

    weight = 1
    models = weighted_names("ZOOSERVE_LOADTEST_FORECAST_MODELS", "lstm-forecast:1,gru-forecast:1,rnn-forecast:1")
    max_history = int(os.environ.get("ZOOSERVE_LOADTEST_MAX_HISTORY", "104"))

    @classmethod
    def prepare(cls) -> None:
        co2_values()

    def on_start(self) -> None:
        served = [(m, w) for m, w in self.models if self._served(m)]
        self.names = [m for m, _ in served]
        self.weights = [w for _, w in served]
        self.values = co2_values()
        self.streams = 0

    def _served(self, model: str) -> bool:
        with self.client.get(f"/v2/models/{model}/ready", name="/v2/models/[forecaster]/ready",
                             catch_response=True) as resp:
            resp.success()           # an unserved model is left out, not a failure
            return resp.status_code == 200

    def _model(self) -> str:
        if not self.names:
            raise StopUser()         # from a task, locust stops this user quietly
        return random.choices(self.names, self.weights)[0]

    def _window(self) -> list[float]:
        n = random.randint(1, self.max_history)
        start = random.randint(0, len(self.values) - n)
        return self.values[start : start + n]

    @task(3)
    def whole_history(self) -> None:
        model = self._model()
        self.post_json(f"/v2/models/{model}/infer", series_body(self._window()),
                       name=f"/v2/models/{model}/infer (history)", check=check_forecast)

    @task(1)
    def stream(self) -> None:
        """One series in 2-5 chunks: start on the first, end on the last; stops at the first failure."""
        model = self._model()
        values = self._window()
        cuts = sorted(random.sample(range(1, len(values)), min(len(values) - 1, random.randint(1, 4))))
        chunks = [values[a:b] for a, b in zip([0, *cuts], [*cuts, len(values)])]
        self.streams += 1
        sequence_id = f"locust-{id(self)}-{self.streams}"
        for i, chunk in enumerate(chunks):
            body = series_body(chunk, sequence_id=sequence_id, sequence_start=i == 0,
                               sequence_end=i == len(chunks) - 1)
            with self.client.post(f"/v2/models/{model}/infer", data=body, headers=JSON_HEADERS,
                                  name=f"/v2/models/{model}/infer (sequence chunk)", catch_response=True) as resp:
                problem = describe_error(resp) if resp.status_code != 200 else check_forecast(resp.json())
                if problem:
                    resp.failure(problem)
                    return
                resp.success()


# ---- samplers (KIND "sample": GAN, VAE; "denoise": diffusion) ---------------------------------

def sampler_body(labels: list[int], seed: int, **parameters) -> bytes:
    body: dict[str, Any] = {"inputs": [{"name": "label", "shape": [len(labels)], "datatype": "INT64", "data": labels},
                                       {"name": "seed", "shape": [1], "datatype": "INT64", "data": [seed]}]}
    if parameters:
        body["parameters"] = parameters
    return json.dumps(body).encode()


def check_images(n: int, output: str = "image", shape: tuple[int, ...] = (1, 8, 8)) -> Callable[[Any], str | None]:
    """A check that the named output has shape [n, *shape]."""
    def check(parsed: Any) -> str | None:
        try:
            got = next(o["shape"] for o in parsed["outputs"] if o["name"] == output)
        except (KeyError, StopIteration, TypeError):
            return f"no output {output!r} in the response: {str(parsed)[:200]}"
        if got[0] != n or (shape and got[1:] != list(shape)):
            return f"output {output!r} has shape {got}, expected [{n}, {', '.join(map(str, shape))}]"
        return None
    return check


_unit_digits: list[list[float]] | None = None


def unit_digits() -> list[list[float]]:
    """sklearn's digits scaled to the generators' [-1, 1] (x / 8 - 1), 64 values each; loaded once."""
    global _unit_digits
    if _unit_digits is None:
        from sklearn.datasets import load_digits

        _unit_digits = [[float(v) / 8.0 - 1.0 for v in img] for img in load_digits().images.reshape(-1, 64)]
    return _unit_digits


class SamplerUser(ZooserveUser):
    """Shared by the three samplers: the model (left out when the server does not serve it), n, labels."""

    abstract = True
    # half a classifier's share: a sampler request is heavier (tens of UNet steps), and with fewer
    # users than classes locust fills the heavier-weighted classes first
    weight = 0.5
    model_env, default_model = "", ""
    samples = int(os.environ.get("ZOOSERVE_LOADTEST_SAMPLES", "4"))

    def on_start(self) -> None:
        self.model = os.environ.get(self.model_env, self.default_model)
        with self.client.get(f"/v2/models/{self.model}/ready", name="/v2/models/[sampler]/ready",
                             catch_response=True) as resp:
            resp.success()           # an unserved model is left out, not a failure
            self.served = resp.status_code == 200

    def labels(self) -> list[int]:
        """Random digits, one in five unconditional (-1)."""
        return [random.choice([-1, *range(10), *range(10)]) for _ in range(self.samples)]

    def infer(self, body: bytes, kind: str, check: Callable[[Any], str | None]) -> None:
        if not self.served:
            raise StopUser()
        self.post_json(f"/v2/models/{self.model}/infer", body, name=f"/v2/models/{self.model}/infer ({kind})",
                       check=check)


class GanUser(SamplerUser):
    """The class-conditional GAN: seeded labels -> images (and the labels used)."""

    model_env, default_model = "ZOOSERVE_LOADTEST_GAN_MODEL", "gan-digits"

    @task
    def sample(self) -> None:
        self.infer(sampler_body(self.labels(), random.randrange(2**31)), "sample", check_images(self.samples))


class VaeUser(SamplerUser):
    """The VAE: prior samples (2 in 4), reconstructions of real digits (1 in 4), their latent means (1 in 4)."""

    model_env, default_model = "ZOOSERVE_LOADTEST_VAE_MODEL", "vae-digits"

    @classmethod
    def prepare(cls) -> None:
        unit_digits()

    def on_start(self) -> None:
        super().on_start()
        self.images = unit_digits()

    def digits(self) -> list[float]:
        """`samples` real digits, flat."""
        return [v for _ in range(self.samples) for v in random.choice(self.images)]

    @task(2)
    def sample(self) -> None:
        self.infer(sampler_body([-1] * self.samples, random.randrange(2**31)), "sample", check_images(self.samples))

    @task(1)
    def reconstruct(self) -> None:
        body = {"inputs": [{"name": "image", "shape": [self.samples, 1, 8, 8], "datatype": "FP32",
                            "data": self.digits()}], "outputs": [{"name": "image"}]}
        self.infer(json.dumps(body).encode(), "reconstruct", check_images(self.samples))

    @task(1)
    def encode(self) -> None:
        body = {"inputs": [{"name": "image", "shape": [self.samples, 1, 8, 8], "datatype": "FP32",
                            "data": self.digits()}], "outputs": [{"name": "latent_mean"}]}
        self.infer(json.dumps(body).encode(), "encode", check_images(self.samples, "latent_mean", ()))


class DiffusionUser(SamplerUser):
    """Diffusion: DDIM requests (3 in 4) and longer DDPM ones (1 in 4), which the denoise engine
    steps in shared UNet batches whatever timestep each has reached."""

    model_env, default_model = "ZOOSERVE_LOADTEST_DIFFUSION_MODEL", "diffusion-digits"
    steps = int(os.environ.get("ZOOSERVE_LOADTEST_DIFFUSION_STEPS", "20"))

    @task(3)
    def ddim(self) -> None:
        body = sampler_body(self.labels(), random.randrange(2**31), sampler="ddim", steps=self.steps,
                            eta=random.choice([0.0, 0.5]))
        self.infer(body, "ddim", check_images(self.samples))

    @task(1)
    def ddpm(self) -> None:
        body = sampler_body(self.labels(), random.randrange(2**31), sampler="ddpm", steps=self.steps * 5 // 2)
        self.infer(body, "ddpm", check_images(self.samples))
