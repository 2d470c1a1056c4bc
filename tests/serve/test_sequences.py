"""The sequence engine behind the real server (rnn forecasters over KServe v2): variable-length
requests batched by right-padding answer as they would alone, streams in chunks (Triton's
sequence parameters) answer as the whole series does, a sequence stays on the version it started
on when the alias moves, idle sequences are freed, bad input is a 400 that leaves the stored
state alone, and the metrics say so. Plus the sequence store's books, with a fake clock."""

from __future__ import annotations

import asyncio
import shutil
import time

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families

from model_registry import Registry, VersionPolicy
from serve.sequence_store import SequenceStore, TooManySequences, UnknownSequence
from training import checkpoint, export, loop, series
from training.models import rnn

ADMIN = "sequence-admin-token"
CO2 = series.load_co2()
MAX_LEN = 64


@pytest.fixture(scope="module")
def forecast_registry(tmp_path_factory):
    """`forecast`: version 1 = tiny LSTM trained for 2 epochs (ONNX). `pinned`: the same as version 1
    and an untrained 1-layer GRU served through TorchScript as version 2, every version loaded."""
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("forecast")
    series.train_forecaster("rnn", "tiny", work / "lstm", train_cfg=loop.TrainConfig(**{**series.TRAIN, "epochs": 2}),
                            progress=False)
    export.package(work / "lstm", work / "lstm-package")
    _, lstm_config = checkpoint.load(work / "lstm")
    torch.manual_seed(1)
    gru = rnn.Model(rnn.Config(cell="gru", hidden=16, layers=1, mean=lstm_config.mean, std=lstm_config.std,
                               step_std=lstm_config.step_std)).eval()
    checkpoint.save(work / "gru", gru, gru.config, {"family": "rnn"})
    export.package(work / "gru", work / "gru-package", formats=("torchscript",), serve_format="torchscript")
    registry = Registry(work / "registry")
    registry.set_alias("forecast", "stable", registry.publish("forecast", work / "lstm-package"))
    cfg = registry.model_config("forecast")
    cfg.batching.max_queue_delay_ms = 200     # a window wide enough that concurrent requests meet
    registry.write_model_config(cfg)
    for package in ("lstm-package", "gru-package"):
        registry.publish("pinned", work / package)
    registry.set_alias("pinned", "stable", 1)
    cfg = registry.model_config("pinned")
    cfg.version_policy = VersionPolicy(policy="all")
    registry.write_model_config(cfg)
    return registry.root


@pytest.fixture(scope="module")
def server(forecast_registry, start_server):
    env = {"ZOOSERVE_SEQUENCE_MAX_LEN": str(MAX_LEN)}
    with start_server(forecast_registry, ["--admin-token", ADMIN], env=env) as s:
        yield s


def body(values, **parameters) -> dict:
    x = np.asarray(values, np.float32)
    x = x.reshape(1, -1, 1) if x.ndim == 1 else x
    out = {"inputs": [{"name": "series", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    if parameters:
        out["parameters"] = parameters
    return out


def infer(server, values=None, model="forecast", version=None, raw=None, **parameters) -> httpx.Response:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    return httpx.post(server.url + path, json=raw if raw is not None else body(values, **parameters), timeout=30)


def forecast(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    (out,) = response.json()["outputs"]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def metric(server, name: str, **labels) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def eager(registry, model: str, version: int, values) -> np.ndarray:
    net, _ = checkpoint.load(registry / model / str(version))
    with torch.no_grad():
        return net(torch.tensor(np.asarray(values, np.float32)).view(1, -1, 1))[0].numpy()


# ---- stateless: variable-length batching ----------------------------------------------------------

@pytest.mark.slow
def test_clients_see_series_in_forecast_out(server):
    meta = httpx.get(f"{server.url}/v2/models/forecast").json()
    assert meta["inputs"] == [{"name": "series", "datatype": "FP32", "shape": [-1, -1, 1]}]
    assert meta["outputs"] == [{"name": "forecast", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["parameters"]["kind"] == "sequence"
    assert {"sequence", "sequence(string_id)"} <= set(httpx.get(f"{server.url}/v2").json()["extensions"])


@pytest.mark.slow
def test_requests_of_different_lengths_batched_together_answer_as_alone(server, forecast_registry):
    histories = [CO2[100 * i : 100 * i + n] for i, n in enumerate((5, 60, 1, 33, 17, 48, 2, 64))]
    alone = [forecast(infer(server, h)) for h in histories]
    for h, f in zip(histories, alone):         # and as the eager model does
        np.testing.assert_allclose(f, eager(forecast_registry, "forecast", 1, h), rtol=0, atol=1e-4)
    before = {k: metric(server, f"zooserve_{k}", model="forecast")
              for k in ("execution_count_total", "inference_count_total", "padding_ratio_count", "padding_ratio_sum")}

    async def together():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(f"{server.url}/v2/models/forecast/infer", json=body(h))
                                          for h in histories))
    for f, r in zip(alone, asyncio.run(together())):
        np.testing.assert_allclose(forecast(r), f, rtol=0, atol=1e-5)
    executions = metric(server, "zooserve_execution_count_total", model="forecast") - before["execution_count_total"]
    padded = metric(server, "zooserve_padding_ratio_count", model="forecast") - before["padding_ratio_count"]
    ratio = metric(server, "zooserve_padding_ratio_sum", model="forecast") - before["padding_ratio_sum"]
    assert metric(server, "zooserve_inference_count_total", model="forecast") - before["inference_count_total"] == 8
    assert executions <= 3 and padded == executions     # 8 histories in at most 3 executions, each one padded
    assert ratio > 0                                    # the lengths differ, so something was padding
    stats = httpx.get(f"{server.url}/v2/models/forecast/stats").json()["model_stats"][0]
    assert max(b["batch_size"] for b in stats["batch_stats"]) >= 3
    # a request of several rows (one length) answers row by row as single requests do
    rows = np.stack([CO2[:20], CO2[500:520], CO2[1000:1020]])
    np.testing.assert_allclose(forecast(infer(server, rows[:, :, None])),
                               np.concatenate([forecast(infer(server, r)) for r in rows]), rtol=0, atol=1e-5)


# ---- stateful sequences -----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_series_streamed_in_chunks_answers_as_the_whole_series(server):
    history = CO2[300:360]
    whole = forecast(infer(server, history))
    cuts = (0, 17, 18, 40, 60)                                          # a chunk of one step too
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        r = infer(server, history[a:b], sequence_id="stream-1", sequence_start=i == 0, sequence_end=b == 60)
        got = forecast(r)
        assert r.headers["x-model-version"] == "1"
        if b != 60:
            assert metric(server, "zooserve_sequences_live", model="forecast") == 1
            assert metric(server, "zooserve_sequence_state_bytes", model="forecast") == 2 * 2 * 32 * 4   # h, c
    np.testing.assert_allclose(got, whole, rtol=0, atol=1e-4)
    assert metric(server, "zooserve_sequences_live", model="forecast") == 0      # the end freed it
    # the stock tritonclient (binary tensors, integer id) streams the same way
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        inp = triton.InferInput("series", [1, b - a, 1], "FP32")
        inp.set_data_from_numpy(history[a:b].reshape(1, -1, 1))
        result = client.infer("forecast", [inp], sequence_id=42, sequence_start=i == 0, sequence_end=b == 60)
    np.testing.assert_allclose(result.as_numpy("forecast"), whole, rtol=0, atol=1e-4)
    client.close()


@pytest.mark.slow
def test_a_start_for_a_live_id_starts_it_over(server):
    a, b = CO2[0:30], CO2[700:720]
    forecast(infer(server, a, sequence_id=5, sequence_start=True))
    restarted = forecast(infer(server, b, sequence_id=5, sequence_start=True))        # as Triton: a new sequence
    np.testing.assert_allclose(restarted, forecast(infer(server, b)), rtol=0, atol=1e-4)
    more = forecast(infer(server, CO2[720:730], sequence_id=5, sequence_end=True))
    np.testing.assert_allclose(more, forecast(infer(server, CO2[700:730])), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_unknown_and_ended_sequences_are_400(server):
    r = infer(server, CO2[:5], sequence_id="never-started")
    assert r.status_code == 400 and "never-started" in r.json()["error"] and "sequence_start" in r.json()["error"]
    forecast(infer(server, CO2[:5], sequence_id=9, sequence_start=True, sequence_end=True))   # one-shot sequence
    r = infer(server, CO2[5:9], sequence_id=9)
    assert r.status_code == 400 and "not live" in r.json()["error"]


def _nan_chunk(server, sequence_id) -> httpx.Response:
    inp = triton.InferInput("series", [1, 3, 1], "FP32")
    inp.set_data_from_numpy(np.array([[[340.0], [np.nan], [341.0]]], np.float32))
    payload, json_size = triton.InferenceServerClient.generate_request_body([inp], sequence_id=sequence_id)
    return httpx.post(f"{server.url}/v2/models/forecast/infer", content=payload,
                      headers={"Inference-Header-Content-Length": str(json_size)})


def _bad(values, shape, **parameters) -> dict:
    return {"inputs": [{"name": "series", "shape": shape, "datatype": "FP32", "data": list(values)}],
            "parameters": parameters}


@pytest.mark.slow
def test_bad_input_is_400_naming_the_problem_and_leaves_the_state_intact(server):
    sid = "careful"
    forecast(infer(server, CO2[900:940], sequence_id=sid, sequence_start=True))
    bad = [
        ("empty series", _bad([], [1, 0, 1], sequence_id=sid), "empty"),
        ("too long", _bad([340.0] * (MAX_LEN + 1), [1, MAX_LEN + 1, 1], sequence_id=sid), f"at most {MAX_LEN}"),
        ("feature size", _bad([340.0] * 6, [1, 3, 2], sequence_id=sid), "dim 2"),
        ("two series", _bad([340.0] * 6, [2, 3, 1], sequence_id=sid), "batch 1"),
        ("start not boolean", _bad([340.0], [1, 1, 1], sequence_id=sid, sequence_start="yes"), "sequence_start"),
        ("id not integer or string", _bad([340.0], [1, 1, 1], sequence_id=1.5), "sequence_id"),
        ("negative id", _bad([340.0], [1, 1, 1], sequence_id=-3), "sequence_id"),
        ("end without id", _bad([340.0], [1, 1, 1], sequence_end=True), "sequence_id"),
    ]
    for case, payload, needle in bad:
        r = infer(server, raw=payload)
        assert r.status_code == 400 and needle in r.json()["error"], (case, r.text)
    r = _nan_chunk(server, sid)
    assert r.status_code == 400 and "NaN" in r.json()["error"]
    # none of that touched the stored state: the stream goes on as if they were never sent
    got = forecast(infer(server, CO2[940:960], sequence_id=sid, sequence_end=True))
    np.testing.assert_allclose(got, forecast(infer(server, CO2[900:960])), rtol=0, atol=1e-4)
    # the same checks guard stateless requests
    for payload, needle in ((_bad([], [1, 0, 1]), "empty"), (_bad([1.0] * 65, [1, 65, 1]), "at most")):
        r = infer(server, raw=payload)
        assert r.status_code == 400 and needle in r.json()["error"]
    assert metric(server, "zooserve_requests_total", model="forecast", status="400") >= len(bad) + 3


@pytest.mark.slow
def test_a_sequence_stays_on_its_version_when_the_alias_moves(server, forecast_registry):
    history = CO2[1200:1250]
    v1_whole = forecast(infer(server, history, model="pinned", version="1"))
    r = infer(server, history[:30], model="pinned", sequence_id="pin", sequence_start=True)
    assert r.headers["x-model-version"] == "1"
    Registry(forecast_registry).set_alias("pinned", "stable", 2)
    load = httpx.post(f"{server.url}/v2/repository/models/pinned/load", headers={"Authorization": f"Bearer {ADMIN}"})
    assert load.status_code == 200
    fresh = infer(server, history, model="pinned")                      # new traffic follows the alias
    assert fresh.headers["x-model-version"] == "2"
    assert not np.allclose(forecast(fresh), v1_whole, atol=1e-3)       # a different model answers there
    r = infer(server, history[30:40], model="pinned", version="2", sequence_id="pin")
    assert r.status_code == 400 and "runs on version 1" in r.json()["error"]
    r = infer(server, history[30:50], model="pinned", sequence_id="pin", sequence_end=True)
    assert r.headers["x-model-version"] == "1" and r.json()["model_version"] == "1"
    np.testing.assert_allclose(forecast(r), v1_whole, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_a_version_the_policy_drops_serves_its_live_sequences_then_unloads(forecast_registry, start_server,
                                                                            tmp_path):
    """`pinned` loading only its newest version (plus aliased ones): moving `stable` to 2 drops
    version 1 from the policy, yet a sequence started there finishes there; then 1 unloads."""
    root = tmp_path / "registry"
    shutil.copytree(forecast_registry, root,
                    ignore=lambda folder, names: ["forecast"] if folder == str(forecast_registry) else [])
    registry = Registry(root)
    cfg = registry.model_config("pinned")
    cfg.version_policy = VersionPolicy(policy="latest", num_versions=1)
    registry.write_model_config(cfg)
    registry.set_alias("pinned", "stable", 1)                  # (another test may have moved it)
    history = CO2[1300:1340]
    index = lambda s: {r["version"]: r for r in httpx.post(f"{s.url}/v2/repository/index").json()   # noqa: E731
                       if r["name"] == "pinned"}
    with start_server(root, ["--admin-token", ADMIN]) as s:
        assert set(index(s)) == {"1", "2"}                      # 1 by the alias, 2 by the policy
        whole = forecast(infer(s, history, model="pinned", version="1"))
        r = infer(s, history[:25], model="pinned", sequence_id="old", sequence_start=True)
        assert r.headers["x-model-version"] == "1"
        registry.set_alias("pinned", "stable", 2)
        assert httpx.post(f"{s.url}/v2/repository/models/pinned/load",
                          headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
        assert "retiring" in index(s)["1"]["reason"]            # still loaded, for its live sequence
        assert infer(s, history, model="pinned").headers["x-model-version"] == "2"
        r = infer(s, history[25:], model="pinned", sequence_id="old", sequence_end=True)
        assert r.headers["x-model-version"] == "1"
        np.testing.assert_allclose(forecast(r), whole, rtol=0, atol=1e-4)
        deadline = time.monotonic() + 10
        while "1" in index(s) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert set(index(s)) == {"2"}                           # its last sequence over: unloaded
        r = infer(s, history, model="pinned", version="1")
        assert r.status_code == 404


def test_config_describes_the_sequence_batcher(server):
    config = triton.InferenceServerClient(server.url.removeprefix("http://")).get_model_config("forecast")
    batcher = config["sequence_batching"]
    assert batcher["max_sequence_idle_microseconds"] > 0 and batcher["control_input"] == []
    assert [(s["input_name"], s["output_name"]) for s in batcher["state"]] == [("h0", "hn"), ("c0", "cn")]
    assert all(s["data_type"] == "TYPE_FP32" and len(s["dims"]) == 2 for s in batcher["state"])


@pytest.mark.slow
def test_idle_sequences_are_freed(forecast_registry, start_server, tmp_path):
    registry = tmp_path / "registry"                  # `forecast` alone: this server starts quicker
    shutil.copytree(forecast_registry, registry,
                    ignore=lambda folder, names: ["pinned"] if folder == str(forecast_registry) else [])
    with start_server(registry, env={"ZOOSERVE_SEQUENCE_IDLE_TIMEOUT_S": "0.5"}) as s:
        forecast(infer(s, CO2[:10], sequence_id=1, sequence_start=True))
        forecast(infer(s, CO2[:10], sequence_id=2, sequence_start=True))
        assert metric(s, "zooserve_sequences_live", model="forecast") == 2
        time.sleep(1.6)                                                 # > timeout + the reaper's interval
        assert metric(s, "zooserve_sequences_live", model="forecast") == 0
        assert metric(s, "zooserve_sequence_state_bytes", model="forecast") == 0
        assert metric(s, "zooserve_sequences_expired_total", model="forecast") == 2
        r = infer(s, CO2[10:12], sequence_id=1)
        assert r.status_code == 400 and "not live" in r.json()["error"]


# ---- the store's books, no server -----------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def state(value: float) -> dict[str, np.ndarray]:
    return {"h0": np.full((2, 3), value, np.float32)}


def test_store_start_update_end_restart_and_expire():
    clock = Clock()
    store = SequenceStore(idle_timeout_s=10, max_sequences=2, clock=clock)
    a = store.start("a", 1, state(1), steps=4)
    assert store.counts(1) == (1, 24) and store.get("a") is a and a.steps == 4
    assert store.update(a, state(2), steps=3) and a.steps == 7 and a.state["h0"][0, 0] == 2
    again = store.start("a", 1, state(5), steps=1)                   # restart: a new sequence
    assert store.get("a") is again and not store.update(a, state(9), 1)   # the old one's update is dropped
    assert store.get("a").state["h0"][0, 0] == 5 and store.counts(1) == (1, 24)
    store.start("b", 2, state(0), steps=1)
    with pytest.raises(TooManySequences):
        store.start("c", 1, state(0), steps=1)
    clock.now = 11.0
    assert sorted(store.expire(version=2)) == ["b"] and store.expired(2) == 1 and store.counts(2) == (0, 0)
    with pytest.raises(UnknownSequence, match="expired after 10 s idle"):
        store.get("a")                                               # expiry also happens on access
    assert store.expired(1) == 1 and len(store) == 0
    c = store.start("c", 1, state(0), steps=1)
    store.end(c)
    with pytest.raises(UnknownSequence, match="not live"):
        store.get("c")
    store.start("d", 3, state(0), steps=1)
    assert store.drop_version(3) == 1 and store.counts(3) == (0, 0) and store.expired(3) == 0


def test_store_does_not_expire_a_sequence_with_a_request_in_flight():
    async def main():
        clock = Clock()
        store = SequenceStore(idle_timeout_s=1, max_sequences=10, clock=clock)
        seq = store.start(7, 1, state(0), steps=1)
        async with seq.lock:
            clock.now = 5.0
            assert store.expire() == [] and store.get(7) is seq
        assert store.expire() == [7]
    asyncio.run(main())
