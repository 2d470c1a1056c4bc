"""Character-level recurrent language model: embedding -> RNN/GRU/LSTM stack -> linear to the vocabulary.

References: Karpathy 2015, "The Unreasonable Effectiveness of Recurrent Neural Networks"
(char-rnn); pytorch/examples `word_language_model` (init_hidden / forward(input, hidden)).
The recurrent stack is `rnn.RNNCore` (its docstring explains how right padding leaves each
row's state exactly where its real tokens end). A byte-level tokenizer with no merges
(vocab 260 = 256 bytes + 4 specials, `training.lm.train_token_family(..., vocab_size=260)`)
makes it character-level on the ASCII corpus.

Dimensions: B batch, T tokens (right-padded), V vocabulary, E embedding width, L layers,
H hidden width.

Its own family (`rnn_lm`, KIND "tokens") rather than a head of `rnn` (KIND "sequence"):
export and serving dispatch on a family module's KIND, and one module has one.

`RNNLM.forward(ids) -> logits` is the full-sequence path from zero state, as for the other token
families (training, evaluation and the generic export parity call it); `RNNLM.step(ids, state,
lengths) -> (logits, state)` is the stateful one, over right-padded rows.

Serving step contract (what a token engine runs; the state is constant-size per row):
    StepModule(model).forward(ids (B, T) int64, n_new (B,) int64, h (B, L, H), c (B, L, H | 0))
        -> logits (B, 1, V), new_h (B, L, H), new_c (B, L, H | 0)
row b's real tokens are ids[b, :n_new[b]] (right-padded; n_new 0 leaves the row as it was), the
logits are those at its last real token (what the next token is sampled from) and the new states
are those after exactly n_new[b] tokens. The names are module-level constants
(STATE_NAMES, STEP_INPUT_NAMES, STEP_OUTPUT_NAMES), as a generic recurrent exporter and token
engine read them, so they cannot change with the configured cell: every cell has "h" and "c",
and only the LSTM fills c; for rnn/gru `state_shapes(config)` gives c a width of 0 (no memory;
ONNX and ONNX Runtime take zero-size tensors) and the step hands it back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.models import rnn
from training.models.rnn import RNNCore, init_state  # noqa: F401  (init_state is part of this family's contract)

KIND = "tokens"
OUTPUT_NAMES = ("logits",)        # of the full forward


@dataclass
class Config:
    cell: str = "lstm"          # "rnn" | "gru" | "lstm"
    vocab_size: int = 260       # V: byte-level without merges = one token per ASCII character
    block_size: int = 128       # training window; the recurrence itself has no context limit
    n_embd: int = 64            # E
    hidden: int = 256           # H
    layers: int = 2             # L
    dropout: float = 0.0        # between recurrent layers, training only

    def __post_init__(self):
        if self.cell not in rnn.CELLS:
            raise ValueError(f"cell must be one of {rnn.CELLS}, got {self.cell!r}")


PRESETS = {
    "tiny": dict(cell="lstm", n_embd=64, hidden=256, layers=2),
    "tiny-gru": dict(cell="gru", n_embd=64, hidden=256, layers=2),
    "tiny-rnn": dict(cell="rnn", n_embd=64, hidden=256, layers=2),
}


class RNNLM(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.core = RNNCore(config.cell, config.n_embd, config.hidden, config.layers, config.dropout)
        self.head = nn.Linear(config.hidden, config.vocab_size)

    def forward(self, ids: Tensor) -> Tensor:
        """The full-sequence path, from zero state: ids (B, T) -> logits (B, T, V) (what training,
        evaluation and export parity use, as for the other token families)."""
        return self.step(ids, init_state(self.config, ids.shape[0], device=ids.device))[0]

    def step(self, ids: Tensor, state: dict[str, Tensor], lengths: Tensor | None = None,
             last: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """The stateful path: ids (B, T) right-padded, state from `init_state`, lengths (B,) real
        tokens (default T) -> logits (B, T, V) (valid at t < lengths), state after each row's tokens.
        last: logits (B, 1, V) at each row's last real token only."""
        B, T = ids.shape
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.int64, device=ids.device)
        out, state = self.core(self.embed(ids), lengths, state)    # (B, T, H)
        if last:                                                    # a row with no new tokens: position 0
            index = (lengths - 1).clamp(min=0)[:, None, None].expand(-1, 1, out.shape[2])
            out = out.gather(1, index)                              # (B, 1, H)
        return self.head(out), state                                # (B, T | 1, V)


Model = RNNLM


STATE_NAMES = ("h", "c")                                   # every cell; c is (L, 0) unless lstm
STEP_INPUT_NAMES = ("ids", "n_new", *STATE_NAMES)           # of StepModule.forward
STEP_OUTPUT_NAMES = ("logits", *(f"new_{name}" for name in STATE_NAMES))


def state_shapes(config: Config) -> dict[str, tuple[int, int]]:
    """Per-row shape of each state tensor (the batch dim comes first when served)."""
    return {"h": (config.layers, config.hidden), "c": (config.layers, config.hidden if config.cell == "lstm" else 0)}


class StepModule(nn.Module):
    """One serving step (module docstring): forward(ids, n_new, *states) -> (logits, *new_states)."""

    def __init__(self, model: RNNLM):
        super().__init__()
        self.model = model
        self.lstm = model.config.cell == "lstm"
        self.train(model.training)   # a fresh wrapper would be in training mode; the exporter warns on that

    def forward(self, ids: Tensor, n_new: Tensor, *states: Tensor) -> tuple[Tensor, ...]:
        h, c = states
        logits, new = self.model.step(ids, {"h": h, "c": c} if self.lstm else {"h": h}, n_new, last=True)
        return logits, new["h"], (new["c"] if self.lstm else c)


def step_dynamic_shapes(max_batch: int = 4096, max_len: int = 65536) -> dict:
    """`dynamic_shapes` for torch.onnx.export of StepModule with dynamic B and T (trace with B, T >= 2)."""
    Dim = torch.export.Dim
    batch, new = Dim("batch", min=1, max=max_batch), Dim("new", min=1, max=max_len)
    return {"ids": {0: batch, 1: new}, "n_new": {0: batch}, "states": tuple({0: batch} for _ in STATE_NAMES)}


def example_inputs(config: Config, batch: int = 2, steps: int = 16) -> tuple[Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, config.vocab_size, (batch, steps), generator=g),)


def loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Next-token cross-entropy; x, y both (B, T) with y[:, t] == x[:, t + 1]."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())
