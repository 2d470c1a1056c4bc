"""Recurrent forecaster: torch.nn.RNN / GRU / LSTM over a raw-valued history, the next K values out.

References: Elman 1990 (tanh RNN); Cho et al. 2014 (GRU); Hochreiter & Schmidhuber 1997 and
Gers et al. 2000 (LSTM with a forget gate). The gate equations and weight layouts are PyTorch's
(`nn.GRU`: rows [r | z | n], `nn.LSTM`: rows [i | f | g | o]). `RNNCore` is shared with the
character-level language model (`rnn_lm.py`).

Dimensions: B batch, T time steps (right-padded), I input features (1 here), L layers,
H hidden width, K horizon (values forecast after the history).

State is explicit and batch-first, one tensor per name: {"h": (B, L, H)} for rnn/gru, plus "c"
for lstm (`init_state`). torch's own (L, B, H) layout never leaves this file.

Right padding. Rows of a batch hold different lengths; `lengths` (B,) says how many steps of
each row are real. Outputs at real steps never see the padding (it comes after them), so a
row's answer is read at step lengths-1. The state after exactly `lengths` steps:
  - h of every layer is that layer's output at lengths-1 (the layers run one at a time, so each
    layer's output sequence is at hand);
  - c (lstm) is never an output, so a pad-flag input channel with fixed weights, -BIG on the
    input gate and +BIG on the forget gate, makes every padded step c' = 1 * c + 0 * g: c rides
    through the padding unchanged (sigmoid(+-1e4) is exactly 1 and 0 in float32).
The dynamo ONNX exporter translates aten::lstm and aten::gru to the ONNX LSTM/GRU ops, but has
no translation for the tanh RNN and unrolls it at the traced length; so under that exporter the
tanh cell runs as a GRU with the reset gate held open and the update gate shut,
h' = tanh(W_ih x + b_ih + W_hh h + b_hh): nn.RNN's update with nn.RNN's own weights. Both exports
(ONNX and traced TorchScript) use that form; eager runs nn.RNN itself, a third of the GRU's work,
so export parity checks the two agree.

`reference_forward` is the slow, obviously correct path (one unpadded row, each torch.nn layer
called as is); the batched, padded path is tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

KIND = "sequence"
OUTPUT_NAMES = ("forecast",)      # the public output; the served artifact also returns the state
CELLS = ("rnn", "gru", "lstm")
LEVEL_SHIFT = 2.0                 # training augmentation (see `loss`), in units of the series' std
BIG = 1e4                         # saturates a gate: sigmoid(BIG) == 1.0, sigmoid(-BIG) == 0.0 in float32
# names of the state tensors in the exported forecaster: initial state in, final state out
STATE_INPUTS = {"h": "h0", "c": "c0"}
STATE_OUTPUTS = {"h": "hn", "c": "cn"}


@dataclass
class Config:
    cell: str = "lstm"          # "rnn" | "gru" | "lstm": which torch.nn recurrent layer
    hidden: int = 32            # H
    layers: int = 2             # L
    horizon: int = 4            # K: the forecast covers the K steps after the history
    dropout: float = 0.0        # between recurrent layers, training only
    # scaling constants fit on the training split; the model applies them, so clients send raw values
    mean: float = 0.0           # of the series' values
    std: float = 1.0
    step_std: float = 1.0       # of (future value - last value); the head predicts that change / step_std

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")


PRESETS = {
    "tiny": dict(cell="lstm", hidden=32, layers=2),
    "tiny-gru": dict(cell="gru", hidden=32, layers=1),    # torch's CPU GRU costs 2x an LSTM a step
    "tiny-rnn": dict(cell="rnn", hidden=32, layers=2),
    "small": dict(cell="lstm", hidden=128, layers=2),
}


def state_names(cell: str) -> tuple[str, ...]:
    return ("h", "c") if cell == "lstm" else ("h",)


def init_state(config, batch: int, device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Zero state for `batch` rows: {"h": (B, L, H)} (+ "c" for lstm), on `device` (default the
    CPU; the models pass their input's, so a model on a GPU gets its state there). Works for any
    config with cell, layers and hidden (the language model's too)."""
    return {name: torch.zeros(batch, config.layers, config.hidden, device=device) for name in state_names(config.cell)}


def _lstm_padded(layer: nn.LSTM, x: Tensor, pad: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor]:
    """One nn.LSTM layer over right-padded x; its cell state rides through the padding unchanged.
    x (B, T, I), pad (B, T) bool, h0/c0 (B, H) -> outputs (B, T, H), c after the last real step (B, H)."""
    H = layer.hidden_size
    flag = torch.cat([x.new_full((H, 1), -BIG), x.new_full((H, 1), BIG), x.new_zeros(2 * H, 1)])  # (4H, 1): [i|f|g|o]
    w_ih = torch.cat([layer.weight_ih_l0, flag], 1)                                                # (4H, I + 1)
    x = torch.cat([x, pad.unsqueeze(-1).to(x.dtype)], -1)                                          # (B, T, I + 1)
    # args after the weights: has_biases, num_layers, dropout, train, bidirectional, batch_first
    out, _, c = torch.lstm(x, (h0[None].contiguous(), c0[None].contiguous()),
                           (w_ih, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0),
                           True, 1, 0.0, False, False, True)
    return out, c[0]


def _gru(layer: nn.GRU, x: Tensor, h0: Tensor) -> Tensor:
    """One nn.GRU layer through the functional op (calling the module froze T in the dynamo export).
    x (B, T, I), h0 (B, H) -> outputs (B, T, H)."""
    params = (layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0)
    return torch.gru(x, h0[None].contiguous(), params, True, 1, 0.0, False, False, True)[0]


def _tanh_rnn_as_gru(layer: nn.RNN, x: Tensor, h0: Tensor) -> Tensor:
    """nn.RNN's tanh update through the GRU op (r = 1, z = 0), which exports with a dynamic T.
    x (B, T, I), h0 (B, H) -> outputs (B, T, H)."""
    H, I = layer.hidden_size, layer.input_size
    gates = torch.cat([x.new_full((H,), BIG), x.new_full((H,), -BIG)])                   # (2H,) r open, z shut
    params = (torch.cat([x.new_zeros(2 * H, I), layer.weight_ih_l0]),                     # (3H, I): [r|z|n]
              torch.cat([x.new_zeros(2 * H, H), layer.weight_hh_l0]),                     # (3H, H)
              torch.cat([gates, layer.bias_ih_l0]),
              torch.cat([x.new_zeros(2 * H), layer.bias_hh_l0]))
    return torch.gru(x, h0[None].contiguous(), params, True, 1, 0.0, False, False, True)[0]


class RNNCore(nn.Module):
    """L single-layer torch.nn.{RNN, GRU, LSTM} (batch_first), run one after another over
    right-padded rows, with an explicit batch-first state."""

    def __init__(self, cell: str, input_size: int, hidden: int, layers: int, dropout: float = 0.0):
        super().__init__()
        self.cell, self.hidden = cell, hidden
        layer = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cell]
        self.layers = nn.ModuleList(layer(input_size if i == 0 else hidden, hidden, batch_first=True)
                                    for i in range(layers))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, lengths: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """x (B, T, I) right-padded, lengths (B,) real steps per row (0 leaves a row's state as it was),
        state {"h": (B, L, H)[, "c"]} -> top-layer outputs (B, T, H) (valid at t < lengths), state
        after exactly `lengths` steps."""
        B, T, _ = x.shape
        pad = torch.arange(T, device=x.device)[None, :] >= lengths[:, None]           # (B, T) True on padding
        last = (lengths - 1).clamp(min=0).view(B, 1, 1).expand(B, 1, self.hidden)    # (B, 1, H) gather index
        moved = (lengths > 0)[:, None]                                                 # (B, 1) rows that took a step
        new: dict[str, list[Tensor]] = {name: [] for name in state}
        for i, layer in enumerate(self.layers):
            h0 = state["h"][:, i]                                                      # (B, H)
            if self.cell == "lstm":
                out, c = _lstm_padded(layer, x, pad, h0, state["c"][:, i])
                new["c"].append(c)
            elif self.cell == "gru":
                out = _gru(layer, x, h0)
            elif torch.compiler.is_exporting() or torch.jit.is_tracing():
                out = _tanh_rnn_as_gru(layer, x, h0)                                   # (B, T, H)
            else:
                out = layer(x, h0[None].contiguous())[0]
            new["h"].append(torch.where(moved, out.gather(1, last).squeeze(1), h0))    # (B, H)
            x = self.dropout(out) if i + 1 < len(self.layers) else out
        return x, {name: torch.stack(parts, 1) for name, parts in new.items()}         # each (B, L, H)


def reference_forward(core: RNNCore, x: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """The slow, obviously correct path: one unpadded row, each torch.nn layer called as is.
    x (T, I), state {"h": (L, H)[, "c"]} -> top-layer outputs (T, H), state after the T steps."""
    x = x[None]                                                                        # (1, T, I)
    new: dict[str, list[Tensor]] = {name: [] for name in state}
    for i, layer in enumerate(core.layers):
        h0 = state["h"][i][None, None]                                                 # (1, 1, H)
        if core.cell == "lstm":
            x, (h, c) = layer(x, (h0, state["c"][i][None, None]))
            new["c"].append(c[0, 0])
        else:
            x, h = layer(x, h0)
        new["h"].append(h[0, 0])
    return x[0], {name: torch.stack(parts) for name, parts in new.items()}


class Forecaster(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.core = RNNCore(config.cell, 1, config.hidden, config.layers, config.dropout)
        self.head = nn.Linear(config.hidden, config.horizon)
        # the scaling lives in the model (and so in every export); config.json is its one source
        for name in ("mean", "std", "step_std"):
            self.register_buffer(name, torch.tensor(getattr(config, name), dtype=torch.float32), persistent=False)

    def forward(self, series: Tensor, lengths: Tensor | None = None,
                state: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """series (B, T, 1) raw values, right-padded; lengths (B,) real steps (default T); state from
        `init_state` (default zeros) -> forecast (B, K) of the K values after each row's last real
        value, in raw units, and the state after it."""
        B = series.shape[0]
        lengths, state = self._defaults(series, lengths, state)
        _, state = self.core(self._scale(series, lengths), lengths, state)
        last = series.gather(1, (lengths - 1).clamp(min=0).view(B, 1, 1)).view(B, 1)              # (B, 1)
        return last + self.head(state["h"][:, -1]) * self.step_std, state   # top layer's h at lengths-1

    def step_forecasts(self, series: Tensor, lengths: Tensor | None = None) -> Tensor:
        """The forecast after every step (B, T, K) (valid at t < lengths), from zero state: what
        training fits, so every step of a history is a lesson, not only the last."""
        lengths, state = self._defaults(series, lengths, None)
        out, _ = self.core(self._scale(series, lengths), lengths, state)    # (B, T, H)
        return series + self.head(out) * self.step_std                      # (B, T, K)

    def _defaults(self, series: Tensor, lengths: Tensor | None, state: dict[str, Tensor] | None):
        B, T, _ = series.shape
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.int64, device=series.device)
        return lengths, init_state(self.config, B, device=series.device) if state is None else state

    def _scale(self, series: Tensor, lengths: Tensor) -> Tensor:
        """(B, T, 1) raw -> scaled, 0 on padding (so padded steps feed the gates nothing large)."""
        real = (torch.arange(series.shape[1], device=series.device)[None, :] < lengths[:, None]).unsqueeze(-1)
        return torch.where(real, (series - self.mean) / self.std, 0.0)


Model = Forecaster


class SequenceModule(nn.Module):
    """The forecaster with plain tensors in and out, for export and serving:
    forward(series (B, T, 1), lengths (B,), h0 (B, L, H)[, c0]) -> forecast (B, K), hn (B, L, H)[, cn]."""

    def __init__(self, model: Forecaster):
        super().__init__()
        self.model = model
        self.train(model.training)   # a fresh wrapper would be in training mode; the exporter warns on that

    def forward(self, series: Tensor, lengths: Tensor, h0: Tensor, c0: Tensor | None = None):
        state = {"h": h0} if c0 is None else {"h": h0, "c": c0}
        forecast, new = self.model(series, lengths, state)
        return (forecast, new["h"]) if c0 is None else (forecast, new["h"], new["c"])


def example_inputs(config: Config, batch: int = 2, steps: int = 12) -> tuple[Tensor, Tensor]:
    """Right-padded raw-valued histories around the training mean, and their lengths (1..steps)."""
    g = torch.Generator().manual_seed(batch)
    series = config.mean + config.std * torch.randn(batch, steps, 1, generator=g)   # (B, T, 1)
    lengths = torch.randint(1, steps + 1, (batch,), generator=g)                     # (B,)
    lengths[0] = steps
    series[torch.arange(steps)[None, :] >= lengths[:, None]] = 0.0                   # padding holds 0
    return series, lengths


def loss(model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Mean squared error, in units of step_std, of the forecast made after every real step of each
    history (the values it forecasts are the history's own later values, then the targets).

    In training each example moves by a random level shift of up to LEVEL_SHIFT std: the change
    after a history does not depend on its level, and later (test) years lie above every training
    level."""
    series, lengths, targets = batch                                     # (B, T, 1), (B,), (B, K)
    B, T, _ = series.shape
    K = targets.shape[1]
    device = series.device                                               # everything made here goes there
    if model.training and LEVEL_SHIFT > 0:
        # on a GPU drawn from its generator (which the loop's run state saves); on the CPU the same draw as ever
        shift = (torch.rand(B, 1, device=device) * 2 - 1) * LEVEL_SHIFT * model.std    # (B, 1)
        series, targets = series + shift[:, :, None], targets + shift
    # each row's history then its targets: the forecast after step t covers values t+1 .. t+K
    full = torch.cat([series[..., 0], series.new_zeros(B, K)], 1)       # (B, T + K)
    full = full.scatter(1, lengths[:, None] + torch.arange(K, device=lengths.device), targets)
    future = full.unfold(1, K, 1)[:, 1:]                                # (B, T, K): full[b, t+1+j]
    real = torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]   # (B, T)
    err = (model.step_forecasts(series, lengths) - future) / model.step_std
    return err.pow(2)[real].mean()
