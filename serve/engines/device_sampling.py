"""Next-token sampling on the device, for a step's rows at once (issue 18).

The same rule as training/sampling.py's `Sampler.sample`, row by row, in float64 torch ops on
the logits where the step left them: temperature, top-k, then top-p over the canonical order (the
largest first, equal values by token id: a stable descending sort), the inverse-CDF draw with the
number the request's own generator gives on the host (`Sampler.uniform`: a seeded request draws
the same token alone or in a full batch, on the CPU or on a GPU), greedy as the first maximum,
and log-probabilities of the model's own distribution. Only the chosen ids and the asked
log-probabilities cross back to the host, in one copy.

Rows without a cut walk the tokens by id, as the numpy sampler does; rows with one walk their
sorted order. The sums run in the same order as numpy's (a running sum and its last element), so
on the CPU the two samplers agree token for token (tests/serve/test_device_sampling.py); on a GPU
the parallel scan may round the last bit differently, which moves a draw only when the number
falls within ~1e-16 of a boundary.
"""

from __future__ import annotations

from typing import Sequence

import torch

from training.sampling import Sampled, Sampler


def sample_rows(logits: torch.Tensor, samplers: Sequence[Sampler]) -> list[Sampled]:
    """One Sampled per row of `logits (B, V)` (any device), row i drawn by `samplers[i]`."""
    rows, vocab = logits.shape
    device = logits.device
    params = [s.params for s in samplers]
    x = logits.to(torch.float64)                                                  # (B, V)

    if all(p.greedy for p in params):          # no draw: no sort, no sums (a greedy batch's step)
        return _answers(x, x.argmax(dim=1), params)

    def per_row(values, dtype=torch.float64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    greedy = per_row([p.greedy for p in params], torch.bool)                      # (B,)
    cut_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    cuts = [k < vocab or p.top_p < 1.0 for k, p in zip(cut_k, params)]
    temperature = per_row([1.0 if p.greedy else p.temperature for p in params])
    top_p = per_row([p.top_p for p in params])
    uniform = per_row([0.0 if p.greedy else s.uniform() for s, p in zip(samplers, params)])

    positions = torch.arange(vocab, device=device)
    scaled = x / temperature[:, None]                                             # (B, V)
    walk = positions.expand(rows, vocab)                                          # candidates in draw order
    if any(cuts):
        order = torch.sort(scaled, dim=1, descending=True, stable=True).indices   # (B, V) canonical
        walk = torch.where(per_row(cuts, torch.bool)[:, None], order, walk)
    weights = torch.exp(scaled.gather(1, walk) - scaled.max(dim=1, keepdim=True).values)
    keep = positions[None, :] < per_row(cut_k, torch.int64)[:, None]              # top-k
    running = torch.cumsum(weights * keep, dim=1)
    before = torch.cat([torch.zeros_like(running[:, :1]), (running / running[:, -1:])[:, :-1]], dim=1)
    keep &= (before < top_p[:, None]) | (top_p[:, None] >= 1.0)                   # top-p: smallest prefix
    cdf = torch.cumsum(weights * keep, dim=1)
    target = (uniform * cdf[:, -1]).unsqueeze(1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(1)
    index = torch.minimum(index, keep.sum(dim=1) - 1)
    drawn = walk.gather(1, index[:, None]).squeeze(1)
    tokens = torch.where(greedy, x.argmax(dim=1), drawn)                          # (B,)
    return _answers(x, tokens, params)


def _answers(x: torch.Tensor, tokens: torch.Tensor, params) -> list[Sampled]:
    """Sampled per row: the token, and where asked its logprob and the n best (one copy back)."""
    asked = [p.logprobs for p in params]
    top_n = max((n for n in asked if n is not None), default=None)
    if top_n is None:
        return [Sampled(int(t)) for t in tokens.cpu().tolist()]
    shifted = x - x.max(dim=1, keepdim=True).values
    logp = shifted - torch.log(torch.exp(shifted).sum(dim=1, keepdim=True))      # (B, V)
    chosen = logp.gather(1, tokens[:, None])                                      # (B, 1)
    best = torch.sort(logp, dim=1, descending=True, stable=True).indices[:, :top_n]   # (B, n)
    # one copy back: token, its logprob, then the n best ids and their logprobs (ids < 2**53: exact)
    host = torch.cat([tokens[:, None].to(torch.float64), chosen, best.to(torch.float64),
                      logp.gather(1, best)], dim=1).cpu().tolist()
    out = []
    for row, n in zip(host, asked):
        token = int(row[0])
        if n is None:
            out.append(Sampled(token))
            continue
        top = [(int(row[2 + j]), row[2 + top_n + j]) for j in range(n)]
        out.append(Sampled(token, row[1], top))
    return out
