"""serve.routing: weighted split, sticky keys by weighted rendezvous hashing, shadow sampling."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from serve.routing import choose_alias, rendezvous_alias, shadow_sampled, unit_hash, weighted_alias

KEYS = [f"user-{i}" for i in range(10_000)]


def test_weighted_draw_shares_within_two_points() -> None:
    rng = random.Random(7)
    split = {"stable": 70, "canary": 20, "blue": 10}
    counts = {a: 0 for a in split}
    for _ in range(10_000):
        counts[choose_alias(split, split.keys(), None, rng)] += 1
    for alias, weight in split.items():
        assert abs(counts[alias] / 100 - weight) < 2, counts


def test_sticky_shares_within_two_points() -> None:
    split = {"stable": 70, "canary": 20, "blue": 10}
    counts = {a: 0 for a in split}
    for key in KEYS:
        counts[choose_alias(split, split.keys(), key)] += 1
    for alias, weight in split.items():
        assert abs(counts[alias] / 100 - weight) < 2, counts


def test_a_key_always_reaches_the_same_alias() -> None:
    split = {"stable": 90, "canary": 10}
    first = {k: choose_alias(split, split.keys(), k) for k in KEYS[:500]}
    for _ in range(3):
        assert {k: choose_alias(split, split.keys(), k) for k in KEYS[:500]} == first


def test_the_choice_is_the_same_in_another_process() -> None:
    """No per-process salt (Python's str hash is salted): replicas agree without talking."""
    split = {"stable": 90, "canary": 10}
    here = [rendezvous_alias(split, k) for k in KEYS[:200]]
    code = ("import sys; from serve.routing import rendezvous_alias; "
            "print(','.join(rendezvous_alias({'stable': 90, 'canary': 10}, f'user-{i}') for i in range(200)))")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "12345", "PATH": ""}, cwd=str(__import__("pathlib").Path(__file__).parents[2]))
    assert there.stdout.strip().split(",") == here


def test_raising_the_canary_moves_only_keys_into_it() -> None:
    before = {k: rendezvous_alias({"stable": 90, "canary": 10}, k) for k in KEYS}
    after = {k: rendezvous_alias({"stable": 80, "canary": 20}, k) for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(before[k] == "stable" and after[k] == "canary" for k in moved)
    assert 0.08 < len(moved) / len(KEYS) < 0.12, len(moved)


def test_a_weight_change_moves_no_key_between_the_other_aliases() -> None:
    before = {k: rendezvous_alias({"stable": 70, "blue": 20, "canary": 10}, k) for k in KEYS}
    after = {k: rendezvous_alias({"stable": 70, "blue": 20, "canary": 25}, k) for k in KEYS}
    moved = [(before[k], after[k]) for k in KEYS if before[k] != after[k]]
    assert moved and all(dst == "canary" for _, dst in moved)
    lowered = {k: rendezvous_alias({"stable": 70, "blue": 20, "canary": 3}, k) for k in KEYS}
    assert all(before[k] == "canary" for k in KEYS if before[k] != lowered[k])


def test_an_alias_that_is_not_serving_gives_its_keys_away_and_only_those() -> None:
    split = {"stable": 50, "canary": 50}
    full = {k: choose_alias(split, {"stable", "canary"}, k) for k in KEYS[:2000]}
    loading = {k: choose_alias(split, {"stable"}, k) for k in KEYS[:2000]}
    assert set(loading.values()) == {"stable"}
    assert all(loading[k] == full[k] for k in KEYS[:2000] if full[k] == "stable")
    assert choose_alias(split, set(), "k") is None
    assert choose_alias({"stable": 0, "canary": 5}, {"stable"}, None) is None


def test_zero_weights_never_chosen_and_bad_splits_refused() -> None:
    assert {rendezvous_alias({"stable": 1, "canary": 0}, k) for k in KEYS[:300]} == {"stable"}
    with pytest.raises(ValueError, match="positive weight"):
        rendezvous_alias({"stable": 0}, "k")
    with pytest.raises(ValueError, match="positive weight"):
        weighted_alias({}, 0.5)
    assert weighted_alias({"a": 1, "b": 1}, 0.0) == "a" and weighted_alias({"a": 1, "b": 1}, 0.999) == "b"


def test_unit_hash_in_open_interval_and_shadow_sampling() -> None:
    values = [unit_hash("a", k) for k in KEYS[:1000]]
    assert all(0 < v < 1 for v in values)
    rng = random.Random(3)
    share = sum(shadow_sampled(25, rng.random()) for _ in range(10_000)) / 100
    assert abs(share - 25) < 2
    assert not shadow_sampled(0, 0.0) and shadow_sampled(100, 0.9999)
