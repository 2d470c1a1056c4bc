"""The constant-size state of recurrent token models (Mamba's conv/SSM state, the RNN LM's
hidden state) as numpy slots: one array (R, *per_row_shape) per state input of the step.

Whatever the context length, a row's state has the same size, so a sequence costs the same
memory and the same step time at token 10 and at token 10,000; the pool is sized by memory
(`serve.engines.factory`), not by context. The step is functional: it takes rows' states and
returns the states after its tokens, which this object stores back.

Step contract (training/export_recurrent.py): inputs ids (B, T), n_new (B,) real tokens per row
(prefill rows are right-padded), one input per state; outputs logits (B, 1, V) at each row's
last real token and the new states, in the same order as the state inputs.
"""

from __future__ import annotations

import numpy as np


class StateSlots:
    """The token-state protocol of `serve.engines.base.TokenState` for recurrent models."""

    def __init__(self, rows: int, shapes: dict[str, tuple[int, ...]], output_names: dict[str, str],
                 max_len: int, dtype: np.dtype = np.float32):
        """shapes: state input name -> per-row shape; output_names: state input -> the step output
        that carries its new value."""
        self.max_len = max_len
        self.states = {name: np.zeros((rows, *shape), dtype) for name, shape in shapes.items()}
        self.output_names = output_names
        self._ones = np.ones(rows, np.int64)

    @staticmethod
    def bytes_per_row(shapes: dict[str, tuple[int, ...]], itemsize: int = 4) -> int:
        return sum(int(np.prod(s)) for s in shapes.values()) * itemsize

    @property
    def rows(self) -> int:
        return self._ones.shape[0]

    def move(self, src: int, dst: int) -> None:
        for a in self.states.values():
            a[dst] = a[src]

    def reset_rows(self, rows: list[int]) -> None:
        for a in self.states.values():
            a[rows] = 0

    def decode_feeds(self, n: int) -> dict[str, np.ndarray]:
        """One token per row: n_new 1 and rows 0..n-1's states (contiguous views, no copy)."""
        return {"n_new": self._ones[:n], **{name: a[:n] for name, a in self.states.items()}}

    def decode_done(self, n: int, outputs: dict[str, np.ndarray]) -> None:
        for name, a in self.states.items():
            a[:n] = outputs[self.output_names[name]]

    def prefill_feeds(self, first_row: int, lengths: list[int]) -> dict[str, np.ndarray]:
        """Fresh rows start from the zero state; n_new tells the step where each prompt ends."""
        p = len(lengths)
        return {"n_new": np.asarray(lengths, np.int64),
                **{name: np.zeros((p, *a.shape[1:]), a.dtype) for name, a in self.states.items()}}

    def prefill_done(self, first_row: int, outputs: dict[str, np.ndarray], lengths: list[int]) -> None:
        for name, a in self.states.items():
            a[first_row:first_row + len(lengths)] = outputs[self.output_names[name]]
