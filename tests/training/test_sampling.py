"""Sampling: greedy, top-k, top-p, seeds, logprobs, parameter checks."""

from __future__ import annotations

import numpy as np
import pytest

from training.sampling import Sampler, SamplingParams, log_softmax

LOGITS = np.array([0.0, 2.0, 1.0, 3.0, -1.0], dtype=np.float32)


def draws(params: SamplingParams, n: int = 2000) -> np.ndarray:
    s = Sampler(params)
    return np.array([s.sample(LOGITS).token for _ in range(n)])


def test_greedy_is_argmax():
    assert set(draws(SamplingParams(temperature=0), 20)) == {3}


def test_top_k_keeps_only_the_k_best():
    assert set(draws(SamplingParams(temperature=1.0, top_k=2, seed=1))) == {1, 3}


def test_top_k_walks_its_candidates_largest_first_equal_values_by_id():
    # four equal logits, top-2: the candidates are tokens 0 and 1, in that order, so the draw's
    # number picks 0 below one half and 1 above it (the device sampler walks the same order)
    u = np.random.default_rng(0).random()
    token = Sampler(SamplingParams(top_k=2, seed=0)).sample(np.ones(4, np.float32)).token
    assert token == (0 if u < 0.5 else 1)


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.exp(log_softmax(LOGITS.astype(np.float64)))   # 3: .64, 1: .24, 2: .09, ...
    assert probs[3] < 0.7 < probs[3] + probs[1]
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.7, seed=2))) == {1, 3}


def test_frequencies_follow_the_softmax():
    counts = np.bincount(draws(SamplingParams(temperature=1.0, seed=3), 20000), minlength=5) / 20000
    np.testing.assert_allclose(counts, np.exp(log_softmax(LOGITS.astype(np.float64))), atol=0.015)


def test_low_temperature_sharpens():
    assert (draws(SamplingParams(temperature=0.1, seed=4), 500) == 3).mean() > 0.99


def test_same_seed_same_draws_different_seed_different_draws():
    a, b = draws(SamplingParams(seed=42), 200), draws(SamplingParams(seed=42), 200)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, draws(SamplingParams(seed=43), 200))


def test_logprobs_of_the_model_distribution():
    out = Sampler(SamplingParams(temperature=0, logprobs=2)).sample(LOGITS)
    expected = log_softmax(LOGITS.astype(np.float64))
    assert out.token == 3 and out.logprob == pytest.approx(expected[3])
    assert [t for t, _ in out.top] == [3, 1] and out.top[1][1] == pytest.approx(expected[1])
    assert Sampler(SamplingParams()).sample(LOGITS).logprob is None


@pytest.mark.parametrize("kwargs,needle", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(logprobs=-1), "logprobs"),
])
def test_bad_parameters_are_named(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**kwargs)
