"""`zooserve train` with --set, --config, --print-config and --resume (issue 15, sections 2-3),
through the real command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve.cli import main
from tests.fixture_builds import in_background

ZOOSERVE = [sys.executable, "-m", "serve.cli"]
ROOT = Path(__file__).resolve().parents[2]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_print_config_resolves_preset_file_and_set_and_feeds_back(tmp_path, capsys):
    code, printed, _ = run_cli(["train", "mlp", "--set", "hidden=64", "--set", "lr=1e-3", "--print-config"], capsys)
    assert code == 0 and "hidden: 64" in printed and "lr: 0.001" in printed
    cfg = tmp_path / "run.yaml"
    cfg.write_text(printed)
    code, again, _ = run_cli(["train", "mlp", "--config", str(cfg), "--print-config"], capsys)
    assert code == 0 and again == printed                   # the printed file reads back to itself
    code, third, _ = run_cli(["train", "mlp", "--config", str(cfg), "--set", "hidden=32", "--print-config"], capsys)
    assert "hidden: 32" in third                            # --set wins over the file


@pytest.mark.parametrize("argv,message", [
    (["train", "mlp", "--set", "hiden=3", "--out", "x"], "did you mean 'hidden'"),
    (["train", "mlp", "--set", "epochs=many", "--out", "x"], "train.epochs expects int"),
    (["train", "decoder", "--set", "lr=0", "--out", "x"], "lr must be above 0"),
    (["train", "mlp", "--set", "n_classes=3", "--data", "table.csv", "--out", "x"], "comes from --data"),
    (["train", "mlp", "--set", "epochs=2"], "required: --out"),
    (["train", "mlp", "--data", "table.csv", "--value-column", "a", "--out", "x"], "--value-column is for rnn"),
    (["train", "rnn", "--time-column", "t", "--out", "x"], "--time-column describes --data"),
    (["train", "decoder", "--data", "missing.txt", "--out", "x"], "missing.txt"),
    (["train", "rnn_lm", "--data", "table.csv", "--tokenizer", "tok.json", "--out", "x"], "--tokenizer is for decoder"),
    (["train", "gan", "--data", "table.csv", "--out", "x"], "gan takes an image folder"),
])
def test_configuration_mistakes_are_one_line_and_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "table.csv").write_text("a,label\n1,x\n2,y\n")
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()                    # nothing trained


def test_set_reaches_the_model_and_the_loop(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, _ = run_cli(["train", "mlp", "--set", "hidden=32", "--set", "epochs=2", "--out", str(out)], capsys)
    assert code == 0
    assert json.loads((out / "config.json").read_text())["hidden"] == 32
    lineage = json.loads((out / "meta.json").read_text())["lineage"]
    assert lineage["training_config"]["train"]["epochs"] == 2 and lineage["metrics"]["epochs_run"] == 2
    steps = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "train_loss" in s] == list(range(1, steps[-1]["step"] + 1))
    assert sum("val_loss" in s for s in steps) == 2          # one validation per epoch


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    args = ["train", "mlp", "--set", "epochs=40", "--set", "patience=100", "--set", "train.checkpoint_every=5",
            "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    whole = tmp_path / "whole"
    # the uninterrupted reference trains alongside the killed run (one thread each, 2 cores)
    with in_background([*ZOOSERVE, *args, "--out", str(whole)], tmp_path / "whole.log", timeout=600, env=env,
                       cwd=ROOT) as whole_done:
        killed = tmp_path / "killed"
        proc = subprocess.Popen([*ZOOSERVE, *args, "--out", str(killed)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        state = killed / "run" / "run_state.json"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(state.read_text())["position"]["step"] >= 60:   # a few epochs in, far from the end (~760 steps)
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert not (killed / "model.safetensors").exists()       # killed before it finished
        done = subprocess.run([*ZOOSERVE, *args, "--out", str(killed), "--resume"], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=600)
        assert done.returncode == 0, done.stderr
        whole_done()
    assert (killed / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert (killed / "run" / "metrics.jsonl").read_bytes() == (whole / "run" / "metrics.jsonl").read_bytes()


def test_rnn_trains_on_a_csv_series_with_set_and_its_run_folder(tmp_path, capsys):
    import math
    import random

    rng = random.Random(0)
    rows = [(i, math.sin(i / 10) + rng.gauss(0, 0.05)) for i in range(300)]
    rng.shuffle(rows)                                        # --time-column puts them back in order
    table = tmp_path / "series.csv"
    table.write_text("t,v\n" + "".join(f"{t},{v}\n" for t, v in rows))
    out = tmp_path / "run"
    code, printed, err = run_cli(["train", "rnn", "--data", str(table), "--time-column", "t", "--set", "epochs=4",
                                  "--out", str(out)], capsys)
    assert code == 0, err
    metrics = dict(kv.split("=") for kv in printed.strip().split(": ", 1)[1].split(", "))
    assert float(metrics["test_mae"]) < float(metrics["naive_test_mae"])
    lineage = json.loads((out / "meta.json").read_text())["lineage"]
    assert lineage["dataset_details"]["time_column"] == "t" and lineage["training_config"]["train"]["epochs"] == 4
    assert (out / "run" / "metrics.jsonl").exists()
