"""The token engine's state objects: KV slots (growing/shrinking capacity) and recurrent state slots."""

from __future__ import annotations

import numpy as np
import pytest

from serve.engines.kv_slots import KVSlots
from serve.engines.state_slots import StateSlots

L, KV, HD = 2, 2, 4


def kv_outputs(n: int, t: int, value_of) -> dict[str, np.ndarray]:
    """new_k_i/new_v_i (n, KV, t, HD) whose entries are value_of(row, token, layer) (+0.5 for v)."""
    out = {}
    for i in range(L):
        k = np.array([[value_of(r, j, i) for j in range(t)] for r in range(n)], np.float32)   # (n, t)
        k = np.broadcast_to(k[:, None, :, None], (n, KV, t, HD)).copy()
        out[f"new_k_{i}"], out[f"new_v_{i}"] = k, k + 0.5
    return out


def held(slots: KVSlots, row: int, layer: int = 1) -> list[float]:
    n = slots.lengths[row]
    return slots.k[layer][row, 0, :n, 0].tolist()


def test_kv_slots_hold_prefill_then_decode_and_grow_only_when_needed():
    slots = KVSlots(rows=4, layers=L, kv_heads=KV, max_len=300, head_dim=HD, bucket=64)
    assert slots.capacity == 64
    feeds = slots.prefill_feeds(0, [3, 70])
    assert feeds["start"].tolist() == [0, 0] and feeds["cache_k_1"].shape == (2, KV, 1, HD)
    slots.prefill_done(0, kv_outputs(2, 70, lambda r, j, i: 1000 * r + j), [3, 70])
    assert slots.capacity == 128 and slots.resizes == 1          # 70 positions need two buckets
    assert held(slots, 0) == [0, 1, 2] and held(slots, 1) == list(range(1000, 1070))
    feeds = slots.decode_feeds(2)
    assert feeds["start"].tolist() == [3, 70]
    assert feeds["cache_k_0"].shape == (2, KV, 128, HD) and np.shares_memory(feeds["cache_k_0"], slots.k[0])
    slots.decode_done(2, kv_outputs(2, 1, lambda r, j, i: -1 - r))
    assert held(slots, 0) == [0, 1, 2, -1] and held(slots, 1) == [*range(1000, 1070), -2]
    assert slots.v[0][1, 1, 70, 0] == -1.5                        # v lands beside k, every head
    assert slots.resizes == 1


def test_kv_slots_shrink_after_the_long_row_leaves_and_keep_live_rows():
    slots = KVSlots(rows=3, layers=L, kv_heads=KV, max_len=512, head_dim=HD, bucket=64)
    slots.prefill_done(0, kv_outputs(2, 300, lambda r, j, i: 10 * r + j % 7), [5, 300])
    assert slots.capacity == 320
    slots.move(0, 2)
    assert held(slots, 2) == [0, 1, 2, 3, 4]
    slots.reset_rows([1, 0])                                      # the long row finishes; row 2 lives on
    slots.move(2, 0)                                              # compaction
    slots.reset_rows([2])
    feeds = slots.decode_feeds(1)
    assert slots.capacity == 64 and feeds["cache_k_1"].shape == (1, KV, 64, HD)
    assert held(slots, 0) == [0, 1, 2, 3, 4]


def test_kv_slots_refuse_a_row_beyond_the_context():
    slots = KVSlots(rows=1, layers=L, kv_heads=KV, max_len=100, head_dim=HD, bucket=64)
    with pytest.raises(ValueError, match="holds 100"):
        slots.prefill_done(0, kv_outputs(1, 101, lambda r, j, i: j), [101])
    slots.prefill_done(0, kv_outputs(1, 100, lambda r, j, i: j), [100])
    assert slots.capacity == 100                                  # capped at max_len, not rounded past it
    with pytest.raises(ValueError):
        slots.decode_feeds(1)


def test_kv_bytes_per_row_counts_k_and_v_of_every_layer_at_full_context():
    assert KVSlots.bytes_per_row(layers=6, kv_heads=2, max_len=512, head_dim=32) == 2 * 6 * 2 * 512 * 32 * 4


def test_state_slots_feed_views_and_store_new_states():
    shapes = {"conv_state": (2, 3, 1), "ssm_state": (2, 3, 4)}
    slots = StateSlots(rows=4, shapes=shapes, output_names={"conv_state": "new_conv", "ssm_state": "new_ssm"},
                       max_len=10_000)
    assert StateSlots.bytes_per_row(shapes) == (6 + 24) * 4
    feeds = slots.prefill_feeds(0, [5, 2])
    assert feeds["n_new"].tolist() == [5, 2] and not feeds["ssm_state"].any()
    slots.prefill_done(0, {"new_conv": np.full((2, 2, 3, 1), 1.0, np.float32),
                           "new_ssm": np.arange(2 * 24, dtype=np.float32).reshape(2, 2, 3, 4)}, [5, 2])
    feeds = slots.decode_feeds(2)
    assert feeds["n_new"].tolist() == [1, 1] and np.shares_memory(feeds["ssm_state"], slots.states["ssm_state"])
    assert feeds["ssm_state"][1].reshape(-1).tolist() == list(range(24, 48))
    slots.decode_done(2, {"new_conv": np.zeros((2, 2, 3, 1), np.float32),
                          "new_ssm": -np.ones((2, 2, 3, 4), np.float32)})
    slots.move(1, 2)
    assert (slots.states["ssm_state"][2] == -1).all()
    slots.reset_rows([0])
    assert not slots.states["ssm_state"][0].any() and (slots.states["ssm_state"][1] == -1).all()
