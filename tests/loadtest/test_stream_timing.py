"""The locustfile's streaming entries time the whole stream: real locust, headless, against a real server,
on streams of a known length (ignore_eos, so every stream is exactly N tokens)."""

from __future__ import annotations

import csv
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
N = 48                       # tokens per stream: long next to the response headers, short enough for CI
MODEL = "decoder-tiny"


def stats_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def timed(client: httpx.Client, body: dict) -> tuple[float, float]:
    """(seconds to the response headers, seconds to the end of the body) of one request."""
    started = time.perf_counter()
    with client.stream("POST", "/v1/completions", json=body) as resp:
        headers = time.perf_counter() - started
        assert resp.status_code == 200, resp.read()
        resp.read()
    return headers, time.perf_counter() - started


def test_stream_entry_is_the_whole_stream_and_ttft_itl_stay_out_of_the_aggregate(token_registry, start_server,
                                                                                 tmp_path):
    with start_server(token_registry) as server:
        env = {"ZOOSERVE_LOADTEST_TOKEN_MODELS": MODEL, "ZOOSERVE_LOADTEST_MAX_TOKENS": str(N)}
        proc = subprocess.run(
            [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "StreamingTokenUser", "--headless",
             "--host", server.url, "--users", "1", "--spawn-rate", "1", "--run-time", "8s", "--stop-timeout", "10",
             "--csv", str(tmp_path / "run"), "--only-summary", "--exit-code-on-error", "1"],
            cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

        # the same streams by hand, unloaded: when the headers come, and a non-streamed twin of the same length
        body = {"model": MODEL, "prompt": "ROMEO.", "max_tokens": N, "temperature": 0.8, "ignore_eos": True}
        with httpx.Client(base_url=server.url, timeout=30) as client:
            streamed = [timed(client, {**body, "stream": True}) for _ in range(5)]
            whole = [timed(client, body)[1] for _ in range(5)]
            usage = client.post("/v1/completions", json=body).json()["usage"]
    assert usage["completion_tokens"] == N                   # ignore_eos: the length is known

    rows = stats_rows(tmp_path / "run_stats.csv")
    stream, ttft, itl = rows[f"/v1/completions {MODEL} (stream)"], rows[f"ttft {MODEL}"], rows[f"itl {MODEL}"]
    assert (stream["Type"], ttft["Type"], itl["Type"]) == ("POST", "SSE", "SSE")
    n_stream, n_ttft, n_itl = (int(r["Request Count"]) for r in (stream, ttft, itl))
    assert n_stream >= 5 and stream["Failure Count"] == "0" and n_ttft == n_stream
    # about one gap per token after the first (a token whose bytes end mid-character has no text yet)
    assert 0.8 * (N - 1) * n_stream <= n_itl <= (N - 1) * n_stream

    # the aggregate is the requests: TTFT and ITL rows are not in it
    agg = rows["Aggregated"]
    assert int(agg["Request Count"]) == n_stream
    assert float(agg["Average Response Time"]) == pytest.approx(float(stream["Average Response Time"]))

    # each stream's time is at least its TTFT plus its gaps, so on average too (locust's averages are exact)
    avg = {k: float(r["Average Response Time"]) for k, r in (("stream", stream), ("ttft", ttft), ("itl", itl))}
    bound_ms = (avg["ttft"] * n_ttft + avg["itl"] * n_itl) / n_stream
    assert avg["stream"] >= bound_ms * 0.999, (avg, bound_ms)
    # and the quick streams too: the shortest stream outlasts the shortest TTFT plus N - 1 shortest gaps
    assert float(stream["Min Response Time"]) >= float(ttft["Min Response Time"]) + (N - 1) * float(
        itl["Min Response Time"])
    # the first token comes early in a stream of N (a 4 KiB block read dated it ~25 tokens late)
    assert float(ttft["Median Response Time"]) * 4 < float(stream["Median Response Time"]), (ttft, stream)

    # the same check fails on the old figure, the time to the response headers
    header_ms = statistics.median(h for h, _ in streamed) * 1000
    assert header_ms < bound_ms / 2, (header_ms, bound_ms)
    # a stream of N tokens takes about as long as the non-streamed answer of N tokens; the headers do not
    whole_ms = statistics.median(whole) * 1000
    assert float(stream["Median Response Time"]) >= 0.5 * whole_ms, (stream, whole_ms)
    assert header_ms < 0.5 * whole_ms, (header_ms, whole_ms)
    assert statistics.median(t for _, t in streamed) * 1000 >= 0.5 * whole_ms


READ_SSE_CHECK = r"""
import json, sys, time
sys.path.insert(0, "loadtest")
import locustfile

def event(text):
    return b"data: " + json.dumps({"choices": [{"index": 0, "text": text}]}).encode() + b"\n\n"

class Stream:                         # events 20 ms apart, handed out one readline(b"\n\n") at a time
    def __init__(self, events):
        self.events = events
    def readline(self, sep):
        assert sep == b"\n\n"
        time.sleep(0.02)
        return self.events.pop(0) if self.events else b""

started = time.perf_counter()
t = locustfile.read_sse(Stream([event("a"), event(""), event("b"), event("c"), b"data: [DONE]\n\n"]), started)
assert t.problem is None and t.text_chunks == 3 and len(t.gaps) == 2, t
assert 0.015 < t.ttft < 0.1, t
assert t.gaps[0] > 0.035, t               # the empty chunk between "a" and "b" is no token gap
assert t.total >= t.ttft + sum(t.gaps) + 0.035, t     # [DONE] and the end of the body: two more reads
assert locustfile.read_sse(Stream([event("a")]), started).problem == "stream ended without data: [DONE]"
err = b'data: {"error": {"message": "boom"}}\n\n'
t = locustfile.read_sse(Stream([event("a"), err, b"data: [DONE]\n\n"]), started)
assert t.problem.startswith("error event") and t.length > 0, t

class Broken:
    def readline(self, sep):
        raise ConnectionResetError("reset")
assert "stream broken after 0 text chunks" in locustfile.read_sse(Broken(), started).problem
print("ok")
"""


def test_read_sse_times_events_as_they_arrive():
    """read_sse on fake streams (in a subprocess: importing locust monkey-patches the interpreter with gevent)."""
    proc = subprocess.run([sys.executable, "-c", READ_SSE_CHECK], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
