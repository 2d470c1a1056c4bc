"""The KV cache of a token engine, as numpy slots that ONNX Runtime reads in place.

Shapes: k, v (R, L, KV, S, hd) — R rows (slots), L layers, KV key/value heads, S = max_len
positions, hd head size; lengths (R,) tokens held per row. The scheduler keeps running rows
dense (0..n-1), so a decode step hands the model the contiguous views k[:n], v[:n] with no copy.
The model's step function is functional: it returns the new tokens' K/V and this object writes
them at each row's positions.
"""

from __future__ import annotations

import numpy as np


class KVSlots:
    def __init__(self, rows: int, layers: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: np.dtype = np.float32):
        shape = (rows, layers, kv_heads, max_len, head_dim)
        self.k = np.zeros(shape, dtype)
        self.v = np.zeros(shape, dtype)
        self.lengths = np.zeros(rows, np.int64)
        self.max_len = max_len

    @property
    def rows(self) -> int:
        return self.k.shape[0]

    def move(self, src: int, dst: int) -> None:
        """Row src's cache and length into row dst (compaction after a departure)."""
        n = self.lengths[src]
        self.k[dst, :, :, :n] = self.k[src, :, :, :n]
        self.v[dst, :, :, :n] = self.v[src, :, :, :n]
        self.lengths[dst] = n

    def reset_rows(self, rows: list[int]) -> None:
        """Forget rows; their stale data stays but is masked by length 0."""
        self.lengths[rows] = 0

    def window(self, n: int, bucket: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(k, v, lengths) of rows 0..n-1, cut to the positions those rows hold (rounded up to
        `bucket`, so ONNX Runtime sees few distinct shapes). Attention cost grows with the
        positions handed over, so a cut copy beats the full view whenever rows are much
        shorter than max_len (bench/tokens.py); at full length the views go uncopied."""
        lengths = self.lengths[:n].copy()
        span = min(self.max_len, max(bucket, -(-int(lengths.max()) // bucket) * bucket))
        if span >= self.max_len:
            return self.k[:n], self.v[:n], lengths
        return (np.ascontiguousarray(self.k[:n, :, :, :span]), np.ascontiguousarray(self.v[:n, :, :, :span]),
                lengths)

    def append_one(self, n: int, new_k: np.ndarray, new_v: np.ndarray) -> None:
        """Decode: rows 0..n-1 each gain one token; new_k, new_v (n, L, KV, 1, hd)."""
        rows = np.arange(n)
        pos = self.lengths[:n]
        self.k[rows, :, :, pos] = new_k[:, :, :, 0]
        self.v[rows, :, :, pos] = new_v[:, :, :, 0]
        self.lengths[:n] += 1

    def write_prefill(self, first_row: int, new_k: np.ndarray, new_v: np.ndarray, lengths: list[int]) -> None:
        """Prefill: fresh rows first_row.. hold their prompts; new_k, new_v (n, L, KV, T, hd), right-padded."""
        for i, n in enumerate(lengths):
            row = first_row + i
            self.k[row, :, :, :n] = new_k[i, :, :, :n]
            self.v[row, :, :, :n] = new_v[i, :, :, :n]
            self.lengths[row] = n
