"""Shadow traffic in a running server: copies run on the shadow version behind live work, their
answers are compared with the primary's and dropped; only the comparison reaches /metrics."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_digits

from model_registry import Registry

pytestmark = pytest.mark.slow

DIGITS = load_digits()


def body(i: int) -> dict:
    return {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                        "data": DIGITS.images[i].astype(np.float32).flatten().tolist()}]}


def samples(url: str, name: str, **labels) -> list:
    text = httpx.get(f"{url}/metrics").text
    return [s for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def shadow_count(url: str, model: str, result: str) -> float:
    return sum(s.value for s in samples(url, "zooserve_shadow_requests_total", model=model, result=result))


def shadow_of(url: str, model: str):
    import json
    config = httpx.get(f"{url}/v2/models/{model}/config").json()
    return json.loads(config["parameters"]["routing"]["string_value"])["shadow"]


def wait_until(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("not seen in time")


def test_a_shadow_is_compared_and_never_answers(registry_copy, start_server):
    reg = Registry(registry_copy)
    same = reg.publish("mlp-digits", registry_copy / "mlp-digits" / "1")          # identical weights
    other = reg.publish("mlp-digits", registry_copy / "resnet-digits" / "1", force=True)  # same signature, other family
    reg.set_alias("mlp-digits", "same", same)
    reg.set_alias("mlp-digits", "other", other)
    reg.set_shadow("mlp-digits", "same", 100)
    with start_server(registry_copy) as server:
        for i in range(30):
            r = httpx.post(f"{server.url}/v2/models/mlp-digits/infer", json=body(i))
            assert r.status_code == 200 and r.headers["x-model-version"] == "1"
        wait_until(lambda: shadow_count(server.url, "mlp-digits", "agree") == 30)
        assert shadow_count(server.url, "mlp-digits", "disagree") == 0
        hist = samples(server.url, "zooserve_shadow_difference_bucket", model="mlp-digits", alias="same", le="0.0")
        assert hist[0].value == 30                                  # identical logits: difference 0
        # a copy is not a request of the shadow version: its request counters stay at 0
        assert not any(s.value for s in samples(server.url, "zooserve_requests_total", model="mlp-digits",
                                                 version=str(same)))
        # requests that name a version are not copied
        httpx.post(f"{server.url}/v2/models/mlp-digits/versions/1/infer", json=body(0))
        # ... but requests routed to the primary by name of an alias are: only the shadow's own are not
        httpx.post(f"{server.url}/v2/models/mlp-digits/versions/same/infer", json=body(0))
        time.sleep(0.3)
        assert shadow_count(server.url, "mlp-digits", "agree") == 31

        reg.set_shadow("mlp-digits", "other", 100)
        wait_until(lambda: (shadow_of(server.url, "mlp-digits") or {}).get("alias") == "other", 3)
        for i in range(40):
            assert httpx.post(f"{server.url}/v2/models/mlp-digits/infer", json=body(i)).status_code == 200
        wait_until(lambda: sum(shadow_count(server.url, "mlp-digits", r) for r in ("agree", "disagree")) == 71)
        diffs = samples(server.url, "zooserve_shadow_difference_count", model="mlp-digits", alias="other")
        assert diffs[0].value == 40
        zero = samples(server.url, "zooserve_shadow_difference_bucket", model="mlp-digits", alias="other", le="0.0")
        assert zero[0].value == 0                                   # another model's logits always differ

        reg.set_shadow("mlp-digits", None, None)
        wait_until(lambda: shadow_of(server.url, "mlp-digits") is None, 3)
        before = samples(server.url, "zooserve_shadow_difference_count", model="mlp-digits", alias="other")[0].value
        httpx.post(f"{server.url}/v2/models/mlp-digits/infer", json=body(0))
        time.sleep(0.3)
        assert samples(server.url, "zooserve_shadow_difference_count", model="mlp-digits",
                       alias="other")[0].value == before


def test_a_full_shadow_drops_copies_and_never_a_live_request(registry_copy, start_server):
    reg = Registry(registry_copy)
    cfg = reg.model_config("mlp-digits")
    cfg.batching.max_queue_delay_ms = 50          # copies linger in the shadow's queue
    reg.write_model_config(cfg)
    reg.set_alias("mlp-digits", "shadow", reg.publish("mlp-digits", registry_copy / "mlp-digits" / "1"))
    reg.set_shadow("mlp-digits", "shadow", 100)
    with start_server(registry_copy, env={"ZOOSERVE_SHADOW_MAX_IN_FLIGHT": "1"}) as server:
        async def burst():
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(*(client.post(f"{server.url}/v2/models/mlp-digits/infer", json=body(i))
                                              for i in range(64)))
        answers = asyncio.run(burst())
        assert [r.status_code for r in answers] == [200] * 64
        wait_until(lambda: shadow_count(server.url, "mlp-digits", "agree")
                   + shadow_count(server.url, "mlp-digits", "dropped") == 64)
        assert shadow_count(server.url, "mlp-digits", "dropped") > 0
        assert shadow_count(server.url, "mlp-digits", "agree") >= 1


def shadowed_by_a_twin(source: Path, tmp_path: Path, model: str) -> Path:
    """A copy of `source` where `model`'s version 1 is published again as alias `twin`, the shadow
    of every request."""
    root = tmp_path / "registry"
    shutil.copytree(source, root)
    reg = Registry(root)
    reg.set_alias(model, "twin", reg.publish(model, root / model / "1"))
    reg.set_shadow(model, "twin", 100)
    return root


def test_token_shadow_compares_greedy_tokens(token_registry, tmp_path, start_server):
    from openai import OpenAI

    root = shadowed_by_a_twin(token_registry, tmp_path, "decoder-tiny")
    with start_server(root) as server, OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        for prompt in ("ROMEO.", "JULIET.", "KING."):
            out = client.completions.create(model="decoder-tiny", prompt=prompt, max_tokens=8, temperature=0)
            assert out.model == "decoder-tiny:1"
        stream = client.completions.create(model="decoder-tiny", prompt="HAMLET.", max_tokens=8, temperature=0.9,
                                           seed=3, stream=True)
        assert "".join(c.choices[0].text for c in stream)
        wait_until(lambda: shadow_count(server.url, "decoder-tiny", "agree") == 4, 30)
        # an unseeded sample has nothing to agree with: not copied
        client.completions.create(model="decoder-tiny", prompt="LEAR.", max_tokens=4, temperature=1.0)
        time.sleep(0.5)
        assert shadow_count(server.url, "decoder-tiny", "agree") == 4
        assert shadow_count(server.url, "decoder-tiny", "disagree") == 0


def test_sampler_shadow_compares_images_of_the_same_seed(generative_registry, tmp_path, start_server):
    root = shadowed_by_a_twin(generative_registry, tmp_path, "gan-digits")
    labels = {"name": "label", "shape": [3], "datatype": "INT64", "data": [1, 7, -1]}
    with start_server(root) as server:
        for seed in (None, 5):        # unseeded: the server draws a seed, and the copy samples with it
            inputs = [labels] + ([{"name": "seed", "shape": [1], "datatype": "INT64", "data": [seed]}] if seed else [])
            r = httpx.post(f"{server.url}/v2/models/gan-digits/infer", json={"inputs": inputs})
            assert r.status_code == 200 and r.headers["x-model-version"] == "1"
        wait_until(lambda: shadow_count(server.url, "gan-digits", "agree") == 2, 15)
        assert shadow_count(server.url, "gan-digits", "disagree") == 0
