"""Next-token sampling, shared by every autoregressive family (decoder, Mamba, RNN LM).

Each request owns a `Sampler` with its own random generator, so a seeded request draws the
same numbers whether it runs alone or among 31 others. Logits arrive as numpy rows `(V,)`
(what ONNX Runtime returns); V = vocabulary size.

Order of operations, as in HF/vLLM: temperature, then top-k, then top-p (nucleus) over what
top-k kept. Temperature 0 is greedy. Reported log-probabilities are those of the model's
own distribution (log-softmax of the raw logits), the values OpenAI's `logprobs` report.

The candidates of a cut (top-k, top-p) are in one canonical order, the largest first and equal
values by token id, the order a stable descending sort gives: the inverse-CDF draw walks them in
that order, so the sampler on the device (serve/engines/device_sampling.py), which sorts, draws
the same token from the same number. The draw's number comes from the request's own generator
on the host, one per sampled step, wherever the rest runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0     # 0 = greedy
    top_k: int = 0               # 0 = no limit
    top_p: float = 1.0           # 1 = no nucleus cut
    seed: int | None = None      # None = fresh entropy
    logprobs: int | None = None  # None = none; k >= 0 = chosen token's logprob plus the top k

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Sampled:
    token: int
    logprob: float | None = None                       # of the chosen token, when asked
    top: list[tuple[int, float]] = field(default_factory=list)   # (token, logprob), best first


def best_first(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest of `values (V,)`, largest first, equal values by index: the first k
    of a stable descending sort, without sorting the whole row (argpartition, then the boundary's
    ties settled by index, then k items sorted)."""
    if k >= values.shape[0]:
        return np.argsort(-values, kind="stable")
    part = np.argpartition(-values, k - 1)[:k]
    kth = values[part].min()
    above = np.flatnonzero(values > kth)
    chosen = np.concatenate([above, np.flatnonzero(values == kth)[: k - above.shape[0]]])
    return chosen[np.lexsort((chosen, -values[chosen]))]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


class Sampler:
    """One request's sampling state: its parameters and its own generator."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def uniform(self) -> float:
        """This request's next number in [0, 1) for a draw (one per sampled, not greedy, step)."""
        return float(self.rng.random())

    def sample(self, logits: np.ndarray) -> Sampled:
        """Draw one token from `logits (V,)`."""
        p = self.params
        token = int(np.argmax(logits)) if p.greedy else self._draw(logits.astype(np.float64))
        if p.logprobs is None:
            return Sampled(token)
        logp = log_softmax(logits.astype(np.float64))
        top: list[tuple[int, float]] = []
        if p.logprobs > 0:
            top = [(int(i), float(logp[i])) for i in best_first(logp, p.logprobs)]
        return Sampled(token, float(logp[token]), top)

    def _draw(self, logits: np.ndarray) -> int:
        p = self.params
        scaled = logits / p.temperature                               # (V,)
        if 0 < p.top_k < scaled.shape[0]:
            candidates = best_first(scaled, p.top_k)
        elif p.top_p < 1.0:
            candidates = np.argsort(-scaled, kind="stable")
        else:                                                         # no cut: every token, by id
            candidates = np.arange(scaled.shape[0])
        weights = np.exp(scaled[candidates] - scaled[candidates].max())
        if p.top_p < 1.0:
            running = np.cumsum(weights)
            cumulative = running / running[-1]      # the running sum's own total, as the device's cumsum
            keep = int(np.searchsorted(cumulative, p.top_p)) + 1      # smallest prefix with mass >= top_p
            candidates, weights = candidates[:keep], weights[:keep]
        cdf = np.cumsum(weights)
        index = int(np.searchsorted(cdf, self.uniform() * cdf[-1], side="right"))
        return int(candidates[min(index, len(candidates) - 1)])
