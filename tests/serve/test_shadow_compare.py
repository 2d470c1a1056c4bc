"""serve.shadow's comparisons, per kind (pure functions), and which requests it copies."""

from __future__ import annotations

import random

import numpy as np

from model_registry import Shadow
from serve.metrics import Metrics
from serve.shadow import ShadowTraffic, compare_tensors, compare_tokens


def test_classifiers_agree_on_top1_and_report_the_largest_logit_difference() -> None:
    a = {"logits": np.array([[0.1, 2.0, 0.3], [1.0, 0.0, 0.0]], np.float32)}
    b = {"logits": np.array([[0.2, 1.5, 0.3], [0.9, 0.1, 0.0]], np.float32)}
    agree, diff = compare_tensors("classify", a, b, 1e-4)
    assert agree and abs(diff - 0.5) < 1e-6
    c = {"logits": np.array([[0.1, 2.0, 0.3], [0.0, 1.0, 0.0]], np.float32)}
    assert compare_tensors("classify", a, c, 1e-4)[0] is False


def test_other_tensors_agree_within_the_tolerance_and_nan_never_agrees() -> None:
    forecast = {"forecast": np.array([[361.2, 361.9]], np.float32)}
    assert compare_tensors("sequence", forecast, {"forecast": forecast["forecast"] + 5e-5}, 1e-4)[0]
    assert not compare_tensors("sequence", forecast, {"forecast": forecast["forecast"] + 1e-2}, 1e-4)[0]
    images = {"image": np.zeros((2, 1, 8, 8), np.float32)}
    nan = {"image": np.full((2, 1, 8, 8), np.nan, np.float32)}
    assert compare_tensors("denoise", images, nan, 1e-4)[0] is False
    assert compare_tensors("classify", {"logits": np.zeros((1, 3))}, {"logits": np.full((1, 3), np.nan)}, 1)[0] is False
    assert compare_tensors("sample", images, {"image": np.zeros((3, 1, 8, 8))}, 1e-4) == (False, float("inf"))
    assert compare_tensors("sample", images, {"other": images["image"]}, 1e-4)[0] is False


def test_tokens_agree_only_when_every_token_does() -> None:
    assert compare_tokens([[1, 2, 3], [4]], [[1, 2, 3], [4]]) == (True, 0.0)
    agree, share = compare_tokens([[1, 2, 3, 4]], [[1, 9, 3]])
    assert not agree and share == 2 / 4           # one differs, one missing


def test_only_routed_requests_to_another_version_are_copied_and_a_full_shadow_drops() -> None:
    traffic = ShadowTraffic(Metrics(), max_in_flight=1, rng=random.Random(0))
    shadow = Shadow(alias="canary", percent=100)
    assert traffic.wanted("m", shadow, "stable", 1, 2)
    assert not traffic.wanted("m", shadow, "canary", 2, 2)          # the shadow's own traffic
    assert not traffic.wanted("m", shadow, "stable", 2, 2)          # the same version
    assert not traffic.wanted("m", shadow, "stable", 1, None)       # the shadow is not ready
    assert not traffic.wanted("m", None, "stable", 1, 2)
    sampler = ShadowTraffic(Metrics(), rng=random.Random(1))
    share = sum(sampler.wanted("m", Shadow(alias="c", percent=10), None, 1, 2) for _ in range(5000)) / 5000
    assert 0.08 < share < 0.12
    assert traffic.admit("m", "canary", queue_depth=0, max_queue=10)
    assert not traffic.admit("m", "canary", queue_depth=6, max_queue=10)     # queue past half full: live first
    traffic.in_flight["m"] = 1
    assert not traffic.admit("m", "canary", queue_depth=0, max_queue=10)     # max_in_flight copies running
    assert traffic.results.labels("m", "canary", "dropped")._value.get() == 2
