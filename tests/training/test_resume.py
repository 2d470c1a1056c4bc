"""Runs that survive: training/loop.py with a run folder (training/run_state.py).

A run interrupted (an exception, a real SIGKILL, a kill in the middle of a checkpoint save) and
resumed ends with bit-identical weights and the same metrics.jsonl as the uninterrupted run of the
same seed, on the CPU with one thread. Digits: 1,257 training rows, batch 64, so 20 steps an epoch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import data, loop, run_state
from training.families import family_module, make_config
from training.run_state import RunState, RunStateError

ROOT = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 20
BASE = dict(epochs=3, checkpoint_every=7)
# lr so large that the best validation loss comes in the first epochs: early stopping before epoch 6
EARLY_STOP = dict(epochs=6, checkpoint_every=7, lr=0.3, patience=3)


class Crash(Exception):
    """Stands in for the process dying in the middle of a training step."""


# one torch thread: results independent of the machine's cores (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return data.digits(seed=0)


def run(digits, run_dir=None, family="mlp", crash_after=None, resume=False, run_config=None, **cfg):
    """Train `family` tiny on digits; `crash_after` training batches, raise Crash. Returns (result, weights)."""
    fam = family_module(family)
    torch.manual_seed(0)
    model = fam.Model(make_config(family, "tiny"))
    batches = 0

    def loss(m, batch):
        nonlocal batches
        if m.training:
            batches += 1
            if crash_after is not None and batches > crash_after:
                raise Crash
        return fam.loss(m, batch)

    result = loop.train(model, loss, digits.train, digits.val, loop.TrainConfig(**{**BASE, **cfg}), progress=False,
                        run_dir=run_dir, resume=resume, run_config=run_config or {"family": family})
    return result, {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name   # bit-exact, not approximately


_references: dict = {}


def reference(digits, tmp_path_factory, family="mlp", **cfg):
    """The uninterrupted run (result, weights, metrics), computed once per configuration."""
    key = (family, tuple(sorted(cfg.items())))
    if key not in _references:
        run_dir = tmp_path_factory.mktemp("reference")
        result, weights = run(digits, run_dir, family, **cfg)
        _references[key] = result, weights, run_state.read_metrics(run_dir)
    return _references[key]


def test_the_run_folder_changes_nothing_and_holds_no_pickle(digits, tmp_path, tmp_path_factory):
    result, weights, metrics = reference(digits, tmp_path_factory)
    fam = family_module("mlp")
    torch.manual_seed(0)
    plain = fam.Model(make_config("mlp", "tiny"))
    assert loop.train(plain, fam.loss, digits.train, digits.val, loop.TrainConfig(**BASE), progress=False) == result
    assert_same_weights(plain.state_dict(), weights)
    steps = [m["step"] for m in metrics if "train_loss" in m]
    assert steps == list(range(1, 3 * STEPS_PER_EPOCH + 1))
    assert all(m["lr"] > 0 for m in metrics if "train_loss" in m)
    assert [m["epoch"] for m in metrics if "val_loss" in m] == [0, 1, 2]

    run(digits, tmp_path)
    record = json.loads((tmp_path / "run_state.json").read_text())   # plain JSON
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["metrics.jsonl", "run_state.json", record["tensors"]])
    assert record["finished"] and record["result"] == result and record["position"]["step"] == 60
    load_file(str(tmp_path / record["tensors"]))   # plain safetensors
    source = (ROOT / "training" / "run_state.py").read_text()
    assert "pickle" not in source.replace("pickled", "") and "torch.load" not in source


# checkpoints (checkpoint_every=7, 20 steps an epoch): steps 7, 14, 20 (epoch end, after validation), 21, 28, ...
@pytest.mark.parametrize("family, crash_after, checkpoint_step, cfg", [
    ("mlp", 30, 28, BASE),           # mid-epoch
    ("mlp", 41, 40, BASE),           # one step after an epoch-end checkpoint
    ("mlp", 35, 35, BASE),           # right at a step checkpoint
    ("resnet", 47, 42, BASE),        # batch norm running statistics travel too
    ("mlp", 70, 70, EARLY_STOP),     # killed with best weights and bad epochs held, then early stopping
], ids=["mid-epoch", "after-epoch-end", "at-checkpoint", "resnet", "early-stopping"])
def test_interrupted_run_resumes_exactly(digits, tmp_path, tmp_path_factory, family, crash_after, checkpoint_step,
                                         cfg):
    result, weights, metrics = reference(digits, tmp_path_factory, family, **cfg)
    if cfg is EARLY_STOP:
        assert result["epochs_run"] < cfg["epochs"]          # it stopped early
    with pytest.raises(Crash):
        run(digits, tmp_path, family, crash_after=crash_after, **cfg)
    state = RunState.load(tmp_path)
    assert not state.finished and state.step == checkpoint_step
    if cfg is EARLY_STOP:
        # killed with the early-stopping state in flight: epochs without a better loss counted, the
        # best weights held (which epoch is best moves with the numeric libraries: lr 0.3 is chaotic)
        assert 1 <= state.bad_epochs < cfg["patience"] and state.best_weights is not None
    resumed, resumed_weights = run(digits, tmp_path, family, resume=True, **cfg)
    assert resumed == result
    assert_same_weights(resumed_weights, weights)
    assert run_state.read_metrics(tmp_path) == metrics   # no step twice, none missing, same values


def test_interrupted_twice_then_resumed_when_finished(digits, tmp_path, tmp_path_factory):
    result, weights, metrics = reference(digits, tmp_path_factory)
    with pytest.raises(Crash):
        run(digits, tmp_path, crash_after=10)                # checkpoint at step 7
    with pytest.raises(Crash):
        run(digits, tmp_path, crash_after=25, resume=True)   # steps 8..32: checkpoint at step 28
    assert RunState.load(tmp_path).step == 28
    for _ in range(2):   # the second resume finds the run finished: its result and final weights
        resumed, resumed_weights = run(digits, tmp_path, resume=True)
        assert resumed == result
        assert_same_weights(resumed_weights, weights)
        assert run_state.read_metrics(tmp_path) == metrics


SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from training import data, loop, run_state
    from training.families import family_module, make_config

    run_dir, resume, kill_after_steps, kill_at = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    saves = 0
    if kill_at == "tensors-written":     # the 3rd save dies with its tensors only under the temporary name
        original_save_file = run_state.save_file
        def save_file(*args, **kwargs):
            global saves
            saves += 1
            original_save_file(*args, **kwargs)
            if saves == 3:
                die()
        run_state.save_file = save_file
    if kill_at == "before-commit":       # the 3rd save dies with its tensors in place, run_state.json not yet
        original_replace = os.replace
        def replace(src, dst):
            global saves
            if str(dst).endswith("run_state.json"):
                saves += 1
                if saves == 3:
                    die()
            original_replace(src, dst)
        run_state.os.replace = replace
    fam = family_module("mlp")
    split = data.digits(seed=0)
    torch.manual_seed(0)
    model = fam.Model(make_config("mlp", "tiny"))
    batches = 0
    def loss(m, batch):
        global batches
        if m.training:
            batches += 1
            if batches == kill_after_steps + 1:
                die()
        return fam.loss(m, batch)
    loop.train(model, loss, split.train, split.val, loop.TrainConfig(epochs=3, checkpoint_every=7),
               progress=False, run_dir=run_dir, resume=resume, run_config={"family": "mlp"})
""")


def script(run_dir: Path, resume: bool = False, kill_after_steps: int = -1, kill_at: str = "") -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(run_dir), "1" if resume else "0", str(kill_after_steps),
                           kill_at], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, -signal.SIGKILL), done.stderr
    return done.returncode


def test_sigkill_then_resume(digits, tmp_path, tmp_path_factory):
    result, weights, metrics = reference(digits, tmp_path_factory)
    assert script(tmp_path, kill_after_steps=45) == -signal.SIGKILL
    assert RunState.load(tmp_path).step == 42
    steps = [m["step"] for m in run_state.read_metrics(tmp_path) if "train_loss" in m]
    assert steps[-1] == 45   # the killed run logged past its checkpoint ...
    assert script(tmp_path, resume=True) == 0
    final = RunState.load(tmp_path)
    assert final.finished and final.result == result
    assert_same_weights(final.model, weights)       # trained in two other processes, equal bit for bit
    assert run_state.read_metrics(tmp_path) == metrics   # ... and the resumed run cut that off


@pytest.mark.parametrize("kill_at", ["tensors-written", "before-commit"])
def test_a_killed_save_leaves_the_previous_checkpoint(digits, tmp_path, tmp_path_factory, kill_at):
    result, weights, _ = reference(digits, tmp_path_factory)
    assert script(tmp_path, kill_at=kill_at) == -signal.SIGKILL
    leftover = sorted(p.name for p in tmp_path.iterdir())
    assert (".run_state.000003.safetensors.tmp" if kill_at == "tensors-written"
            else "run_state.000003.safetensors") in leftover
    state = RunState.load(tmp_path)   # the 2nd save, complete (its sha256 checked)
    assert (state.seq, state.step) == (2, 14)
    resumed, resumed_weights = run(digits, tmp_path, resume=True)
    assert resumed == result
    assert_same_weights(resumed_weights, weights)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".", "run_state."))) == sorted([
        "run_state.json", f"run_state.{RunState.load(tmp_path).seq:06d}.safetensors"])   # leftovers gone


def test_a_checkpoint_is_only_ever_named_when_complete(digits, tmp_path, monkeypatch):
    renames, original = [], os.replace

    def replace(src, dst):
        assert Path(src).name.endswith(".tmp") and Path(src).parent == Path(dst).parent
        with open(src, "rb") as f:   # complete before it gets its name
            body = f.read()
        if Path(dst).name == "run_state.json":
            assert (Path(dst).parent / json.loads(body)["tensors"]).exists()
        else:
            load_file(str(src))
        renames.append(Path(dst).name)
        original(src, dst)

    monkeypatch.setattr(run_state.os, "replace", replace)
    run(digits, tmp_path, epochs=1)
    # steps 7 and 14, the end of the only epoch (the final save): tensors first, then the commit
    assert renames == ["run_state.000001.safetensors", "run_state.json", "run_state.000002.safetensors",
                       "run_state.json", "run_state.000003.safetensors", "run_state.json"]


def test_a_different_configuration_is_refused(digits, tmp_path):
    config = {"family": "mlp", "model": {"hidden": 128, "feature_mean": (0.5, 1.5)}, "train": {"lr": 3e-3}}
    with pytest.raises(Crash):
        run(digits, tmp_path, crash_after=8, run_config=config)
    with pytest.raises(RunStateError) as err:
        run(digits, tmp_path, resume=True, lr=1e-3, run_config={**config, "model": {"hidden": 64}})
    message = str(err.value)
    assert "loop.lr: recorded 0.003, now 0.001" in message
    assert "run.model.hidden: recorded 128, now 64" in message
    assert "run.model.feature_mean: recorded [0.5, 1.5], now absent" in message
    with pytest.raises(RunStateError, match=r"data\.val"):
        fam = family_module("mlp")
        model = fam.Model(make_config("mlp", "tiny"))
        loop.train(model, fam.loss, digits.train, digits.test, loop.TrainConfig(**BASE), progress=False,
                   run_dir=tmp_path, resume=True, run_config=config)
    with pytest.raises(RunStateError, match="already holds a run"):
        run(digits, tmp_path, run_config=config)
    with pytest.raises(RunStateError, match="no run_state.json"):
        run(digits, tmp_path / "elsewhere", resume=True)
    # checkpoint_every may change: it does not change the result
    assert run(digits, tmp_path, resume=True, checkpoint_every=5, run_config=config)[0]["steps"] == 60
