"""Sampling on the device (serve/engines/device_sampling.py) against the numpy sampler
(training/sampling.py), on the CPU: the same tokens from the same seeds, row by row in a batch of
mixed parameters, and the same log-probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve.engines.device_sampling import sample_rows
from training.sampling import Sampler, SamplingParams, best_first

VOCAB = 300
PARAMS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0, logprobs=3),
    SamplingParams(temperature=1.0, seed=1),
    SamplingParams(temperature=0.7, top_k=5, seed=2),
    SamplingParams(temperature=1.3, top_p=0.8, seed=3),
    SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=4, logprobs=5),
    SamplingParams(temperature=1.0, top_k=1, seed=5),
    SamplingParams(temperature=2.0, top_p=0.05, seed=6, logprobs=0),
    SamplingParams(temperature=1.0, top_k=VOCAB, seed=7),               # no cut: k >= V
    SamplingParams(temperature=0.5, seed=8, logprobs=2),
]


def logits_batch(rng: np.random.Generator, rows: int, ties: bool) -> np.ndarray:
    x = rng.normal(0, 3, (rows, VOCAB)).astype(np.float32)
    if ties:                       # few distinct values: candidates tie at every top-k boundary
        x = np.round(x).astype(np.float32)
    return x


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ties", [False, True])
def test_the_device_sampler_draws_what_the_numpy_sampler_draws(ties, device):
    rng = np.random.default_rng(0)
    host = [Sampler(p) for p in PARAMS]
    on_device = [Sampler(p) for p in PARAMS]              # the same seeds: the same numbers
    for step in range(60):
        x = logits_batch(rng, len(PARAMS), ties)
        want = [s.sample(row) for s, row in zip(host, x)]
        got = sample_rows(torch.from_numpy(x).to(device), on_device)
        for i, (w, g) in enumerate(zip(want, got)):
            assert g.token == w.token, (step, i, PARAMS[i])
            if w.logprob is None:
                assert g.logprob is None and g.top == []
                continue
            assert g.logprob == pytest.approx(w.logprob, abs=1e-12)
            assert [t for t, _ in g.top] == [t for t, _ in w.top], (step, i)
            np.testing.assert_allclose([v for _, v in g.top], [v for _, v in w.top], atol=1e-12)


def test_a_seeded_row_draws_the_same_alone_or_in_a_batch():
    rng = np.random.default_rng(1)
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.95, seed=99)
    alone, among = Sampler(params), [Sampler(SamplingParams(temperature=1.0, seed=s)) for s in range(15)]
    in_batch = Sampler(params)
    for _ in range(30):
        x = logits_batch(rng, 16, ties=False)
        solo = sample_rows(torch.from_numpy(x[7:8]), [alone])[0].token
        batch = sample_rows(torch.from_numpy(x), [*among[:7], in_batch, *among[7:]])
        assert batch[7].token == solo


def test_greedy_rows_draw_no_number():
    # a greedy step must not move the request's generator (the numpy sampler draws none either)
    sampler = Sampler(SamplingParams(temperature=0, seed=3))
    sample_rows(torch.zeros(1, VOCAB), [sampler])
    assert sampler.uniform() == np.random.default_rng(3).random()


def test_best_first_is_a_stable_descending_sort_cut_at_k():
    rng = np.random.default_rng(2)
    for _ in range(200):
        values = np.round(rng.normal(0, 2, 50))          # many ties
        k = int(rng.integers(1, 60))
        np.testing.assert_array_equal(best_first(values, k), np.argsort(-values, kind="stable")[:k])
