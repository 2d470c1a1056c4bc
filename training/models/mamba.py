"""Mamba-1: a language model of selective state-space (SSM) blocks, no attention.

References: Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"
(arXiv 2312.00752), Algorithm 2 and section 3.5; HF `modeling_mamba.py` is the oracle, and our
parameter names are HF's (`to_hf_mamba` only adds the `backbone.` prefix).

Dimensions: B batch, T tokens, V vocab, D model width (d_model), L layers, E inner width
(expand * D), N SSM state size (d_state), K conv kernel (d_conv), R rank of the dt projection.
Paper -> code: Delta -> dt, A -> A (= -exp(A_log)), B/C -> B/C, u -> x, h -> s (the SSM state).

One layer: x, z = in_proj(norm(h)); x = silu(causal depthwise conv(x)); dt, B, C = x_proj(x);
dt = softplus(dt_proj(dt)); s_t = exp(dt_t A) s_{t-1} + dt_t B_t x_t; y_t = C_t . s_t + D x_t;
h += out_proj(y * silu(z)). The recurrent state per layer is the last K-1 conv inputs (K-1, E)
and the SSM state (N, E): constant size, whatever the context length. Both are channels-last,
like the activations (T, E), so the conv and the scan broadcast along contiguous E-wide rows
(HF keeps the transposes, (E, K) and (E, N)).

Two scans compute the same recurrence in eager torch: `scan_sequential` (one step at a time, the
obviously correct reference) and `scan_chunked` (whole chunks at once, used by `forward`); a test
holds them equal. The exported step (ONNX) is two graphs under one If on T: a decode step (T = 1,
`Mamba.decode`, no loop at all) and a prefill (`_scan_export`: one ONNX Scan over chunks of
EXPORT_CHUNK tokens, each chunk in closed form; a sequential Scan where the decay is too steep).
TorchScript traces the general path with a scripted `scan_sequential`. A server with the native
kernels (training/kernels) runs prompts through the split prefill instead: `prefill_segments`
below, ONNX segments around a native conv and scan (training/split_prefill.py).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KIND = "tokens"
OUTPUT_NAMES = ("logits",)                                  # of the full forward
STATE_NAMES = ("conv_state", "ssm_state")   # the state kinds; the step takes one of each per layer: state_names()
CHUNK = 32              # time steps per chunk of scan_chunked
MAX_CHUNK_DECAY = 60.0  # largest |A * sum of dt| inside one chunk: exp(60) ~ 1e26 leaves fp32 1e12 of headroom
EXPORT_CHUNK = 16       # time steps per iteration of the exported prefill's Scan
# the exported chunks measure decay from their middle, so exp(+-60) bounds both ends of a 120-nat chunk
MAX_CENTRED_DECAY = 120.0
EXPORT_EXAMPLE_NEW = 2 * EXPORT_CHUNK + 5   # tokens per row in the traced example (see step_dynamic_shapes)

ScanFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass
class Config:
    vocab_size: int = 2048
    block_size: int = 128        # training window; bookkeeping only (Mamba has no positional limit)
    d_model: int = 128
    n_layer: int = 4
    d_state: int = 16            # N
    d_conv: int = 4              # K
    expand: int = 2              # E = expand * d_model
    dt_rank: int = 0             # R; 0 = ceil(d_model / 16), the paper's "auto", resolved below
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # lm_head shares the token embedding weight
    dt_min: float = 0.001        # initial dt is log-uniform in [dt_min, dt_max] per channel
    dt_max: float = 0.1

    def __post_init__(self) -> None:
        if self.dt_rank == 0:
            self.dt_rank = math.ceil(self.d_model / 16)
        if self.d_conv < 2:
            raise ValueError(f"d_conv {self.d_conv} must be >= 2 (the conv state holds d_conv - 1 inputs)")
        if min(self.d_model, self.n_layer, self.d_state, self.expand, self.dt_rank) < 1:
            raise ValueError("d_model, n_layer, d_state, expand and dt_rank must be positive")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model


PRESETS = {
    "tiny": dict(d_model=128, n_layer=4, d_state=8),   # ~0.70 M parameters with vocab 2048 (decoder tiny ~0.97 M)
    "bench": dict(d_model=256, n_layer=6),         # the size research/token-oracles.md measured HF Mamba at
}


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps), computed in fp32 (as HF MambaRMSNorm). Written as a division
    so that ONNX Runtime fuses the exported pattern into one SimplifiedLayerNormalization."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        return self.weight * (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _softplus(x: Tensor) -> Tensor:
    """F.softplus; exported as five elementwise ops (equal in fp32): ONNX Runtime's Softplus
    kernel (13 ns an element) was 12% of a 512-token prefill, these cost under a third of that."""
    if not torch.compiler.is_exporting():
        return F.softplus(x)
    # log(1 + e^x) > x always, and for x > 20 it is x to fp32 precision: so max(., x) with the
    # exponent capped at 20 (no overflow). Below about -16 it rounds to 0 where softplus is < 1e-7.
    return torch.maximum(torch.log(1 + torch.exp(x.clamp(max=20.0))), x)


# --- the selective scan: x, dt (B, T, E); A (E, N); B, C (B, T, N); s0 (B, N, E) -> y (B, T, E), s_T ---

def scan_sequential(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, s0: Tensor) -> tuple[Tensor, Tensor]:
    """The recurrence one step at a time (the reference; also scripted for TorchScript export)."""
    s, At = s0, A.t()                                                      # At (N, E)
    ys: list[Tensor] = []
    for t in range(x.shape[1]):
        dA = torch.exp(dt[:, t, None, :] * At)                             # (B, N, E) zero-order hold of A
        dBx = (dt[:, t] * x[:, t])[:, None, :] * B[:, t, :, None]          # (B, N, E) Euler step of B x
        s = dA * s + dBx
        ys.append((s * C[:, t, :, None]).sum(1))                           # (B, E)
    return torch.stack(ys, dim=1), s


def _chunk_size(dt: Tensor, A: Tensor, largest: int) -> int:
    """`largest`, halved until no channel decays by more than MAX_CHUNK_DECAY (in log space)
    inside one chunk; 1 means the sequential scan."""
    with torch.no_grad():
        rate = A.abs().amax(-1)                                            # (E,) fastest decay per channel
        T, q = dt.shape[1], largest
        while q > 1:
            chunks = F.pad(dt, (0, 0, 0, -T % q)).unflatten(1, (-1, q))    # (B, nC, Q, E)
            if float((chunks.sum(2) * rate).amax()) <= MAX_CHUNK_DECAY:
                return q
            q //= 2
    return 1


def scan_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, s0: Tensor,
                 chunk: int = CHUNK) -> tuple[Tensor, Tensor]:
    """The same recurrence, a chunk of Q steps at a time, with a sequential carry between chunks.

    Inside a chunk that starts from state s, with a_t = A * sum_{i<=t} dt_i (the log decay since
    the chunk start, <= 0), the recurrence unrolls to
        s_t = exp(a_t) * (s + sum_{i<=t} exp(-a_i) dt_i B_i x_i)
    i.e. one cumsum and a few elementwise products for all Q steps. exp(-a_i) grows with the
    decay, so the chunk is halved (down to 1 = scan_sequential) until no channel decays by more
    than MAX_CHUNK_DECAY inside one. Time is the last, contiguous axis: a cumsum over it is ~4x
    faster on CPU than over axis 1. Measured on one CPU thread, it is 1.3-2x faster than
    scan_sequential where one step's (B, E, N) is small (a prompt at batch 1, training `tiny`)
    and slower where that is already large (B 8, E 512, N 16): it makes more passes over memory.
    """
    q = _chunk_size(dt, A, min(chunk, x.shape[1]))                       # a decode step (T = 1) is one step
    if q == 1:
        return scan_sequential(x, dt, A, B, C, s0)
    T = x.shape[1]

    def chunks(v: Tensor) -> Tensor:                                       # (B, T, F) -> (B, nC, F, Q)
        return F.pad(v, (0, 0, 0, -T % q)).unflatten(1, (-1, q)).transpose(2, 3).contiguous()

    # padded steps have dt = 0: they neither decay nor feed the state
    cum_dt, dtx, B_c, C_c = chunks(dt).cumsum(-1), chunks(dt * x), chunks(B), chunks(C)   # (B, nC, E|N, Q)
    minus_A = -A[:, :, None]                                               # (E, N, 1) > 0
    s, ys = s0.transpose(1, 2), []                                         # (B, E, N) here
    for c in range(cum_dt.shape[1]):
        grow = torch.exp(cum_dt[:, c, :, None] * minus_A)                  # (B, E, N, Q) exp(-a_t), in [1, e^60]
        u = dtx[:, c, :, None] * B_c[:, c, None]                           # (B, E, N, Q) dt B x
        states = ((grow * u).cumsum(-1) + s[..., None]) / grow             # (B, E, N, Q) s_t for t in the chunk
        ys.append((states * C_c[:, c, None]).sum(2))                       # (B, E, Q) C_t . s_t
        s = states[..., -1]                                                # carried into the next chunk
    y = torch.stack(ys, dim=1).transpose(2, 3).flatten(1, 2)[:, :T]        # (B, T, E)
    return y, s.transpose(1, 2)


def _scan_hop(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, s0: Tensor) -> tuple[Tensor, Tensor]:
    """scan_sequential as torch's `scan` operator: torch.export keeps it as one ONNX Scan over a
    dynamic T instead of unrolling a Python loop at the traced length."""
    from torch._higher_order_ops.scan import scan

    dA = torch.exp(dt[:, :, None, :] * A.t())                              # (B, T, N, E)
    dBx = (dt * x)[:, :, None, :] * B[..., None]                           # (B, T, N, E)

    def step(s: Tensor, inputs: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        a, bx, c = inputs                                                  # (B, N, E), (B, N, E), (B, N)
        s = a * s + bx
        return s, (s * c[..., None]).sum(1)

    s, y = scan(step, s0.contiguous(), (dA, dBx, C), dim=1)   # the carry must keep init's strides
    return y.contiguous(), s.contiguous()


def _scan_chunks_hop(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, s0: Tensor) -> tuple[Tensor, Tensor]:
    """scan_chunked for export: one Scan iteration per chunk of Q = EXPORT_CHUNK steps (T padded
    with dt = 0 steps, which leave the state alone), everything per token hoisted out of the loop.

    Same closed form as scan_chunked, with the log decay measured from the chunk's middle
    (m = a at half the chunk's total): s_t = (s e^{m} + sum_{i<=t} g_i dt_i B_i x_i) / g_t with
    g_t = exp(m - a_t) in [e^-60, e^60] while the chunk decays by <= MAX_CENTRED_DECAY (the caller
    checks). Layout (B, nC, Q, N, E): every broadcast runs along E-wide rows. Measured in ONNX
    Runtime at one thread, a 512-token prompt at batch 1 (E 512, N 16): ~10 ms a layer against
    ~36 ms for the one-token-per-iteration Scan; Q = 16 beat 8, 32 and 64 (8 at batch 16).
    """
    from torch._higher_order_ops.scan import scan

    b, T, E = x.shape
    N, Q = A.shape[1], EXPORT_CHUNK
    nC = (T + Q - 1) // Q

    def chunks(v: Tensor) -> Tensor:                                       # (B, T, F) -> (B, nC, Q, F)
        return F.pad(v, (0, 0, 0, nC * Q - T)).view(b, nC, Q, v.shape[-1])

    rate = -A.t()                                                          # (N, E) > 0
    cum = chunks(dt).cumsum(2)                                             # (B, nC, Q, E) sum of dt in the chunk
    half = cum[:, :, -1:] * 0.5                                            # (B, nC, 1, E)
    centred = (cum - half)[:, :, :, None, :]                               # (B, nC, Q, 1, E)
    carry_in = torch.exp(-half * rate)[:, :, None]                         # (B, nC, 1, N, E) e^{m} for the carry
    dtx = chunks(dt * x)[:, :, :, None, :]                                 # (B, nC, Q, 1, E)
    B_c, C_c = chunks(torch.cat([B, C], -1))[..., None].split([N, N], 3)   # (B, nC, Q, N, 1) each

    # the carry keeps a chunk axis of length 1, (B, 1, N, E): taking it is a Slice of the last
    # state and using it a plain broadcast (a Gather and an Unsqueeze per chunk, ~4 % of the scan)
    def step(s: Tensor, inputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        cen, bx, bq, cq, into = inputs
        g = torch.exp(cen * rate)                                          # (B, Q, N, E)
        states = ((g * (bx * bq)).cumsum(1) + s * into) / g                # (B, Q, N, E) s_t in the chunk
        # the carry must keep init's strides: a plain clone keeps the slice's (B = 1 made them differ)
        return states[:, Q - 1:].clone(memory_format=torch.contiguous_format), (cq.transpose(2, 3) @ states)[:, :, 0]

    s, y = scan(step, s0[:, None].contiguous(), (centred, dtx, B_c.contiguous(), C_c.contiguous(), carry_in), dim=1)
    return y.reshape(b, nC * Q, E).narrow(1, 0, T).contiguous(), s[:, 0].contiguous()


def _chunks_are_mild(dt: Tensor, A: Tensor) -> Tensor:
    """() bool: no channel decays by more than MAX_CENTRED_DECAY inside one EXPORT_CHUNK chunk."""
    b, T, E = dt.shape
    nC = (T + EXPORT_CHUNK - 1) // EXPORT_CHUNK
    total = F.pad(dt, (0, 0, 0, nC * EXPORT_CHUNK - T)).view(b, nC, EXPORT_CHUNK, E).sum(2)   # (B, nC, E)
    return (total * A.abs().amax(-1)).amax(dim=(0, 1, 2)) <= MAX_CENTRED_DECAY


def _scan_export(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, s0: Tensor) -> tuple[Tensor, Tensor]:
    """The exported prefill scan: chunked where every chunk's decay is mild, else one step at a
    time (an ONNX If on the data; both are exact)."""
    # B and C are views of one projection: cond refuses aliased operands, so they go as copies
    return torch.cond(_chunks_are_mild(dt, A), _scan_chunks_hop, _scan_hop,
                      (x, dt, A, B.contiguous(), C.contiguous(), s0))


@functools.cache
def _scan_scripted() -> ScanFn:
    # a traced module keeps a call to a scripted function, loop and all (T stays dynamic)
    return torch.jit.script(scan_sequential)


def _scan_for_context() -> ScanFn:
    """The scan to run now: ONNX export and TorchScript tracing need a loop the exporter keeps."""
    if torch.compiler.is_exporting():
        return _scan_export
    if torch.jit.is_tracing():
        return _scan_scripted()
    return scan_chunked


class Mixer(nn.Module):
    """The selective SSM block (paper Figure 3); names and layouts are HF MambaMixer's."""

    def __init__(self, c: Config):
        super().__init__()
        E, N, R, K = c.d_inner, c.d_state, c.dt_rank, c.d_conv
        self.sizes = (R, N, K)
        self.in_proj = nn.Linear(c.d_model, 2 * E, bias=False)            # rows [0:E] x, [E:2E] z
        self.conv1d = nn.Conv1d(E, E, K, groups=E, bias=True)             # weight (E, 1, K), applied by hand
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)                  # -> [dt_low (R), B (N), C (N)]
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))  # (E, N)
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, c.d_model, bias=False)
        self.A_log._no_weight_decay = self.D._no_weight_decay = True      # as mamba_ssm: never decayed

    def forward(self, h: Tensor, conv_state: Tensor, ssm_state: Tensor, n_new: Tensor | None = None,
                scan: ScanFn | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """h (B, T, D); conv_state (B, K-1, E) the conv inputs before these tokens; ssm_state (B, N, E);
        n_new (B,): only the first n_new[b] tokens of row b are real (None: all T).
        Returns out (B, T, D) and the states after the real tokens: (B, K-1, E), (B, N, E)."""
        x, z, dt, B, C, new_conv = self.project(h, conv_state, n_new)
        y, new_ssm = (scan or _scan_for_context())(x, dt, self.decay(), B, C, ssm_state)
        return self.out_proj(self.gate(y, x, z)), new_conv, new_ssm

    def decay(self) -> Tensor:
        """A (E, N) = -exp(A_log) < 0: a stable decay."""
        return -torch.exp(self.A_log.float())

    def project(self, h: Tensor, conv_state: Tensor, n_new: Tensor | None = None) -> tuple[Tensor, ...]:
        """Everything before the scan: x, z, dt (B, T, E), B, C (B, T, N) and the new conv state
        (B, K-1, E). dt is softplus'd and 0 at padding (n_new)."""
        x, z = self.in_projections(h)
        x, new_conv = self.causal_conv(x, conv_state, n_new)
        dt, B, C = self.ssm_inputs(x)
        dt = _softplus(dt)                                                 # step size > 0
        if n_new is not None:                                              # dt = 0 at padding: exp(0 A) = 1 and
            real = torch.arange(h.shape[1], device=h.device)[None, :] < n_new[:, None]   # dt B x = 0, so the
            dt = dt * real[:, :, None].to(dt.dtype)                        # state passes padding unchanged
        return x, z, dt, B, C, new_conv

    def in_projections(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """h (B, T, D) -> x, z (B, T, E): two products with halves of in_proj's weight, not one and
        a split (the split copied the (B, T, 2E) product again, ~5 % of an exported prefill segment)."""
        w_x, w_z = self.in_proj.weight.chunk(2, dim=0)                     # (E, D) each
        return F.linear(h, w_x), F.linear(h, w_z)

    def causal_conv(self, x: Tensor, conv_state: Tensor, n_new: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T, E) -> silu(causal depthwise conv) (B, T, E) and the conv state after the real
        tokens (B, K-1, E). HF: conv1d with K-1 left padding. Over a prompt, ONNX Runtime's grouped
        Conv and two transposes took 0.5 ms where K shifted multiply-adds took 1.3 (512 tokens, E
        512); decode() keeps the multiply-adds, where the Conv was 27 % of a step."""
        T, K = x.shape[1], self.sizes[2]
        xc = torch.cat([conv_state, x], dim=1)                             # (B, K-1+T, E)
        out = F.silu(F.conv1d(xc.transpose(1, 2), self.conv1d.weight, self.conv1d.bias,
                              groups=xc.shape[2]).transpose(1, 2))         # (B, T, E)
        if n_new is None:
            return out, xc[:, T:]                                          # (B, K-1, E) the last K-1 inputs
        idx = n_new[:, None, None] + torch.arange(K - 1, device=x.device)[:, None]   # (B, K-1, 1)
        return out, xc.gather(1, idx.expand(-1, -1, xc.shape[2]))         # the last K-1 *real* inputs

    def ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, E) -> dt before its softplus (B, T, E), B, C (B, T, N)."""
        R, N, _ = self.sizes
        dt, B, C = self.x_proj(x).split([R, N, N], dim=-1)                 # (B, T, R), (B, T, N), (B, T, N)
        return self.dt_proj(dt), B, C

    def gate(self, y: Tensor, x: Tensor, z: Tensor) -> Tensor:
        """After the scan: y, x, z (B, T, E) -> (y + D x) * silu(z) (B, T, E), out_proj's input."""
        return (y + x * self.D) * F.silu(z)                                # D x: the skip term

    def decode(self, h: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One token: h (B, 1, D) -> out (B, 1, D) and the new states; forward at T = 1 without
        padding, gathers or loops: O(1) ops whatever the context (the exported decode step)."""
        R, N, K = self.sizes
        x, z = self.in_proj(h).chunk(2, dim=-1)                            # (B, 1, E)
        xc = torch.cat([conv_state, x], dim=1)                             # (B, K, E)
        x = F.silu((xc * self.conv1d.weight[:, 0].t()).sum(1, keepdim=True) + self.conv1d.bias)   # (B, 1, E)
        dt, B, C = self.x_proj(x).split([R, N, N], dim=-1)                 # (B, 1, R|N|N)
        dt = _softplus(self.dt_proj(dt))                                   # (B, 1, E)
        A = -torch.exp(self.A_log.float()).t()                             # (N, E)
        s = torch.exp(dt * A) * ssm_state + (dt * x) * B.transpose(1, 2)   # (B, N, E)
        y = C @ s + x * self.D                                             # (B, 1, E) C . s + D x
        return self.out_proj(y * F.silu(z)), xc[:, 1:], s


class Block(nn.Module):
    """Pre-norm residual: h + mixer(norm(h))."""

    def __init__(self, c: Config):
        super().__init__()
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self.mixer = Mixer(c)

    def forward(self, h: Tensor, conv_state: Tensor, ssm_state: Tensor, n_new: Tensor | None = None,
                scan: ScanFn | None = None) -> tuple[Tensor, Tensor, Tensor]:
        out, conv_state, ssm_state = self.mixer(self.norm(h), conv_state, ssm_state, n_new, scan)
        return h + out, conv_state, ssm_state

    def decode(self, h: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out, conv_state, ssm_state = self.mixer.decode(self.norm(h), conv_state, ssm_state)
        return h + out, conv_state, ssm_state


class Mamba(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = c = config
        self.embeddings = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm_f = RMSNorm(c.d_model, c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self._init_weights()
        if c.tie_embeddings:
            self.lm_head.weight = self.embeddings.weight

    @torch.no_grad()
    def _init_weights(self) -> None:
        """mamba_ssm's init: embeddings N(0, 0.02); dt = softplus(bias) log-uniform in [dt_min, dt_max];
        dt_proj weights U(+-R^-0.5); out_proj scaled by 1/sqrt(L) (pre-norm residual); A_log = log(1..N)."""
        c = self.config
        nn.init.normal_(self.embeddings.weight, std=0.02)
        for block in self.layers:
            m = block.mixer
            nn.init.uniform_(m.dt_proj.weight, -c.dt_rank**-0.5, c.dt_rank**-0.5)
            dt = torch.exp(torch.rand(c.d_inner) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
            dt = dt.clamp(min=1e-4)
            m.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))         # inverse of softplus
            m.out_proj.weight /= math.sqrt(c.n_layer)

    def run(self, ids: Tensor, states: Sequence[Tensor], n_new: Tensor | None = None,
            scan: ScanFn | None = None, last: bool = False) -> tuple[Tensor, ...]:
        """ids (B, T); states in state_names order (conv_state_0 (B, K-1, E), ssm_state_0 (B, N, E),
        conv_state_1, ...) -> logits (B, T, V) and the new states (same order and shapes), after
        n_new[b] tokens of row b. last: logits (B, 1, V) at each row's last real token only (what
        a server samples from; the head over every position was ~6 % of a 512-token prefill)."""
        h = self.embeddings(ids)                                           # (B, T, D)
        new: list[Tensor] = []
        for i, block in enumerate(self.layers):
            h, conv, ssm = block(h, states[2 * i], states[2 * i + 1], n_new, scan)
            new += [conv, ssm]
        if last:
            n = n_new if n_new is not None else torch.full(ids.shape[:1], ids.shape[1], device=ids.device)
            h = last_positions(h, n - 1)                                   # (B, 1, D)
        return self.lm_head(self.norm_f(h)), *new

    def decode(self, ids: Tensor, states: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """run() for one token per row: ids (B, 1) -> logits (B, 1, V) and the new states."""
        h = self.embeddings(ids)                                           # (B, 1, D)
        new: list[Tensor] = []
        for i, block in enumerate(self.layers):
            h, conv, ssm = block.decode(h, states[2 * i], states[2 * i + 1])
            new += [conv, ssm]
        return self.lm_head(self.norm_f(h)), *new

    def forward(self, ids: Tensor, scan: ScanFn | None = None) -> Tensor:
        """ids (B, T) int64 -> logits (B, T, V), from zero state; `scan` defaults to scan_chunked."""
        state = MambaState.allocate(self.config, ids.shape[0], self.embeddings.weight.dtype, ids.device)
        return self.run(ids, state.per_layer(), None, scan)[0]


Model = Mamba


def last_positions(h: Tensor, index: Tensor) -> Tensor:
    """h (B, T, F), index (B,) -> (B, 1, F): row b's h at time index[b]."""
    return h.gather(1, index[:, None, None].expand(-1, 1, h.shape[2]))


class StepModule(nn.Module):
    """The serving step as a module: step_input_names(config) -> step_output_names(config).

    ids (B, T) int64, right-padded: row b's real tokens are ids[b, :n_new[b]] (1 <= n_new <= T);
    then per layer i conv_state_i (B, K-1, E) and ssm_state_i (B, N, E) float32, the states
    before these tokens. Returns logits (B, 1, V) at each row's last real token (what the next
    token is sampled from) and the states after exactly n_new[b] tokens, in the same order. T = 1
    is a decode step: its cost does not depend on the context. Exported, it is an If on T = 1:
    `Mamba.decode` or `Mamba.run`.
    """

    def __init__(self, model: Mamba):
        super().__init__()
        self.model = model
        self.train(model.training)   # a fresh wrapper would be in training mode; the exporter warns on that

    def forward(self, ids: Tensor, n_new: Tensor, *states: Tensor) -> tuple[Tensor, ...]:
        if not torch.compiler.is_exporting():
            return self.model.run(ids, states, n_new, last=True)
        return torch.cond(ids.shape[1] == 1, self._decode, self._prefill, (ids, n_new, *states))

    # torch.cond's branches take the same operands and return dense, unaliased tensors
    def _decode(self, ids: Tensor, n_new: Tensor, *states: Tensor) -> tuple[Tensor, ...]:
        # T is 1 here (n_new too); the slice only tells the tracer, which runs both branches at T > 1
        return tuple(t.contiguous() for t in self.model.decode(ids[:, :1], states))

    def _prefill(self, ids: Tensor, n_new: Tensor, *states: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.contiguous() for t in self.model.run(ids, states, n_new, last=True))


# --- the split prefill: the layers' products as ONNX segments, conv and scan native between them ---
# Per layer i, two segments: "open" finishes layer i-1 (out_proj and the residual) and computes
# layer i's norm and in_proj; "mid" computes the scan's inputs from the conv's output. Between
# them the server runs the causal conv, and after "mid" the scan with dt's softplus before it and
# gate() after it, in native code (training/kernels; training/split_prefill.py). Tensors:
#   h (B, T, D) the residual stream; x_in, z (B, T, E) in_proj's halves; conv_w (K, E), conv_b (E,);
#   x (B, T, E) the conv's output; dt (B, T, E) before its softplus; B, C (B, T, N); a_t (N, E) = A
#   transposed; d (E,) = D; prev_h, prev_y: h and the gated scan output of the layer before.
SEGMENT_OPEN_OUTPUTS = ("h", "x_in", "z", "conv_w", "conv_b")
SEGMENT_MID_OUTPUTS = ("dt", "B", "C", "a_t", "d")


class _PrefillSegment(nn.Module):
    def __init__(self, model: Mamba, layer: int):
        super().__init__()
        self.model, self.layer = model, layer
        self.train(model.training)

    def _open(self, h: Tensor) -> tuple[Tensor, ...]:
        block = self.model.layers[self.layer]
        x, z = block.mixer.in_projections(block.norm(h))
        conv = block.mixer.conv1d
        return h, x, z, conv.weight[:, 0].t().contiguous(), conv.bias.detach().clone()

    def _finish(self, h: Tensor, y: Tensor) -> Tensor:
        return h + self.model.layers[self.layer - 1].mixer.out_proj(y)


class PrefillEntry(_PrefillSegment):
    """Layer 0's open: ids (B, T) -> SEGMENT_OPEN_OUTPUTS."""

    def __init__(self, model: Mamba):
        super().__init__(model, 0)

    def forward(self, ids: Tensor) -> tuple[Tensor, ...]:
        return self._open(self.model.embeddings(ids))


class PrefillLink(_PrefillSegment):
    """Layer i's open, i in 1..L-1: (prev_h, prev_y of layer i-1) -> SEGMENT_OPEN_OUTPUTS."""

    def forward(self, prev_h: Tensor, prev_y: Tensor) -> tuple[Tensor, ...]:
        return self._open(self._finish(prev_h, prev_y))


class PrefillMid(_PrefillSegment):
    """Layer i's scan inputs: x (the conv's output) -> SEGMENT_MID_OUTPUTS."""

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        mixer = self.model.layers[self.layer].mixer
        dt, B, C = mixer.ssm_inputs(x)
        return dt, B.contiguous(), C.contiguous(), mixer.decay().t().contiguous(), mixer.D.detach().clone()


class PrefillExit(_PrefillSegment):
    """After the last layer: (prev_h, prev_y, n_new) -> logits (B, 1, V) at each row's last real token."""

    def __init__(self, model: Mamba):
        super().__init__(model, model.config.n_layer)

    def forward(self, prev_h: Tensor, prev_y: Tensor, n_new: Tensor) -> Tensor:
        h = last_positions(self._finish(prev_h, prev_y), n_new - 1)       # (B, 1, D)
        return self.model.lm_head(self.model.norm_f(h))


def prefill_segments(model: Mamba) -> list[nn.Module]:
    """The 2L + 1 segments, in order: open and mid of each layer, then the exit."""
    L = model.config.n_layer
    opens = [PrefillEntry(model), *(PrefillLink(model, i) for i in range(1, L))]
    return [seg for i in range(L) for seg in (opens[i], PrefillMid(model, i))] + [PrefillExit(model)]


def state_names(config: Config) -> tuple[str, ...]:
    """The step's state inputs: one of each STATE_NAMES kind per layer, layer by layer. One input
    per layer (not one (B, L, ...) tensor) spares the exported step a Split and a Concat of the
    whole state per call, as one KV input per layer did for the decoder."""
    return tuple(f"{kind}_{i}" for i in range(config.n_layer) for kind in STATE_NAMES)


def state_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Per-row shapes of the float32 state tensors, by state_names."""
    per_kind = {"conv_state": (config.d_conv - 1, config.d_inner), "ssm_state": (config.d_state, config.d_inner)}
    return {name: per_kind[name.rsplit("_", 1)[0]] for name in state_names(config)}


def step_dynamic_shapes(config: Config, max_batch: int = 4096, max_len: int = 65536) -> dict:
    """`dynamic_shapes` for exporting StepModule with dynamic B and T (trace with B != T, both >= 2,
    and T > EXPORT_CHUNK: a single chunk would pin the chunk count to 1)."""
    Dim = torch.export.Dim
    batch, new = Dim("batch", min=1, max=max_batch), Dim("new", min=1, max=max_len)
    return {"ids": {0: batch, 1: new}, "n_new": {0: batch},
            "states": tuple({0: batch} for _ in state_names(config))}



@dataclass
class MambaState:
    """conv: (B, L, K-1, E), ssm: (B, L, N, E); lengths: (B,) int64 tokens consumed per row
    (bookkeeping only: the state has no positions and does not grow)."""
    conv: Tensor
    ssm: Tensor
    lengths: Tensor

    @classmethod
    def allocate(cls, config: Config, batch: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> "MambaState":
        L, K, N, E = config.n_layer, config.d_conv, config.d_state, config.d_inner
        return cls(torch.zeros(batch, L, K - 1, E, dtype=dtype, device=device),
                   torch.zeros(batch, L, N, E, dtype=dtype, device=device),
                   torch.zeros(batch, dtype=torch.int64, device=device))

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """Views (B, K-1, E), (B, N, E) of layer i."""
        return self.conv[:, i], self.ssm[:, i]

    def per_layer(self) -> list[Tensor]:
        """Views in state_names order: conv_state_0, ssm_state_0, conv_state_1, ..."""
        return [v for i in range(self.conv.shape[1]) for v in self.layer(i)]

    def write(self, rows: Tensor | Sequence[int], conv: Tensor, ssm: Tensor, n_new: Tensor | Sequence[int]) -> None:
        """Store a step's new states (R, L, ...) into rows `rows`; advance their lengths by n_new."""
        rows = torch.as_tensor(rows, dtype=torch.int64, device=self.lengths.device)
        self.conv[rows], self.ssm[rows] = conv, ssm
        self.lengths[rows] += torch.as_tensor(n_new, dtype=torch.int64, device=self.lengths.device)

    def reset_rows(self, rows: Tensor | Sequence[int]) -> None:
        """Zero the rows' states (a new sequence starts from zero state)."""
        rows = torch.as_tensor(rows, dtype=torch.int64, device=self.lengths.device)
        self.conv[rows], self.ssm[rows], self.lengths[rows] = 0.0, 0.0, 0

    def copy_row(self, src: int, dst: int) -> None:
        """Row src's states and length into row dst (e.g. to fork a shared prompt)."""
        self.conv[dst], self.ssm[dst], self.lengths[dst] = self.conv[src], self.ssm[src], self.lengths[src]


def init_state(model_or_config: Mamba | Config, batch_size: int, max_len: int | None = None) -> MambaState:
    """A zero state; `max_len` is accepted for the token-engine signature and ignored (constant size)."""
    if isinstance(model_or_config, nn.Module):
        p = model_or_config.embeddings.weight
        return MambaState.allocate(model_or_config.config, batch_size, p.dtype, p.device)
    return MambaState.allocate(model_or_config, batch_size)


def forward(model: Mamba, ids: Tensor, state: MambaState) -> tuple[Tensor, MambaState]:
    """ids (B, T) appended to every row of state; returns (logits (B, T, V), state)."""
    B, T = ids.shape
    n_new = torch.full((B,), T, dtype=torch.int64, device=ids.device)
    logits, *new = model.run(ids, state.per_layer(), n_new)
    state.write(torch.arange(B), torch.stack(new[0::2], dim=1), torch.stack(new[1::2], dim=1), n_new)
    return logits, state


def example_inputs(config: Config, batch: int = 2) -> tuple[Tensor]:
    """Random token ids (batch, 16)."""
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, config.vocab_size, (batch, 16), generator=g),)


def loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Next-token cross entropy; x, y (B, T) int64 with y already shifted by the caller."""
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def to_hf_mamba(model: Mamba):
    """A `transformers.MambaForCausalLM` (fp32, eval) with our weights: the names are HF's, under `backbone.`."""
    from transformers import MambaConfig, MambaForCausalLM

    c = model.config
    hf = MambaForCausalLM(MambaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layer, state_size=c.d_state,
        conv_kernel=c.d_conv, expand=c.expand, time_step_rank=c.dt_rank, layer_norm_epsilon=c.norm_eps,
        use_bias=False, use_conv_bias=True, hidden_act="silu", tie_word_embeddings=c.tie_embeddings))
    ours = {(k if k.startswith("lm_head.") else "backbone." + k): w.detach().clone()
            for k, w in model.state_dict().items()}
    hf.load_state_dict(ours, strict=True)
    return hf.float().eval()
