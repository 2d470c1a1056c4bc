"""The early token shed (serve/api/token_admission.py): an OpenAI generate request to a token model
whose engine is full is refused with 429 by `InferFastPath._route` (`admit_or_refuse`), before
FastAPI, pydantic validation and tokenization.

The proof is a body the handler would refuse with 400 (an unknown field, which the strict request
schemas forbid) but that names the model: while the engine is full it gets 429 and a Retry-After,
which only the early path can answer (the handler validates first, and its own 429 comes from
`TokenEngine.generate`, after validation); once the engine is idle the same body gets 400.

"Full" is held by count, not by timing: lstm-charlm (recurrent, so a sequence may be thousands of
tokens long) with one row (ZOOSERVE_MAX_NUM_SEQS=1) and a waiting queue of one (max_queue_size 1,
max_queue_wait_ms out of the way). One long stream holds the row, a second waits; /metrics shows
both before the probes, and the running stream is checked to be still running after them. A real
server (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest

from model_registry import Registry

pytestmark = pytest.mark.slow
MODEL = "lstm-charlm"
# how long (on a calm machine) the stream that holds the row should last: long beside the few
# requests sent while the engine is full, short beside the test's time limit
HOLD_S = 2.5


@pytest.fixture
def one_row_lstm(token_registry, tmp_path):
    """lstm-charlm alone; its waiting queue holds one sequence, bounded by count only."""
    reg = Registry(tmp_path / "registry")
    reg.set_alias(MODEL, "stable", reg.publish(MODEL, token_registry / MODEL / "1"))
    cfg = reg.model_config(MODEL)
    cfg.batching.max_queue_size = 1
    cfg.batching.max_queue_wait_ms = 3_600_000.0
    reg.write_model_config(cfg)
    return reg.root


def gauge(metrics: str, name: str) -> float | None:
    match = re.search(rf'^{name}{{model="{MODEL}",version="1"}} (\S+)$', metrics, re.M)
    return float(match.group(1)) if match else None


def test_a_full_token_engine_refuses_before_validation_and_the_running_streams_finish(one_row_lstm,
                                                                                     start_server):
    with start_server(one_row_lstm, env={"ZOOSERVE_MAX_NUM_SEQS": "1"}) as server:
        completions, chat = f"{server.url}/v1/completions", f"{server.url}/v1/chat/completions"
        # the probes: each names the model and carries a field the strict schemas refuse (400)
        probes = [(completions, {"model": MODEL, "prompt": "ROMEO.", "max_tokens": 4, "bogus_field": 1}),
                  (chat, {"model": MODEL, "messages": [{"role": "user", "content": "Speak."}], "bogus_field": 1})]

        def probe_all() -> list[httpx.Response]:
            # a fresh connection per probe: a 429 may pace the connection it was answered on
            return [httpx.post(url, json=body, timeout=30, headers={"Connection": "close"}) for url, body in probes]

        idle = probe_all()
        assert [r.status_code for r in idle] == [400, 400], [r.text for r in idle]
        assert all("bogus_field" in r.json()["error"]["message"] for r in idle)

        # how many tokens hold the row for about HOLD_S here (the faster of two runs: the calm machine's)
        rate = 0.0
        for _ in range(2):
            started = time.perf_counter()
            r = httpx.post(completions, json={"model": MODEL, "prompt": "ROMEO.", "max_tokens": 1000,
                                              "temperature": 0, "ignore_eos": True}, timeout=60)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1000, r.text
            rate = max(rate, 1000 / (time.perf_counter() - started))
        tokens = int(min(60000, max(2000, rate * HOLD_S)))
        stream_body = {"model": MODEL, "prompt": "ROMEO.", "max_tokens": tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

        async def scenario():
            async with httpx.AsyncClient(timeout=120) as client:
                first_token = {"a": asyncio.Event(), "b": asyncio.Event()}
                finished = {"a": False, "b": False}

                async def stream(key: str) -> tuple[int, int, list[str]]:
                    """(status, completion tokens in the usage chunk, finish reasons)."""
                    usage, reasons = -1, []
                    async with client.stream("POST", completions, json=stream_body) as r:
                        if r.status_code != 200:
                            return r.status_code, usage, reasons
                        async for line in r.aiter_lines():
                            if not line.startswith("data: {"):
                                continue
                            chunk = json.loads(line[6:])
                            if chunk.get("usage"):
                                usage = chunk["usage"]["completion_tokens"]
                            for choice in chunk.get("choices", ()):
                                first_token[key].set()
                                if choice.get("finish_reason"):
                                    reasons.append(choice["finish_reason"])
                                    finished[key] = True
                    return r.status_code, usage, reasons

                a = asyncio.ensure_future(stream("a"))
                await asyncio.wait_for(first_token["a"].wait(), 60)       # a holds the only row
                b = asyncio.ensure_future(stream("b"))
                # b waits for the row: every row busy and the waiting queue at its bound (1)
                deadline = time.monotonic() + 30
                while True:
                    metrics = (await client.get(f"{server.url}/metrics")).text
                    if gauge(metrics, "zooserve_requests_running") == 1 and \
                            gauge(metrics, "zooserve_requests_waiting") == 1:
                        break
                    assert time.monotonic() < deadline and not finished["a"], "the engine never filled up"
                    await asyncio.sleep(0.02)
                full = await asyncio.to_thread(probe_all)
                # a was still streaming after the probes: it held the row, and b waited, all along
                a_still_running = not finished["a"] and not b.done()
                return full, a_still_running, await a, await b

        full, a_still_running, a, b = asyncio.run(scenario())
        statuses = [r.status_code for r in full]
        assert a_still_running, (f"the stream holding the row ({tokens} tokens) ended before the probes "
                                 f"were answered {statuses}: the engine was not full for them")
        # refused, though the handler would have refused these bodies with 400 (unknown field): the
        # answer came before validation, i.e. from the early shed, not from TokenEngine.generate
        assert statuses == [429, 429], [r.text for r in full]
        for r in full:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert r.headers["x-model-version"] == "1" and r.headers.get("x-request-id")
        # the running and the waiting stream got every token they asked for
        assert a == (200, tokens, ["length"]) and b == (200, tokens, ["length"]), (a, b, tokens)

        # idle again: the same bodies are validated (400), and the engine still serves
        again = probe_all()
        assert [r.status_code for r in again] == [400, 400], [r.text for r in again]
        r = httpx.post(completions, json={"model": MODEL, "prompt": "ROMEO.", "max_tokens": 4}, timeout=30)
        assert r.status_code == 200, r.text
