"""Exports against eager: ONNX in ONNX Runtime and TorchScript, at shapes other than the traced one."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from training import checkpoint, export
from training.families import family_module


@pytest.mark.parametrize("name", ["mlp-digits", "resnet-digits"])
def test_published_manifest_records_parity_of_both_formats(demo_registry, name):
    manifest = json.loads((demo_registry / name / "1" / "manifest.json").read_text())
    reports = {r["format"]: r for r in manifest["parity"]}
    assert set(reports) == {"onnx", "torchscript"}
    for r in reports.values():
        assert r["passed"] and 0 <= r["max_abs_error"] <= r["tolerance"] == 1e-4
        assert [s[0] for s in r["shapes_checked"]] == list(export.PARITY_BATCHES)
    assert manifest["format"] == "onnx"
    assert manifest["signature"]["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert manifest["signature"]["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]


@pytest.mark.parametrize("name", ["mlp-digits", "resnet-digits"])
def test_onnx_file_matches_eager_at_an_untraced_batch(demo_registry, name):
    vdir = demo_registry / name / "1"
    model, config = checkpoint.load(vdir)
    (x,) = family_module(checkpoint.read_family(vdir)).example_inputs(config, 13)
    session = ort.InferenceSession(str(vdir / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert got.shape == (13, 10)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_parity_check_catches_a_wrong_artifact():
    model = torch.nn.Linear(4, 2).eval()

    def make_inputs(b):
        return (torch.randn(b, 4),)

    def off_by_a_bit(x):
        with torch.no_grad():
            return (model(x).numpy() + 1e-3,)
    report = export.check_parity(model, off_by_a_bit, make_inputs, "onnx")
    assert not report["passed"] and report["max_abs_error"] == pytest.approx(1e-3, rel=1e-3)


def test_package_refuses_a_serve_format_it_did_not_export(tmp_path):
    with pytest.raises(ValueError, match="serve format"):
        export.package(tmp_path, tmp_path / "out", formats=("onnx",), serve_format="torchscript")
