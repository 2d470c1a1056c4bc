"""The classifier families: the DESIGN section 2 contract, training quality, checkpoints."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from training import checkpoint, data, loop
from training.families import config_from_dict, family_module, make_config

CLASSIFIERS = ["mlp", "resnet"]


@pytest.mark.parametrize("family", CLASSIFIERS)
def test_family_contract(family):
    fam = family_module(family)
    assert fam.KIND == "classify"
    assert "tiny" in fam.PRESETS
    config = make_config(family, "tiny")
    assert dataclasses.is_dataclass(config)
    # what is stored is exactly asdict, and it rebuilds the same config through JSON
    stored = json.loads(json.dumps(dataclasses.asdict(config)))
    assert dataclasses.asdict(config_from_dict(family, stored)) == dataclasses.asdict(config)
    model = fam.Model(config).eval()
    (x,) = fam.example_inputs(config, 5)
    assert x.shape == (5, 1, 8, 8) and x.min() >= 0 and x.max() <= 16
    assert model(x).shape == (5, 10)
    loss = fam.loss(model, (x, torch.arange(5)))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_unknown_family_and_preset_are_named():
    with pytest.raises(ValueError, match="unknown family 'nope'"):
        family_module("nope")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        make_config("mlp", "huge")
    with pytest.raises(ValueError, match="unknown fields"):
        config_from_dict("mlp", {"hidden": 3, "bogus": 1})


def test_digits_split_is_fixed_and_disjoint():
    a, b = data.digits(seed=0), data.digits(seed=0)
    assert a.sha256 == b.sha256
    assert torch.equal(a.test[1], b.test[1])
    sizes = [len(a.train[1]), len(a.val[1]), len(a.test[1])]
    assert sum(sizes) == 1797 and min(sizes) > 200
    train_rows = {tuple(r.flatten().tolist()) for r in a.train[0]}
    overlap = sum(tuple(r.flatten().tolist()) in train_rows for r in a.test[0])
    assert overlap < 5   # digits has a handful of duplicate images, not a leaked split


def test_cosine_schedule_warms_up_then_decays():
    values = [loop.cosine_with_warmup(s, warmup=10, total=100) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[99] < 0.01
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


@pytest.mark.parametrize("name", ["mlp-digits", "resnet-digits"])
def test_trained_tiny_preset_reaches_95_percent_on_held_out_digits(demo_registry, name):
    """Accuracy recomputed here from the published checkpoint, not read from the lineage."""
    model, _ = checkpoint.load(demo_registry / name / "1")
    split = data.digits(seed=0)
    acc = loop.accuracy(model, split.test)
    assert acc >= 0.95
    lineage = json.loads((demo_registry / name / "1" / "manifest.json").read_text())["lineage"]
    assert lineage["metrics"]["test_accuracy"] == pytest.approx(acc)
    assert lineage["dataset_sha256"] == split.sha256 and lineage["seed"] == 0


def test_checkpoint_round_trip(tmp_path):
    config = make_config("resnet", "tiny")
    torch.manual_seed(1)
    model = family_module("resnet").Model(config).eval()
    checkpoint.save(tmp_path, model, config, {"family": "resnet"})
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(json.dumps(dataclasses.asdict(config)))
    loaded, loaded_config = checkpoint.load(tmp_path)
    assert not loaded.training
    (x,) = family_module("resnet").example_inputs(config, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="family"):
        checkpoint.save(tmp_path, model, config, {})
