"""`zooserve registry import`: ONNX and TorchScript files trained elsewhere become versions that a
real server loads (hashes, golden replay) and serves; whatever could not be served is refused with
`error: ...`, exit 2 and nothing published. Then the faulty canaries of tests/faulty_models.py,
imported and served: one fails on ~5% of inputs, one answers ~50 ms later.

Models are real: one-node ONNX graphs written with onnx.helper, small torch modules scripted or
traced here, and the demo registry's mlp-digits artifacts (torch.onnx.export and torch.jit.trace).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from safetensors.numpy import load_file
from sklearn.datasets import load_digits

from model_registry import Registry, sha256_file
from model_registry.cli import add_parser
from serve.golden import check_golden
from serve.runtimes import open_runtime
from tests.faulty_models import IMPORT_ARGS, build_failing_canary, build_slow_canary

REPO = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)


# ---- real model files ---------------------------------------------------------------------------

def linear_onnx(path: Path, batch: str | int = "batch") -> Path:
    """x FP32 [batch, 4] -> MatMul with fixed (4, 3) weights -> y FP32 [batch, 3]; batch fixed if an int."""
    weights = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.linspace(-1, 1, 12).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])], [weights])
    return _save_onnx(graph, path)


def identity_onnx(path: Path, elem_type: int) -> Path:
    """x [batch, 4] -> Identity -> y, of any ONNX element type (complex64, bfloat16 ...)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity",
        [helper.make_tensor_value_info("x", elem_type, ["batch", 4])],
        [helper.make_tensor_value_info("y", elem_type, ["batch", 4])])
    return _save_onnx(graph, path)


def _save_onnx(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


class TokenBag(torch.nn.Module):
    """ids INT64 (B, 5) in [0, 16) -> mean embedding -> scores FP32 (B, 3)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.EmbeddingBag(16, 8, mode="mean")
        self.head = torch.nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


class BatchCentered(torch.nn.Module):
    """x (B, 4) -> x minus the batch mean: a row's answer depends on the rest of its batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


class SumsTheBatch(torch.nn.Module):
    """x (B, 4) -> (1, 4): dim 0 of the output does not follow the batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(0, keepdim=True)


class ComplexOut(torch.nn.Module):
    """x (B, 4) -> complex64 (B, 2): a datatype KServe v2 has not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.view_as_complex(x.reshape(x.shape[0], 2, 2))


class NotFinite(torch.nn.Module):
    """x (B, 4) -> x / 0: inf and NaN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / 0.0


def scripted(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


def traced_dropout_in_training_mode(path: Path) -> Path:
    """A trace taken in training mode keeps its dropout on (the flag is baked in): answers vary by chance."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # the tracer warns that dropout makes the trace nondeterministic
        traced = torch.jit.trace(model, torch.ones(2, 4), check_trace=False)
    torch.jit.save(traced, str(path))
    return path


# ---- the CLI ------------------------------------------------------------------------------------

def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="zooserve")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def import_cli(root: Path, name: str, file: Path, *flags: str) -> int:
    return cli("registry", "import", "--registry", str(root), name, str(file), *flags)


def onnx_run(path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, inputs)


def torch_run(path: Path, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.jit.load(str(path)).eval()(torch.from_numpy(x)).numpy()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "registry"


# ---- imports that succeed -----------------------------------------------------------------------

def test_onnx_import_reads_the_graph_and_records_a_golden_pair_the_server_check_replays(tmp_path, root, capsys):
    source = linear_onnx(tmp_path / "linear.onnx")
    (tmp_path / "labels.txt").write_text("ant\nbee\ncat\n\n")
    assert import_cli(root, "tiny", source, "--labels", str(tmp_path / "labels.txt")) == 0
    out, err = capsys.readouterr()
    assert out == "1\n" and "tiny: imported" in err
    registry = Registry(root)
    manifest = registry.manifest("tiny", 1)
    assert (manifest.kind, manifest.format, manifest.family) == ("classify", "onnx", "imported")
    assert manifest.signature.model_dump() == {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]}
    assert manifest.labels == ["ant", "bee", "cat"]
    assert manifest.lineage.imported_from == str(source.resolve())
    assert manifest.lineage.imported_sha256 == sha256_file(source) == manifest.files["model.onnx"]
    assert manifest.lineage.import_options["golden_seed"] == 0
    registry.verify("tiny", 1)
    vdir = registry.version_dir("tiny", 1)
    golden = load_file(str(vdir / "golden.safetensors"))
    x = golden["input.x"]
    assert x.shape == (2, 4) and x.dtype == np.float32 and np.array_equal(x, np.round(x)) and x.max() < 10
    np.testing.assert_array_equal(golden["output.y"], onnx_run(source, {"x": x})[0])
    runtime = open_runtime(vdir, "onnx", "model.onnx", ["x"], ["y"], device="cpu")
    assert check_golden(manifest, runtime, vdir) == 0.0        # the server's load-time check


def test_torchscript_import_takes_shape_and_names_from_flags(tmp_path, root, capsys):
    source = scripted(TokenBag(), tmp_path / "bag.pt")
    assert import_cli(root, "bag", source, "--input-shape", "1,5", "--datatype", "INT64", "--seed", "7") == 0
    manifest = Registry(root).manifest("bag", 1)
    assert manifest.format == "torchscript" and manifest.artifacts == {"torchscript": "model.ts"}
    assert manifest.signature.model_dump() == {
        "inputs": [{"name": "input", "datatype": "INT64", "shape": [-1, 5]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}]}
    golden = load_file(str(Registry(root).version_dir("bag", 1) / "golden.safetensors"))
    assert golden["input.input"].dtype == np.int64 and golden["input.input"].shape == (2, 5)
    np.testing.assert_array_equal(golden["output.output"], torch_run(source, golden["input.input"]))
    assert manifest.lineage.import_options["golden_seed"] == 7


def test_no_batch_import_serves_a_fixed_first_dim_one_request_at_a_time(tmp_path, root, capsys):
    source = linear_onnx(tmp_path / "fixed.onnx", batch=1)
    assert import_cli(root, "fixed", source, "--no-batch") == 0
    assert "batching.max_batch_size from 32 to 1" in capsys.readouterr().err
    registry = Registry(root)
    assert registry.manifest("fixed", 1).signature.inputs[0].shape == [1, 4]
    assert registry.model_config("fixed").batching.max_batch_size == 1


# ---- refusals: exit 2, `error: ...`, nothing published ----------------------------------------------

def _text(tmp: Path, name: str) -> Path:
    (tmp / name).write_text("this is not a model\n")
    return tmp / name


def _random_bytes(tmp: Path, name: str) -> Path:
    (tmp / name).write_bytes(np.random.default_rng(0).bytes(4096))
    return tmp / name


SHAPE_4 = ("--input-shape", "1,4")
REFUSALS = [  # id, (tmp -> file), flags, what the error says
    ("text-as-onnx", lambda t: _text(t, "m.onnx"), (), "is not an ONNX model"),
    ("random-bytes-as-onnx", lambda t: _random_bytes(t, "m.onnx"), (), "is not an ONNX model"),
    ("text-as-torchscript", lambda t: _text(t, "m.pt"), SHAPE_4, "is not a TorchScript model"),
    ("random-bytes-as-torchscript", lambda t: _random_bytes(t, "m.pt"), SHAPE_4, "is not a TorchScript model"),
    ("unknown-suffix", lambda t: _text(t, "m.bin"), (), "cannot tell the format"),
    ("fixed-batch-graph", lambda t: linear_onnx(t / "m.onnx", batch=1), (), "has no batch axis"),
    ("complex-input", lambda t: identity_onnx(t / "m.onnx", TensorProto.COMPLEX64), (), "COMPLEX64 (ONNX)"),
    ("bfloat16-input", lambda t: identity_onnx(t / "m.onnx", TensorProto.BFLOAT16), (), "BFLOAT16 (ONNX)"),
    ("string-input", lambda t: identity_onnx(t / "m.onnx", TensorProto.STRING), (), "cannot store strings"),
    ("complex-output", lambda t: scripted(ComplexOut(), t / "m.pt"), SHAPE_4, "torch.complex64"),
    ("bfloat16-flag", lambda t: scripted(torch.nn.Linear(4, 3), t / "m.pt"), (*SHAPE_4, "--datatype", "BF16"),
     "--datatype BF16 is not a KServe v2 datatype"),
    ("torchscript-without-shape", lambda t: scripted(torch.nn.Linear(4, 3), t / "m.pt"), (), "give --input-shape"),
    ("wrong-input-shape", lambda t: scripted(torch.nn.Linear(4, 3), t / "m.pt"), ("--input-shape", "1,5"),
     "mat1 and mat2 shapes cannot be multiplied"),
    ("labels-count", lambda t: linear_onnx(t / "m.onnx"), ("--labels", __file__), "labels, but output 'y'"),
    ("onnx-name-flag", lambda t: linear_onnx(t / "m.onnx"), ("--input-name", "image"), "does not match the graph"),
    ("rows-depend-on-batch", lambda t: scripted(BatchCentered(), t / "m.pt"), SHAPE_4, "depends on chance or on"),
    ("dropout-left-on", lambda t: traced_dropout_in_training_mode(t / "m.pt"), SHAPE_4,
     "dropout or batch norm left in training mode"),
    ("output-ignores-batch", lambda t: scripted(SumsTheBatch(), t / "m.pt"), SHAPE_4, "does not follow the batch"),
    ("not-finite", lambda t: scripted(NotFinite(), t / "m.pt"), SHAPE_4, "is not finite"),
]


@pytest.mark.parametrize("make_file, flags, message", [pytest.param(*r[1:], id=r[0]) for r in REFUSALS])
def test_refused_with_a_clear_error_and_nothing_published(tmp_path, root, capsys, make_file, flags, message):
    assert import_cli(root, "tiny", linear_onnx(tmp_path / "first.onnx")) == 0
    capsys.readouterr()
    before = sorted(p.name for p in (root / "tiny").iterdir())
    assert import_cli(root, "tiny", make_file(tmp_path), *flags) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and message in err, err
    assert "Traceback (most recent call last)" not in err
    assert Registry(root).versions("tiny") == [1]
    assert sorted(p.name for p in (root / "tiny").iterdir()) == before        # no staging folder left


@pytest.mark.parametrize("name", ["Digits", "has space", ".dot-first", "a..b", ""])
def test_invalid_model_name_is_refused_before_anything_is_created(tmp_path, root, capsys, name):
    assert import_cli(root, name, linear_onnx(tmp_path / "m.onnx")) == 2
    assert capsys.readouterr().err.startswith(f"error: invalid model name {name!r}")
    assert Registry(root).models() == [] and not root.exists()


# ---- served by a real server ----------------------------------------------------------------------

DIGITS = load_digits()


def infer(client: httpx.Client, url: str, name: str, x: np.ndarray, datatype: str = "FP32") -> httpx.Response:
    body = {"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.flatten().tolist()}]}
    return client.post(url, json=body)


def output_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    (out,) = response.json()["outputs"]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


@pytest.mark.slow
def test_imported_models_are_served_like_any_other_version(registry_copy, start_server, tmp_path):
    v1 = registry_copy / "mlp-digits" / "1"
    (tmp_path / "labels.txt").write_text("".join(f"digit {i}\n" for i in range(10)))
    # the real entry point once, as a user runs it (the ONNX path needs no torch)
    done = subprocess.run([sys.executable, "-m", "serve.cli", "registry", "import", "--registry", str(registry_copy),
                           "digits-onnx", str(v1 / "model.onnx"), "--labels", str(tmp_path / "labels.txt")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "1\n"), done.stderr
    assert import_cli(registry_copy, "digits-ts", v1 / "model.ts", *IMPORT_ARGS) == 0
    bag = scripted(TokenBag(), tmp_path / "bag.pt")
    assert import_cli(registry_copy, "token-bag", bag, "--input-shape", "1,5", "--datatype", "INT64",
                      "--input-name", "ids", "--output-name", "scores") == 0
    fixed = linear_onnx(tmp_path / "fixed.onnx", batch=1)
    assert import_cli(registry_copy, "fixed-linear", fixed, "--no-batch") == 0
    assert Registry(registry_copy).manifest("digits-onnx", 1).lineage.imported_sha256 == \
        Registry(registry_copy).manifest("mlp-digits", 1).files["model.onnx"]

    images = DIGITS.images[100:116].astype(np.float32).reshape(16, 1, 8, 8)
    ids = np.random.default_rng(1).integers(0, 16, size=(3, 5))
    row = np.array([[0.5, -1.0, 2.0, 3.0]], dtype=np.float32)
    with start_server(registry_copy) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        meta = client.get("/v2/models/digits-onnx").json()
        assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        assert meta["parameters"]["labels"][3] == "digit 3" and meta["parameters"]["family"] == "imported"
        original = output_of(infer(client, "/v2/models/mlp-digits/versions/1/infer", "image", images))
        from_onnx = output_of(infer(client, "/v2/models/digits-onnx/infer", "image", images))
        from_ts = output_of(infer(client, "/v2/models/digits-ts/infer", "image", images))
        scores = output_of(infer(client, "/v2/models/token-bag/infer", "ids", ids, "INT64"))
        fixed_out = output_of(infer(client, "/v2/models/fixed-linear/infer", "x", row))
        two_rows = infer(client, "/v2/models/fixed-linear/infer", "x", np.vstack([row, row]))
    np.testing.assert_array_equal(from_onnx, original)
    np.testing.assert_allclose(from_onnx, onnx_run(v1 / "model.onnx", {"image": images})[0], atol=1e-5)
    np.testing.assert_allclose(from_ts, torch_run(v1 / "model.ts", images), atol=1e-5)
    np.testing.assert_allclose(from_ts, original, atol=1e-4)
    assert (original.argmax(1) == DIGITS.target[100:116]).mean() >= 0.9
    np.testing.assert_allclose(scores, torch_run(bag, ids), atol=1e-6)
    np.testing.assert_allclose(fixed_out, onnx_run(fixed, {"x": row})[0], atol=1e-6)
    assert two_rows.status_code == 400 and "dim 0 is 2, the model expects 1" in two_rows.json()["error"]


# ---- the faulty canaries ----------------------------------------------------------------------------

def import_canary(registry: Path, source: Path) -> int:
    """Import a canary as the next version of mlp-digits, aliased `canary` so that the server loads it
    (--force: an import's family, `imported`, is not mlp-digits' `mlp`)."""
    assert import_cli(registry, "mlp-digits", source, *IMPORT_ARGS, "--force") == 0
    reg = Registry(registry)
    version = reg.versions("mlp-digits")[-1]
    reg.set_alias("mlp-digits", "canary", version)
    assert reg.model_config("mlp-digits").routing.aliases["stable"] == 1
    return version


def random_digits(count: int, seed: int) -> np.ndarray:
    """`count` real digits drawn at random: (count, 1, 8, 8) FP32, integer pixels 0..16."""
    rows = np.random.default_rng(seed).choice(len(DIGITS.images), size=count, replace=False)
    return DIGITS.images[rows].astype(np.float32).reshape(count, 1, 8, 8)


@pytest.mark.slow
def test_failing_canary_fails_on_about_5_percent_of_inputs_and_answers_as_stable_elsewhere(
        registry_copy, start_server, tmp_path):
    canary = build_failing_canary(registry_copy / "mlp-digits" / "1" / "model.ts", tmp_path / "failing.pt")
    version = import_canary(registry_copy, canary)
    images = random_digits(400, seed=3)
    with start_server(registry_copy) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        answers = [infer(client, f"/v2/models/mlp-digits/versions/{version}/infer", "image", x[None]) for x in images]
        stable = [output_of(infer(client, "/v2/models/mlp-digits/versions/1/infer", "image", x[None])) for x in images]
        failed = [i for i, r in enumerate(answers) if r.status_code != 200]
        again = [infer(client, f"/v2/models/mlp-digits/versions/{version}/infer", "image", images[i][None])
                 for i in failed[:5]]
    assert 0.03 <= len(failed) / len(images) <= 0.08, len(failed)
    for i in failed:
        assert answers[i].status_code == 500 and "faulty canary" in answers[i].json()["error"], answers[i].text
    assert [r.status_code for r in again] == [500] * len(again)        # by input content: the same inputs fail
    for i, response in enumerate(answers):
        if i not in failed:
            np.testing.assert_allclose(output_of(response), stable[i], atol=1e-4)


@pytest.mark.slow
def test_slow_canary_answers_as_stable_at_least_30_ms_later(registry_copy, start_server, tmp_path):
    canary = build_slow_canary(registry_copy / "mlp-digits" / "1" / "model.ts", tmp_path / "slow.pt", extra_ms=50)
    version = import_canary(registry_copy, canary)
    images = random_digits(100, seed=4)
    latency: dict[str, list[float]] = {"stable": [], "canary": []}
    with start_server(registry_copy) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        for x in images:      # interleaved: both versions see the same machine at the same moments
            for alias, ref in (("stable", "1"), ("canary", str(version))):
                started = time.perf_counter()
                response = infer(client, f"/v2/models/mlp-digits/versions/{ref}/infer", "image", x[None])
                latency[alias].append(time.perf_counter() - started)
                if alias == "stable":
                    expected = output_of(response)
                else:
                    np.testing.assert_allclose(output_of(response), expected, atol=1e-4)
    added_s = statistics.median(latency["canary"]) - statistics.median(latency["stable"])
    assert added_s >= 0.030, json.dumps({k: statistics.median(v) for k, v in latency.items()})
