"""Which alias answers a request that names no version: pure functions of the request's key and
`model.json`'s routing, so that every replica, with no shared state, makes the same choice.

- A caller with a sticky key goes by weighted rendezvous hashing (Schindelhauer & Schomaker's
  logarithmic method, as mcrouter's WeightedRendezvousHashFunc): each alias scores
  `w / -ln(u)` with `u` uniform in (0, 1) from a hash of (alias, key), and the highest score wins.
  `-ln(u) / w` is Exp(w), so alias i wins with probability w_i / sum(w); changing one alias's
  weight only moves keys into it (raised) or out of it (lowered), never between the others.
- A caller without a key gets a weighted draw.
The hash is blake2b, not Python's `hash()`, which is salted per process: replicas must agree.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Collection, Mapping

_SCALE = 2.0 ** 64


def unit_hash(alias: str, key: str) -> float:
    """A uniform number in the open interval (0, 1) from (alias, key), the same in every process."""
    digest = hashlib.blake2b(f"{alias}\x00{key}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / _SCALE


def rendezvous_alias(weights: Mapping[str, int], key: str) -> str:
    """The alias a sticky key lands on (weights > 0 only; ties, vanishingly rare, go to the name)."""
    best, best_score = "", -1.0
    for alias, weight in weights.items():
        if weight <= 0:
            continue
        score = weight / -math.log(unit_hash(alias, key))
        if score > best_score or (score == best_score and alias < best):
            best, best_score = alias, score
    if not best:
        raise ValueError(f"no alias with a positive weight in {dict(weights)}")
    return best


def weighted_alias(weights: Mapping[str, int], u: float) -> str:
    """The alias a uniform draw `u` in [0, 1) falls on, aliases taken in sorted order."""
    positive = sorted((a, w) for a, w in weights.items() if w > 0)
    if not positive:
        raise ValueError(f"no alias with a positive weight in {dict(weights)}")
    total = sum(w for _, w in positive)
    edge = u * total
    for alias, weight in positive:
        edge -= weight
        if edge < 0:
            return alias
    return positive[-1][0]


def choose_alias(split: Mapping[str, int], serving: Collection[str], key: str | None,
                 rng: random.Random | None = None) -> str | None:
    """The alias of the split that answers: by the sticky key when there is one, else a weighted
    draw; only aliases in `serving` (their version is ready) take part, so a canary still loading
    gets nothing and its share goes to the others (by rendezvous: only its own keys move).
    None when no alias of the split serves (the caller falls back to its default version)."""
    live = {a: w for a, w in split.items() if a in serving and w > 0}
    if not live:
        return None
    if key is not None:
        return rendezvous_alias(live, key)
    return weighted_alias(live, (rng or random).random())


def shadow_sampled(percent: float, u: float) -> bool:
    """Whether a request is copied to the shadow: `u` uniform in [0, 1)."""
    return u * 100.0 < percent
