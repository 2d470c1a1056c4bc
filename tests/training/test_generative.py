"""The generative families (gan, vae, diffusion): the family contract, losses that go down,
the ELBO against torch.distributions, the judge's metrics, grids, and export parity through
training.export.package. Quality at full training is measured by `python -m training.generative`
and stored in the checkpoint lineage; here models train for a handful of steps only."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from training import checkpoint, export, generative, judge, loop
from training.families import config_from_dict, family_module, make_config

GENERATIVE = ["gan", "vae", "diffusion"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return generative.digits_unit(seed=0)


@pytest.mark.parametrize("family", GENERATIVE)
def test_family_contract(family, digits):
    fam = family_module(family)
    assert fam.KIND == ("denoise" if family == "diffusion" else "sample")
    config = make_config(family, "tiny")
    stored = json.loads(json.dumps(dataclasses.asdict(config)))
    assert dataclasses.asdict(config_from_dict(family, stored)) == dataclasses.asdict(config)
    torch.manual_seed(0)
    model = fam.Model(config).eval()
    inputs = fam.example_inputs(config, 5)
    with torch.no_grad():
        out = model(*inputs)
    assert out.shape == (5, 1, 8, 8) and out.dtype == torch.float32
    if family != "diffusion":   # generators end in tanh: the data range
        assert out.min() >= -1 and out.max() <= 1
    if family == "gan":
        assert [t.dtype for t in inputs] == [torch.float32, torch.int64] and inputs[0].shape == (5, config.latent_dim)
    if family == "diffusion":
        x_t, t, label = inputs
        assert t.dtype == label.dtype == torch.int64 and int(label.max()) <= config.null_label
    batch = (digits.train[0][:8], digits.train[1][:8])
    value = fam.loss(model, batch)
    assert value.ndim == 0 and torch.isfinite(value)
    assert set(fam.generation_defaults(config)) >= {"output_range"}


def test_data_path_scales_digits_to_unit_range_and_back(digits):
    raw = family_module("mlp").example_inputs(make_config("mlp", "tiny"), 4)[0]   # 0..16
    unit = generative.to_unit(raw)
    assert unit.min() >= -1 and unit.max() <= 1
    torch.testing.assert_close(judge.to_digits(unit), raw)
    assert digits.train[0].min() == -1 and digits.train[0].max() == 1


def test_gan_players_lower_their_own_losses(digits):
    """A few D steps lower D's loss on a fixed batch; a few G steps (D frozen) lower G's loss."""
    gan = family_module("gan")
    config = make_config("gan", "tiny")
    torch.manual_seed(0)
    model = gan.Model(config).train()
    real, label = digits.train[0][:64], digits.train[1][:64]
    z = torch.randn(64, config.latent_dim)
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(model.generator.parameters(), lr=2e-4, betas=(0.5, 0.999))

    def d_loss():
        return gan.discriminator_loss(model, real, model.generator(z, label).detach(), label)
    before = d_loss().item()
    for _ in range(10):
        opt_d.zero_grad()
        d_loss().backward()
        opt_d.step()
    assert d_loss().item() < before - 0.05

    def g_loss():
        return gan.generator_loss(model, model.generator(z, label), label)
    before = g_loss().item()
    for _ in range(10):
        opt_g.zero_grad()
        g_loss().backward()
        opt_g.step()
    assert g_loss().item() < before - 0.05


def test_gan_mode_seeking_term_punishes_ignoring_z():
    gan = family_module("gan")
    config = make_config("gan", "tiny")
    torch.manual_seed(0)
    model = gan.Model(config).eval()
    z, z2, label = torch.randn(8, config.latent_dim), torch.randn(4, config.latent_dim), torch.arange(8)
    with torch.no_grad():
        varied = gan.mode_seeking_loss(model, model.generator(z, label), z, label, z2)
        model.generator.project[0].weight[:, : config.latent_dim] = 0   # G now ignores z
        collapsed = gan.mode_seeking_loss(model, model.generator(z, label), z, label, z2)
    assert collapsed > 100 * varied


def test_gan_training_loop_runs_and_reports_both_losses(digits):
    gan = family_module("gan")
    torch.manual_seed(0)
    model = gan.Model(make_config("gan", "tiny"))
    result = gan.train(model, *digits.train, gan.GANTrainConfig(steps=5, batch_size=16), progress=False)
    assert not model.training
    assert {"loss_d", "loss_g"} <= set(result) and all(map(lambda v: v == v, result.values()))   # not NaN


def test_vae_elbo_terms_match_torch_distributions(digits):
    vae = family_module("vae")
    config = make_config("vae", "tiny")
    torch.manual_seed(0)
    model = vae.Model(config).eval()
    x = digits.train[0][:6]
    e = torch.randn(6, config.latent_dim)
    with torch.no_grad():
        log_lik, kl = vae.elbo_terms(model, x, e)
        mu, log_var = model.encoder(x)
        std = (0.5 * log_var).exp()
        q = torch.distributions.Normal(mu, std)
        prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(std))
        expected_kl = torch.distributions.kl_divergence(q, prior).sum(1)
        x_hat = model.decoder(mu + std * e)
        expected_ll = torch.distributions.Normal(x_hat, config.recon_sigma).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(kl, expected_kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_lik, expected_ll, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(model.reconstruct(x), model.decoder(model.encode_mean(x)))


@pytest.mark.parametrize("family", ["vae", "diffusion"])
def test_loss_decreases_in_a_short_training_run(family, digits):
    """Eval-mode losses use a fixed seed, so before/after compare the same noise and timesteps."""
    fam = family_module(family)
    torch.manual_seed(0)
    model = fam.Model(make_config(family, "tiny"))
    subset = (digits.train[0][:256], digits.train[1][:256])
    val = (digits.val[0][:128], digits.val[1][:128])
    before = loop.evaluate(model, fam.loss, val)
    assert loop.evaluate(model, fam.loss, val) == before   # deterministic in eval mode
    cfg = loop.TrainConfig(epochs=3 if family == "vae" else 2, batch_size=32, lr=2e-3, warmup_steps=5,
                           weight_decay=0.0)
    result = loop.train(model, fam.loss, subset, val, cfg, progress=False)
    assert result["best_val_loss"] < 0.8 * before


def test_judge_metrics():
    labels = torch.arange(10).repeat(5)
    assert judge.label_entropy(labels) == pytest.approx(judge.MAX_ENTROPY)
    assert judge.label_entropy(torch.zeros(50, dtype=torch.int64)) == 0
    assert judge.agreement(labels, labels) == 1 and judge.agreement(labels, (labels + 1) % 10) == 0
    same = torch.zeros(20, 1, 8, 8)
    assert judge.spread(same, labels[:20]) == 0
    assert judge.spread(torch.randn(20, 1, 8, 8), labels[:20]) > 1


def test_judge_reads_generated_scale():
    """A 'classifier' that reads the mean pixel shows what the judge feeds it: 0..16 digits."""
    class MeanPixel(torch.nn.Module):
        def forward(self, image):
            return torch.nn.functional.one_hot(image.mean(dim=(1, 2, 3)).round().long(), 17).float()
    images = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(4, 1, 1, 1).expand(4, 1, 8, 8)
    assert judge.judge(MeanPixel(), images).tolist() == [0, 8, 16, 16]   # clamped at 16


def test_evaluate_reports_metrics_per_family(digits):
    """evaluate() with a stand-in judge (always says 3): the metric plumbing, not the quality."""
    class SaysThree(torch.nn.Module):
        def forward(self, image):
            return torch.nn.functional.one_hot(torch.full((image.shape[0],), 3), 10).float()
    cfg = generative.EvalConfig(per_class=2, unconditional=6)
    for family, keys in (("gan", {"judge_agreement", "judge_entropy", "spread_ratio"}),
                         ("vae", {"judge_entropy", "spread_ratio"}),
                         ("diffusion", {"judge_agreement_ddim50", "judge_entropy_ddim50_uncond"})):
        fam = family_module(family)
        config = make_config(family, "tiny")
        metrics, samples = generative.evaluate(family, fam.Model(config).eval(), config, cfg, SaysThree())
        assert keys <= set(metrics)
        for images, _ in samples.values():
            assert images.shape[1:] == (1, 8, 8) and images.min() >= -1 - 1e-6 and images.max() <= 1 + 1e-6
        if "judge_agreement" in metrics:
            assert metrics["judge_agreement"] == pytest.approx(0.1) and metrics["judge_entropy"] == 0


def test_write_grid(tmp_path):
    from PIL import Image

    images = torch.linspace(-1, 1, 100).view(100, 1, 1, 1).expand(100, 1, 8, 8)
    path = generative.write_grid(images, tmp_path / "grid.png", scale=2, gap=1)
    with Image.open(path) as img:
        assert img.size == (10 * 17 + 1, 10 * 17 + 1) and img.mode == "L"
        assert img.getpixel((1, 1)) == 255 and img.getpixel((img.size[0] - 2, img.size[1] - 2)) == 0   # -1 white, 1 ink


PARTS = {"gan": {"generator": (["z", "label"], ["image"])},
         "vae": {"decoder": (["z"], ["image"]), "encoder": (["image"], ["latent_mean", "latent_log_var"])},
         "diffusion": {"denoiser": (["x_t", "t", "label"], ["eps"])}}


@pytest.mark.parametrize("family", GENERATIVE)
def test_export_package_parity(family, tmp_path):
    """A briefly trained checkpoint through training.export.package: every part in ONNX and
    TorchScript at batch 2, 1 and 7 against eager, seeded requests end to end against
    generative.sample, the golden pairs, the public signature and the sampler defaults."""
    fam = family_module(family)
    tiny_train = {"gan": fam.GANTrainConfig(steps=3, batch_size=16) if family == "gan" else None,
                  "vae": loop.TrainConfig(epochs=1, batch_size=256), "diffusion": loop.TrainConfig(epochs=1, batch_size=256)}
    metrics, _ = generative.train_generative(family, "tiny", tmp_path / "ckpt", progress=False, eval_cfg=None,
                                             train_cfg=tiny_train[family])
    manifest = export.package(tmp_path / "ckpt", tmp_path / "pkg")
    assert manifest.kind == fam.KIND and manifest.family == family
    assert manifest.lineage.metrics["train_seconds"] == pytest.approx(metrics["train_seconds"])
    config = make_config(family, "tiny")
    # the parts: names, tensors, one artifact per format, each checked against eager
    assert {n: ([s.name for s in p.inputs], [s.name for s in p.outputs]) for n, p in manifest.parts.items()} == PARTS[family]
    main = next(iter(manifest.parts.values()))
    assert manifest.artifacts == main.artifacts
    for name, part in manifest.parts.items():
        assert part.artifacts == {"onnx": f"{name}.onnx", "torchscript": f"{name}.ts"}
        assert all((tmp_path / "pkg" / f).is_file() for f in part.artifacts.values())
        assert {r.format for r in part.parity} == {"onnx", "torchscript"}
        assert all(r.passed and [s[0] for s in r.shapes_checked] == list(export.PARITY_BATCHES) for r in part.parity)
    # end to end: seeded requests through the exported part against generative.sample
    assert {r.format for r in manifest.parity} == {"onnx", "torchscript"}
    assert all(r.passed and r.max_abs_error <= r.tolerance <= 1e-3 for r in manifest.parity)
    # the public signature
    sig = {s.name: (s.datatype, s.shape) for s in manifest.signature.inputs}
    outputs = {s.name: (s.datatype, s.shape) for s in manifest.signature.outputs}
    assert sig["label"] == ("INT64", [-1]) and sig["seed"] == ("INT64", [1])
    assert outputs["image"] == ("FP32", [-1, 1, 8, 8])
    if family == "gan":
        assert set(sig) == {"label", "seed"} and outputs["label"] == ("INT64", [-1])
    elif family == "vae":
        assert sig["image"] == ("FP32", [-1, 1, 8, 8])
        assert outputs["latent_mean"] == outputs["latent_log_var"] == ("FP32", [-1, config.latent_dim])
    else:
        assert set(sig) == {"label", "seed"} and set(outputs) == {"image"}
        assert manifest.generation["num_train_timesteps"] == config.num_train_timesteps
        assert {"sampler", "steps", "eta", "guidance", "beta_schedule", "null_label"} <= set(manifest.generation)
    assert manifest.generation["output_range"] == [-1.0, 1.0]
    # the main ONNX part at an untraced batch against the reloaded eager model
    import onnxruntime as ort
    from safetensors.numpy import load_file

    model, _ = checkpoint.load(tmp_path / "pkg")
    inputs = fam.example_inputs(config, 5)
    session = ort.InferenceSession(str(tmp_path / "pkg" / main.artifacts["onnx"]), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {s.name: t.numpy() for s, t in zip(main.inputs, inputs)})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(*inputs), rtol=0, atol=1e-4)
    if family == "diffusion":   # the sampling loop over the ONNX denoiser follows the eager one
        from training.schedulers.pipeline import generate

        def onnx_denoiser(x_t, t, label):
            out = session.run(None, {"x_t": x_t.numpy(), "t": t.numpy(), "label": label.numpy()})[0]
            return torch.from_numpy(out)
        labels = torch.tensor([0, 3, config.null_label])
        runs = [generate(d, fam.make_sampler(config, steps=10, eta=0.5, seed=0), labels, 1.5, config.null_label)
                for d in (model, onnx_denoiser)]
        torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=1e-3)
    # golden: each part's pair, and the public request (labels + seed) with the eager sampler's images
    golden = load_file(str(tmp_path / "pkg" / "golden.safetensors"))
    expected = {f"part.{p}.{side}.{n}" for p, (ins, outs) in PARTS[family].items()
                for side, names in (("input", ins), ("output", outs)) for n in names}
    expected |= {"input.label", "input.seed", "output.image"} | ({"output.label"} if family == "gan" else set())
    assert set(golden) == expected
    labels = torch.from_numpy(golden["input.label"])
    images = generative.sample(family, model, config, labels, int(golden["input.seed"][0]))
    assert torch.equal(images, torch.from_numpy(golden["output.image"]))


def test_gan_unconditional_label_draws_a_class_after_z():
    """-1 for the GAN: z as for any request, then a uniform class from the same generator."""
    config = make_config("gan", "tiny")
    z, used = generative.draw_latents("gan", config, torch.tensor([3, -1, -1, 5]), seed=9)
    z_ref = torch.randn(4, config.latent_dim, generator=torch.Generator().manual_seed(9))
    assert torch.equal(z, z_ref)
    assert used[0] == 3 and used[3] == 5 and bool(((used >= 0) & (used < 10)).all())
    g = torch.Generator().manual_seed(9)
    torch.randn(4, config.latent_dim, generator=g)
    assert used[1:3].tolist() == torch.randint(0, 10, (2,), generator=g).tolist()
    _, vae_labels = generative.draw_latents("vae", make_config("vae", "tiny"), torch.tensor([-1, -1]), seed=9)
    assert vae_labels.tolist() == [-1, -1]


def test_train_dispatches_the_generative_families(monkeypatch, tmp_path):
    from training.train import DATASETS, train

    calls = []
    monkeypatch.setattr(generative, "train", lambda *args, **kw: calls.append(args) or {"judge_entropy": 2.3})
    for family in GENERATIVE:
        assert DATASETS[family] == "digits"
        assert train(family, "tiny", tmp_path, progress=False) == {"judge_entropy": 2.3}
    assert [c[0] for c in calls] == GENERATIVE
