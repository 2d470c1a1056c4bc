"""`zooserve demo` side by side and `make serve`'s first start, and `zooserve train`'s one-line
answer to a wrong --preset.

The worker-pool tests run stand-in workers (a few lines of Python: no torch, no training), so the
scheduling, failure and signal paths cost seconds; the `slow` ones train real demo models.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from model_registry import Registry
from tests.conftest import ROOT, free_port
from training import cli
from training.families import FAMILIES, family_module, literal_preset_names, preset_names

STARTED, PUBLISHED, FAILED = (re.compile(rf"^\[demo\] {word} +(\S+) ") for word in ("started", "published", "failed"))

# a stand-in for `python -m training.cli --demo-worker NAME ...`, acting by the model's name
FAKE_WORKER = '''
import argparse, json, os, sys, time
p = argparse.ArgumentParser()
for flag in ("--demo-worker", "--registry", "--threads", "--result"):
    p.add_argument(flag)
a = p.parse_args()
name = a.demo_worker
if name == "mlp-digits":
    result = {"version": 1, "quality": "test accuracy 0.990"}
elif name == "resnet-digits":
    print("Traceback (most recent call last):\\nRuntimeError: boom", file=sys.stderr)
    result = {"error": "RuntimeError: boom"}
elif name == "rnn-forecast":
    os._exit(3)                                  # a crash: no result at all
else:                                            # runs until stopped; says it is running
    with open(os.path.join(a.registry, name + ".pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)
    sys.exit(0)
with open(a.result, "w") as f:
    json.dump(result, f)
sys.exit(0 if "version" in result else 1)
'''


def lines_by_kind(output: str) -> dict[str, list[str]]:
    kinds = {"started": [], "published": [], "failed": []}
    for line in output.splitlines():
        for kind, pattern in zip(kinds, (STARTED, PUBLISHED, FAILED)):
            if (m := pattern.match(line)) is not None:
                kinds[kind].append(m.group(1))
    return kinds


@pytest.fixture
def fake_worker(tmp_path) -> list[str]:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    return [sys.executable, str(script)]


# ---- zooserve train: configuration mistakes --------------------------------------------------------

def test_a_wrong_preset_is_one_line_naming_the_flag_and_the_valid_values(tmp_path):
    out = subprocess.run([sys.executable, "-m", "serve.cli", "train", "mlp", "--preset", "tinyy",
                          "--out", str(tmp_path / "ckpt")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stdout == ""
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "--preset" in out.stderr and "'tinyy'" in out.stderr
    assert "tiny, small" in out.stderr
    assert not (tmp_path / "ckpt").exists()


def test_train_help_lists_every_familys_presets():
    out = subprocess.run([sys.executable, "-m", "serve.cli", "train", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())              # help text wraps lines
    for family in FAMILIES:
        assert f"{family}: {', '.join(preset_names(family))}" in text


def test_preset_names_read_without_import_are_the_modules_presets():
    for family, module in FAMILIES.items():
        assert literal_preset_names(module) == list(family_module(family).PRESETS) == preset_names(family)


# ---- the worker pool, with stand-in workers -----------------------------------------------------------

def test_a_failed_model_does_not_stop_the_others(tmp_path, monkeypatch, capsys, fake_worker):
    monkeypatch.setattr(cli, "WORKER", fake_worker)
    published, failures = cli.demo_parallel(tmp_path / "registry", ["resnet-digits", "rnn-forecast", "mlp-digits"],
                                            jobs=2, threads=1, log_dir=tmp_path / "logs")
    assert published == {"mlp-digits": 1}
    assert failures == {"resnet-digits": "RuntimeError: boom",
                        "rnn-forecast": "worker exited with code 3 and no result"}
    out = capsys.readouterr().out
    kinds = lines_by_kind(out)
    assert sorted(kinds["started"]) == ["mlp-digits", "resnet-digits", "rnn-forecast"]
    assert kinds["published"] == ["mlp-digits"]
    assert sorted(kinds["failed"]) == ["resnet-digits", "rnn-forecast"]
    assert "Traceback" not in out                                  # the worker's output stays in its log
    assert "boom" in (tmp_path / "logs" / "resnet-digits.log").read_text()
    assert not (tmp_path / "logs" / "mlp-digits.log").exists()     # a published model's log is not kept


def test_jobs_default_to_the_usable_cores_one_torch_thread_each(tmp_path, monkeypatch, capsys, fake_worker):
    monkeypatch.setattr(cli, "WORKER", fake_worker)
    monkeypatch.setattr(cli, "usable_cores", lambda: 4)
    registry = tmp_path / "registry"
    registry.mkdir()
    names = ["decoder-tiny", "mamba-tiny", "lstm-charlm", "gan-digits", "vae-digits"]    # all run until stopped

    def stop_when_four_run():
        pids = [registry / f"{name}.pid" for name in names[:4]]
        while not all(p.exists() and p.read_text() for p in pids):
            time.sleep(0.05)
        time.sleep(0.5)                          # time enough for a fifth worker to start, were it let
        os.kill(os.getpid(), signal.SIGTERM)     # handled in the main thread: DemoStopped

    threading.Thread(target=stop_when_four_run, daemon=True).start()
    with pytest.raises(cli.DemoStopped):
        cli.demo_parallel(registry, names, log_dir=tmp_path / "logs")
    out = capsys.readouterr().out
    assert "4 at a time (4 usable cores)" in out
    assert lines_by_kind(out)["started"] == names[:4]
    assert out.count("1 torch thread)") == 4
    assert "[demo] stopped (SIGTERM): " + ", ".join(names) + " not published" in out
    assert not [name for name in names[:4] if _alive(int((registry / f"{name}.pid").read_text()))]
    assert not list((tmp_path / "logs").iterdir())      # the stopped workers' logs are not kept
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN     # the handlers are put back


def test_sigterm_stops_the_trainer_and_its_workers(tmp_path, fake_worker):
    registry = tmp_path / "registry"
    registry.mkdir()
    code = ("import sys; from training import cli; cli.WORKER = sys.argv[1:]; from serve.cli import main; "
            f"sys.exit(main(['demo', '--registry', {str(registry)!r}, '--only', 'decoder-tiny', 'mamba-tiny', "
            "'--jobs', '2', '--threads', '1']))")
    proc = subprocess.Popen([sys.executable, "-c", code, *fake_worker], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        pid_files = [registry / "decoder-tiny.pid", registry / "mamba-tiny.pid"]
        deadline = time.monotonic() + 30
        while not all(p.exists() and p.read_text() for p in pid_files):
            assert proc.poll() is None and time.monotonic() < deadline, "workers did not start"
            time.sleep(0.05)
        workers = [int(p.read_text()) for p in pid_files]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert "[demo] stopped (SIGTERM): " in out and "not published" in out
    assert not [pid for pid in workers if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---- real training ---------------------------------------------------------------------------------------

CHEAP = ["mlp-digits", "rnn-forecast"]


@pytest.mark.slow
def test_demo_trains_two_models_side_by_side_one_line_each(tmp_path):
    registry = tmp_path / "registry"
    cmd = [sys.executable, "-m", "serve.cli", "demo", "--registry", str(registry), "--only", *CHEAP, "--jobs", "2"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    kinds = lines_by_kind(out.stdout)
    assert sorted(kinds["started"]) == CHEAP and sorted(kinds["published"]) == CHEAP and not kinds["failed"]
    assert len(out.stdout.splitlines()) == 2 + 2 * len(CHEAP)      # a header, the model lines, a summary
    assert "Traceback" not in out.stdout + out.stderr and "Warning" not in out.stdout + out.stderr
    reg = Registry(registry)
    assert reg.models() == sorted(CHEAP)
    assert all(reg.model_config(name).routing.aliases == {"stable": 1} for name in CHEAP)

    # what `make serve` runs on a later start: nothing to train, done at once
    again = subprocess.run([*cmd, "--missing"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already" in again.stdout and "started" not in again.stdout
    assert reg.versions("mlp-digits") == [1]


@pytest.mark.slow
def test_make_serve_answers_at_once_and_serves_models_as_they_are_published(tmp_path):
    """`make serve` on a missing registry: ready before any model is published, mlp-digits served
    while the next one still trains, and SIGTERM to make leaves no process behind."""
    registry, port = tmp_path / "registry", free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "make.log", "w")
    # -o: never rerun `make setup` (pip) from a test; one job at a time so the order is known
    make = subprocess.Popen(["make", "--no-print-directory", "-o", ".venv/.setup-stamp", "serve",
                             f"REGISTRY={registry}", f"PORT={port}", f"DEMO_ARGS=--only {' '.join(CHEAP)} --jobs 1"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    tree: list[psutil.Process] = []
    try:
        _wait_for(lambda: httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200, 60, make)
        assert Registry(registry).models() == [], "ready only after a model was published"
        _wait_for(lambda: httpx.get(f"{url}/v2/models/mlp-digits/ready", timeout=1).status_code == 200, 300, make)
        assert Registry(registry).models() == ["mlp-digits"]      # rnn-forecast still training
        assert httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200
        tree = psutil.Process(make.pid).children(recursive=True)
        assert any("--demo-worker" in " ".join(p.cmdline()) for p in tree)
        make.send_signal(signal.SIGTERM)
        make.wait(60)
    finally:
        if make.poll() is None:
            make.kill()
        log.close()
    left = [p for p in tree if _alive(p.pid)]
    assert not left, [p.cmdline() for p in left]
    assert "[demo] started    mlp-digits" in (tmp_path / "make.log").read_text()


def _wait_for(check, timeout_s: float, proc: subprocess.Popen) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"make exited with {proc.returncode}"
        try:
            if check():
                return time.monotonic()
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"not within {timeout_s} s")
