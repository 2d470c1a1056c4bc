"""ONNX Runtime through I/O binding (serve/runtimes.py BoundOnnxRuntime), the classify path where
ONNX Runtime runs on CUDA: bound on the CPU here, it must answer exactly as `session.run` does,
keep its device values per thread and per shape, and leave what it cannot pre-shape to ONNX
Runtime. The CUDA test runs where `onnxruntime-gpu` is installed (not on the machines here)."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

from serve.runtimes import BoundOnnxRuntime, OnnxRuntime, with_device_io


def export(model: torch.nn.Module, example: torch.Tensor, path, dynamic: dict[int, str]) -> None:
    dims = {axis: torch.export.Dim(name, min=1, max=1024) for axis, name in dynamic.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # exporter noise, as training/export.py quiets it
        torch.onnx.export(model.eval(), (example,), str(path), input_names=["image"], output_names=["logits"],
                          dynamic_shapes=(dims,), external_data=False, verbose=False)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ort") / "cnn.onnx"
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 8 * 8, 10))
    export(model, torch.zeros(2, 1, 8, 8), path, {0: "batch"})
    return OnnxRuntime(path, ["logits"], threads=1, device="cpu")


def batch(rng, rows: int) -> dict[str, np.ndarray]:
    return {"image": rng.standard_normal((rows, 1, 8, 8)).astype(np.float32)}


def test_bound_runs_answer_exactly_as_session_run_and_reuse_their_values(classifier):
    assert with_device_io(classifier) is classifier          # on the CPU the classify path is as before
    bound = BoundOnnxRuntime(classifier, device="cpu")
    rng = np.random.default_rng(0)
    for rows in (3, 3, 8, 5, 1, 8, 3):
        x = batch(rng, rows)
        got, want = bound.run(x)["logits"], classifier.run(x)["logits"]
        assert got.shape == (rows, 10)
        np.testing.assert_array_equal(got, want)
    # one input and one output value per batch size seen (3, 8, 5, 1), however often it came back
    assert bound.allocations == 8
    # the answer is the caller's: the next batch of the same size does not overwrite it
    first = bound.run(batch(rng, 3))["logits"]
    seen = first.copy()
    bound.run(batch(rng, 3))
    np.testing.assert_array_equal(first, seen)


def test_each_thread_binds_its_own_values(classifier):
    bound = BoundOnnxRuntime(classifier, device="cpu")
    errors = []

    def instance(seed: int):
        rng = np.random.default_rng(seed)
        for _ in range(40):
            x = batch(rng, 4)
            if not np.array_equal(bound.run(x)["logits"], classifier.run(x)["logits"]):
                errors.append(seed)

    threads = [threading.Thread(target=instance, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and bound.allocations == 6          # 3 threads x (one input + one output)


def test_an_output_with_a_symbolic_inner_dim_is_left_to_onnx_runtime(tmp_path):
    class Double(torch.nn.Module):
        def forward(self, x):
            return x * 2.0

    export(Double(), torch.zeros(2, 5), tmp_path / "double.onnx", {0: "batch", 1: "width"})
    plain = OnnxRuntime(tmp_path / "double.onnx", ["logits"], threads=1, device="cpu")
    bound = BoundOnnxRuntime(plain, device="cpu")
    for width in (5, 7):
        x = {"image": np.arange(3 * width, dtype=np.float32).reshape(3, width)}
        np.testing.assert_array_equal(bound.run(x)["logits"], x["image"] * 2)
    assert bound.allocations == 2                            # the two inputs; the outputs were ORT's


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu with a CUDA device")
def test_on_cuda_the_classify_path_is_bound_and_answers_as_the_cpu(classifier):
    cuda = OnnxRuntime(classifier.session._model_path, ["logits"], threads=1, device="cuda")
    bound = with_device_io(cuda)
    assert isinstance(bound, BoundOnnxRuntime) and bound.bind_device == "cuda"
    rng = np.random.default_rng(1)
    for rows in (3, 8, 32, 8):
        x = batch(rng, rows)
        np.testing.assert_allclose(bound.run(x)["logits"], classifier.run(x)["logits"], atol=1e-4)
