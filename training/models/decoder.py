"""Decoder-only transformer (Llama-style), optionally a Mixtral-style mixture of experts.

References: Touvron et al. 2023, "LLaMA" (RMSNorm pre-norm, SwiGLU, RoPE); Su et al. 2021,
"RoFormer" (rotary position embeddings); Ainslie et al. 2023, "GQA"; Jiang et al. 2024,
"Mixtral of Experts" (top-k routing). HF `modeling_llama.py` / `modeling_mixtral.py` are the
oracles: `to_hf_llama` / `to_hf_mixtral` copy our weights there without any permutation,
because RoPE here uses HF's rotate_half layout (dimension j pairs with j + hd/2).

Dimensions: B batch, T new tokens, S cache slots (allocated length), V vocab, D model width
(n_embd), L layers, H query heads, KV key/value heads, G = H // KV queries per KV head,
hd head dim (D // H), I FFN inner width (per expert), E experts, A active experts per token.

Two paths share the same layers: `Decoder.forward(ids)` is the obviously correct full-sequence
path (positions 0..T-1, causal mask, no cache); `Decoder.step(...)` is the functional KV-cache
step used for serving and ONNX export, and is tested against `forward`. `KVCache` is the
engine-owned state with per-row verbs; it holds no model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KIND = "tokens"
OUTPUT_NAMES = ("logits",)                           # of the full forward


@dataclass
class Config:
    vocab_size: int = 2048
    block_size: int = 256            # context length (max positions)
    n_layer: int = 4
    n_head: int = 8
    n_kv_head: int = 2               # GQA: query head h uses KV head h // (n_head // n_kv_head)
    n_embd: int = 128
    ffn_hidden: int = 352            # SwiGLU inner width (per expert)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True      # lm_head shares the token embedding weight
    n_experts: int = 0               # 0 = dense FFN; > 0 = top-k MoE in every layer
    n_experts_active: int = 2

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.n_experts and not 1 <= self.n_experts_active <= self.n_experts:
            raise ValueError(f"n_experts_active {self.n_experts_active} not in 1..n_experts {self.n_experts}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


PRESETS = {
    "tiny": dict(n_layer=4, n_head=8, n_kv_head=2, n_embd=128, ffn_hidden=352),
    "tiny-moe": dict(n_layer=4, n_head=8, n_kv_head=2, n_embd=128, ffn_hidden=176, n_experts=4, n_experts_active=2),
    "small": dict(n_layer=6, n_head=8, n_kv_head=2, n_embd=256, ffn_hidden=688),   # the benchmark size
}


class RMSNorm(nn.Module):
    """w * x * rsqrt(mean(x^2) + eps), computed in fp32 (no bias, no 1 + w offset)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(pos: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """pos (B, T) int64 -> cos, sin (B, 1, T, hd), rotate_half layout: cat([f, f])."""
    f = pos[..., None].float() * inv_freq             # (B, T, hd/2)
    emb = torch.cat([f, f], dim=-1)                   # (B, T, hd)
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, heads, T, hd): dimension j pairs with j + hd/2 (HF rotate_half)."""
    x1, x2 = x.chunk(2, dim=-1)                       # (B, heads, T, hd/2) each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Grouped-query attention; q/k/v/o are bias-free Linears in HF's [out, in] layout."""

    def __init__(self, c: Config):
        super().__init__()
        self.n_head, self.n_kv_head, self.hd = c.n_head, c.n_kv_head, c.head_dim
        self.q = nn.Linear(c.n_embd, c.n_head * c.head_dim, bias=False)
        self.k = nn.Linear(c.n_embd, c.n_kv_head * c.head_dim, bias=False)
        self.v = nn.Linear(c.n_embd, c.n_kv_head * c.head_dim, bias=False)
        self.o = nn.Linear(c.n_head * c.head_dim, c.n_embd, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor,
                past_k: Tensor | None = None, past_v: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, D); bias (B|1, 1, G*T, S+T) float, 0 = may attend, -inf = may not (attention_bias);
        past_k/v (B, KV, S, hd). Returns (y (B, T, D), k, v (B, KV, T, hd)): the new tokens' rotated
        keys and values."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.hd).transpose(1, 2)      # (B, H, T, hd)
        k = self.k(x).view(B, T, self.n_kv_head, self.hd).transpose(1, 2)   # (B, KV, T, hd)
        v = self.v(x).view(B, T, self.n_kv_head, self.hd).transpose(1, 2)   # (B, KV, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        g = self.n_head // self.n_kv_head              # query head h reads KV head h // g
        # Grouped attention without copying the cache: the g query heads of one KV head become
        # g*T query rows against that head's keys, and cached and new keys are scored
        # separately, so the (large) cache is never expanded to H heads or concatenated with
        # the new keys (that data movement was most of a decode step in ONNX Runtime).
        qg = q.reshape(B, self.n_kv_head, g * T, self.hd) * self.hd**-0.5   # (B, KV, g*T, hd)
        scores = qg @ k.transpose(-1, -2)                                   # (B, KV, g*T, T)
        if past_k is not None:
            scores = torch.cat([qg @ past_k.transpose(-1, -2), scores], dim=-1)   # (B, KV, g*T, S+T)
        # Every query sees at least itself, so no row is all -inf (no NaN).
        p = (scores + bias).softmax(dim=-1)                                 # (B, KV, g*T, S+T)
        y = p[..., -T:] @ v                                                 # (B, KV, g*T, hd)
        if past_k is not None:
            y = y + p[..., :-T] @ past_v
        y = y.reshape(B, self.n_head, T, self.hd)                           # (B, H, T, hd)
        return self.o(y.transpose(1, 2).reshape(B, T, -1)), k, v


def attention_bias(mask: Tensor, groups: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """mask (B|1, T, S+T) bool, True = may attend -> additive bias (B|1, 1, G*T, S+T): 0 or -inf,
    laid out like Attention's query rows (G query heads of a KV head, then T). Built once per
    forward, not per layer: a masked_fill per layer cost 13-23 % of an ONNX Runtime decode step."""
    b, t, s = mask.shape
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return bias[:, None, None].expand(b, 1, groups, t, s).reshape(b, 1, groups * t, s)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, c: Config):
        super().__init__()
        self.gate = nn.Linear(c.n_embd, c.ffn_hidden, bias=False)
        self.up = nn.Linear(c.n_embd, c.ffn_hidden, bias=False)
        self.down = nn.Linear(c.ffn_hidden, c.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoE(nn.Module):
    """Top-k mixture of SwiGLU experts with Mixtral's routing.

    Experts are 3-D Parameters in the Linear [out, in] layout: experts_gate / experts_up
    (E, I, D), experts_down (E, D, I); router is a Linear D -> E.
    """

    def __init__(self, c: Config):
        super().__init__()
        self.k = c.n_experts_active
        self.router = nn.Linear(c.n_embd, c.n_experts, bias=False)
        self.experts_gate = nn.Parameter(torch.empty(c.n_experts, c.ffn_hidden, c.n_embd))
        self.experts_up = nn.Parameter(torch.empty(c.n_experts, c.ffn_hidden, c.n_embd))
        self.experts_down = nn.Parameter(torch.empty(c.n_experts, c.n_embd, c.ffn_hidden))

    def routing(self, x: Tensor) -> Tensor:
        """x (B, T, D) -> weights (B, T, E): softmax over all E in fp32, keep the top k,
        renormalise them to sum 1; the other E - k are zero (as HF MixtralTopKRouter)."""
        probs = F.softmax(self.router(x).float(), dim=-1)                    # (B, T, E)
        top_w, top_i = probs.topk(self.k, dim=-1)                           # (B, T, A)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, top_i, top_w)            # (B, T, E)

    def forward(self, x: Tensor) -> Tensor:
        w = self.routing(x).to(x.dtype)                                     # (B, T, E)
        # Deliberately dense: every expert runs on every token and the (mostly zero) routing
        # weights pick the mix. One static graph (no gather/scatter by expert, no data-dependent
        # shapes) exports cleanly to ONNX, and at E=4, k=2 it costs only 2x the active compute.
        gate = torch.einsum("btd,eid->btei", x, self.experts_gate)          # (B, T, E, I)
        up = torch.einsum("btd,eid->btei", x, self.experts_up)              # (B, T, E, I)
        h = F.silu(gate) * up * w[..., None]                                # (B, T, E, I)
        return torch.einsum("btei,edi->btd", h, self.experts_down)          # (B, T, D)


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.attn_norm = RMSNorm(c.n_embd, c.norm_eps)
        self.attn = Attention(c)
        self.ffn_norm = RMSNorm(c.n_embd, c.norm_eps)
        self.ffn = MoE(c) if c.n_experts else SwiGLU(c)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor,
                past_k: Tensor | None = None, past_v: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        a, k, v = self.attn(self.attn_norm(x), cos, sin, bias, past_k, past_v)
        x = x + a
        return x + self.ffn(self.ffn_norm(x)), k, v


class Decoder(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.n_embd, c.norm_eps)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim)   # (hd/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)   # derived, not in checkpoints
        self.apply(self._init_weights)
        for p in self.parameters():
            if p.dim() == 3:                                   # MoE expert weights
                nn.init.normal_(p, std=0.02)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        """ids (B, T) int64 -> logits (B, T, V): positions 0..T-1, causal, no cache."""
        B, T = ids.shape
        pos = torch.arange(T, device=ids.device).expand(B, T)           # (B, T)
        cos, sin = rope_cos_sin(pos, self.inv_freq)
        t = torch.arange(T, device=ids.device)
        bias = attention_bias((t[None, :] <= t[:, None])[None], self.config.n_head // self.config.n_kv_head,
                              self.tok_emb.weight.dtype)                # (1, 1, G*T, T)
        x = self.tok_emb(ids)                                           # (B, T, D)
        for layer in self.layers:
            x, _, _ = layer(x, cos, sin, bias)
        return self.lm_head(self.norm(x))

    def step(self, ids: Tensor, start: Tensor, cache_k: Tensor, cache_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One functional KV-cache step over a stacked cache; the cache is read, never written.

        ids (B, T) int64 new tokens; start (B,) int64 tokens row b already holds (new token t
        sits at position start[b] + t); cache_k/v (B, L, KV, S, hd), slots >= start[b] stale.
        Returns logits (B, T, V) and the new tokens' new_k, new_v (B, L, KV, T, hd), which the
        caller writes at positions start..start+T-1 (KVCache.write).
        """
        logits, new = self.step_layers(ids, start, list(zip(cache_k.unbind(1), cache_v.unbind(1))))
        return logits, torch.stack([k for k, _ in new], dim=1), torch.stack([v for _, v in new], dim=1)

    def step_layers(self, ids: Tensor, start: Tensor,
                    past: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """`step` with one (k, v) pair per layer, each (B, KV, S, hd): the serving form. Handing
        the layers over as separate tensors spares ONNX Runtime a Split that copied the whole
        cache every step (16 % of a step; the per-layer export ran a decode step 1.2-1.6x faster).
        Returns logits (B, T, V) and per layer the new tokens' (k, v), each (B, KV, T, hd)."""
        B, T = ids.shape
        S = past[0][0].shape[2]
        t = torch.arange(T, device=ids.device)
        pos = start[:, None] + t[None, :]                               # (B, T)
        cos, sin = rope_cos_sin(pos, self.inv_freq)
        held = torch.arange(S, device=ids.device)[None, :] < start[:, None]   # (B, S) real cache slots
        causal = t[None, :] <= t[:, None]                               # (T, T) query t sees new t' <= t
        mask = torch.cat([held[:, None, :].expand(B, T, S), causal.expand(B, T, T)], dim=-1)   # (B, T, S+T)
        bias = attention_bias(mask, self.config.n_head // self.config.n_kv_head, self.tok_emb.weight.dtype)
        x = self.tok_emb(ids)                                           # (B, T, D)
        new = []
        for layer, (past_k, past_v) in zip(self.layers, past, strict=True):
            x, k, v = layer(x, cos, sin, bias, past_k, past_v)
            new.append((k, v))
        return self.lm_head(self.norm(x)), new


Model = Decoder


def step_input_names(config: Config) -> tuple[str, ...]:
    """Inputs of StepModule.forward: ids, start, then each layer's cache_k_i, cache_v_i."""
    return ("ids", "start", *(f"cache_{kv}_{i}" for i in range(config.n_layer) for kv in "kv"))


def step_output_names(config: Config) -> tuple[str, ...]:
    """Outputs of StepModule.forward: logits, then each layer's new_k_i, new_v_i."""
    return ("logits", *(f"new_{kv}_{i}" for i in range(config.n_layer) for kv in "kv"))


class StepModule(nn.Module):
    """`Decoder.step_layers` as a module's forward, for export, with flat tensor arguments:
    (ids, start, cache_k_0, cache_v_0, cache_k_1, ...) -> (logits, new_k_0, new_v_0, new_k_1, ...)."""

    def __init__(self, model: Decoder):
        super().__init__()
        self.model = model
        self.train(model.training)   # a fresh wrapper would be in training mode; the exporter warns on that

    def forward(self, ids: Tensor, start: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        past = list(zip(caches[0::2], caches[1::2], strict=True))
        logits, new = self.model.step_layers(ids, start, past)
        return (logits, *(t for pair in new for t in pair))


def step_dynamic_shapes(config: Config, max_batch: int = 4096, max_len: int = 65536) -> tuple:
    """`dynamic_shapes` for exporting StepModule with dynamic B, T and S (trace with B, T, S >= 2, all distinct)."""
    Dim = torch.export.Dim
    batch = Dim("batch", min=1, max=max_batch)
    new, cached = Dim("new", min=1, max=max_len), Dim("cached", min=1, max=max_len)
    cache = {0: batch, 2: cached}
    return ({0: batch, 1: new}, {0: batch}, tuple(cache for _ in range(2 * config.n_layer)))


@dataclass
class KVCache:
    """k, v: (B, L, KV, S, hd) preallocated; lengths: (B,) int64 tokens held per row."""
    k: Tensor
    v: Tensor
    lengths: Tensor

    @classmethod
    def allocate(cls, config: Config, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> "KVCache":
        shape = (batch, config.n_layer, config.n_kv_head, max_len, config.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(batch, dtype=torch.int64, device=device))

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """Views (B, KV, S, hd) of layer i."""
        return self.k[:, i], self.v[:, i]

    def write(self, rows: Tensor | Sequence[int], new_k: Tensor, new_v: Tensor,
              n_new: Tensor | Sequence[int]) -> None:
        """Write the first n_new[j] tokens of new_k/new_v (R, L, KV, T, hd) into row rows[j] at
        positions lengths[row]..; advance lengths[rows] by n_new (a padded tail is dropped)."""
        rows = torch.as_tensor(rows, dtype=torch.int64, device=self.lengths.device)
        n_new = torch.as_tensor(n_new, dtype=torch.int64, device=self.lengths.device)
        t = torch.arange(new_k.shape[3], device=self.lengths.device)
        pos = self.lengths[rows][:, None] + t[None, :]                 # (R, T)
        real = t[None, :] < n_new[:, None]                              # (R, T)
        if bool((pos[real] >= self.k.shape[3]).any()):
            raise ValueError(f"KV cache overflow: a row would exceed {self.k.shape[3]} slots")
        r, p = rows[:, None].expand_as(pos)[real], pos[real]            # (N,) each
        self.k[r, :, :, p] = new_k.permute(0, 3, 1, 2, 4)[real]         # (N, L, KV, hd)
        self.v[r, :, :, p] = new_v.permute(0, 3, 1, 2, 4)[real]
        self.lengths[rows] += n_new

    def reset_rows(self, rows: Tensor | Sequence[int]) -> None:
        """Empty the rows (lengths -> 0); stale data stays and is masked by `start`."""
        self.lengths[torch.as_tensor(rows, dtype=torch.int64, device=self.lengths.device)] = 0

    def copy_row(self, src: int, dst: int) -> None:
        """Row src's k, v and length into row dst (e.g. to fork a shared prompt)."""
        self.k[dst], self.v[dst], self.lengths[dst] = self.k[src], self.v[src], self.lengths[src]


def init_state(model_or_config: Decoder | Config, batch_size: int, max_len: int) -> KVCache:
    """An empty KV cache; dtype and device follow the model's when a model is given."""
    if isinstance(model_or_config, nn.Module):
        p = next(model_or_config.parameters())
        return KVCache.allocate(model_or_config.config, batch_size, max_len, p.dtype, p.device)
    return KVCache.allocate(model_or_config, batch_size, max_len)


def forward(model: Decoder, ids: Tensor, state: KVCache) -> tuple[Tensor, KVCache]:
    """ids (B, T) appended to every row of state: step, then write; returns (logits (B, T, V), state)."""
    logits, new_k, new_v = model.step(ids, state.lengths, state.k, state.v)
    B, T = ids.shape
    state.write(torch.arange(B), new_k, new_v, torch.full((B,), T))
    return logits, state


def example_inputs(config: Config, batch: int = 2) -> tuple[Tensor]:
    """Random token ids (batch, 16)."""
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, config.vocab_size, (batch, 16), generator=g),)


def loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Next-token cross entropy; x, y (B, T) int64 with y already shifted by the caller."""
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


# --- HF converters (the test oracle). Names: ours -> HF, one small mapping per converter. ---

def _hf_config_kwargs(c: Config) -> dict:
    return dict(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.ffn_hidden,
                num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps,
                rope_theta=c.rope_theta,                   # transformers 5 maps it to rope_parameters
                tie_word_embeddings=c.tie_embeddings, attention_bias=False,
                attn_implementation="eager")


def _hf_state_dict(model: Decoder, ffn_weights: Callable[[nn.Module], dict[str, Tensor]]) -> dict[str, Tensor]:
    """Our weights under HF names; `ffn_weights(layer.ffn)` gives a layer's `mlp.*` entries."""
    out = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.norm.weight,
           "lm_head.weight": model.lm_head.weight}           # the same tensor as tok_emb when tied
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = layer.attn_norm.weight
        out[p + "post_attention_layernorm.weight"] = layer.ffn_norm.weight
        for n in "qkvo":
            out[p + f"self_attn.{n}_proj.weight"] = getattr(layer.attn, n).weight
        out.update({p + k: w for k, w in ffn_weights(layer.ffn).items()})
    return {k: w.detach().clone() for k, w in out.items()}


def _llama_ffn(ffn: SwiGLU) -> dict[str, Tensor]:
    return {"mlp.gate_proj.weight": ffn.gate.weight, "mlp.up_proj.weight": ffn.up.weight,
            "mlp.down_proj.weight": ffn.down.weight}


def _mixtral_ffn(ffn: MoE) -> dict[str, Tensor]:
    return {"mlp.gate.weight": ffn.router.weight,                                           # (E, D)
            # (E, 2I, D): the gate rows, then the up rows
            "mlp.experts.gate_up_proj": torch.cat([ffn.experts_gate, ffn.experts_up], dim=1),
            "mlp.experts.down_proj": ffn.experts_down}                                      # (E, D, I)


def to_hf_llama(model: Decoder):
    """A `transformers.LlamaForCausalLM` (fp32, eval, eager attention) with our dense weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if model.config.n_experts:
        raise ValueError("to_hf_llama needs a dense model (n_experts=0); use to_hf_mixtral")
    hf = LlamaForCausalLM(LlamaConfig(**_hf_config_kwargs(model.config), mlp_bias=False))
    hf.load_state_dict(_hf_state_dict(model, _llama_ffn), strict=True)
    return hf.float().eval()


def to_hf_mixtral(model: Decoder):
    """A `transformers.MixtralForCausalLM` (fp32, eval, eager attention) with our MoE weights.
    transformers 5.x: router `mlp.gate.weight` (E, D); experts 3-D `mlp.experts.gate_up_proj`
    (E, 2I, D) and `mlp.experts.down_proj` (E, D, I); routing as ours (softmax, top-k, renormalise)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = model.config
    if not c.n_experts:
        raise ValueError("to_hf_mixtral needs an MoE model (n_experts > 0); use to_hf_llama")
    hf = MixtralForCausalLM(MixtralConfig(**_hf_config_kwargs(c), num_local_experts=c.n_experts,
                                          num_experts_per_tok=c.n_experts_active, router_jitter_noise=0.0))
    hf.load_state_dict(_hf_state_dict(model, _mixtral_ffn), strict=True)
    return hf.float().eval()
