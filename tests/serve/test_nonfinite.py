"""Non-finite values on a real server: a version whose artifact answers NaN fails its load-time
golden check (classify and sequence), and a model that overflows answers 200 with NaN/Inf written
as "NaN"/"Infinity"/"-Infinity" in JSON, as IEEE values in binary, and counted in
zooserve_nonfinite_outputs_total."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import torch
import tritonclient.http as triton
from onnx import numpy_helper
from prometheus_client.parser import text_string_to_metric_families

from model_registry import Registry
from serve.engines.sample import _compare
from serve.golden import GoldenMismatch
from serve.metrics import Metrics
from serve.v2_codec import RequestedOutput, encode_infer_response
from training import checkpoint, export
from training.import_model import import_model
from training.models import rnn

torch.set_num_threads(1)


# ---- artifacts that answer NaN, re-hashed as a broken export would be ------------------------------

def republish_with_hashes_cleared(registry: Registry, name: str, folder: Path) -> int:
    """Publish `folder` as the next version of `name`, its files hashed anew (a broken export's
    manifest lists the hashes of the broken files: the hash check at load cannot catch it)."""
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = {}
    manifest_path.write_text(json.dumps(manifest))
    return registry.publish(name, folder)


def onnx_with_nan_weights(src: Path, dst: Path) -> None:
    """The ONNX model at `src`, its first float initializer set to NaN, written to `dst`."""
    model = onnx.load(str(src))
    for i, init in enumerate(model.graph.initializer):
        weights = numpy_helper.to_array(init)
        if weights.dtype.kind == "f" and weights.size > 1:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.full_like(weights, np.nan), init.name))
            break
    onnx.save(model, str(dst))


def publish_nan_classifier(registry: Registry, work: Path) -> int:
    """mlp-digits version 1 with NaN weights, as the next version of mlp-digits."""
    folder = work / "mlp-nan"
    shutil.copytree(registry.root / "mlp-digits" / "1", folder)
    onnx_with_nan_weights(folder / "model.onnx", folder / "model.onnx")
    return republish_with_hashes_cleared(registry, "mlp-digits", folder)


def publish_nan_forecaster(registry: Registry, work: Path) -> int:
    """An untrained 1-layer GRU forecaster (TorchScript) whose weights are NaN, as model `forecast-nan`."""
    torch.manual_seed(0)
    model = rnn.Model(rnn.Config(cell="gru", hidden=8, layers=1, mean=340.0, std=15.0, step_std=0.8)).eval()
    checkpoint.save(work / "gru", model, model.config, {"family": "rnn"})
    folder = work / "gru-package"
    export.package(work / "gru", folder, formats=("torchscript",), serve_format="torchscript")
    scripted = torch.jit.load(str(folder / "model.ts"))
    with torch.no_grad():
        for p in scripted.parameters():
            p.fill_(math.nan)
    torch.jit.save(scripted, str(folder / "model.ts"))
    return republish_with_hashes_cleared(registry, "forecast-nan", folder)


# ---- a model that overflows ------------------------------------------------------------------------

class Overflow(torch.nn.Module):
    """y = x for ordinary inputs (the import's golden inputs are integers in [0, 10)); x * 1e38, so
    +-Inf in float32, where |x| > 1e6; Inf - Inf = NaN where x > 1e20."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = x * 1e38
        y = torch.where(x.abs() > 1e6, big, x)
        return torch.where(x > 1e20, big - big, y)


OVERFLOWING_ROW = [0.5, 1e7, -1e7, 1e21]          # -> 0.5, Inf, -Inf, NaN


def import_overflow(registry: Registry, work: Path) -> int:
    path = work / "overflow.pt"
    torch.jit.save(torch.jit.script(Overflow()), str(path))
    return import_model(registry, "overflow", path, input_shape="1,4", input_name="x", output_name="y").version


@pytest.fixture(scope="module")
def server(demo_registry, tmp_path_factory, start_server):
    """One server over a copy of the demo registry plus: mlp-digits 2 (NaN weights), forecast-nan 1
    (NaN weights) and overflow 1."""
    work = tmp_path_factory.mktemp("nonfinite")
    root = work / "registry"
    shutil.copytree(demo_registry, root)
    registry = Registry(root)
    assert publish_nan_classifier(registry, work) == 2
    assert publish_nan_forecaster(registry, work) == 1
    assert import_overflow(registry, work) == 1
    # lenient: forecast-nan has no version that serves, and strict readiness would hold the whole
    # server unready (the start-up wait polls /v2/health/ready)
    with start_server(root, env={"ZOOSERVE_READINESS": "lenient"}) as running:
        yield running


def index_row(server, name: str, version: str) -> dict:
    rows = httpx.post(f"{server.url}/v2/repository/index").json()
    return next(row for row in rows if row["name"] == name and row.get("version") == version)


def metric_value(server, name: str, **labels) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# ---- golden checks at load ---------------------------------------------------------------------------

@pytest.mark.slow
def test_a_classifier_version_answering_nan_is_unavailable_and_says_non_finite(server):
    row = index_row(server, "mlp-digits", "2")
    assert row["state"] == "UNAVAILABLE" and "non-finite" in row["reason"], row
    r = httpx.get(f"{server.url}/v2/models/mlp-digits/versions/2/ready")
    assert r.status_code == 503 and "non-finite" in r.json()["error"]
    image = np.zeros((1, 1, 8, 8), np.float32)
    body = {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": image.ravel().tolist()}]}
    r = httpx.post(f"{server.url}/v2/models/mlp-digits/versions/2/infer", json=body)
    assert r.status_code == 503 and "non-finite" in r.json()["error"]
    # version 1 (the stable alias) is untouched
    assert index_row(server, "mlp-digits", "1")["state"] == "READY"
    assert httpx.post(f"{server.url}/v2/models/mlp-digits/infer", json=body).status_code == 200


@pytest.mark.slow
def test_a_forecaster_answering_nan_fails_its_stateful_golden_check(server):
    row = index_row(server, "forecast-nan", "1")
    assert row["state"] == "UNAVAILABLE" and "non-finite" in row["reason"], row
    assert "stateful golden" in row["reason"]                 # SequenceRuntime's check, the first to run
    r = httpx.get(f"{server.url}/v2/models/forecast-nan/ready")
    assert r.status_code == 503 and "non-finite" in r.json()["error"]


def test_a_sampler_golden_comparison_fails_on_nan():
    # the generative engines' golden check (serve/engines/sample.py) compares through the same helper
    expected = np.zeros((2, 1, 8, 8), np.float32)
    got = expected.copy()
    got[1, 0, 3, 3] = np.nan
    with pytest.raises(GoldenMismatch, match="non-finite"):
        _compare("sampled output 'image'", got, expected, 1e-4)
    assert _compare("sampled output 'image'", expected.copy(), expected, 1e-4) == 0.0


# ---- non-finite answers ------------------------------------------------------------------------------

def overflow_body(row: list[float]) -> dict:
    return {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": row}]}


@pytest.mark.slow
def test_json_answers_write_non_finite_values_as_strings_and_count_them(server):
    def count() -> float:
        return metric_value(server, "zooserve_nonfinite_outputs_total", model="overflow", version="1")
    before = count()
    url = f"{server.url}/v2/models/overflow/infer"
    finite = httpx.post(url, json=overflow_body([1.0, 2.0, 3.0, 4.0]))
    assert finite.status_code == 200 and finite.json()["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]
    assert count() == before                                   # a finite answer is not counted
    r = httpx.post(url, json=overflow_body(OVERFLOWING_ROW))
    assert r.status_code == 200
    output = r.json()["outputs"][0]
    assert output["datatype"] == "FP32" and output["shape"] == [1, 4]
    assert output["data"] == [0.5, "Infinity", "-Infinity", "NaN"]
    assert count() == before + 1                               # one answer, three non-finite values: 1


@pytest.mark.slow
def test_tritonclient_reads_non_finite_values_from_json_and_binary_answers(server):
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    before = metric_value(server, "zooserve_nonfinite_outputs_total", model="overflow", version="1")
    expected = np.array([[0.5, np.inf, -np.inf, np.nan]], np.float32)
    for binary in (False, True):
        x = triton.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.array([OVERFLOWING_ROW], np.float32), binary_data=binary)
        result = client.infer("overflow", [x], outputs=[triton.InferRequestedOutput("y", binary_data=binary)])
        got = result.as_numpy("y")
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)           # NaN where NaN, the same signed Infs
    client.close()
    after = metric_value(server, "zooserve_nonfinite_outputs_total", model="overflow", version="1")
    assert after == before + 2


# ---- the encoder ---------------------------------------------------------------------------------

def encode(outputs: dict[str, np.ndarray], datatypes: dict[str, str], binary: bool = False) -> tuple[dict, int]:
    """(the JSON header, times on_nonfinite was called) of one answer with every output requested."""
    calls = []
    requested = [RequestedOutput(name, binary) for name in outputs]
    body, headers = encode_infer_response("m", "1", None, outputs, requested, datatypes,
                                          on_nonfinite=lambda: calls.append(1))
    header = body[: int(headers.get("Inference-Header-Content-Length", len(body)))]
    return json.loads(header), len(calls)


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_every_float_datatype_writes_the_same_strings(datatype):
    doc, calls = encode({"y": np.array([np.nan, -np.inf, np.inf, -1.5])}, {"y": datatype})
    assert doc["outputs"][0]["data"] == ["NaN", "-Infinity", "Infinity", -1.5] and calls == 1


def test_a_value_beyond_fp16_range_becomes_infinity_and_counts():
    doc, calls = encode({"y": np.array([1e6, 1.0], np.float32)}, {"y": "FP16"})
    assert doc["outputs"][0]["data"] == ["Infinity", 1.0] and calls == 1


def test_one_count_per_answer_whatever_holds_the_non_finite_values():
    outputs = {"a": np.array([[np.nan, np.nan]], np.float32), "b": np.array([[np.inf]], np.float32),
               "label": np.array([3], np.int64)}
    datatypes = {"a": "FP32", "b": "FP32", "label": "INT64"}
    for binary in (False, True):
        assert encode(outputs, datatypes, binary)[1] == 1
    finite = {"a": np.zeros((1, 2), np.float32), "label": np.array([3], np.int64)}
    for binary in (False, True):
        assert encode(finite, {"a": "FP32", "label": "INT64"}, binary)[1] == 0


def test_binary_answers_carry_the_ieee_values():
    values = np.array([np.nan, np.inf, -np.inf, 2.0], np.float32)
    requested = [RequestedOutput("y", True)]
    body, headers = encode_infer_response("m", "1", None, {"y": values}, requested, {"y": "FP32"})
    start = int(headers["Inference-Header-Content-Length"])
    assert body[start:] == values.astype("<f4").tobytes()


def test_the_counter_is_exposed_per_version():
    metrics = Metrics()
    series = metrics.for_model("overflow", 3)
    series.nonfinite_answer()
    series.nonfinite_answer()
    samples = [s for fam in text_string_to_metric_families(metrics.exposition().decode()) for s in fam.samples
               if s.name == "zooserve_nonfinite_outputs_total"]
    assert [(s.labels, s.value) for s in samples] == [({"model": "overflow", "version": "3"}, 2.0)]
