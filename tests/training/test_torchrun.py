"""`zooserve train FAMILY --nproc 2`: data-parallel training under torchrun (issue 17 §2), on the CPU
(gloo), through the real command line in subprocesses.

Each rank appends, after every optimiser step, a sha256 of its parameters and of the batch it
trained on (ZOOSERVE_DDP_CHECK): identical parameters on both ranks after every step while their
batches differ can only come from all-reduced gradients. ZOOSERVE_DDP_FAIL_AT=1:K makes rank 1
raise after its step K. Tiny models (--set), one torch thread per rank (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from serve.cli import main
from training import run_state, text

ROOT = Path(__file__).resolve().parents[2]
MLP = ["hidden=64", "epochs=20", "patience=100", "batch_size=64", "warmup_steps=5"]
DECODER = ["n_layer=1", "n_embd=32", "n_head=4", "n_kv_head=2", "ffn_hidden=64", "vocab_size=300",
           "steps=40", "block_size=32", "batch_size=4", "eval_interval=10", "eval_batches=2",
           "final_eval_batches=8", "warmup_steps=5"]
# the 2-rank run against one process, same settings (batch_size per rank: twice the batch, half the
# steps per epoch for the shared loop; twice the windows per step for the token loop)
MLP_ACCURACY_MARGIN = 0.03      # test accuracy, absolute
DECODER_LOSS_MARGIN = 0.05      # held-out loss, nats/token (2 ranks see twice the windows: lower or about equal)


def zooserve(args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "serve.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**clean, "OMP_NUM_THREADS": "1", **(env or {})})
    proc.elapsed, proc.ended = time.monotonic() - started, time.time()
    return proc


def sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def fingerprints(check: Path, rank: int) -> list[tuple[int, str, str]]:
    lines = (check / f"rank-{rank}.txt").read_text().splitlines()
    return [(int(step), params, batch) for step, params, batch in (line.split() for line in lines)]


def assert_ranks_in_step(check: Path, steps: int) -> None:
    """Both ranks: one line per step 1..steps, the same parameters after each, different batches."""
    rank0, rank1 = fingerprints(check, 0), fingerprints(check, 1)
    assert [s for s, _, _ in rank0] == [s for s, _, _ in rank1] == list(range(1, steps + 1))
    for (step, params0, batch0), (_, params1, batch1) in zip(rank0, rank1):
        assert params0 == params1, f"the ranks' weights differ after step {step}"
        assert batch0 != batch1, f"both ranks trained on the same batch at step {step}: the data is not sharded"


def meta(out: Path) -> dict:
    return json.loads((out / "meta.json").read_text())


_runs: dict = {}


def mlp_runs(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """mlp on digits, one process and 2 ranks (with fingerprints), once per session."""
    if "mlp" not in _runs:
        base = tmp_path_factory.mktemp("mlp")
        assert main(["train", "mlp", "--out", str(base / "single"), *sets(MLP)]) == 0   # in this process
        (base / "check").mkdir()
        ddp = zooserve(["train", "mlp", "--out", str(base / "ddp"), "--nproc", "2", *sets(MLP),
                        "--publish", "ddp-mlp", "--registry", str(base / "registry")],
                       env={"ZOOSERVE_DDP_CHECK": str(base / "check")})
        assert ddp.returncode == 0, ddp.stderr
        _runs["mlp"] = base, ddp
    base, ddp = _runs["mlp"]
    return base, base / "check", ddp


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_mlp_two_ranks_keep_identical_weights_and_match_one_process(tmp_path_factory):
    base, check, ddp = mlp_runs(tmp_path_factory)
    single, out = meta(base / "single"), meta(base / "ddp")
    assert "data-parallel with torchrun: 2 processes (gloo)" in ddp.stdout
    assert ddp.stdout.count("checkpoint written to") == 1      # rank 0 alone reports and publishes
    assert ddp.stdout.count("published ddp-mlp version 1") == 1
    assert [p.name for p in (base / "registry" / "ddp-mlp").iterdir() if p.is_dir()] == ["1"]
    manifest = json.loads((base / "registry" / "ddp-mlp" / "1" / "manifest.json").read_text())
    assert manifest["lineage"]["training_config"]["distributed"]["world_size"] == 2

    records = run_state.read_metrics(base / "ddp" / "run")
    steps = [r["step"] for r in records if "train_loss" in r]
    # 1,259 training rows: 630 per rank, 10 batches of 64 per epoch, 20 epochs; each step logged once (rank 0)
    assert steps == list(range(1, 201))
    assert_ranks_in_step(check, 200)

    lineage = out["lineage"]
    assert lineage["seed"] == 0
    distributed = lineage["training_config"]["distributed"]
    assert distributed["world_size"] == 2 and distributed["backend"] == "gloo"
    assert distributed["effective_batch_size"] == 128 and distributed["batch_size_per_rank"] == 64
    state = json.loads((base / "ddp" / "run" / "run_state.json").read_text())
    assert state["config"]["distributed"] == {"world_size": 2} and state["finished"]

    acc1, acc2 = single["lineage"]["metrics"]["test_accuracy"], lineage["metrics"]["test_accuracy"]
    print(f"mlp test accuracy: one process {acc1:.4f}, 2 ranks {acc2:.4f}")
    assert acc2 >= acc1 - MLP_ACCURACY_MARGIN
    assert acc2 > 0.85


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_decoder_two_ranks_keep_identical_weights_and_match_one_process(tmp_path):
    corpus = tmp_path / "plays.txt"
    corpus.write_text("\n".join(d.text for d in text.load_corpus().documents)[:60_000])
    common = ["train", "decoder", "--data", str(corpus), *sets(DECODER)]
    assert main([*common, "--out", str(tmp_path / "single")]) == 0   # one process: this one
    (tmp_path / "check").mkdir()
    ddp = zooserve([*common, "--out", str(tmp_path / "ddp"), "--nproc", "2"],
                   env={"ZOOSERVE_DDP_CHECK": str(tmp_path / "check")})
    assert ddp.returncode == 0, ddp.stderr
    assert_ranks_in_step(tmp_path / "check", 40)
    records = run_state.read_metrics(tmp_path / "ddp" / "run")
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, 41))

    one, two = meta(tmp_path / "single")["lineage"], meta(tmp_path / "ddp")["lineage"]
    assert two["training_config"]["distributed"]["world_size"] == 2 and two["seed"] == 0
    assert two["metrics"]["tokens_seen"] == 2 * one["metrics"]["tokens_seen"]
    loss1, loss2 = one["metrics"]["val_loss"], two["metrics"]["val_loss"]
    print(f"decoder held-out loss: one process {loss1:.4f}, 2 ranks {loss2:.4f} "
          f"(initial {two['metrics']['initial_val_loss']:.4f})")
    assert loss2 <= loss1 + DECODER_LOSS_MARGIN
    assert loss2 < two["metrics"]["initial_val_loss"] - 1.0


@pytest.mark.slow
def test_a_dying_rank_ends_the_run_in_one_line_and_resume_finishes_it(tmp_path, tmp_path_factory):
    base, _, _ = mlp_runs(tmp_path_factory)
    out, check = tmp_path / "out", tmp_path / "check"
    check.mkdir()
    args = ["train", "mlp", "--out", str(out), "--nproc", "2", *sets([*MLP, "checkpoint_every=10"])]
    died = zooserve(args, env={"ZOOSERVE_DDP_FAIL_AT": "1:25", "ZOOSERVE_DDP_CHECK": str(check)})
    assert died.returncode == 1, died.stderr
    last = died.stderr.strip().splitlines()[-1]
    assert last.startswith("zooserve train: error: rank 1 of 2 failed: RuntimeError: injected failure"), died.stderr
    assert "after step 25" in last
    # the failing rank's traceback, once; not rank 0's consequent "connection closed", nor torchrun's log
    assert died.stderr.count("Traceback (most recent call last)") == 1 and "rank 1: Traceback" in died.stderr
    assert "ChildFailedError" not in died.stderr
    # rank 1's last fingerprint is written just before it raises: the run ended within seconds of it
    assert died.ended - (check / "rank-1.txt").stat().st_mtime < 5.0
    assert fingerprints(check, 1)[-1][0] == 25
    assert not (out / "model.safetensors").exists()

    resumed = zooserve([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(str(out / "model.safetensors")), load_file(str(base / "ddp" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # as the uninterrupted 2-rank run


@pytest.mark.slow
def test_two_machines_with_static_rendezvous_train_as_two_processes(tmp_path, tmp_path_factory):
    """--nnodes 2 on loopback, a launcher per "machine" sharing --out: the same weights as --nproc 2."""
    base, _, _ = mlp_runs(tmp_path_factory)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["train", "mlp", "--out", str(tmp_path / "out"), "--nnodes", "2", "--rdzv-endpoint",
              f"127.0.0.1:{port}", *sets(MLP)]
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    nodes = [subprocess.Popen([sys.executable, "-m", "serve.cli", *common, "--node-rank", str(rank)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**clean, "OMP_NUM_THREADS": "1"}) for rank in (0, 1)]
    outputs = [node.communicate(timeout=120) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "checkpoint written to" in outputs[0][0] and "checkpoint written to" not in outputs[1][0]
    a, b = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(base / "ddp" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta(tmp_path / "out")["lineage"]["training_config"]["distributed"]["nnodes"] == 2


@pytest.mark.slow
def test_more_ranks_than_batches_is_refused_before_training(tmp_path):
    proc = zooserve(["train", "mlp", "--out", str(tmp_path / "out"), "--nproc", "2",
                     *sets(["batch_size=2000", "epochs=1"])])
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("zooserve train: error: rank ") and "2 ranks need at least 2 training batches" in last
    assert "1 batch(es) of batch_size 2000" in last
    assert "Traceback" not in proc.stderr and proc.stderr.count("zooserve train: error:") == 1   # once, not per rank
    assert not (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "out" / "run").exists()


@pytest.mark.slow
def test_resume_with_another_world_size_is_refused(tmp_path_factory, tmp_path, capsys):
    base, _, _ = mlp_runs(tmp_path_factory)
    import shutil

    shutil.copytree(base / "ddp", tmp_path / "out")
    code = main(["train", "mlp", "--out", str(tmp_path / "out"), "--resume", *sets(MLP)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "distributed: recorded {'world_size': 2}, now absent" in err


@pytest.mark.parametrize("argv, message", [
    (["train", "gan", "--nproc", "2"],
     "--nproc/--nnodes (torchrun) are for mlp, resnet, decoder, mamba, rnn_lm, not gan"),
    (["train", "rnn", "--nproc", "2"], "not rnn"),
    (["train", "mlp", "--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
    (["train", "mlp", "--node-rank", "1"], "--node-rank and --rdzv-endpoint are for several machines"),
    (["train", "mlp", "--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "--node-rank 2 is not in 0..1"),
    (["train", "mlp", "--nproc", "0"], "must be 1 or more"),
])
def test_launcher_flags_are_checked_at_once(argv, message, tmp_path, capsys):
    try:
        code = main([*argv, "--out", str(tmp_path / "out")])
    except SystemExit as exc:       # argparse's own refusal (--nproc 0)
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()
