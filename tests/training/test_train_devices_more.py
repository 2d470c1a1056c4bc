"""`zooserve train --device/--precision/--tensorboard` for the token families (training/lm.py, its own
loop) and the generative ones (training/generative.py: the GAN's own loop, vae and diffusion through
the shared loop) and for the rnn family's model on a device other than the CPU (issue 15 §3-4).

Here (no CUDA): the event files equal metrics.jsonl, `--device auto` trains on the CPU and lineage
says so, half precision on the CPU is refused in one line, and the flags change nothing on the CPU
(bit-identical weights); the fp16 GradScaler path runs on the CPU too (GradScaler("cpu"), whose
power-of-two scale leaves fp32 training bit-identical); rnn's zero state, masks and level shift are
made on the batch's device (checked on the `meta` device, where a CPU tensor cannot mix in).
Marker `gpu` (skipped without CUDA): decoder, gan and rnn trained on CUDA in bf16 (gan in fp16 too)
load, generate and forecast on the CPU, and a token run saved on CUDA resumes on the CPU.

Tiny budgets (--set) on one torch thread; the file takes about a minute.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from serve.cli import main
from training import checkpoint, lm, run_state, text

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
EXPECTED_DEVICE = "cuda" if HAS_CUDA else "cpu"

# a decoder small enough to train 20 steps in a moment on ~30k characters (BPE vocab 300)
DECODER = ["n_layer=1", "n_embd=32", "n_head=4", "n_kv_head=2", "ffn_hidden=64", "vocab_size=300",
           "steps=20", "block_size=32", "batch_size=4", "eval_interval=10", "eval_batches=2",
           "final_eval_batches=2", "warmup_steps=5", "checkpoint_every=7"]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def sets(*pairs: str) -> list[str]:
    return [a for s in pairs for a in ("--set", s)]


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
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(key, []).append((record["step"], float(np.float32(value))))
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name   # bit-exact


def assert_cpu_float32(model: torch.nn.Module) -> None:
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "plays.txt"
    path.write_text("\n".join(d.text for d in text.load_corpus().documents)[:30_000])
    return path


@pytest.fixture(scope="module")
def sevens(tmp_path_factory) -> Path:
    """One class folder (60 digit sevens, 8x8): a sampler of it trains without a judge (nothing to tell apart)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("images") / "d"
    (root / "seven").mkdir(parents=True)
    digits = load_digits()
    for i, image in enumerate(digits.images[digits.target == 7][:60]):
        Image.fromarray((image * 255 / 16).round().astype(np.uint8)).save(root / "seven" / f"{i}.png")
    return root


# ---- on the CPU --------------------------------------------------------------------------------

def test_a_token_family_with_auto_and_tensorboard_trains_here_writes_events_and_changes_nothing(
        corpus, tmp_path, capsys):
    out = tmp_path / "auto"
    code, printed, err = run_cli(["train", "decoder", "--data", str(corpus), "--out", str(out), "--device", "auto",
                                  "--tensorboard", *sets(*DECODER)], capsys)
    assert code == 0, err
    assert f"training on {EXPECTED_DEVICE}" in printed
    recorded = lineage(out)["training_config"]
    assert recorded["device"].startswith(EXPECTED_DEVICE) and recorded["precision"] == "fp32"
    expected = jsonl_scalars(out / "run")
    assert {"train_loss", "lr", "val_loss", "final_val_loss"} <= set(expected)
    assert [s for s, _ in expected["train_loss"]] == list(range(1, 21))
    assert tensorboard_scalars(out / "run" / "tensorboard") == expected
    state = run_state.RunState.load(out / "run")
    assert state.config["precision"] == "fp32" and state.finished
    assert (state.cuda_rng_state is not None) == HAS_CUDA
    model, _ = checkpoint.load(out)
    assert_cpu_float32(model)
    if not HAS_CUDA:   # auto was the CPU: the same weights as a run without any of the flags
        plain = tmp_path / "plain"
        code, _, err = run_cli(["train", "decoder", "--data", str(corpus), "--out", str(plain), *sets(*DECODER)],
                               capsys)
        assert code == 0, err
        assert_same_weights(out, plain)
        assert lineage(plain)["training_config"]["device"] == "cpu"
        assert not (plain / "run" / "tensorboard").exists()


def test_the_gan_with_auto_and_tensorboard_writes_events_and_samples_on_the_cpu(sevens, tmp_path, capsys):
    from training.generative import sample

    out = tmp_path / "gan"
    code, printed, err = run_cli(["train", "gan", "--data", str(sevens), "--out", str(out), "--device", "auto",
                                  "--tensorboard", *sets("steps=30", "checkpoint_every=10")], capsys)
    assert code == 0, err
    assert f"training on {EXPECTED_DEVICE}" in printed
    recorded = lineage(out)["training_config"]
    assert recorded["device"].startswith(EXPECTED_DEVICE) and recorded["precision"] == "fp32"
    expected = jsonl_scalars(out / "run")
    assert set(expected) == {"loss_d", "loss_g"} and [s for s, _ in expected["loss_d"]] == list(range(1, 31))
    assert tensorboard_scalars(out / "run" / "tensorboard") == expected
    model, config = checkpoint.load(out)
    assert_cpu_float32(model)
    images = sample("gan", model, config, torch.tensor([0, -1]), seed=1)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    if not HAS_CUDA:
        plain = tmp_path / "plain"
        code, _, err = run_cli(["train", "gan", "--data", str(sevens), "--out", str(plain),
                                *sets("steps=30", "checkpoint_every=10")], capsys)
        assert code == 0, err
        assert_same_weights(out, plain)


def test_the_vae_through_the_shared_loop_writes_tensorboard_events(sevens, tmp_path, capsys):
    out = tmp_path / "vae"
    code, _, err = run_cli(["train", "vae", "--data", str(sevens), "--out", str(out), "--device", "cpu",
                            "--tensorboard", *sets("epochs=2", "batch_size=16")], capsys)
    assert code == 0, err
    assert {"device": "cpu", "precision": "fp32"}.items() <= lineage(out)["training_config"].items()
    expected = jsonl_scalars(out / "run")
    assert {"train_loss", "lr", "val_loss"} <= set(expected) and len(expected["val_loss"]) == 2
    assert tensorboard_scalars(out / "run" / "tensorboard") == expected
    assert math.isfinite(lineage(out)["metrics"]["test_neg_elbo"])   # on the CPU model, after training


@pytest.mark.parametrize("argv,message", [
    (["train", "decoder", "--precision", "bf16"], "--precision bf16 is autocast on CUDA; on the CPU training runs"),
    (["train", "mamba", "--device", "cpu", "--precision", "fp16"], "--precision fp16 is autocast on CUDA"),
    (["train", "rnn_lm", "--precision", "fp16"], "--precision fp16 is autocast on CUDA"),
    (["train", "gan", "--precision", "bf16"], "--precision bf16 is autocast on CUDA; on the CPU training runs in fp32"),
    (["train", "vae", "--device", "cpu", "--precision", "fp16"], "--precision fp16 is autocast on CUDA"),
    (["train", "diffusion", "--precision", "bf16"], "--precision bf16 is autocast on CUDA"),
])
def test_half_precision_on_the_cpu_is_refused_for_every_family_in_one_line(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli([*argv, "--out", str(out)], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusals where there is no CUDA")
@pytest.mark.parametrize("family", ["decoder", "rnn_lm", "gan", "diffusion", "rnn"])
def test_without_cuda_cuda_and_auto_half_precision_are_refused_before_anything_is_written(family, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", family, "--device", "cuda", "--out", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--device cuda" in err and ("CPU-only build" in err or "sees no CUDA device" in err), err
    code, _, err = run_cli(["train", family, "--device", "auto", "--precision", "bf16", "--out", str(out)], capsys)
    assert code == 2 and "training runs on the CPU here" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_the_python_entry_points_refuse_what_the_machine_cannot_do(tmp_path):
    from training.devices import DeviceError
    from training.generative import train_generative
    from training.models import gan

    ids = torch.arange(200) % 50
    model = _tiny_decoder()
    with pytest.raises(ValueError, match="give run_dir too"):
        lm.train_lm(model, _decoder_loss, ids, ids, lm.LMTrainConfig(steps=2, block_size=8), progress=False,
                    tensorboard=True)
    with pytest.raises(DeviceError, match="--precision bf16 is autocast on CUDA"):
        lm.train_lm(model, _decoder_loss, ids, ids, lm.LMTrainConfig(steps=2, block_size=8), progress=False,
                    precision="bf16")
    images, labels = torch.zeros(8, 1, 8, 8), torch.zeros(8, dtype=torch.int64)
    with pytest.raises(DeviceError, match="--precision fp16 is autocast on CUDA"):
        gan.train(gan.GAN(gan.Config()), images, labels, gan.GANTrainConfig(steps=1), progress=False,
                  precision="fp16")
    with pytest.raises(ValueError, match="give run_dir too"):
        train_generative("vae", "tiny", tmp_path / "vae", progress=False, eval_cfg=None, tensorboard=True)
    assert not (tmp_path / "vae").exists()


# ---- the fp16 GradScaler path, on the CPU ---------------------------------------------------------

def _tiny_decoder() -> torch.nn.Module:
    from training.models import decoder

    torch.manual_seed(0)
    return decoder.Model(decoder.Config(vocab_size=50, block_size=8, n_layer=1, n_embd=16, n_head=2, n_kv_head=1,
                                        ffn_hidden=32))


def _decoder_loss(model, batch):
    from training.models import decoder

    return decoder.loss(model, batch)


def _cpu_scaler(monkeypatch) -> None:
    """The loops get a GradScaler on the CPU (as fp16 on CUDA gets one): its scale is a power of two,
    so scaling the loss and unscaling the gradients is exact in fp32 and the weights stay bit-identical."""
    from training import devices

    monkeypatch.setattr(devices, "grad_scaler", lambda device, precision: torch.amp.GradScaler("cpu"))


def test_the_token_loop_through_a_grad_scaler_unscales_before_clipping_and_saves_the_scaler(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    train_ids, val_ids = torch.randint(0, 50, (400,), generator=g), torch.randint(0, 50, (100,), generator=g)
    # grad_clip small enough to clip every step: clipping the scaled gradients would change the weights
    cfg = lm.LMTrainConfig(steps=12, block_size=8, batch_size=4, eval_interval=5, eval_batches=1, warmup_steps=2,
                           vocab_size=50, grad_clip=0.05, checkpoint_every=4)

    def train(run_dir: Path) -> dict[str, torch.Tensor]:
        model = _tiny_decoder()
        lm.train_lm(model, _decoder_loss, train_ids, val_ids, cfg, progress=False, run_dir=run_dir)
        return {k: v.clone() for k, v in model.state_dict().items()}

    plain = train(tmp_path / "plain")
    _cpu_scaler(monkeypatch)
    scaled = train(tmp_path / "scaled")
    assert plain.keys() == scaled.keys() and all(torch.equal(plain[k], scaled[k]) for k in plain)
    assert run_state.RunState.load(tmp_path / "plain").scaler is None
    saved = run_state.RunState.load(tmp_path / "scaled").scaler
    assert saved is not None and saved["scale"] == 2.0 ** 16


def test_the_gan_loop_through_a_grad_scaler_steps_both_optimisers_through_it(tmp_path, monkeypatch):
    from training.models import gan

    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (64,), generator=g)
    cfg = gan.GANTrainConfig(steps=6, batch_size=16, checkpoint_every=3)
    small = gan.Config(latent_dim=8, label_dim=8, g_channels=16, d_channels=16)

    def train(run_dir: Path) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = gan.GAN(small)
        gan.train(model, images, labels, cfg, progress=False, run_dir=run_dir)
        return {k: v.clone() for k, v in model.state_dict().items()}

    plain = train(tmp_path / "plain")
    _cpu_scaler(monkeypatch)
    scaled = train(tmp_path / "scaled")
    # Adam is nearly blind to a gradient's scale, but not bit for bit (eps): a step taken on the scaled
    # gradients, not unscaled through the scaler, would show here
    assert plain.keys() == scaled.keys() and all(torch.equal(plain[k], scaled[k]) for k in plain)
    saved = run_state.RunState.load(tmp_path / "scaled")
    assert saved.scaler is not None and saved.scaler["scale"] == 2.0 ** 16 and saved.config["precision"] == "fp32"


# ---- rnn on another device -----------------------------------------------------------------------

@pytest.mark.parametrize("family", ["rnn", "rnn_lm"])
def test_the_recurrent_models_make_their_state_and_masks_on_the_batch_device(family):
    """On the `meta` device (shapes only) every tensor an op meets must be on meta too: a zero state,
    mask or level shift made on the CPU stops the forward pass, as it would on CUDA."""
    import torch.fx.experimental._config as fx_config

    from training.families import family_module, make_config

    fam = family_module(family)
    torch.manual_seed(0)
    model = fam.Model(make_config(family, "tiny")).to("meta").train()
    if family == "rnn":
        series = torch.randn(3, 12, 1, device="meta")
        lengths = torch.tensor([12, 5, 1]).to("meta")
        batch = (series, lengths, torch.randn(3, model.config.horizon, device="meta"))
        forecast, state = model(series, lengths)
        assert forecast.device.type == "meta" and all(t.device.type == "meta" for t in state.values())
    else:
        ids = torch.randint(0, model.config.vocab_size, (2, 16)).to("meta")
        batch = (ids, ids)
    # the loss's boolean mask (nonzero) has no data-independent shape on meta: let it assume every element
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        loss = fam.loss(model, batch)
    assert loss.device.type == "meta" and loss.shape == ()
    loss.backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters() if p.requires_grad)


# ---- on a GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
def test_a_decoder_trained_on_cuda_in_bf16_loads_and_generates_on_the_cpu(corpus, tmp_path, capsys):
    from training.tokenizer import Tokenizer

    out = tmp_path / "run"
    code, printed, err = run_cli(["train", "decoder", "--data", str(corpus), "--out", str(out), "--device", "cuda",
                                  "--precision", "bf16", "--tensorboard", *sets(*DECODER)], capsys)
    assert code == 0, err
    recorded = lineage(out)
    assert recorded["training_config"]["device"].startswith("cuda:")
    assert recorded["training_config"]["precision"] == "bf16"
    assert math.isfinite(recorded["metrics"]["test_loss"])           # scored on the CPU in fp32, after training
    state = run_state.RunState.load(out / "run")
    assert state.cuda_rng_state is not None and all(t.device.type == "cpu" for t in state.model.values())
    assert tensorboard_scalars(out / "run" / "tensorboard") == jsonl_scalars(out / "run")
    model, _ = checkpoint.load(out)
    assert_cpu_float32(model)
    tok = Tokenizer.from_file(out / "tokenizer.json")
    ids = torch.tensor([tok.encode("ROMEO:")])
    with torch.no_grad():
        for _ in range(8):                                           # greedy, on the CPU
            logits = model(ids)[:, -1]
            assert torch.isfinite(logits).all()
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    assert isinstance(tok.decode(ids[0].tolist()), str)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_gan_trained_on_cuda_in_half_precision_loads_and_samples_on_the_cpu(precision, sevens, tmp_path, capsys):
    from training.generative import sample

    out = tmp_path / "gan"
    code, _, err = run_cli(["train", "gan", "--data", str(sevens), "--out", str(out), "--device", "cuda",
                            "--precision", precision, *sets("steps=60", "checkpoint_every=20")], capsys)
    assert code == 0, err
    assert lineage(out)["training_config"]["precision"] == precision
    state = run_state.RunState.load(out / "run")
    assert state.cuda_rng_state is not None and (state.scaler is not None) == (precision == "fp16")
    model, config = checkpoint.load(out)
    assert_cpu_float32(model)
    images = sample("gan", model, config, torch.tensor([0, 0, -1]), seed=1)
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()


@pytest.mark.gpu
@needs_cuda
def test_rnn_trains_on_cuda_in_bf16_and_forecasts_on_the_cpu(tmp_path, capsys):
    table = tmp_path / "series.csv"
    table.write_text("v\n" + "".join(f"{math.sin(i / 10):.4f}\n" for i in range(200)))
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "rnn", "--data", str(table), "--device", "cuda", "--precision", "bf16",
                            *sets("epochs=3"), "--out", str(out)], capsys)
    assert code == 0, err
    assert math.isfinite(lineage(out)["metrics"]["test_mae"])
    model, config = checkpoint.load(out)
    assert_cpu_float32(model)
    with torch.no_grad():
        forecast, _ = model(torch.randn(2, 10, 1), torch.tensor([10, 4]))
    assert forecast.shape == (2, config.horizon) and torch.isfinite(forecast).all()


@pytest.mark.gpu
@needs_cuda
def test_a_token_run_saved_on_cuda_resumes_on_the_cpu(tmp_path):
    g = torch.Generator().manual_seed(0)
    train_ids, val_ids = torch.randint(0, 50, (400,), generator=g), torch.randint(0, 50, (100,), generator=g)
    cfg = lm.LMTrainConfig(steps=12, block_size=8, batch_size=4, eval_interval=5, eval_batches=1, warmup_steps=2,
                           vocab_size=50, checkpoint_every=4)

    class Crash(Exception):
        pass

    steps = 0

    def dying(model, batch):
        nonlocal steps
        if model.training:
            steps += 1
            if steps > 6:
                raise Crash
        return _decoder_loss(model, batch)

    with pytest.raises(Crash):
        lm.train_lm(_tiny_decoder(), dying, train_ids, val_ids, cfg, progress=False, run_dir=tmp_path, device="cuda")
    assert run_state.RunState.load(tmp_path).step == 5          # checkpoints at step 4 and at the evaluation of 5
    model = _tiny_decoder()
    result = lm.train_lm(model, _decoder_loss, train_ids, val_ids, cfg, progress=False, run_dir=tmp_path,
                         resume=True)
    assert result["steps_run"] == 12 and next(model.parameters()).device.type == "cpu"
    assert [m["step"] for m in run_state.read_metrics(tmp_path) if "train_loss" in m] == list(range(1, 13))
