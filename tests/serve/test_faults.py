"""Faults a serving replica must outlive: an engine whose runtime raises on every call, an engine
thread that dies, a request that only the engine thread refuses (all on a token engine built from
a real exported character LSTM), and a registry root that disappears while a real server serves.
"""

from __future__ import annotations

import asyncio
import ctypes
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_digits

from model_registry import Registry
from serve.api.openai import _engine_error
from serve.engines.factory import make_token_engine
from serve.engines.sequence import artifact_names
from serve.engines.step_loop import EngineFault
from serve.engines.tokens import GenerationRequest, TokenEngine
from serve.errors import engine_refusal
from serve.metrics import Metrics
from serve.runtimes import open_runtime
from serve.scheduler import TokenScheduler
from serve.settings import ServeSettings
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

SETTINGS = ServeSettings(max_num_seqs=2, max_model_len=4096)     # 2 rows: a third request waits
ANSWERED_WITHIN_S = 1.0
CHAR_LM = "lstm-charlm"            # the token registry's character LSTM


@pytest.fixture(scope="module")
def char_lm(token_registry):
    """The token registry's character LSTM (vocab 260, exported with its parity check and
    published; read only here): (registry, name)."""
    return Registry(token_registry), CHAR_LM


def token_engine(char_lm, metrics: Metrics, broken_runtime: bool = False) -> TokenEngine:
    """The published version's engine; `broken_runtime`: its real ONNX session asked for an output
    the graph does not have, so that every run raises (as a runtime that lost its device does)."""
    registry, name = char_lm
    manifest, vdir = registry.manifest(name, 1), registry.version_dir(name, 1)
    inputs, outputs = artifact_names(manifest)
    runtime = open_runtime(vdir, "onnx", manifest.artifacts["onnx"], inputs,
                           outputs + ["no_such_output"] if broken_runtime else outputs, 1, "cpu")
    return make_token_engine(name, 1, manifest, runtime, vdir, SETTINGS, metrics.for_token_model(name, 1))


async def generate(engine: TokenEngine, max_tokens: int, prompt: str = "the night is long") -> list:
    events = []
    async for batch in engine.generate(GenerationRequest(engine.tokenizer.encode(prompt), max_tokens, ignore_eos=True)):
        events += batch
    return events


def restarts(metrics: Metrics, model: str) -> float:
    return sum(s.value for fam in text_string_to_metric_families(metrics.exposition().decode()) for s in fam.samples
               if s.name == "zooserve_engine_restarts_total" and s.labels == {"model": model, "version": "1"})


def test_a_runtime_that_raises_on_every_call_answers_everything_503_at_once_and_the_engine_restarts(char_lm):
    metrics = Metrics()
    engine = token_engine(char_lm, metrics, broken_runtime=True)

    async def run():
        engine.start()
        try:
            started = time.perf_counter()
            calls = [asyncio.ensure_future(generate(engine, 20)) for _ in range(5)]   # 2 run, 3 wait
            results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
            elapsed = time.perf_counter() - started
            again = await asyncio.wait_for(asyncio.gather(generate(engine, 5), return_exceptions=True), 5)
            return results, elapsed, again[0]
        finally:
            await engine.close(1)
    results, elapsed, again = asyncio.run(run())
    assert all(isinstance(r, EngineFault) for r in results), results
    assert elapsed < ANSWERED_WITHIN_S
    assert "no_such_output" in str(results[0]) and "retry" in str(results[0])
    assert isinstance(again, EngineFault)                   # restarted: it takes requests (and fails them) again
    # both APIs answer it 503
    assert engine_refusal(results[0], CHAR_LM).status == 503 and _engine_error(results[0]).status == 503
    assert restarts(metrics, CHAR_LM) >= 2


def test_an_engine_thread_that_dies_answers_its_requests_503_and_a_new_thread_serves(char_lm):
    metrics = Metrics()
    engine = token_engine(char_lm, metrics)

    async def run():
        engine.start()
        try:
            long = asyncio.ensure_future(generate(engine, 3000))      # seconds of steps: the thread is busy
            waiting = [asyncio.ensure_future(generate(engine, 3000)) for _ in range(2)]
            while engine.metrics.generated_tokens < 5:
                await asyncio.sleep(0.01)
            dead = engine._thread
            # kill the engine thread as a fatal error would: an exception that is not an Exception,
            # raised inside it
            assert ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(dead.ident),
                                                              ctypes.py_object(SystemExit)) == 1
            started = time.perf_counter()
            results = await asyncio.wait_for(asyncio.gather(long, *waiting, return_exceptions=True), 5)
            elapsed = time.perf_counter() - started
            dead.join(5)
            served = await asyncio.wait_for(generate(engine, 8), 10)
            return results, elapsed, dead, served
        finally:
            await engine.close(1)
    results, elapsed, dead, served = asyncio.run(run())
    assert all(isinstance(r, EngineFault) for r in results), results
    assert elapsed < ANSWERED_WITHIN_S
    assert not dead.is_alive() and engine._thread is not dead
    assert sum(e.token is not None for e in served) == 8 and served[-1].finish_reason == "length"
    assert restarts(metrics, CHAR_LM) == 1


def test_a_request_only_the_engine_thread_refuses_fails_alone_and_the_engine_serves_on(char_lm):
    metrics = Metrics()
    engine = token_engine(char_lm, metrics)
    # a scheduler stricter than the engine's own check before queueing (a rule only the engine
    # thread knows): its refusal reaches the caller, not the thread
    engine.scheduler = TokenScheduler(engine.scheduler.max_rows, max_len=12)

    async def run():
        engine.start()
        try:
            beside = asyncio.ensure_future(generate(engine, 4, "ab"))
            refused = await asyncio.wait_for(asyncio.gather(generate(engine, 10, "abcdef"), return_exceptions=True), 5)
            return refused[0], await asyncio.wait_for(beside, 10), await asyncio.wait_for(generate(engine, 3, "x"), 10)
        finally:
            await engine.close(1)
    refused, beside, after = asyncio.run(run())
    assert isinstance(refused, ValueError) and "exceeds the context of 12 tokens" in str(refused)
    assert beside[-1].finish_reason == "length" and after[-1].finish_reason == "length"
    assert restarts(metrics, CHAR_LM) == 0


def test_max_tokens_0_given_to_the_engine_directly_is_refused_at_once(char_lm):
    engine = token_engine(char_lm, Metrics())

    async def run():
        engine.start()
        try:
            refused = await asyncio.wait_for(asyncio.gather(generate(engine, 0), return_exceptions=True), 5)
            return refused[0], await asyncio.wait_for(generate(engine, 3), 10)
        finally:
            await engine.close(1)
    refused, after = asyncio.run(run())
    assert isinstance(refused, ValueError) and "max_tokens must be >= 1" in str(refused)
    assert after[-1].finish_reason == "length"


# ---- the registry root goes away while serving ----------------------------------------------------

DIGIT = load_digits().images[0].astype(np.float32)
BODY = {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": DIGIT.flatten().tolist()}]}


class Traffic:
    """Requests to both demo models, one after another on a thread, until stopped; every status kept."""

    def __init__(self, url: str):
        self.url, self.statuses, self._stop = url, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                for model in ("mlp-digits", "resnet-digits"):
                    self.statuses.append(client.post(f"{self.url}/v2/models/{model}/infer", json=BODY).status_code)
                time.sleep(0.01)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def test_a_registry_root_that_disappears_never_takes_down_a_loaded_version(registry_copy, start_server):
    """Renamed away, then removed outright: the loaded versions answer 200 all along, the watch
    logs each outage once and applies what changed once the root is back. (Tests run as root,
    for whom chmod 000 does not stop reads, so an unreadable root is not tested as such: renaming
    and removal fail the same os.stat/os.scandir calls, with FileNotFoundError where a lost
    permission gives PermissionError, both an OSError to the watch. A read-only root is still
    readable, so the watch, which only reads, does not notice it.)"""
    away = registry_copy.with_name("registry-away")
    backup = registry_copy.with_name("registry-backup")
    with start_server(registry_copy) as server, Traffic(server.url) as traffic:
        def served_lately() -> bool:
            seen = len(traffic.statuses)
            time.sleep(0.6)
            return len(traffic.statuses) > seen + 4

        registry_copy.rename(away)
        time.sleep(2.5)                            # five polls without a root
        assert served_lately()
        rows = httpx.post(f"{server.url}/v2/repository/index").json()
        assert [(r["name"], r["state"]) for r in rows] == [("mlp-digits", "READY"), ("resnet-digits", "READY")]
        assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
        away.rename(registry_copy)
        Registry(registry_copy).publish("mlp-digits", registry_copy / "mlp-digits" / "1")   # a change meanwhile
        wait_for(lambda: {"name": "mlp-digits", "version": "2", "state": "READY"} in
                 httpx.post(f"{server.url}/v2/repository/index").json(), 5, "version 2 after the root came back")
        assert httpx.post(f"{server.url}/v2/models/mlp-digits/versions/2/infer", json=BODY).status_code == 200

        shutil.copytree(registry_copy, backup)
        shutil.rmtree(registry_copy)
        time.sleep(2.5)
        assert served_lately()
        shutil.copytree(backup, registry_copy)
        wait_for(lambda: server.logs().count("registry root is readable again") == 2, 5, "the second recovery")
        assert served_lately()
    assert traffic.statuses and set(traffic.statuses) == {200}, sorted(set(traffic.statuses))
    logs = server.log_path.read_text()
    assert logs.count("registry root cannot be read") == 2, logs     # once per outage, not every poll
    assert "left the registry" not in logs and "registry poll failed" not in logs
