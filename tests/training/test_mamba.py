"""The mamba family: sequential vs chunked scan, the serving step (padding, constant state, long
prompts), HF MambaForCausalLM as the oracle, and export through `training.export.package`."""

from __future__ import annotations

import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from training import checkpoint, export, export_recurrent, lm
from training.models import mamba as M

V = 61


# one torch thread: results independent of the machine's cores (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**overrides) -> M.Config:
    # dt_rank 3 (not the auto 2) and eps off the default, so a converter that drops either fails
    fields = dict(vocab_size=V, d_model=32, n_layer=2, d_state=8, d_conv=4, expand=2, dt_rank=3, norm_eps=1e-6)
    return M.Config(**(fields | overrides))


def randomized(config: M.Config, seed: int = 0) -> M.Mamba:
    """A model in eval mode with O(1) random weights (logits of a few units) and dt ~ 0.02-0.3."""
    torch.manual_seed(seed)
    model = M.Model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("dt_proj.bias"):
                p.uniform_(-4.0, -1.0)                                   # softplus -> 0.02 .. 0.3
            elif p.dim() == 1:                                           # norms, D, conv bias
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def close(got: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal up to float32 rounding: max abs difference <= rel * the largest |expected|."""
    return got.shape == expected.shape and max_diff(got, expected) <= rel * expected.abs().max().item()


def scan_inputs(T: int, dt_scale: float = 0.1, seed: int = 0, b: int = 2, E: int = 12, N: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, E, generator=g)
    dt = torch.rand(b, T, E, generator=g) * dt_scale
    A = -torch.exp(torch.randn(E, N, generator=g))                       # decay rates ~0.1 .. 10
    B, C = torch.randn(b, T, N, generator=g), torch.randn(b, T, N, generator=g)
    return x, dt, A, B, C, torch.randn(b, N, E, generator=g)            # the state is channels-last


def step_prefill_decode(model: M.Mamba, ids: torch.Tensor, prompt: int, decode=None) -> torch.Tensor:
    """Prefill ids[:, :prompt] through StepModule from zero state, then decode the rest one token at
    a time feeding the states back (through `decode(ids, states)` if given); the logits the step
    returns, (B, 1 + T - prompt, V): positions prompt - 1 .. T - 1."""
    step = M.StepModule(model)
    B, T = ids.shape
    states = M.init_state(model, B).per_layer()
    outs = []
    with torch.no_grad():
        for lo, hi in [(0, prompt)] + [(t, t + 1) for t in range(prompt, T)]:
            if hi - lo == 1 and decode is not None:
                logits, *states = decode(ids[:, lo:hi], states)
            else:
                logits, *states = step(ids[:, lo:hi], torch.full((B,), hi - lo), *states)
            outs.append(logits)
    return torch.cat(outs, dim=1)


def states_of(config: M.Config, batch: int, seed: int = 0) -> list[torch.Tensor]:
    """Random per-layer states in state_names order (a mid-sequence step)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=g) for shape in M.state_shapes(config).values()]


# --- config ---------------------------------------------------------------------------------

def test_config_resolves_auto_dt_rank_and_rejects_a_conv_without_history():
    assert M.Config(d_model=40).dt_rank == 3 and M.Config(d_model=40, dt_rank=7).dt_rank == 7
    assert M.Config(**M.PRESETS["bench"]).d_inner == 512
    with pytest.raises(ValueError, match="d_conv"):
        M.Config(d_conv=1)
    tied, untied = M.Model(tiny()), M.Model(tiny(tie_embeddings=False))
    assert tied.lm_head.weight is tied.embeddings.weight and untied.lm_head.weight is not untied.embeddings.weight


def test_exported_softplus_equals_torch_softplus(monkeypatch):
    """The elementwise form the ONNX graph gets (ONNX Runtime's Softplus kernel is slow) equals
    F.softplus in fp32 across dt's whole range, overflow region included."""
    x = torch.cat([torch.linspace(-40.0, 100.0, 20001), torch.tensor([-1e4, 1e4, 19.99, 20.0, 20.01])])
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    exported = M._softplus(x)
    assert torch.isfinite(exported).all()
    torch.testing.assert_close(exported, F.softplus(x), rtol=2e-6, atol=1e-7)


# --- chunked scan vs the sequential reference -------------------------------------------------

@pytest.mark.parametrize("T", [1, 5, 16, 31, 70])
def test_chunked_scan_matches_sequential_scan(T):
    xs = scan_inputs(T)
    y_ref, s_ref = M.scan_sequential(*xs)
    y, s = M.scan_chunked(*xs, chunk=16)                                 # several chunks, a ragged last one
    assert y.shape == y_ref.shape == (2, T, 12) and s.shape == s_ref.shape == (2, 5, 12)
    assert close(y, y_ref) and close(s, s_ref)


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("T", [1, 5, 16, 37])
def test_export_scans_match_the_sequential_scan(T, b):
    """The exported prefill's two scans (torch `scan` operators, run eagerly here): chunks of
    EXPORT_CHUNK in closed form, and one step at a time. (`_scan_export` is an If between them;
    its export is checked in ONNX Runtime by test_exported_onnx_prefills_and_decodes_in_onnxruntime.)
    At b = 1 the carry's strides once differed from the initial state's, which `scan` refuses."""
    xs = scan_inputs(T, b=b)
    y_ref, s_ref = M.scan_sequential(*xs)
    assert M._chunks_are_mild(xs[1], xs[2])
    for scan in (M._scan_chunks_hop, M._scan_hop):
        y, s = scan(*xs)
        assert close(y, y_ref) and close(s, s_ref), scan.__name__


def test_export_scan_steps_one_at_a_time_where_a_chunk_decays_too_fast():
    """~200 nats a step: the closed form would need exp(+-1600) (inf/0 in fp32); the guard sends
    such prompts to the step-at-a-time scan."""
    steep = scan_inputs(40, dt_scale=20.0)
    x, dt, A = steep[:3]
    assert not M._chunks_are_mild(dt, A) and M._chunks_are_mild(dt * 1e-3, A)
    y_ref, s_ref = M.scan_sequential(*steep)
    y, s = M._scan_hop(*steep)
    assert torch.isfinite(y).all() and close(y, y_ref) and close(s, s_ref)
    assert not torch.isfinite(M._scan_chunks_hop(*steep)[0]).all()       # what the guard avoids


def test_chunks_shrink_where_the_decay_is_fast_and_stay_exact():
    """Steps that decay by up to ~200 nats: a 16-step chunk would need exp(3000) (inf in fp32)."""
    xs = scan_inputs(40, dt_scale=20.0)
    x, dt, A = xs[:3]
    assert M._chunk_size(dt, A, 16) == 1                                 # falls back to one step at a time
    mild = scan_inputs(40, dt_scale=2.0)                                 # up to ~20 nats a step
    assert 1 < M._chunk_size(mild[1], mild[2], 16) < 16
    for inputs in (xs, mild):
        y_ref, s_ref = M.scan_sequential(*inputs)
        y, s = M.scan_chunked(*inputs, chunk=16)
        assert torch.isfinite(y).all() and close(y, y_ref) and close(s, s_ref)


def test_model_forward_uses_the_chunked_scan_and_matches_the_sequential_one():
    model = randomized(tiny())
    ids = torch.randint(0, V, (2, 70))
    calls = []

    def recording(*args):
        calls.append(args[0].shape[1])
        return M.scan_chunked(*args)

    with torch.no_grad():
        fast = model(ids, scan=recording)
        slow = model(ids, scan=M.scan_sequential)
        default = model(ids)
    assert calls == [70, 70] and torch.equal(default, fast)
    assert close(fast, slow)


# --- the serving step -------------------------------------------------------------------------

def test_right_padded_rows_match_each_row_stepped_alone():
    model = randomized(tiny())
    lengths = [3, 7, 1]                                                  # 1 < K-1: the conv state keeps old inputs
    states = states_of(model.config, 3)                                  # nonzero states: a mid-sequence step
    ids = torch.randint(0, V, (3, 7))
    step = M.StepModule(model)
    with torch.no_grad():
        logits, *new = step(ids, torch.tensor(lengths), *states)
        assert logits.shape == (3, 1, V)                                 # at each row's last real token
        for b, n in enumerate(lengths):
            alone_logits, *alone = step(ids[b:b + 1, :n], torch.tensor([n]), *(s[b:b + 1] for s in states))
            every = model.run(ids[b:b + 1, :n], [s[b:b + 1] for s in states])[0]   # (1, n, V)
            assert close(logits[b], alone_logits[0]) and close(logits[b, 0], every[0, -1])
            assert all(close(got[b], want[0]) for got, want in zip(new, alone, strict=True))
        unpadded = step(ids[2:3], torch.tensor([7]), *(s[2:3] for s in states))
    assert not torch.allclose(new[-1][2], unpadded[-1][0])


def test_decode_is_the_step_at_one_token():
    """Mamba.decode (the exported T = 1 branch: no padding, gathers or loop) == run() at T = 1."""
    model = randomized(tiny())
    states = states_of(model.config, 3)
    ids = torch.randint(0, V, (3, 1))
    with torch.no_grad():
        general = M.StepModule(model)(ids, torch.ones(3, dtype=torch.int64), *states)
        decoded = model.decode(ids, states)
    assert len(decoded) == len(general) == 1 + 2 * model.config.n_layer
    assert all(close(d, g) for d, g in zip(decoded, general, strict=True))


def test_decode_state_has_one_size_whatever_the_context():
    model = randomized(tiny())
    expected = {name: (1, *shape) for name, shape in M.state_shapes(model.config).items()}
    assert expected == {"conv_state_0": (1, 3, 64), "ssm_state_0": (1, 8, 64),
                        "conv_state_1": (1, 3, 64), "ssm_state_1": (1, 8, 64)}
    assert M.state_names(model.config) == tuple(expected)
    step = M.StepModule(model)
    for context in (5, 300):
        states = M.init_state(model, 1).per_layer()
        with torch.no_grad():
            _, *states = step(torch.randint(0, V, (1, context)), torch.tensor([context]), *states)
            logits, *states = step(torch.randint(0, V, (1, 1)), torch.tensor([1]), *states)
        assert logits.shape == (1, 1, V)
        assert {n: tuple(s.shape) for n, s in zip(expected, states, strict=True)} == expected


def test_a_2048_token_prompt_prefills_through_the_step_and_decodes():
    model = randomized(tiny())
    ids = torch.randint(0, V, (1, 2051))
    with torch.no_grad():
        full = model(ids, scan=M.scan_sequential)                        # the reference over all 2051 tokens
    got = step_prefill_decode(model, ids, prompt=2048, decode=model.decode)
    assert got.shape == full[:, 2047:].shape and max_diff(got, full[:, 2047:]) <= 1e-4


def test_stateful_forward_continues_where_it_left_off():
    model = randomized(tiny())
    ids = torch.randint(0, V, (2, 12))
    state = M.init_state(model.config, 2, max_len=999)                   # max_len is ignored: constant size
    with torch.no_grad():
        first, state = M.forward(model, ids[:, :7], state)
        second, state = M.forward(model, ids[:, 7:], state)
        full = model(ids)
    assert state.lengths.tolist() == [12, 12]
    assert close(torch.cat([first, second], dim=1), full)


def test_state_verbs_write_reset_and_copy_rows():
    c = tiny()
    state = M.MambaState.allocate(c, batch=3)
    assert state.conv.shape == (3, 2, 3, 64) and state.ssm.shape == (3, 2, 8, 64)
    conv_1, ssm_1 = state.layer(1)
    ssm_1.fill_(2.0)                                                     # a view, not a copy
    assert state.ssm[:, 1].eq(2).all() and state.ssm[:, 0].eq(0).all() and conv_1.eq(0).all()
    assert state.per_layer()[3] is not None and state.per_layer()[3].eq(2).all()   # ssm_state_1
    state.write([0, 2], torch.ones(2, 2, 3, 64), torch.full((2, 2, 8, 64), 5.0), [4, 1])
    assert state.lengths.tolist() == [4, 0, 1] and state.conv[0].eq(1).all() and state.conv[1].eq(0).all()
    state.copy_row(0, 1)
    assert state.lengths.tolist() == [4, 4, 1] and state.ssm[1].eq(5).all()
    state.ssm[0] = 7.0                                                   # a copy, not a view
    assert state.ssm[1].eq(5).all()
    state.reset_rows([1, 2])
    assert state.lengths.tolist() == [4, 0, 0] and state.ssm[1:].eq(0).all() and state.conv[1:].eq(0).all()
    assert state.ssm[0].eq(7).all()


# --- HF MambaForCausalLM as the oracle ----------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_logits_match_hf_mamba_for_full_forward_and_step_decode(tied):
    model = randomized(tiny(tie_embeddings=tied), seed=1)
    hf = M.to_hf_mamba(model)
    ids = torch.randint(0, V, (3, 40))
    with torch.no_grad():
        expected = hf(ids, use_cache=False).logits                      # (B, T, V)
        full = model(ids)
    stepped = step_prefill_decode(model, ids, prompt=33)                 # positions 32 .. 39
    decoded = step_prefill_decode(model, ids, prompt=33, decode=model.decode)
    expected_steps = expected[:, 32:]
    print(f"\nmamba ({'tied' if tied else 'untied'}): |logits| max {expected.abs().max():.2f}, "
          f"max diff full {max_diff(full, expected):.2e}, prefill+decode {max_diff(stepped, expected_steps):.2e}, "
          f"prefill+Mamba.decode {max_diff(decoded, expected_steps):.2e}")
    assert expected.abs().max() > 1.0                                    # a real signal, not near-zero logits
    assert max(max_diff(full, expected), max_diff(stepped, expected_steps), max_diff(decoded, expected_steps)) <= 1e-4


def test_our_state_is_hf_cache_state():
    """HF's cache state, transposed (ours is channels-last): ssm_state == recurrent state,
    conv_state == its last K-1 columns."""
    model = randomized(tiny(), seed=2)
    hf = M.to_hf_mamba(model)
    ids = torch.randint(0, V, (2, 9))
    state = M.init_state(model, 2)
    with torch.no_grad():
        cache = hf(ids, use_cache=True).cache
        _, state = M.forward(model, ids, state)
    for i in range(model.config.n_layer):
        conv, ssm = state.layer(i)
        assert close(ssm.transpose(1, 2), cache.get_recurrent_state(i))
        assert close(conv.transpose(1, 2), cache.get_conv_state(i)[..., 1:])


def test_a_wrong_weight_layout_is_caught_by_the_oracle():
    """Negative control: swapping in_proj's x and z halves (a plausible converter slip) must fail."""
    model = randomized(tiny(), seed=1)
    hf = M.to_hf_mamba(model)
    with torch.no_grad():
        w = hf.backbone.layers[0].mixer.in_proj.weight
        w.copy_(torch.cat(w.chunk(2, dim=0)[::-1]))
    ids = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        diff = max_diff(model(ids), hf(ids, use_cache=False).logits)
    print(f"\nin_proj halves swapped: max diff {diff:.2e}")
    assert diff > 1e-2


# --- export through package -----------------------------------------------------------------

def steep_second_layer(model: M.Mamba) -> M.Mamba:
    """Layer 1's dt ~4 (tens of nats of decay a token): its exported prefill steps one token at a
    time, while layer 0 (dt ~0.02-0.3) takes the chunked scan, so one export checks both."""
    with torch.no_grad():
        model.layers[1].mixer.dt_proj.bias.fill_(4.0)
    return model


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """A random-weight 2-layer tiny mamba checkpoint, packaged (ONNX + TorchScript, parity checked)."""
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("mamba")
    config = tiny()
    model = steep_second_layer(randomized(config, seed=3))
    checkpoint.save(work / "checkpoint", model, config, {"family": "mamba"})
    manifest = export.package(work / "checkpoint", work / "package")
    return work / "package", manifest


def test_package_records_parity_of_both_formats(packaged):
    vdir, manifest = packaged
    stored = json.loads((vdir / "manifest.json").read_text())
    reports = {r["format"]: r for r in stored["parity"]}
    assert set(reports) == {"onnx", "torchscript"}
    for r in reports.values():
        print(f"\n{r['format']}: max abs error {r['max_abs_error']:.2e}")
        assert r["passed"] and 0 <= r["max_abs_error"] <= r["tolerance"] == 1e-4
        assert r["shapes_checked"] == [[len(p), max(p) + n] for p, n in export_recurrent.PARITY_CASES]
    assert stored["kind"] == "tokens" and stored["family"] == "mamba"
    assert stored["generation"]["max_model_len"] >= 8192                 # not the training window
    names = ["conv_state_0", "ssm_state_0", "conv_state_1", "ssm_state_1"]
    assert [t["name"] for t in stored["signature"]["inputs"]] == ["ids", "n_new", *names]
    assert [t["name"] for t in stored["signature"]["outputs"]] == ["logits", *(f"new_{n}" for n in names)]
    assert stored["signature"]["outputs"][4] == {"name": "new_ssm_state_1", "datatype": "FP32", "shape": [-1, 8, 64]}
    assert (vdir / "model.onnx").exists() and (vdir / "model.ts").exists() and (vdir / export.GOLDEN).exists()


def test_exported_onnx_prefills_and_decodes_in_onnxruntime(packaged):
    """Untraced shapes, padded rows, both prefill scans (layer 0 chunked, layer 1 stepwise) and
    the decode branch, against the eager sequential reference."""
    vdir, _ = packaged
    model, config = checkpoint.load(vdir)
    tokens = torch.randint(0, V, (4, 43))
    lengths = [40, 6, 1, 23]                                              # B = 4 and T = 40: untraced shapes
    real = (torch.arange(40) < torch.tensor(lengths)[:, None])[..., None]   # the prompts' tokens
    mild = []

    def recording(*args):                                                # the guard the ONNX prefill computes
        mild.append(bool(M._chunks_are_mild(args[1][:, :40] * real, args[2])))
        return M.scan_sequential(*args)

    with torch.no_grad():
        full = model(tokens, scan=recording).numpy()
    assert mild == [True, False]
    session = ort.InferenceSession(str(vdir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == ["ids", "n_new", *M.state_names(config)]
    states = [s.numpy() for s in M.init_state(config, 4).per_layer()]
    logits, *states = session.run(None, {"ids": tokens[:, :40].numpy(), "n_new": np.array(lengths),
                                         **dict(zip(names[2:], states))})
    assert logits.shape == (4, 1, V)                                     # each prompt's last token
    got, prefilled = [[logits[b]] for b in range(4)], states
    for t in range(3):                                                   # decode: T = 1
        step_ids = np.array([[tokens[b, n + t]] for b, n in enumerate(lengths)])
        logits, *states = session.run(None, {"ids": step_ids, "n_new": np.ones(4, np.int64),
                                             **dict(zip(names[2:], states))})
        for b in range(4):
            got[b].append(logits[b])
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(np.concatenate(got[b]), full[b, n - 1:n + 3], atol=1e-4, rtol=0)
        with torch.no_grad():                                            # the state each padded row left
            _, *alone = model.run(tokens[b:b + 1, :n], M.init_state(config, 1).per_layer(), scan=M.scan_sequential)
        for name, got_state, want in zip(names[2:], prefilled, alone, strict=True):
            np.testing.assert_allclose(got_state[b], want[0].numpy(), atol=1e-4, rtol=0, err_msg=name)


def test_package_exports_the_split_prefill_with_its_parity(packaged):
    vdir, manifest = packaged
    stored = json.loads((vdir / "manifest.json").read_text())["prefill"]
    assert stored["segments"] == [f"prefill_{i}.onnx" for i in range(5)]   # 2L + 1 for 2 layers
    assert stored["kernel"] == "selective_scan" and all((vdir / f).exists() for f in stored["segments"])
    report = stored["parity"]
    print(f"\nsplit prefill: max abs error {report['max_abs_error']:.2e}")
    assert report["passed"] and 0 <= report["max_abs_error"] <= report["tolerance"] == 1e-4


def test_split_prefill_equals_eager_at_untraced_shapes_and_the_whole_step(packaged):
    """Prompts of 40, 6, 1 and 23 tokens (B = 4, T = 40; the segments were traced at B 2, T 7):
    logits at each prompt's last token and every state, against the eager sequential reference
    and against the whole ONNX step."""
    from training.split_prefill import SplitPrefill

    vdir, manifest = packaged
    model, config = checkpoint.load(vdir)
    tokens = torch.randint(0, V, (4, 40))
    lengths = [40, 6, 1, 23]
    names = list(M.state_names(config))
    feed = {"ids": tokens.numpy(), "n_new": np.array(lengths),
            **{n: s.numpy() for n, s in zip(names, M.init_state(config, 4).per_layer())}}
    got = SplitPrefill(vdir, manifest.prefill.segments).run(feed)
    whole = export_recurrent.onnx_step_runner(vdir / "model.onnx")(feed)
    assert set(got) == set(whole)
    for name in whole:
        np.testing.assert_allclose(got[name], whole[name], atol=1e-4, rtol=0, err_msg=name)
    for b, n in enumerate(lengths):
        with torch.no_grad():
            logits, *alone = model.run(tokens[b:b + 1, :n], M.init_state(config, 1).per_layer(), scan=M.scan_sequential)
        np.testing.assert_allclose(got["logits"][b, 0], logits[0, -1].numpy(), atol=1e-4, rtol=0)
        for name, want in zip(names, alone, strict=True):
            np.testing.assert_allclose(got[f"new_{name}"][b], want[0].numpy(), atol=1e-4, rtol=0, err_msg=name)


def test_a_server_without_the_kernel_runs_prompts_through_the_whole_step(packaged, monkeypatch):
    from serve.runtimes import SplitPrefillRuntime, open_runtime, with_split_prefill
    from training.kernels import selective_scan

    vdir, manifest = packaged
    names = [t.name for t in manifest.signature.inputs], [t.name for t in manifest.signature.outputs]
    split = with_split_prefill(open_runtime(vdir, "onnx", "model.onnx", *names), manifest, vdir)
    assert isinstance(split, SplitPrefillRuntime) and split.prefill.startswith("split")
    monkeypatch.setenv("ZOOSERVE_NATIVE_KERNELS", "0")
    selective_scan.load.cache_clear()
    try:
        whole = with_split_prefill(open_runtime(vdir, "onnx", "model.onnx", *names), manifest, vdir)
    finally:
        monkeypatch.delenv("ZOOSERVE_NATIVE_KERNELS")
        selective_scan.load.cache_clear()
    assert not isinstance(whole, SplitPrefillRuntime) and "ZOOSERVE_NATIVE_KERNELS=0" in whole.prefill
    feed = export_recurrent.step_inputs(M, checkpoint.load(vdir)[1], batch=3, new=9, seed=4)
    a, b = split.run(feed), whole.run(feed)
    for name in names[1]:
        np.testing.assert_allclose(a[name], b[name], atol=1e-4, rtol=0, err_msg=name)


def test_parity_check_catches_a_step_that_ignores_padding():
    model = randomized(tiny(n_layer=1), seed=3)
    config = model.config
    eager = export_recurrent.eager_step_runner(M, model)

    def no_padding(inputs):                                              # treats every row as full length
        return eager({**inputs, "n_new": np.full_like(inputs["n_new"], inputs["ids"].shape[1])})

    good = export_recurrent.check_recurrent_parity(M, model, config, eager, "eager")
    bad = export_recurrent.check_recurrent_parity(M, model, config, no_padding, "eager")
    assert good["passed"] and not bad["passed"] and bad["max_abs_error"] > 1e-2


# --- training ---------------------------------------------------------------------------------

def test_loss_starts_near_log_vocab_and_decreases_on_a_repeated_batch():
    torch.manual_seed(0)
    model = M.Model(tiny(n_layer=1))
    x = torch.randint(0, V, (4, 16))
    batch = (x[:, :-1], x[:, 1:])
    first = M.loss(model, batch)
    assert first.dim() == 0 and abs(first.item() - math.log(V)) < 0.1
    opt = lm._optimizer(model, lm.LMTrainConfig(lr=3e-3))
    no_decay = {id(p) for p in opt.param_groups[1]["params"]}
    assert all(id(block.mixer.A_log) in no_decay for block in model.layers)   # log decay rates are not shrunk
    for _ in range(10):
        opt.zero_grad()
        M.loss(model, batch).backward()
        opt.step()
    assert M.loss(model, batch).item() < first.item() - 0.5


def test_example_inputs_are_token_ids():
    (ids,) = M.example_inputs(tiny(), batch=3)
    assert ids.shape == (3, 16) and ids.dtype == torch.int64 and 0 <= ids.min() and ids.max() < V
