"""The token families (decoder, mamba, rnn_lm) with --set/--config, a run folder, --resume and early
stopping (issue 15), through the real command line (`zooserve train`).

Tiny models (--set) on ~60k characters of the bundled corpus written to a .txt file (--data), so the
BPE trains in a moment (vocab 300; rnn_lm keeps its byte-level 260). Each run: 40 steps of 4 windows
of 32 tokens, evaluated every 10 steps, a run-state checkpoint every 7 steps as well. One torch
thread, here and in the killed subprocess: a resumed run ends with bit-identical weights.
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

from serve.cli import main
from training import lm, run_state, text
from training.run_config import recipe_train_config, resolve
from training.run_state import RunState

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = ["steps=40", "block_size=32", "batch_size=4", "eval_interval=10", "eval_batches=2",
         "final_eval_batches=4", "warmup_steps=5", "checkpoint_every=7"]
# a bare vocab_size= is train.vocab_size, the BPE target (the model's is derived: the tokenizer's size)
MODEL = {
    "decoder": ["n_layer=1", "n_embd=32", "n_head=4", "n_kv_head=2", "ffn_hidden=64", "vocab_size=300"],
    "mamba": ["n_layer=1", "d_model=32", "d_state=4", "vocab_size=300"],
    # dropout between the two layers: the resumed run must restore torch's RNG too
    "rnn_lm": ["cell=gru", "n_embd=16", "hidden=32", "layers=2", "dropout=0.2"],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The bundled corpus's first ~60k characters as one .txt file (split by lines: 80/10/10)."""
    path = tmp_path_factory.mktemp("text") / "plays.txt"
    path.write_text("\n".join(d.text for d in text.load_corpus().documents)[:60_000])
    return path


def argv(family: str, corpus: Path, out: Path, *extra: str, sets: list[str] | None = None) -> list[str]:
    sets = [*MODEL[family], *TRAIN] if sets is None else sets
    return ["train", family, "--data", str(corpus), "--out", str(out),
            *[a for s in sets for a in ("--set", s)], *extra]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name   # bit-exact, not approximately


_references: dict = {}


def reference(family: str, corpus: Path, tmp_path_factory, capsys, *extra_sets: str):
    """The uninterrupted run of `family` (weights, metrics.jsonl records, checkpoint metrics, its
    --out folder), once per configuration."""
    key = (family, extra_sets)
    if key not in _references:
        out = tmp_path_factory.mktemp(f"reference-{family}")
        code, err = run_cli(argv(family, corpus, out, sets=[*MODEL[family], *TRAIN, *extra_sets]), capsys)
        assert code == 0, err
        metrics = json.loads((out / "meta.json").read_text())["lineage"]["metrics"]
        _references[key] = weights(out), run_state.read_metrics(out / "run"), metrics, out
    return _references[key]


def test_set_reaches_the_checkpoint_and_the_run_folder_logs_each_step(corpus, tmp_path, tmp_path_factory, capsys):
    ref_weights, records, metrics, _ = reference("decoder", corpus, tmp_path_factory, capsys)
    out = tmp_path / "out"
    code, err = run_cli(argv("decoder", corpus, out, sets=[*MODEL["decoder"], *TRAIN, "lr=3e-3", "n_embd=48"]),
                        capsys)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["block_size"]) == (1, 48, 32)   # model fields and derived
    assert config["vocab_size"] <= 300
    train = json.loads((out / "meta.json").read_text())["lineage"]["training_config"]["train"]
    assert (train["lr"], train["steps"], train["checkpoint_every"], train["patience"]) == (3e-3, 40, 7, 0)
    state = json.loads((out / "run" / "run_state.json").read_text())
    assert state["finished"] and state["position"]["step"] == 40
    assert state["config"]["run"]["model"]["n_embd"] == 48 and state["config"]["train"]["lr"] == 3e-3
    assert (out / "run" / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()

    # metrics.jsonl (of the reference run, same recipe): train_loss and lr each step, val_loss each evaluation
    steps = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 41)) and all(r["lr"] > 0 for r in steps)
    assert [r["step"] for r in records if "val_loss" in r] == [0, 10, 20, 30]
    assert records[-1]["step"] == 40 and records[-1]["final_val_loss"] == pytest.approx(metrics["val_loss"])
    assert metrics["steps_run"] == 40 and metrics["tokens_seen"] == 40 * 4 * 32

    # the run folder changes nothing: the recipe called with the resolved configs and no run folder
    run = resolve("decoder", "tiny", [*MODEL["decoder"], *TRAIN])
    plain = lm.train_token_family("decoder", "tiny", tmp_path / "plain", progress=False, data=corpus,
                                  train_cfg=run.train_config(), model_config=run.model_config())
    assert_same_weights(weights(tmp_path / "plain"), ref_weights)
    assert plain["val_loss"] == metrics["val_loss"] and not (tmp_path / "plain" / "run").exists()


def test_bad_values_are_one_line_naming_the_field(corpus, tmp_path, capsys):
    for sets, message in ((["steps=0"], "steps must be 1 or more, not 0"),
                          (["patience=-1"], "patience must be 0 or more, not -1"),
                          (["checkpoint_every=-7"], "checkpoint_every must be 0 or more"),
                          (["lr=0"], "lr must be above 0"),
                          (["n_layer=two"], "model.n_layer expects int"),
                          (["n_head=5"], "not a multiple of n_head 5")):
        code, err = run_cli(argv("decoder", corpus, tmp_path / "out", sets=sets), capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (sets, err)
    assert not (tmp_path / "out").exists()   # nothing trained, nothing written


KILL = textwrap.dedent("""
    import importlib, os, signal, sys
    import torch
    torch.set_num_threads(1)
    family, kill_after = sys.argv[1], int(sys.argv[2])
    module = importlib.import_module(f"training.models.{family}")
    loss, batches = module.loss, 0
    def dying_loss(model, batch):   # the process dies, as by `kill -9`, just before training batch kill_after + 1
        global batches
        if model.training:
            batches += 1
            if batches == kill_after + 1:
                os.kill(os.getpid(), signal.SIGKILL)
        return loss(model, batch)
    module.loss = dying_loss        # train_token_family looks the family's loss up when it trains
    from serve.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def killed_run(family: str, kill_after: int, args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", KILL, family, str(kill_after), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


def kill_and_resume(family: str, corpus: Path, out: Path, capsys, kill_after: int, checkpoint_step: int,
                    ref, extra: tuple[str, ...] = ()) -> RunState:
    """Kill a run with SIGKILL just before training step kill_after + 1, check its last checkpoint is
    at `checkpoint_step`, resume it and compare with `ref`; returns the killed run's state."""
    ref_weights, ref_records, ref_metrics, _ = ref
    args = argv(family, corpus, out, sets=[*MODEL[family], *TRAIN, *extra])
    killed_run(family, kill_after, args)
    state = RunState.load(out / "run")
    assert not state.finished and state.step == checkpoint_step
    assert [r["step"] for r in run_state.read_metrics(out / "run") if "train_loss" in r][-1] == kill_after
    assert not (out / "model.safetensors").exists()
    code, err = run_cli([*args, "--resume"], capsys)
    assert code == 0, err
    assert_same_weights(weights(out), ref_weights)
    assert run_state.read_metrics(out / "run") == ref_records    # no step twice, none missing, same values
    metrics = json.loads((out / "meta.json").read_text())["lineage"]["metrics"]
    assert {k: v for k, v in metrics.items() if not k.endswith("_seconds")} == {
        k: v for k, v in ref_metrics.items() if not k.endswith("_seconds")}
    return state


# checkpoints every 7 steps and at each evaluation (every 10): 7, 10, 14, 20, 21, 28, 30, 35, then the end
@pytest.mark.parametrize("family, kill_after, checkpoint_step", [
    ("decoder", 24, 21),
    ("rnn_lm", 33, 30),              # dropout: torch's RNG travels too
    ("mamba", 16, 14),
])
def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(corpus, tmp_path, tmp_path_factory, capsys,
                                                                  family, kill_after, checkpoint_step):
    ref = reference(family, corpus, tmp_path_factory, capsys)
    kill_and_resume(family, corpus, tmp_path / "out", capsys, kill_after, checkpoint_step, ref)


# lr 0.2 is too large for long: the validation loss falls, then climbs; evaluations every 3 steps,
# patience 2: training stops two evaluations after the best one (step 15 of 40 on this corpus)
EARLY_STOP = ("lr=0.2", "eval_interval=3", "patience=2")


def test_sigkill_in_early_stopping_then_resume(corpus, tmp_path, tmp_path_factory, capsys):
    ref = reference("decoder", corpus, tmp_path_factory, capsys, *EARLY_STOP)
    first_bad = ref[2]["best_step"] + 3   # the evaluation after the best: a checkpoint with bad evaluations = 1
    state = kill_and_resume("decoder", corpus, tmp_path / "out", capsys, first_bad, first_bad, ref, EARLY_STOP)
    assert state.best_weights is not None and state.bad_epochs == 1


def test_resume_is_refused_when_the_configuration_or_the_data_differ(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    sets = [*MODEL["decoder"], *TRAIN, "steps=10"]
    killed_run("decoder", 8, argv("decoder", corpus, out, sets=sets))   # checkpoint at step 7
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text().replace("the", "a"))
    for args, message in (
            (argv("decoder", corpus, out, sets=[*sets, "lr=1e-2"]), "train.lr: recorded 0.004, now 0.01"),
            (argv("decoder", corpus, out, sets=[*sets, "n_embd=16"]), "run.model.n_embd: recorded 32, now 16"),
            (argv("decoder", other, out, sets=sets), "dataset_sha256: recorded"),
            (argv("decoder", corpus, tmp_path / "elsewhere", sets=sets), "no run_state.json")):
        code, err = run_cli([*args, "--resume"], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (message, err)
        assert err.startswith("zooserve train: error: --resume: cannot resume") or "no run_state.json" in err
    assert RunState.load(out / "run").step == 7           # refusals leave the run as it was
    # checkpoint_every does not change the result: it may differ
    code, err = run_cli([*argv("decoder", corpus, out, sets=[*sets, "checkpoint_every=3"]), "--resume"], capsys)
    assert code == 0, err
    assert RunState.load(out / "run").finished


def test_early_stopping_stops_and_restores_the_best_weights(corpus, tmp_path_factory, capsys):
    _, records, metrics, out = reference("decoder", corpus, tmp_path_factory, capsys, *EARLY_STOP)
    evaluations = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and r["step"] > 0]
    best_step, best = min(evaluations, key=lambda e: e[1])
    assert (metrics["best_step"], metrics["best_val_loss"]) == (best_step, best)
    assert metrics["steps_run"] == evaluations[-1][0] == best_step + 2 * 3 < 40   # stopped early
    assert all(loss > best for step, loss in evaluations if step > best_step)
    assert records[-1]["early_stopped"] and records[-1]["best_val_loss"] == best

    # the checkpoint holds the best evaluation's weights: scored on the same windows, they give its loss
    model = lm.checkpoint.load(out)[0]
    from training.user_text import prepare

    val_ids = prepare("decoder", corpus, vocab_size=300, block_size=32).val_ids
    loss = lm.evaluate_lm(model, model_loss("decoder"), val_ids, block_size=32, batch_size=4, max_batches=2)
    assert loss == best   # the restored weights, bit for bit; the last ones scored evaluations[-1]
    assert abs(loss - evaluations[-1][1]) > 1e-3
    # off by default: the demo presets train every step as before
    assert all(recipe_train_config(f, p).patience == 0 for f, p in (("decoder", "tiny"), ("decoder", "tiny-moe"),
                                                                    ("mamba", "tiny"), ("rnn_lm", "tiny")))


def model_loss(family: str):
    from training.families import family_module

    return family_module(family).loss
