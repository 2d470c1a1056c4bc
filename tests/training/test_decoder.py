"""The decoder family: KV cache verbs, cached step vs full forward, HF Llama/Mixtral as oracles, ONNX step export."""

from __future__ import annotations

import logging
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch

from training.models import decoder as D

V = 61


def tiny(moe: bool, **overrides) -> D.Config:
    # rope_theta off the default so a converter that drops it fails; GQA with G = 2
    fields = dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=48, rope_theta=1000.0,
                  n_experts=4 if moe else 0, n_experts_active=2)
    return D.Config(**(fields | overrides))


def randomized(config: D.Config, seed: int = 0) -> D.Decoder:
    """A model in eval mode with O(1) random weights (logits of a few units, not init's near-zero ones)."""
    torch.manual_seed(seed)
    model = D.Model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:                                   # RMSNorm weights
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return model


def decode_through_cache(model: D.Decoder, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Prefill ids[:, :prompt], then feed the rest one token at a time; logits (B, T, V)."""
    state = D.init_state(model, ids.shape[0], ids.shape[1])
    outs = []
    with torch.no_grad():
        logits, state = D.forward(model, ids[:, :prompt], state)
        outs.append(logits)
        for t in range(prompt, ids.shape[1]):
            logits, state = D.forward(model, ids[:, t:t + 1], state)
            outs.append(logits)
    assert state.lengths.tolist() == [ids.shape[1]] * ids.shape[0]
    return torch.cat(outs, dim=1)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- config -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [dict(n_embd=30), dict(n_kv_head=3), dict(n_embd=12, n_head=4, n_kv_head=2),
                                 dict(n_experts=2, n_experts_active=3)])
def test_config_rejects_inconsistent_shapes(bad):
    with pytest.raises(ValueError):
        tiny(False, **bad)


def test_presets_are_valid_and_tied_embeddings_share_one_tensor():
    for name, fields in D.PRESETS.items():
        assert D.Config(**fields).n_experts in (0, 4), name
    tied, untied = D.Model(tiny(False)), D.Model(tiny(False, tie_embeddings=False))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight


# --- KVCache verbs, no model ----------------------------------------------------------------

def test_kv_cache_allocate_and_layer_views():
    c = tiny(False)
    cache = D.KVCache.allocate(c, batch=3, max_len=10)
    assert cache.k.shape == cache.v.shape == (3, c.n_layer, c.n_kv_head, 10, c.head_dim)
    assert cache.lengths.tolist() == [0, 0, 0] and cache.lengths.dtype == torch.int64
    k1, v1 = cache.layer(1)
    assert k1.shape == (3, c.n_kv_head, 10, c.head_dim)
    k1.fill_(7.0)                                              # a view, not a copy
    assert cache.k[:, 1].eq(7).all() and cache.k[:, 0].eq(0).all() and v1.eq(0).all()


def test_kv_cache_write_places_tokens_per_row_and_advances_by_n_new():
    c = tiny(False)
    cache = D.KVCache.allocate(c, batch=3, max_len=8)
    cache.lengths[:] = torch.tensor([0, 2, 5])
    T = 3
    new_k = torch.arange(1, 3 * T + 1, dtype=torch.float32).view(3, 1, 1, T, 1)
    new_k = new_k.expand(3, c.n_layer, c.n_kv_head, T, c.head_dim)                   # token j of row i = i*T + j + 1
    cache.write(torch.tensor([2, 0]), new_k[:2], -new_k[:2], torch.tensor([2, 3]))   # row 2 real 2 of 3 (padded)
    assert cache.lengths.tolist() == [3, 2, 7]
    assert cache.k[0, 0, 0, :, 0].tolist() == [4, 5, 6, 0, 0, 0, 0, 0]             # row 0 got new_k[1]
    assert cache.k[2, 0, 0, :, 0].tolist() == [0, 0, 0, 0, 0, 1, 2, 0]             # padded 3rd token dropped
    assert cache.v[2, 1, 1, 5:7, 3].tolist() == [-1, -2]
    assert cache.k[1].eq(0).all()                                                    # untouched row
    with pytest.raises(ValueError, match="overflow"):
        cache.write([2], new_k[:1], new_k[:1], [2])                                 # 7 + 2 > 8 slots


def test_kv_cache_reset_rows_and_copy_row():
    c = tiny(False)
    cache = D.KVCache.allocate(c, batch=3, max_len=4)
    cache.k[0], cache.v[0] = 1.0, 2.0
    cache.lengths[:] = torch.tensor([3, 1, 2])
    cache.copy_row(0, 2)
    assert cache.lengths.tolist() == [3, 1, 3] and cache.k[2].eq(1).all() and cache.v[2].eq(2).all()
    cache.k[0] = 5.0                                                                 # a copy, not a view
    assert cache.k[2].eq(1).all()
    cache.reset_rows([0, 2])
    assert cache.lengths.tolist() == [0, 1, 0]


# --- fast path (cached step) vs slow path (full forward) -----------------------------------

@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_incremental_decode_matches_full_forward(moe):
    model = randomized(tiny(moe))
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        full = model(ids)                                                            # (B, T, V)
    torch.testing.assert_close(decode_through_cache(model, ids, prompt=5), full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_right_padded_rows_with_per_row_start_match_their_own_forward(moe):
    model = randomized(tiny(moe))
    prompts, n_decode = [3, 7, 5], 4
    seqs = [torch.randint(0, V, (p + n_decode,)) for p in prompts]
    state = D.init_state(model, batch_size=3, max_len=16)
    state.k.normal_()                                           # stale garbage beyond lengths must be masked
    state.v.normal_()
    padded = torch.zeros(3, max(prompts), dtype=torch.int64)   # right-padded prefill, pad id 0
    for b, p in enumerate(prompts):
        padded[b, :p] = seqs[b][:p]
    got = [[] for _ in prompts]
    with torch.no_grad():
        logits, new_k, new_v = model.step(padded, state.lengths, state.k, state.v)
        state.write(torch.arange(3), new_k, new_v, torch.tensor(prompts))
        for b, p in enumerate(prompts):
            got[b].append(logits[b, :p])
        for i in range(n_decode):
            ids = torch.stack([s[p + i] for s, p in zip(seqs, prompts)])[:, None]   # (B, 1)
            logits, state = D.forward(model, ids, state)
            for b in range(3):
                got[b].append(logits[b])
        assert state.lengths.tolist() == [p + n_decode for p in prompts]
        for b, seq in enumerate(seqs):
            torch.testing.assert_close(torch.cat(got[b]), model(seq[None])[0], rtol=0, atol=1e-4)


# --- HF oracles ---------------------------------------------------------------------------

def to_hf(model: D.Decoder):
    return D.to_hf_mixtral(model) if model.config.n_experts else D.to_hf_llama(model)


@pytest.mark.parametrize("moe", [False, True], ids=["dense-llama", "moe-mixtral"])
def test_logits_match_hf_for_full_forward_and_cached_decode(moe):
    # untied embeddings for dense and tied for MoE, so both converter paths run
    model = randomized(tiny(moe, tie_embeddings=moe), seed=1)
    hf = to_hf(model)
    ids = torch.randint(0, V, (3, 20))
    with torch.no_grad():
        expected = hf(ids).logits                                                    # (B, T, V)
        full = model(ids)
    cached = decode_through_cache(model, ids, prompt=8)
    print(f"\n{'mixtral' if moe else 'llama'}: |logits| max {expected.abs().max():.2f}, "
          f"max diff full {max_diff(full, expected):.2e}, cached {max_diff(cached, expected):.2e}")
    assert max_diff(full, expected) <= 1e-4
    assert max_diff(cached, expected) <= 1e-4


def test_wrong_rope_layout_is_caught_by_the_oracle(monkeypatch):
    """Negative control: interleaved pairs (2j, 2j+1), Meta's original layout, must not pass."""
    model = randomized(tiny(False))
    hf = D.to_hf_llama(model)

    def interleaved(x, cos, sin):
        half = x.shape[-1] // 2
        c, s = cos[..., :half].repeat_interleave(2, -1), sin[..., :half].repeat_interleave(2, -1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return x * c + torch.stack([-x2, x1], dim=-1).flatten(-2) * s

    monkeypatch.setattr(D, "apply_rope", interleaved)
    ids = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        diff = max_diff(model(ids), hf(ids).logits)
    print(f"\nwrong RoPE layout: max diff {diff:.2e}")
    assert diff > 1e-2


def test_converters_refuse_the_other_kind():
    with pytest.raises(ValueError, match="dense"):
        D.to_hf_llama(D.Model(tiny(True)))
    with pytest.raises(ValueError, match="MoE"):
        D.to_hf_mixtral(D.Model(tiny(False)))


# --- ONNX export of the step ----------------------------------------------------------------

def step_inputs(config: D.Config, batch: int, new: int, slots: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, config.n_kv_head, slots, config.head_dim)                        # per layer
    return (torch.randint(0, config.vocab_size, (batch, new), generator=g),
            torch.randint(1, slots + 1, (batch,), generator=g),                     # nonzero start
            *(torch.randn(shape, generator=g) for _ in range(2 * config.n_layer)))


# The dynamo exporter's own noise: a LeafSpec FutureWarning raised from copyreg (so the pyproject
# torch.* module filter misses it), and "axis name batch will not be used" because one Dim is shared.
@pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")
@pytest.mark.filterwarnings("ignore:.*axis name.*will not be used:UserWarning")
def test_onnx_step_export_matches_eager_at_other_shapes(tmp_path, caplog):
    # One export (each costs 5-10 s on two shared cores): the MoE step, whose ops (attention, RoPE,
    # masks, topk/scatter routing, einsum experts) are a superset of the dense step's. Two layers (the per-layer cache inputs).
    config = tiny(True, n_layer=2)
    step = D.StepModule(randomized(config))
    inputs, outputs = D.step_input_names(config), D.step_output_names(config)
    assert inputs == ("ids", "start", "cache_k_0", "cache_v_0", "cache_k_1", "cache_v_1")
    path = tmp_path / "step.onnx"
    # quiets "torchvision is not installed" log lines (caplog restores the level afterwards)
    caplog.set_level(logging.ERROR, logger="torch.onnx._internal.exporter._registration")
    torch.onnx.export(step, step_inputs(config, 2, 5, 16, seed=0), str(path),
                      input_names=list(inputs), output_names=list(outputs),
                      dynamic_shapes=D.step_dynamic_shapes(config), external_data=False, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(inputs)
    for batch, new, slots in [(2, 5, 16), (3, 1, 32), (1, 1, 1)]:
        xs = step_inputs(config, batch, new, slots, seed=batch)
        got = session.run(None, {n: x.numpy() for n, x in zip(inputs, xs, strict=True)})
        with torch.no_grad():
            expected = step(*xs)
        for name, g, e in zip(outputs, got, expected, strict=True):
            assert g.shape == tuple(e.shape), name
            np.testing.assert_allclose(g, e.numpy(), atol=1e-4, rtol=0, err_msg=f"{name} at {(batch, new, slots)}")


# --- training ---------------------------------------------------------------------------------

def test_loss_starts_near_log_vocab_and_decreases_on_a_repeated_batch():
    torch.manual_seed(0)
    model = D.Model(tiny(True, n_layer=1))
    x = torch.randint(0, V, (4, 16))
    batch = (x[:, :-1], x[:, 1:])
    first = D.loss(model, batch)
    assert first.dim() == 0 and torch.isfinite(first)
    assert abs(first.item() - math.log(V)) < 0.1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(10):
        opt.zero_grad()
        D.loss(model, batch).backward()
        opt.step()
    assert D.loss(model, batch).item() < first.item() - 0.5


def test_example_inputs_are_token_ids():
    (ids,) = D.example_inputs(tiny(False), batch=3)
    assert ids.shape == (3, 16) and ids.dtype == torch.int64 and 0 <= ids.min() and ids.max() < V
