"""training/run_config.py: family + preset + config file + --set -> one validated run configuration."""

from __future__ import annotations

import dataclasses
import json

import pytest

from training import families, generative, lm, loop, series
from training.run_config import DERIVED, ConfigError, RunConfig, recipe_train_config, resolve


def test_defaults_preset_file_set_precedence(tmp_path):
    base = resolve("decoder", "tiny")
    assert base.model["n_layer"] == 4 and base.train["lr"] == 4e-3             # preset / recipe default
    assert resolve("decoder", "small").model["n_layer"] == 6                     # preset over defaults
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  n_layer: 5\n  n_embd: 64\ntrain:\n  lr: 3e-4\n  steps: 7\n")
    run = resolve("decoder", "small", config_file=f)
    assert run.model["n_layer"] == 5 and run.model["n_embd"] == 64               # file over preset
    assert run.train["lr"] == 3e-4 and run.train["steps"] == 7                   # YAML's "3e-4" string -> float
    run = resolve("decoder", "small", ["n_layer=3", "steps=9", "n_layer=2"], config_file=f)
    assert run.model["n_layer"] == 2 and run.train["steps"] == 9                 # --set over file, last wins
    assert run.model["n_embd"] == 64 and run.model["ffn_hidden"] == 688          # untouched keys keep their layer


def test_bare_and_prefixed_keys():
    bare = resolve("mlp", "tiny", ["hidden=64", "lr=1e-3", "seed=3"])
    prefixed = resolve("mlp", "tiny", ["model.hidden=64", "train.lr=1e-3", "train.seed=3"])
    assert bare == prefixed
    assert bare.model["hidden"] == 64 and bare.train["lr"] == 1e-3 and bare.train["seed"] == 3


def test_name_in_both_sections_needs_a_prefix(monkeypatch):
    monkeypatch.setitem(DERIVED, "decoder", {})   # no derived fields: block_size is then in both sections
    with pytest.raises(ConfigError, match=r"both a model and a train field.*model\.block_size= or train\.block_size="):
        resolve("decoder", "tiny", ["block_size=64"])
    assert resolve("decoder", "tiny", ["train.block_size=64"]).train["block_size"] == 64


def test_derived_model_fields():
    run = resolve("decoder", "tiny", ["block_size=64"])          # bare: the model's block_size is derived
    assert run.train["block_size"] == 64 and run.model["block_size"] == 64
    assert resolve("decoder", "tiny", ["model.block_size=64", "train.block_size=64"]).model["block_size"] == 64
    with pytest.raises(ConfigError, match=r"model\.block_size is set by the decoder recipe from train\.block_size"):
        resolve("decoder", "tiny", ["model.block_size=64"])
    with pytest.raises(ConfigError, match=r"^--set std=2: model\.std is fit on the training split"):
        resolve("rnn", "tiny", ["std=2"])


@pytest.mark.parametrize("item, message", [
    ("n_layer=abc", "--set n_layer=abc: model.n_layer expects int, got 'abc'"),
    ("tie_embeddings=maybe", "--set tie_embeddings=maybe: model.tie_embeddings expects bool, got 'maybe'"),
    ("lr=fast", "--set lr=fast: train.lr expects float, got 'fast'"),
    ("n_layer=2.5", "--set n_layer=2.5: model.n_layer expects int, got '2.5'"),
])
def test_type_errors_are_one_line(item, message):
    with pytest.raises(ConfigError) as err:
        resolve("decoder", "tiny", [item])
    assert str(err.value) == message and "\n" not in str(err.value)


def test_value_parsing():
    assert resolve("decoder", "tiny", ["tie_embeddings=false"]).model["tie_embeddings"] is False
    assert resolve("decoder", "tiny", ["tie_embeddings=1"]).model["tie_embeddings"] is True
    assert resolve("resnet", "tiny", ["blocks_per_stage=2,2,2"]).model["blocks_per_stage"] == (2, 2, 2)
    assert resolve("resnet", "tiny", ["blocks_per_stage=[1, 3]"]).model["blocks_per_stage"] == (1, 3)
    assert resolve("gan", "tiny", ["betas=0.5,0.9"]).train["betas"] == (0.5, 0.9)
    assert resolve("rnn", "tiny", ["cell=gru"]).model["cell"] == "gru"
    with pytest.raises(ConfigError, match=r"train\.betas expects tuple\[float, float\], got '0.5'"):
        resolve("gan", "tiny", ["betas=0.5"])


def test_unknown_key_lists_the_section_and_suggests():
    with pytest.raises(ConfigError) as err:
        resolve("mlp", "tiny", ["train.epoch=3"])
    msg = str(err.value)
    assert "unknown key 'epoch' for mlp (did you mean 'epochs'?)" in msg
    assert "train keys: batch_size, checkpoint_every, epochs, grad_clip, lr, patience, seed, warmup_steps, weight_decay" in msg
    assert "model keys" not in msg
    with pytest.raises(ConfigError, match=r"unknown key 'n_layer' for mlp \(did you mean 'n_layers'\?\); model keys: "):
        resolve("mlp", "tiny", ["n_layer=3"])
    with pytest.raises(ConfigError, match=r"unknown section 'optim'"):
        resolve("mlp", "tiny", ["optim.lr=1"])
    with pytest.raises(ConfigError, match=r"--set expects key=value"):
        resolve("mlp", "tiny", ["lr"])


def test_model_constraints_from_the_config():
    with pytest.raises(ConfigError, match=r"^decoder model config: n_head 8 is not a multiple of n_kv_head 3$"):
        resolve("decoder", "tiny", ["n_kv_head=3"])
    with pytest.raises(ConfigError, match=r"cell must be one of"):
        resolve("rnn_lm", "tiny", ["cell=transformer"])


def test_json_file_and_file_errors(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"preset": "small", "model": {"blocks_per_stage": [3, 3]}, "train": {"epochs": 2}}))
    run = resolve("resnet", None, config_file=f)
    assert run.preset == "small" and run.model["blocks_per_stage"] == (3, 3) and run.train["epochs"] == 2
    with pytest.raises(ConfigError, match=r"is for preset 'small', but --preset is 'tiny'"):
        resolve("resnet", "tiny", config_file=f)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {}\noptimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"unknown top-level key 'optimizer'; allowed: family, preset, model, train"):
        resolve("mlp", "tiny", config_file=bad)
    bad.write_text("model:\n  hidden: [1\n")
    with pytest.raises(ConfigError, match=r"not valid YAML") as err:
        resolve("mlp", "tiny", config_file=bad)
    assert "\n" not in str(err.value)
    bad.write_text("model:\n  hidden: many\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: model\.hidden expects int, got 'many'"):
        resolve("mlp", "tiny", config_file=bad)
    bad.write_text("model:\n  hidden: yes\n")
    with pytest.raises(ConfigError, match=r"model\.hidden expects int, got True"):
        resolve("mlp", "tiny", config_file=bad)
    bad.write_text("family: gan\n")
    with pytest.raises(ConfigError, match=r"is for family 'gan', not 'mlp'"):
        resolve("mlp", "tiny", config_file=bad)
    with pytest.raises(ConfigError, match=r"expected a \.yaml, \.yml or \.json file"):
        resolve("mlp", "tiny", config_file=tmp_path / "run.toml")
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        resolve("mlp", "tiny", config_file=tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"unknown preset 'huge' for mlp; known: tiny, small"):
        resolve("mlp", "huge")
    with pytest.raises(ConfigError, match=r"unknown family 'cnn'"):
        resolve("cnn", "tiny")


def test_render_is_stable_and_round_trips(tmp_path):
    run = resolve("diffusion", "tiny", ["channel_mult=1,2", "epochs=3"])
    text = run.render()
    assert text == resolve("diffusion", "tiny", ["epochs=3", "channel_mult=1,2"]).render()
    assert text.splitlines()[1:4] == ["family: diffusion", "preset: tiny", "model:"]
    assert "  channel_mult: [1, 2]\n" in text
    assert list(json.loads(run.to_json())) == ["family", "preset", "model", "train"]
    assert list(json.loads(run.to_json())["model"]) == [f.name for f in dataclasses.fields(run.model_config())]
    for name, render in (("again.yaml", RunConfig.render), ("again.json", RunConfig.to_json)):
        token = resolve("decoder", "tiny", ["block_size=64", "n_layer=2"])   # derived fields round-trip too
        path = tmp_path / name
        path.write_text(render(token))
        assert resolve("decoder", None, config_file=path) == token
    path.write_text(run.to_json())
    assert resolve("diffusion", "tiny", config_file=path) == run


def _recipe_model(family: str, preset: str, train: dict) -> dict:
    """The model config each recipe builds today for a preset with no overrides."""
    config = dataclasses.asdict(families.make_config(family, preset))
    if family in ("decoder", "mamba", "rnn_lm"):   # lm._build_config(..., vocab_size=tokenizer, block_size=block_size)
        config.update(block_size=train["block_size"], vocab_size=train["vocab_size"])
    return config


@pytest.mark.parametrize("family", sorted(families.FAMILIES))
def test_every_family_and_preset_resolves_as_today(family, tmp_path):
    for preset in families.preset_names(family):
        run = resolve(family, preset)
        assert run.family == family and run.preset == preset
        assert run.train == dataclasses.asdict(recipe_train_config(family, preset))
        assert run.model == _recipe_model(family, preset, run.train)
        non_derived = {k: v for k, v in run.model.items() if k not in DERIVED.get(family, {})}
        assert non_derived.items() <= dataclasses.asdict(families.make_config(family, preset)).items()
        assert run.model_config() == families.make_config(family, preset, **{
            k: run.model[k] for k in DERIVED.get(family, {}) if k in ("block_size", "vocab_size")})
        assert dataclasses.asdict(run.train_config()) == run.train
        (tmp_path / "run.yaml").write_text(run.render())   # --print-config output is a valid --config file
        assert resolve(family, None, config_file=tmp_path / "run.yaml") == run


def test_recipe_defaults_per_family():
    assert recipe_train_config("mlp", "tiny") == loop.TrainConfig()
    assert recipe_train_config("rnn", "small") == loop.TrainConfig(**series.TRAIN)
    assert recipe_train_config("decoder", "tiny").steps == lm.DEFAULT_STEPS["tiny"]
    assert recipe_train_config("decoder", "tiny-moe").steps == lm.DEFAULT_STEPS["tiny-moe"]
    assert recipe_train_config("mamba", "tiny").steps == lm.DEFAULT_STEPS["mamba/tiny"]
    assert recipe_train_config("rnn_lm", "tiny").steps == lm.DEFAULT_STEPS["rnn_lm/tiny"]
    assert recipe_train_config("rnn_lm", "tiny-gru").steps == lm.FALLBACK_STEPS
    assert recipe_train_config("rnn_lm", "tiny").vocab_size == 260
    for family in generative.GENERATIVE:
        assert recipe_train_config(family, "tiny") == generative.train_config(family, "tiny")
    assert resolve("decoder", "small").model["block_size"] == 128   # make_config says 256; the recipe trains at 128
