"""The native kernels (training/kernels) against the eager reference: the fused selective scan
against Mamba's softplus, `scan_sequential` and gate, and the causal conv against the Mixer's, for
padded rows, odd widths and steep steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.kernels import selective_scan
from training.models import mamba as M


@pytest.fixture(scope="module")
def kernel() -> selective_scan.SelectiveScanKernel:
    return selective_scan.load()   # the test machine has a C compiler (CI too): unavailable is a failure


def inputs(b: int, T: int, E: int, N: int, seed: int = 0, dt_shift: float = -3.0, dt_spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x, z = torch.randn(b, T, E, generator=g), torch.randn(b, T, E, generator=g)
    dt_raw = torch.randn(b, T, E, generator=g) * dt_spread + dt_shift                 # softplus -> ~0.05 typical
    A = -torch.exp(torch.randn(E, N, generator=g))                       # (E, N) decay rates ~0.1 .. 10
    B, C = torch.randn(b, T, N, generator=g), torch.randn(b, T, N, generator=g)
    D = torch.randn(E, generator=g)
    return x, z, dt_raw, A, B, C, D, torch.randn(b, N, E, generator=g)


def reference(x, z, dt_raw, A, B, C, D, s0, n_new):
    """Eager, row by row over its real tokens only: softplus, scan_sequential, (y + D x) silu(z)."""
    ys, states = torch.zeros_like(x), []
    for r, n in enumerate(n_new):
        if n == 0:
            states.append(s0[r:r + 1])
            continue
        dt = F.softplus(dt_raw[r:r + 1, :n])
        y, s = M.scan_sequential(x[r:r + 1, :n], dt, A, B[r:r + 1, :n], C[r:r + 1, :n], s0[r:r + 1])
        ys[r, :n] = ((y + x[r:r + 1, :n] * D) * F.silu(z[r:r + 1, :n]))[0]
        states.append(s)
    return ys, torch.cat(states)


def run(kernel, x, z, dt_raw, A, B, C, D, s0, n_new):
    args = [t.numpy() for t in (x, z, dt_raw)] + [A.t().contiguous().numpy()] + [t.numpy() for t in (B, C, D)]
    return kernel.scan(*args, np.array(n_new, np.int64), s0.numpy())


@pytest.mark.parametrize("b, T, E, N, n_new", [
    (1, 64, 32, 16, [64]),            # the common layout, one row
    (3, 19, 13, 5, [19, 1, 7]),       # E not a multiple of a vector, padded rows, a one-token row
    (2, 40, 24, 8, [0, 40]),          # a row with no real token keeps its state
])
def test_kernel_matches_softplus_scan_and_gate(kernel, b, T, E, N, n_new):
    x, z, dt_raw, A, B, C, D, s0 = inputs(b, T, E, N)
    before = s0.clone()
    y, s = run(kernel, x, z, dt_raw, A, B, C, D, s0, n_new)
    want_y, want_s = reference(x, z, dt_raw, A, B, C, D, s0, n_new)
    scale = max(1.0, float(want_y.abs().max()))
    np.testing.assert_allclose(y, want_y.numpy(), atol=2e-5 * scale, rtol=0)
    np.testing.assert_allclose(s, want_s.numpy(), atol=2e-5 * max(1.0, float(want_s.abs().max())), rtol=0)
    assert torch.equal(s0, before)                                       # the caller's state is left as it was
    for r, n in enumerate(n_new):
        assert not y[r, n:].any()                                        # padding: y = 0


def test_steep_and_large_steps(kernel):
    """dt_raw above 20 (softplus is the identity there) and steps that decay the state to ~0."""
    x, z, dt_raw, A, B, C, D, s0 = inputs(2, 30, 16, 4, seed=5, dt_shift=12.0, dt_spread=6.0)
    y, s = run(kernel, x, z, dt_raw, A, B, C, D, s0, [30, 30])
    want_y, want_s = reference(x, z, dt_raw, A, B, C, D, s0, [30, 30])
    assert (dt_raw > 20).any() and np.isfinite(y).all()
    np.testing.assert_allclose(y, want_y.numpy(), atol=1e-4 * float(want_y.abs().max()), rtol=0)
    np.testing.assert_allclose(s, want_s.numpy(), atol=1e-4 * float(want_s.abs().max()), rtol=0)


@pytest.mark.parametrize("b, T, E, K, n_new", [(1, 33, 32, 4, [33]), (3, 6, 13, 4, [6, 1, 2]), (2, 2, 8, 3, [0, 2])])
def test_conv_matches_the_mixers_causal_conv(kernel, b, T, E, K, n_new):
    """silu(causal depthwise conv) and the conv state after each row's real tokens, against
    Mixer.causal_conv; prompts shorter than the conv window take part of the old state along."""
    mixer = M.Mixer(M.Config(vocab_size=11, d_model=E, n_layer=1, d_conv=K, expand=1))   # E channels
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        mixer.conv1d.weight.copy_(torch.randn(mixer.conv1d.weight.shape, generator=g))
        mixer.conv1d.bias.copy_(torch.randn(E, generator=g))
        x, state = torch.randn(b, T, E, generator=g), torch.randn(b, K - 1, E, generator=g)
        want, want_state = mixer.causal_conv(x, state, torch.tensor(n_new))
    out, new_state = kernel.conv(x.numpy(), state.numpy(), mixer.conv1d.weight[:, 0].t().contiguous().detach().numpy(),
                                 mixer.conv1d.bias.detach().numpy(), np.array(n_new, np.int64))
    np.testing.assert_allclose(out, want.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(new_state, want_state.numpy())


def test_a_wrong_shape_is_refused_before_the_loop_reads(kernel):
    x, z, dt_raw, A, B, C, D, s0 = inputs(2, 8, 16, 4)
    with pytest.raises(ValueError, match="state has shape"):
        run(kernel, x, z, dt_raw, A, B, C, D, s0[:1], [8, 8])
    with pytest.raises(ValueError, match="n_new has shape"):
        run(kernel, x, z, dt_raw, A, B, C, D, s0, [8])
    with pytest.raises(ValueError, match="causal conv: state has shape"):
        kernel.conv(x.numpy(), np.zeros((2, 2, 16), np.float32), np.zeros((4, 16), np.float32),
                    np.zeros(16, np.float32), np.array([8, 8]))


def test_turned_off_says_why(monkeypatch):
    monkeypatch.setenv("ZOOSERVE_NATIVE_KERNELS", "0")
    selective_scan.load.cache_clear()
    try:
        assert "ZOOSERVE_NATIVE_KERNELS=0" in selective_scan.available()
    finally:
        monkeypatch.delenv("ZOOSERVE_NATIVE_KERNELS")
        selective_scan.load.cache_clear()
    assert selective_scan.available() is None


def test_a_missing_compiler_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("ZOOSERVE_KERNEL_CACHE", str(tmp_path / "cache"))
    selective_scan.load.cache_clear()
    try:
        assert "does not run" in selective_scan.available()
    finally:
        selective_scan.load.cache_clear()
