"""The KV cache of a token engine, as numpy slots that ONNX Runtime reads in place.

Shapes: per layer i, k[i] and v[i] are (R, KV, C, hd) — R rows (slots), KV key/value heads,
C = the current capacity in positions, hd head size; lengths (R,) tokens held per row.

Why this layout:
- One array per layer, because the exported step takes one cache input per layer: a single
  (R, L, ...) input made ONNX Runtime Split (copy) the whole cache every step.
- Rows outermost, and the scheduler keeps running rows dense (0..n-1), so a decode step hands
  the model the contiguous views k[i][:n] with no copy.
- The capacity C follows the longest sequence held (rounded up to `bucket` positions) instead of
  the model's context: attention costs grow with the positions handed over, so short sequences
  must not pay for max_len. Growing or shrinking copies the live rows once, at most every
  `bucket` tokens, where cutting a window per step copied the whole cache every step.
The model's step is functional: it returns the new tokens' K/V and this object writes them at
each row's positions.
"""

from __future__ import annotations

import numpy as np


class KVSlots:
    """The token-state protocol of `serve.engines.base.TokenState` for KV-cache (decoder) models."""

    def __init__(self, rows: int, layers: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: np.dtype = np.float32, bucket: int = 64):
        self.max_len, self.bucket = max_len, bucket
        self._row_shape = (kv_heads, head_dim)
        self.dtype = np.dtype(dtype)
        self.capacity = min(bucket, max_len)
        self.k = [self._empty(rows, self.capacity) for _ in range(layers)]
        self.v = [self._empty(rows, self.capacity) for _ in range(layers)]
        self.lengths = np.zeros(rows, np.int64)
        self.resizes = 0                       # capacity changes so far (each one copies the live rows)

    @staticmethod
    def bytes_per_row(layers: int, kv_heads: int, max_len: int, head_dim: int, itemsize: int = 4) -> int:
        """Memory one row takes at full context (what a slot pool must be able to hold)."""
        return 2 * layers * kv_heads * max_len * head_dim * itemsize

    def _empty(self, rows: int, capacity: int) -> np.ndarray:
        kv_heads, head_dim = self._row_shape
        return np.zeros((rows, kv_heads, capacity, head_dim), self.dtype)

    @property
    def rows(self) -> int:
        return self.lengths.shape[0]

    # ---- per-row verbs -------------------------------------------------------------------------
    def move(self, src: int, dst: int) -> None:
        """Row src's cache and length into row dst (compaction after a departure)."""
        n = self.lengths[src]
        for arrays in (self.k, self.v):
            for a in arrays:
                a[dst, :, :n] = a[src, :, :n]
        self.lengths[dst] = n

    def reset_rows(self, rows: list[int]) -> None:
        """Forget rows; their stale data stays but is masked by length 0."""
        self.lengths[rows] = 0

    # ---- capacity ------------------------------------------------------------------------------
    def _fit(self, needed: int) -> None:
        """Make the capacity hold `needed` positions, and give memory back once the longest
        sequence held is two buckets shorter than the capacity (hysteresis against flapping)."""
        if needed > self.max_len:
            raise ValueError(f"a row needs {needed} positions; the cache holds {self.max_len}")
        target = min(self.max_len, -(-needed // self.bucket) * self.bucket)
        if target > self.capacity or target <= self.capacity - 2 * self.bucket:
            self._resize(target)

    def _resize(self, capacity: int) -> None:
        live = np.flatnonzero(self.lengths)
        keep = min(capacity, self.capacity)
        for arrays in (self.k, self.v):
            for i, old in enumerate(arrays):
                new = self._empty(self.rows, capacity)
                new[live, :, :keep] = old[live, :, :keep]
                arrays[i] = new
        self.capacity = capacity
        self.resizes += 1

    # ---- the step's inputs and outputs (TokenState) --------------------------------------------
    def decode_feeds(self, n: int) -> dict[str, np.ndarray]:
        """Inputs of a decode step over rows 0..n-1 (one new token each): start and the caches."""
        start = self.lengths[:n].copy()
        self._fit(max(int(self.lengths.max()), int(start.max()) + 1))    # every live row keeps its data
        feeds = {"start": start}
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            feeds[f"cache_k_{i}"], feeds[f"cache_v_{i}"] = k[:n], v[:n]
        return feeds

    def decode_done(self, n: int, outputs: dict[str, np.ndarray]) -> None:
        """Rows 0..n-1 each gain one token; outputs new_k_i, new_v_i (n, KV, 1, hd)."""
        rows, pos = np.arange(n), self.lengths[:n]
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            k[rows, :, pos] = outputs[f"new_k_{i}"][:, :, 0]
            v[rows, :, pos] = outputs[f"new_v_{i}"][:, :, 0]
        self.lengths[:n] += 1

    def prefill_feeds(self, first_row: int, lengths: list[int]) -> dict[str, np.ndarray]:
        """Inputs of a prefill of fresh rows: start 0 and a one-slot empty cache (masked)."""
        p = len(lengths)
        empty = self._empty(p, 1)
        feeds = {"start": np.zeros(p, np.int64)}
        for i in range(len(self.k)):
            feeds[f"cache_k_{i}"] = feeds[f"cache_v_{i}"] = empty
        return feeds

    def prefill_done(self, first_row: int, outputs: dict[str, np.ndarray], lengths: list[int]) -> None:
        """Fresh rows first_row.. now hold their prompts; new_k_i, new_v_i (p, KV, T, hd), right-padded."""
        self._fit(max(int(self.lengths.max()), max(lengths)))
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            new_k, new_v = outputs[f"new_k_{i}"], outputs[f"new_v_{i}"]
            for j, n in enumerate(lengths):
                k[first_row + j, :, :n] = new_k[j, :, :n]
                v[first_row + j, :, :n] = new_v[j, :, :n]
        self.lengths[first_row:first_row + len(lengths)] = lengths
