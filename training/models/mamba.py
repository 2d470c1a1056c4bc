"""Mamba-1: a language model of selective state-space (SSM) blocks, no attention.

References: Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"
(arXiv 2312.00752), Algorithm 2 and section 3.5; HF `modeling_mamba.py` is the oracle, and our
parameter names are HF's (`to_hf_mamba` only adds the `backbone.` prefix).

Dimensions: B batch, T tokens, V vocab, D model width (d_model), L layers, E inner width
(expand * D), N SSM state size (d_state), K conv kernel (d_conv), R rank of the dt projection.
Paper -> code: Delta -> dt, A -> A (= -exp(A_log)), B/C -> B/C, u -> x, h -> s (the SSM state).

One layer: x, z = in_proj(norm(h)); x = silu(causal depthwise conv(x)); dt, B, C = x_proj(x);
dt = softplus(dt_proj(dt)); s_t = exp(dt_t A) s_{t-1} + dt_t B_t x_t; y_t = C_t . s_t + D x_t;
h += out_proj(y * silu(z)). The recurrent state per layer is the last K-1 conv inputs (E, K-1)
and the SSM state (E, N): constant size, whatever the context length.

Two scans compute the same recurrence: `scan_sequential` (one step at a time, the obviously
correct reference) and `scan_chunked` (whole chunks at once, used by `forward`); a test holds them
equal. Exported steps run the recurrence as one ONNX Scan / TorchScript loop (`_scan_for_context`).
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
STATE_NAMES = ("conv_state", "ssm_state")
STEP_INPUT_NAMES = ("ids", "n_new", "conv_state", "ssm_state")
STEP_OUTPUT_NAMES = ("logits", "new_conv_state", "new_ssm_state")
CHUNK = 32              # time steps per chunk of scan_chunked
MAX_CHUNK_DECAY = 60.0  # largest |A * sum of dt| inside one chunk: exp(60) ~ 1e26 leaves fp32 1e12 of headroom

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
    """w * x * rsqrt(mean(x^2) + eps), computed in fp32 (as HF MambaRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


# --- the selective scan: x, dt (B, T, E); A (E, N); B, C (B, T, N); s0 (B, E, N) -> y (B, T, E), s_T ---

def scan_sequential(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, s0: Tensor) -> tuple[Tensor, Tensor]:
    """The recurrence one step at a time (the reference; also scripted for TorchScript export)."""
    s = s0
    ys: list[Tensor] = []
    for t in range(x.shape[1]):
        dA = torch.exp(dt[:, t, :, None] * A)                             # (B, E, N) zero-order hold of A
        dBx = (dt[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]         # (B, E, N) Euler step of B x
        s = dA * s + dBx
        ys.append((s * C[:, t, None, :]).sum(-1))                          # (B, E)
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
    s, ys = s0, []
    for c in range(cum_dt.shape[1]):
        grow = torch.exp(cum_dt[:, c, :, None] * minus_A)                  # (B, E, N, Q) exp(-a_t), in [1, e^60]
        u = dtx[:, c, :, None] * B_c[:, c, None]                           # (B, E, N, Q) dt B x
        states = ((grow * u).cumsum(-1) + s[..., None]) / grow             # (B, E, N, Q) s_t for t in the chunk
        ys.append((states * C_c[:, c, None]).sum(2))                       # (B, E, Q) C_t . s_t
        s = states[..., -1]                                                # carried into the next chunk
    return torch.stack(ys, dim=1).transpose(2, 3).flatten(1, 2)[:, :T], s  # (B, T, E), (B, E, N)


def _scan_hop(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, s0: Tensor) -> tuple[Tensor, Tensor]:
    """scan_sequential as torch's `scan` operator: torch.export (the ONNX exporter) keeps it as one
    ONNX Scan over a dynamic T instead of unrolling a Python loop at the traced length."""
    from torch._higher_order_ops.scan import scan

    dA = torch.exp(dt[..., None] * A)                                      # (B, T, E, N)
    dBx = (dt * x)[..., None] * B[:, :, None, :]                           # (B, T, E, N)

    def step(s: Tensor, inputs: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        a, bx, c = inputs                                                  # (B, E, N), (B, E, N), (B, N)
        s = a * s + bx
        return s, (s * c[:, None, :]).sum(-1)

    s, y = scan(step, s0.contiguous(), (dA, dBx, C), dim=1)   # the carry must keep init's strides
    return y, s


@functools.cache
def _scan_scripted() -> ScanFn:
    # a traced module keeps a call to a scripted function, loop and all (T stays dynamic)
    return torch.jit.script(scan_sequential)


def _scan_for_context() -> ScanFn:
    """The scan to run now: ONNX export and TorchScript tracing need a loop the exporter keeps."""
    if torch.compiler.is_exporting():
        return _scan_hop
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
        """h (B, T, D); conv_state (B, E, K-1) the conv inputs before these tokens; ssm_state (B, E, N);
        n_new (B,): only the first n_new[b] tokens of row b are real (None: all T).
        Returns out (B, T, D) and the states after the real tokens: (B, E, K-1), (B, E, N)."""
        R, N, K = self.sizes
        T = h.shape[1]
        x, z = self.in_proj(h).chunk(2, dim=-1)                            # (B, T, E) each
        xc = torch.cat([conv_state, x.transpose(1, 2)], dim=-1)            # (B, E, K-1+T)
        # causal depthwise conv, written as K shifted multiply-adds: ONNX Runtime's grouped Conv
        # (groups = E) was 27% of a decode step; this is the same sum (HF: conv1d, left pad K-1)
        w = self.conv1d.weight[:, 0, :, None]                              # (E, K, 1)
        x = sum((w[:, k] * xc[:, :, k:k + T] for k in range(K)), self.conv1d.bias[:, None])   # (B, E, T)
        x = F.silu(x).transpose(1, 2)                                      # (B, T, E)
        if n_new is None:
            new_conv = xc[:, :, T:]                                        # (B, E, K-1) the last K-1 inputs
        else:                                                              # the last K-1 *real* inputs of each row
            idx = n_new[:, None, None] + torch.arange(K - 1, device=h.device)   # (B, 1, K-1)
            new_conv = xc.gather(2, idx.expand(-1, xc.shape[1], -1))
        dt, B, C = self.x_proj(x).split([R, N, N], dim=-1)                 # (B, T, R), (B, T, N), (B, T, N)
        dt = F.softplus(self.dt_proj(dt))                                  # (B, T, E) step size > 0
        if n_new is not None:                                              # dt = 0 at padding: exp(0 A) = 1 and
            real = torch.arange(T, device=h.device)[None, :] < n_new[:, None]   # dt B x = 0, so the state
            dt = dt * real[:, :, None].to(dt.dtype)                        # passes padding unchanged
        A = -torch.exp(self.A_log.float())                                 # (E, N) < 0: a stable decay
        y, new_ssm = (scan or _scan_for_context())(x, dt, A, B, C, ssm_state)
        y = y + x * self.D                                                 # (B, T, E) skip term
        return self.out_proj(y * F.silu(z)), new_conv, new_ssm


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

    def run(self, ids: Tensor, conv_state: Tensor, ssm_state: Tensor, n_new: Tensor | None = None,
            scan: ScanFn | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """ids (B, T); conv_state (B, L, E, K-1); ssm_state (B, L, E, N) ->
        logits (B, T, V) and the new states (same shapes), after n_new[b] tokens of row b."""
        h = self.embeddings(ids)                                           # (B, T, D)
        convs, ssms = [], []
        for i, block in enumerate(self.layers):
            h, conv, ssm = block(h, conv_state[:, i], ssm_state[:, i], n_new, scan)
            convs.append(conv)
            ssms.append(ssm)
        return self.lm_head(self.norm_f(h)), torch.stack(convs, dim=1), torch.stack(ssms, dim=1)

    def forward(self, ids: Tensor, scan: ScanFn | None = None) -> Tensor:
        """ids (B, T) int64 -> logits (B, T, V), from zero state; `scan` defaults to scan_chunked."""
        state = MambaState.allocate(self.config, ids.shape[0], self.embeddings.weight.dtype, ids.device)
        return self.run(ids, state.conv, state.ssm, None, scan)[0]


Model = Mamba


class StepModule(nn.Module):
    """The serving step as a module: STEP_INPUT_NAMES -> STEP_OUTPUT_NAMES.

    ids (B, T) int64, right-padded: row b's real tokens are ids[b, :n_new[b]] (1 <= n_new <= T);
    conv_state (B, L, E, K-1), ssm_state (B, L, E, N) float32, the states before these tokens.
    Returns logits (B, T, V) (positions >= n_new[b] are padding: ignore) and the states after
    exactly n_new[b] tokens. T = 1 is a decode step: its cost does not depend on the context.
    """

    def __init__(self, model: Mamba):
        super().__init__()
        self.model = model
        self.train(model.training)   # a fresh wrapper would be in training mode; the exporter warns on that

    def forward(self, ids: Tensor, n_new: Tensor, conv_state: Tensor,
                ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.model.run(ids, conv_state, ssm_state, n_new)


def state_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Per-row shapes of the float32 state tensors, by STATE_NAMES."""
    return {"conv_state": (config.n_layer, config.d_inner, config.d_conv - 1),
            "ssm_state": (config.n_layer, config.d_inner, config.d_state)}


def step_dynamic_shapes(max_batch: int = 4096, max_len: int = 65536) -> dict:
    """`dynamic_shapes` for exporting StepModule with dynamic B and T (trace with B != T, both >= 2)."""
    Dim = torch.export.Dim
    batch, new = Dim("batch", min=1, max=max_batch), Dim("new", min=1, max=max_len)
    return {"ids": {0: batch, 1: new}, "n_new": {0: batch}, "conv_state": {0: batch}, "ssm_state": {0: batch}}


@dataclass
class MambaState:
    """conv: (B, L, E, K-1), ssm: (B, L, E, N); lengths: (B,) int64 tokens consumed per row
    (bookkeeping only: the state has no positions and does not grow)."""
    conv: Tensor
    ssm: Tensor
    lengths: Tensor

    @classmethod
    def allocate(cls, config: Config, batch: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> "MambaState":
        shapes = state_shapes(config)
        return cls(torch.zeros(batch, *shapes["conv_state"], dtype=dtype, device=device),
                   torch.zeros(batch, *shapes["ssm_state"], dtype=dtype, device=device),
                   torch.zeros(batch, dtype=torch.int64, device=device))

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """Views (B, E, K-1), (B, E, N) of layer i."""
        return self.conv[:, i], self.ssm[:, i]

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
    logits, conv, ssm = model.run(ids, state.conv, state.ssm, n_new)
    state.write(torch.arange(B), conv, ssm, n_new)
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
