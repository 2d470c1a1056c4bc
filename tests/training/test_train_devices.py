"""`zooserve train --device/--precision/--tensorboard` and `--publish NAME --alias ALIAS` (issue 15,
sections 3-5), through the real command line, plus the GPU checks (marker `gpu`, skipped without CUDA):
a checkpoint trained on CUDA in bf16 exports and serves on the CPU, and a run saved on CUDA resumes
on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from serve.cli import main
from training import data, loop, run_state
from training.families import family_module, make_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
TINY = ["--set", "epochs=2", "--threads", "1"]


class Crash(Exception):
    """Stands in for the process dying in the middle of a training step."""


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def lineage(out: Path) -> dict:
    return json.loads((out / "meta.json").read_text())["lineage"]


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in `folder`, read back by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})   # 0: keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def jsonl_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as TensorBoard stores it: each numeric field at the record's step, in float32."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record in run_state.read_metrics(run_dir):
        for key, value in record.items():
            if key != "step":
                out.setdefault(key, []).append((record["step"], float(np.float32(value))))
    return out


def test_device_auto_trains_where_cuda_is_or_on_the_cpu_and_lineage_records_it(tmp_path, capsys):
    out = tmp_path / "run"
    code, printed, err = run_cli(["train", "mlp", "--device", "auto", *TINY, "--out", str(out)], capsys)
    assert code == 0, err
    recorded = lineage(out)["training_config"]
    expected = "cuda" if HAS_CUDA else "cpu"
    assert recorded["device"].startswith(expected) and recorded["precision"] == "fp32"
    assert f"training on {expected}" in printed
    from training import checkpoint

    model, _ = checkpoint.load(out)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal where there is no CUDA")
def test_device_cuda_without_cuda_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "mlp", "--device", "cuda", *TINY, "--out", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--device cuda" in err and ("CPU-only build" in err or "sees no CUDA device" in err), err
    assert not out.exists()                                  # refused before anything was written


@pytest.mark.parametrize("argv,message", [
    (["train", "mlp", "--precision", "bf16"], "--precision bf16 is autocast on CUDA; on the CPU training runs in fp32"),
    (["train", "resnet", "--device", "cpu", "--precision", "fp16"], "--precision fp16 is autocast on CUDA"),
    (["train", "decoder", "--precision", "fp16"], "--precision fp16 is autocast on CUDA"),
    (["train", "vae", "--device", "cpu", "--precision", "bf16"], "--precision bf16 is autocast on CUDA"),
    (["train", "mlp", "--alias", "stable"], "--alias points a registry alias at the version --publish NAME publishes"),
    (["train", "mlp", "--publish", "m", "--alias", "42"], "--alias: invalid alias name '42'"),
    (["train", "mlp", "--publish", "m", "--alias", "Not Good"], "--alias: invalid alias name 'Not Good'"),
])
def test_mistakes_are_one_line_exit_2_before_training(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli([*argv, "--out", str(out)], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_those_mistakes_are_refused_before_torch_is_imported(tmp_path):
    """A refusal that needs no torch costs no torch import (seconds on a small machine)."""
    script = ("import sys; from serve.cli import main; "
              "codes = [main(argv.split()) for argv in sys.argv[1:]]; "
              "print(codes, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script, f"train mlp --precision bf16 --out {tmp_path}/a",
                           f"train vae --precision bf16 --out {tmp_path}/b", f"train mlp --alias stable --out {tmp_path}/c"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[2, 2, 2] False", done.stdout + done.stderr
    assert done.stderr.count("zooserve train: error:") == 3


@pytest.mark.skipif(HAS_CUDA, reason="auto becomes cuda where there is one")
def test_half_precision_with_auto_on_a_machine_without_cuda_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "mlp", "--device", "auto", "--precision", "bf16", *TINY, "--out", str(out)],
                           capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "training runs on the CPU here" in err, err
    assert not out.exists()


def test_tensorboard_events_hold_the_scalars_of_metrics_jsonl(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "mlp", "--tensorboard", *TINY, "--out", str(out)], capsys)
    assert code == 0, err
    expected = jsonl_scalars(out / "run")
    assert set(expected) == {"epoch", "train_loss", "lr", "val_loss"}
    assert len(expected["val_loss"]) == 2 and len(expected["train_loss"]) == 40   # 2 epochs of 20 steps
    assert tensorboard_scalars(out / "run" / "tensorboard") == expected


def test_rnn_writes_tensorboard_events_and_records_its_device(tmp_path, capsys):
    import math

    table = tmp_path / "series.csv"
    table.write_text("v\n" + "".join(f"{math.sin(i / 10):.4f}\n" for i in range(200)))
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "rnn", "--data", str(table), "--device", "cpu", "--tensorboard", *TINY,
                            "--out", str(out)], capsys)
    assert code == 0, err
    assert {"device": "cpu", "precision": "fp32"}.items() <= lineage(out)["training_config"].items()
    expected = jsonl_scalars(out / "run")
    assert len(expected["val_loss"]) == 2
    assert tensorboard_scalars(out / "run" / "tensorboard") == expected


def test_a_resumed_run_rewrites_its_tensorboard_events_without_the_cut_steps(tmp_path):
    """A run killed after its checkpoint logged steps that its resumption logs again: metrics.jsonl
    cuts them, and the event files must not show them twice."""
    digits, fam = data.digits(seed=0), family_module("mlp")
    cfg = loop.TrainConfig(epochs=2, checkpoint_every=7)

    def train(crash_after: int | None = None, resume: bool = False):
        torch.manual_seed(0)
        model = fam.Model(make_config("mlp", "tiny"))
        steps = 0

        def loss(m, batch):
            nonlocal steps
            if m.training:
                steps += 1
                if crash_after is not None and steps > crash_after:
                    raise Crash   # the process stopping in the middle of a step
            return fam.loss(m, batch)

        loop.train(model, loss, digits.train, digits.val, cfg, progress=False, run_dir=tmp_path, resume=resume,
                   run_config={"family": "mlp"}, tensorboard=True)

    with pytest.raises(Crash):
        train(crash_after=11)                     # checkpoint at step 7, steps 8-11 logged after it
    assert [s for s, _ in tensorboard_scalars(tmp_path / "tensorboard")["train_loss"]] == list(range(1, 12))
    train(resume=True)
    expected = jsonl_scalars(tmp_path)
    assert [s for s, _ in expected["train_loss"]] == list(range(1, 41))
    assert tensorboard_scalars(tmp_path / "tensorboard") == expected
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_publish_with_alias_points_the_alias_at_the_new_version(tmp_path, capsys):
    from model_registry import Registry

    registry = tmp_path / "registry"
    for expected_version in (1, 2):
        code, printed, err = run_cli(["train", "mlp", "--set", "epochs=1", "--threads", "1", "--out",
                                      str(tmp_path / f"run{expected_version}"), "--publish", "digits",
                                      "--registry", str(registry), "--alias", "canary" if expected_version == 2
                                      else "stable"], capsys)
        assert code == 0, err
        assert f"alias {'canary' if expected_version == 2 else 'stable'} of digits -> version {expected_version}" \
            in printed
    reg = Registry(registry)
    assert reg.versions("digits") == [1, 2]
    assert reg.resolve("digits", "stable") == 1 and reg.resolve("digits", "canary") == 2


# ---- on a GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
@pytest.mark.parametrize("precision", ["bf16"])
def test_a_checkpoint_trained_on_cuda_in_half_precision_loads_and_serves_on_the_cpu(precision, tmp_path, capsys):
    import httpx

    from model_registry import Registry
    from tests.conftest import running_server
    from training import checkpoint

    out, registry = tmp_path / "run", tmp_path / "registry"
    code, printed, err = run_cli(["train", "mlp", "--device", "cuda", "--precision", precision, "--tensorboard",
                                  "--set", "epochs=4", "--threads", "1", "--out", str(out), "--publish", "mlp-gpu",
                                  "--registry", str(registry), "--alias", "stable"], capsys)
    assert code == 0, err
    recorded = lineage(out)
    assert recorded["training_config"]["device"].startswith("cuda:") and recorded["training_config"]["precision"] == precision
    assert recorded["metrics"]["test_accuracy"] > 0.6           # evaluated on the CPU in fp32, after training
    model, _ = checkpoint.load(out)                             # the CPU is the default device
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    state = run_state.RunState.load(out / "run")                # the run-state tensors are CPU tensors too
    assert state.cuda_rng_state is not None and all(t.device.type == "cpu" for t in state.model.values())
    assert tensorboard_scalars(out / "run" / "tensorboard") == jsonl_scalars(out / "run")
    version = Registry(registry).resolve("mlp-gpu", "stable")
    image = data.digits(seed=0).test[0][:1]
    with running_server(registry, ["--device", "cpu"]) as server:
        reply = httpx.post(f"{server.url}/v2/models/mlp-gpu/versions/stable/infer", timeout=30, json={
            "inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": image.flatten().tolist()}]})
    assert reply.status_code == 200, reply.text
    logits = torch.tensor(reply.json()["outputs"][0]["data"]).reshape(1, -1)
    assert reply.json()["model_version"] == str(version)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(image), atol=1e-4, rtol=1e-4)   # the CPU model, served


@pytest.mark.gpu
@needs_cuda
def test_a_run_saved_on_cuda_resumes_on_the_cpu(tmp_path):
    digits, fam = data.digits(seed=0), family_module("mlp")
    cfg = loop.TrainConfig(epochs=2, checkpoint_every=7)

    def train(device: str, crash_after: int | None = None, resume: bool = False) -> tuple[dict, torch.nn.Module]:
        torch.manual_seed(0)
        model = fam.Model(make_config("mlp", "tiny"))
        steps = 0

        def loss(m, batch):
            nonlocal steps
            if m.training:
                steps += 1
                if crash_after is not None and steps > crash_after:
                    raise Crash
            return fam.loss(m, batch)

        result = loop.train(model, loss, digits.train, digits.val, cfg, progress=False, run_dir=tmp_path,
                            resume=resume, run_config={"family": "mlp"}, device=device)
        return result, model

    with pytest.raises(Crash):
        train("cuda", crash_after=10)
    assert run_state.RunState.load(tmp_path).step == 7
    result, model = train("cpu", resume=True)
    assert result["steps"] == 40 and next(model.parameters()).device.type == "cpu"
    assert [m["step"] for m in run_state.read_metrics(tmp_path) if "train_loss" in m] == list(range(1, 41))
