"""DDPM / DDIM samplers: diffusers' schedulers as the oracle, DDIM-as-DDPM, batched rows at
different timesteps, classifier-free guidance and seeds."""

from __future__ import annotations

import pytest
import torch

from training.schedulers.ddim import DDIMSampler, ddim_step
from training.schedulers.ddpm import DDPMSampler, ddpm_step
from training.schedulers.pipeline import DenoiseRequest, generate, guided_eps, step_requests
from training.schedulers.schedule import NoiseSchedule

diffusers = pytest.importorskip("diffusers")

T = 1000
SHAPE = (4, 1, 8, 8)
NULL = 10


def _randn(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(SHAPE, generator=gen)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(beta_schedule):
    ours = NoiseSchedule(T, beta_schedule, 1e-4, 0.02)
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=1e-7)
    torch.testing.assert_close(ours.betas, ref.betas, rtol=0, atol=1e-7)


def test_add_noise_matches_diffusers():
    gen = torch.Generator().manual_seed(0)
    x0, noise, t = _randn(gen), _randn(gen), torch.tensor([0, 17, 500, 999])
    ref = diffusers.DDPMScheduler(num_train_timesteps=T).add_noise(x0, noise, t)
    torch.testing.assert_close(NoiseSchedule(T).add_noise(x0, noise, t), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 50, 333, 1000])
def test_timesteps_match_diffusers(spacing, steps):
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
        ref = cls(num_train_timesteps=T, timestep_spacing=spacing)
        ref.set_timesteps(steps)
        assert torch.equal(NoiseSchedule(T).timesteps(steps, spacing), ref.timesteps)
    with pytest.raises(ValueError, match="trained horizon"):
        NoiseSchedule(T).timesteps(T + 1)


def _noise(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _run_against(ref_step, ours, timesteps) -> float:
    """Step both along the reference chain with fixed model outputs and fixed noise (step k uses
    the noise drawn from seed k); the worst abs error of any step."""
    gen = torch.Generator().manual_seed(1)
    x, worst = _randn(gen), 0.0
    for k, t in enumerate(timesteps.tolist()):
        eps = _randn(gen)
        expected = ref_step(eps, t, x, k)
        got = ours.step(eps, t, x, _noise(k))
        worst = max(worst, float((expected - got).abs().max()))
        x = expected
    return worst


@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("steps", [None, 50, 7])
def test_ddpm_step_matches_diffusers(steps, beta_schedule, clip_sample):
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, clip_sample=clip_sample)
    ref.set_timesteps(steps or T)
    ours = DDPMSampler(NoiseSchedule(T, beta_schedule), steps, clip_sample=clip_sample)
    assert torch.equal(ours.timesteps, ref.timesteps)

    def ref_step(eps, t, x, k):   # diffusers draws its noise from the generator it is given
        return ref.step(eps, t, x, generator=torch.Generator().manual_seed(k)).prev_sample
    assert _run_against(ref_step, ours, ref.timesteps) <= 1e-5


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("steps,spacing", [(50, "leading"), (7, "leading"), (1000, "leading"), (1, "leading"),
                                           (50, "trailing"), (20, "trailing")])
@pytest.mark.parametrize("clip_sample,clipped_eps", [(True, False), (False, False), (True, True)])
def test_ddim_step_matches_diffusers(eta, steps, spacing, clip_sample, clipped_eps):
    ref = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, clip_sample=clip_sample)
    ref.set_timesteps(steps)
    ours = DDIMSampler(NoiseSchedule(T), steps, eta=eta, spacing=spacing, clip_sample=clip_sample,
                       clipped_eps=clipped_eps)
    assert torch.equal(ours.timesteps, ref.timesteps)

    def ref_step(eps, t, x, k):
        return ref.step(eps, t, x, eta=eta, variance_noise=_noise(k),
                        use_clipped_model_output=clipped_eps).prev_sample
    assert _run_against(ref_step, ours, ref.timesteps) <= 1e-5


def test_ddim_at_the_full_horizon_with_eta_1_is_ddpm():
    """sigma_t(eta = 1) is the DDPM posterior std and the means agree (DDIM paper, section 4.1),
    when x_0 is not clipped (clipping acts on different parameterisations of the mean). In
    float64 the two agree to rounding; in float32 DDPM's form loses ~5e-5 near t = 1 (as
    diffusers' does), so the samplers themselves are held to 1e-4."""
    schedule = NoiseSchedule(T)
    ddpm = DDPMSampler(schedule, clip_sample=False)
    ddim = DDIMSampler(schedule, T, eta=1.0, clip_sample=False)
    assert torch.equal(ddpm.timesteps, ddim.timesteps)
    ac64 = schedule.alphas_cumprod.double()
    gen = torch.Generator().manual_seed(2)
    worst32, worst64 = 0.0, 0.0
    for t in ddpm.timesteps.tolist():
        # a realistic x_t (noised data in [-1, 1]) and a model output near its true noise
        x0, e, noise = torch.rand(SHAPE, generator=gen) * 2 - 1, _randn(gen), _randn(gen)
        x = schedule.add_noise(x0, e, torch.full((SHAPE[0],), t))
        eps = e + 0.1 * _randn(gen)
        worst32 = max(worst32, float((ddim.step(eps, t, x, noise) - ddpm.step(eps, t, x, noise)).abs().max()))
        rows, prev = torch.full((SHAPE[0],), t), torch.full((SHAPE[0],), t - 1)
        a = ddpm_step(ac64, eps.double(), rows, prev, x.double(), noise.double(), False)
        b = ddim_step(ac64, eps.double(), rows, prev, x.double(), 1.0, noise.double(), False)
        worst64 = max(worst64, float((a - b).abs().max()))
    assert worst64 <= 1e-10 and worst32 <= 1e-4
    # with eta < 1 the two part ways
    ddim_half = DDIMSampler(schedule, T, eta=0.5, clip_sample=False)
    eps, noise, x = _randn(gen), _randn(gen), _randn(gen)
    assert not torch.allclose(ddim_half.step(eps, 500, x, noise), ddpm.step(eps, 500, x, noise), atol=1e-3)


def test_ddim_eta_0_is_deterministic_and_eta_needs_noise():
    ddim = DDIMSampler(NoiseSchedule(T), 10, eta=0.0, seed=0)
    gen = torch.Generator().manual_seed(3)
    eps, x = _randn(gen), _randn(gen)
    assert torch.equal(ddim.step(eps, 900, x), ddim.step(eps, 900, x, _randn(gen)))
    t, prev = torch.full((4,), 900), torch.full((4,), 800)
    with pytest.raises(ValueError, match="needs noise"):
        ddim_step(NoiseSchedule(T).alphas_cumprod, eps, t, prev, x, 1.0, None)
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(NoiseSchedule(T), 10, eta=1.5)
    with pytest.raises(ValueError, match="schedule"):
        ddim.step(eps, 901, x)   # not one of this request's timesteps


def fake_denoiser(calls: list[int] | None = None):
    """A row-wise deterministic denoiser: eps depends on x, t and the label of its own row only."""
    def denoise(x_t, t, label):
        if calls is not None:
            calls.append(x_t.shape[0])
        shift = (t.float() / T - 0.5 + 0.05 * label.float()).view(-1, 1, 1, 1)
        return torch.tanh(x_t) * 0.5 + shift
    return denoise


def _requests(seed0: int = 0) -> list[DenoiseRequest]:
    schedule = NoiseSchedule(T)
    samplers = [DDPMSampler(schedule, seed=seed0), DDIMSampler(schedule, 50, eta=0.0, seed=seed0 + 1),
                DDIMSampler(schedule, 20, eta=0.5, seed=seed0 + 2), DDIMSampler(schedule, 50, eta=1.0, seed=seed0 + 3),
                DDPMSampler(schedule, 100, clip_sample=False, seed=seed0 + 4)]
    labels = [torch.tensor([3, 3]), torch.tensor([0, 7, NULL]), torch.tensor([5]), torch.tensor([NULL]),
              torch.tensor([9, 1])]
    guidance = [2.0, 3.0, 1.0, 2.0, 0.0]
    return [DenoiseRequest(s, lab, g).start() for s, lab, g in zip(samplers, labels, guidance)]


def test_rows_at_different_timesteps_stepped_together_equal_each_stepped_alone():
    together, alone = _requests(), _requests()
    # put the requests at different timesteps first: request i runs i * 3 steps on its own
    for i, r in enumerate(together + alone):
        for _ in range((i % len(together)) * 3):
            step_requests(fake_denoiser(), [r], NULL)
    assert len({r.t for r in together}) == len(together)
    calls: list[int] = []
    for _ in range(25):
        step_requests(fake_denoiser(calls), together, NULL)
        for r in alone:
            step_requests(fake_denoiser(), [r], NULL)
    assert all(n == calls[0] for n in calls[:3]) and len(calls) == 25   # one denoiser call per step
    for a, b in zip(together, alone):
        assert a.position == b.position
        assert torch.equal(a.x, b.x)
    # and the per-request verb gives the same step as the batch helper
    r = _requests()[1]
    eps = guided_eps(fake_denoiser(), r.x, torch.full((3,), r.t), r.label, r.guidance, NULL)
    expected = r.sampler.step(eps, r.t, r.x)
    step_requests(fake_denoiser(), [r], NULL)
    assert torch.equal(r.x, expected)


def test_finished_requests_leave_the_batch():
    schedule = NoiseSchedule(T)
    short = DenoiseRequest(DDIMSampler(schedule, 2, seed=0), torch.tensor([1]), 1.0).start()
    long = DenoiseRequest(DDIMSampler(schedule, 4, seed=1), torch.tensor([2, 3]), 1.0).start()
    calls: list[int] = []
    while not (short.done and long.done):
        step_requests(fake_denoiser(calls), [short, long], NULL)
    assert calls == [3, 3, 2, 2]


def test_classifier_free_guidance_combines_one_denoiser_call():
    calls: list[int] = []
    den = fake_denoiser(calls)
    gen = torch.Generator().manual_seed(4)
    x, t = _randn(gen), torch.tensor([10, 500, 900, 999])
    label = torch.tensor([1, NULL, 4, 9])
    g = torch.tensor([2.5, 2.5, 1.0, 0.0])
    eps = guided_eps(den, x, t, label, g, NULL)
    assert calls == [4 + 2]   # rows 0 and 3 need an unconditional pass; 1 is unconditional, 2 has g = 1
    cond, uncond = den(x, t, label), den(x, t, torch.full_like(label, NULL))
    torch.testing.assert_close(eps[0], uncond[0] + 2.5 * (cond[0] - uncond[0]))
    torch.testing.assert_close(eps[1], uncond[1])
    torch.testing.assert_close(eps[2], cond[2])
    torch.testing.assert_close(eps[3], uncond[3])


def test_same_seed_gives_bit_identical_samples():
    schedule = NoiseSchedule(T)
    labels = torch.tensor([0, 5, NULL])

    def draw(sampler):
        return generate(fake_denoiser(), sampler, labels, 2.0, NULL)
    for make in (lambda s: DDPMSampler(schedule, 100, seed=s), lambda s: DDIMSampler(schedule, 30, eta=0.7, seed=s)):
        a, b, c = draw(make(7)), draw(make(7)), draw(make(8))
        assert torch.equal(a, b) and not torch.allclose(a, c)
    # a seeded request draws the same sample alone or batched with others
    alone = _requests(seed0=20)[2]
    batched = _requests(seed0=20)
    while not alone.done:
        step_requests(fake_denoiser(), [alone], NULL)
    while not all(r.done for r in batched):
        step_requests(fake_denoiser(), batched, NULL)
    assert torch.equal(alone.x, batched[2].x)
