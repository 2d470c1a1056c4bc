"""Token state as torch tensors on a device (CUDA, or the CPU): the device-resident twins of
`serve.engines.kv_slots.KVSlots` and `serve.engines.state_slots.StateSlots`.

Same protocol (`serve.engines.base.TokenState`), same layout, same verbs, same capacity rule;
only where the state lives changes. The step (serve/engines/device_runtime.py) takes and returns
tensors on the same device, so between steps nothing but the fed token ids goes to the device
and nothing but the logits comes back (issue 18; sampling on the device is the next step).

Rules that keep it right on CUDA by construction:
- the books the scheduler and the capacity rule read (each row's length) are kept on the host
  beside a device copy updated by the same verbs: deciding a resize never waits for the device;
- every write is one tensor op per layer and state (a slice copy or an advanced-index write),
  never a Python loop over rows;
- host -> device copies of small index tensors are non-blocking (pageable memory: the copy is
  staged before the call returns, so the host array may go away at once).
The tensors are plain ones (not inference tensors): the step runs under `torch.no_grad()`, and
in-place writes into them are allowed whatever mode the caller is in.
"""

from __future__ import annotations

import numpy as np
import torch

from serve.engines.kv_slots import KVSlots
from serve.engines.state_slots import StateSlots


def _to(device: torch.device, array: np.ndarray) -> torch.Tensor:
    """A small host array on the device (int64 indices, lengths)."""
    return torch.from_numpy(np.ascontiguousarray(array)).to(device, non_blocking=True)


class TorchKVSlots(KVSlots):
    """`KVSlots` on a torch device. Per layer i, k[i] and v[i] are (R, KV, C, hd) tensors. The
    capacity rule (`_fit`, decided on the host books), `rows` and `bytes_per_row` are KVSlots'."""

    def __init__(self, rows: int, layers: int, kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, bucket: int = 64):
        self.device = torch.device(device)
        self.max_len, self.bucket = max_len, bucket
        self._row_shape = (kv_heads, head_dim)
        self.dtype = dtype
        self.capacity = min(bucket, max_len)
        self.k = [self._empty(rows, self.capacity) for _ in range(layers)]
        self.v = [self._empty(rows, self.capacity) for _ in range(layers)]
        self.lengths = np.zeros(rows, np.int64)                               # host books
        self._lengths = torch.zeros(rows, dtype=torch.int64, device=self.device)   # the same, on the device
        self._arange = torch.arange(rows, device=self.device)
        self.resizes = 0

    def _empty(self, rows: int, capacity: int) -> torch.Tensor:
        kv_heads, head_dim = self._row_shape
        return torch.zeros((rows, kv_heads, capacity, head_dim), dtype=self.dtype, device=self.device)

    # ---- per-row verbs -------------------------------------------------------------------------
    def move(self, src: int, dst: int) -> None:
        """Row src's cache and length into row dst (compaction after a departure)."""
        n = int(self.lengths[src])
        for arrays in (self.k, self.v):
            for a in arrays:
                a[dst, :, :n] = a[src, :, :n]
        self.lengths[dst] = n
        self._lengths[dst] = self._lengths[src]

    def reset_rows(self, rows: list[int]) -> None:
        """Forget rows; their stale data stays but is masked by length 0."""
        self.lengths[rows] = 0
        self._lengths[_to(self.device, np.asarray(rows, np.int64))] = 0

    # ---- capacity (KVSlots._fit's rule calls this) ---------------------------------------------
    def _resize(self, capacity: int) -> None:
        """New tensors of `capacity` positions holding every row's first min(old, new) positions:
        one strided copy per tensor (free rows come along; their length 0 masks them)."""
        keep = min(capacity, self.capacity)
        for arrays in (self.k, self.v):
            for i, old in enumerate(arrays):
                new = self._empty(self.rows, capacity)
                new[:, :, :keep] = old[:, :, :keep]
                arrays[i] = new
        self.capacity = capacity
        self.resizes += 1

    # ---- the step's inputs and outputs (TokenState) --------------------------------------------
    def decode_feeds(self, n: int) -> dict[str, torch.Tensor]:
        """start (n,) and the per-layer caches' rows 0..n-1 (contiguous views, no copy)."""
        self._fit(max(int(self.lengths.max()), int(self.lengths[:n].max()) + 1))
        feeds = {"start": self._lengths[:n].clone()}
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            feeds[f"cache_k_{i}"], feeds[f"cache_v_{i}"] = k[:n], v[:n]
        return feeds

    def decode_done(self, n: int, outputs: dict[str, torch.Tensor]) -> None:
        """Rows 0..n-1 each gain one token: new_k_i, new_v_i (n, KV, 1, hd) written at each row's
        position in one advanced-index write per tensor."""
        rows, pos = self._arange[:n], self._lengths[:n]
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            k[rows, :, pos] = outputs[f"new_k_{i}"][:, :, 0]
            v[rows, :, pos] = outputs[f"new_v_{i}"][:, :, 0]
        self._lengths[:n] += 1
        self.lengths[:n] += 1

    def prefill_feeds(self, first_row: int, lengths: list[int]) -> dict[str, torch.Tensor]:
        """start 0 and a one-slot empty cache (masked by start 0) per layer."""
        p = len(lengths)
        empty = self._empty(p, 1)
        feeds = {"start": torch.zeros(p, dtype=torch.int64, device=self.device)}
        for i in range(len(self.k)):
            feeds[f"cache_k_{i}"] = feeds[f"cache_v_{i}"] = empty
        return feeds

    def prefill_done(self, first_row: int, outputs: dict[str, torch.Tensor], lengths: list[int]) -> None:
        """Fresh rows first_row.. now hold their prompts; new_k_i, new_v_i (p, KV, T, hd) right-padded.
        The whole (p, KV, T, hd) block is copied in one slice per tensor: the padded positions
        past a row's length hold the pad tokens' K/V, which no step reads (start masks them) and
        the row's decode steps overwrite one by one."""
        p, t = len(lengths), max(lengths)
        self._fit(max(int(self.lengths.max()), t))
        rows = slice(first_row, first_row + p)
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            k[rows, :, :t] = outputs[f"new_k_{i}"][:, :, :t]
            v[rows, :, :t] = outputs[f"new_v_{i}"][:, :, :t]
        self.lengths[rows] = lengths
        self._lengths[rows] = _to(self.device, np.asarray(lengths, np.int64))


class TorchStateSlots(StateSlots):
    """`StateSlots` on a torch device: one tensor (R, *per_row_shape) per state input of the step.
    Every verb but the zero state of fresh rows is StateSlots' own: slicing, row copies, list
    indexing and assignment from tensors work the same on torch tensors."""

    def __init__(self, rows: int, shapes: dict[str, tuple[int, ...]], output_names: dict[str, str],
                 max_len: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.max_len = max_len
        self.states = {name: torch.zeros((rows, *shape), dtype=dtype, device=self.device)
                       for name, shape in shapes.items()}
        self.output_names = output_names
        self._ones = torch.ones(rows, dtype=torch.int64, device=self.device)

    def prefill_feeds(self, first_row: int, lengths: list[int]) -> dict[str, torch.Tensor]:
        """Fresh rows start from the zero state; n_new tells the step where each prompt ends."""
        p = len(lengths)
        return {"n_new": _to(self.device, np.asarray(lengths, np.int64)),
                **{name: torch.zeros((p, *a.shape[1:]), dtype=a.dtype, device=self.device)
                   for name, a in self.states.items()}}
