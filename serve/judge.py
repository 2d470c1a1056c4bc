"""Judge one analysis window of a canary against its stable: pure statistics, no I/O.

A window holds, per arm, the requests answered, the errors among them (HTTP status >= 500), the
request-latency histogram (cumulative `le` -> count, as Prometheus exposes it) and, when a shadow
ran, how many shadow answers agreed or disagreed with the primary's. `judge` returns a `Verdict`:

- `wait`: either arm has fewer than `min_requests` requests; too little data is neither pass nor fail.
- `fail`: some limit is exceeded by more than noise: the observed difference must pass the limit AND
  a one-sided test must reject "no worse than stable" at `alpha`. Requiring both keeps a few unlucky
  requests from failing a good canary, and keeps a harmless but significant difference (a 0.1 %
  error-rate increase over a million requests) from failing one either.
- `pass`: everything else. NaN, infinity or a negative count anywhere is a `fail` (never a pass).

Tests: errors are counts, so Fisher's exact test on the 2x2 table; latency is ordinal once bucketed,
so a Mann-Whitney U test on the bucket indices (ties corrected by scipy); shadow agreement is a
binomial proportion against the floor.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from model_registry.routing import Rollout

# scipy.stats is imported where a test runs, or by load_tests, not with this module: a server
# without the controller (and the CLI) never pays its 1-2 s, one with it pays it beside its load


def load_tests() -> None:
    """Import scipy.stats now. A server with the rollout controller calls it in a thread beside its
    start-up load, before it is ready: the import holds the GIL for ~1-2 s, which in the middle of a
    rollout's first judgement stalled the event loop (requests routed to a canary just rolled back
    finished after the rollback), and just after ready stalled the first requests.

    scipy's import-time array-API checks read `sys.modules["torch"].Tensor`; a torch that the load
    is importing in its own thread is there half-built, and the import failed with "partially
    initialized module 'torch' has no attribute 'Tensor'" (CI, test_shadow_server). Then this
    waits for torch's import to finish (`import torch` takes the module's lock) and imports again."""
    try:
        from scipy import stats  # noqa: F401
    except AttributeError:
        if "torch" not in sys.modules:
            raise
        import torch  # noqa: F401  - returns once the other thread's import of it is done
        from scipy import stats  # noqa: F401,F811


Outcome = Literal["wait", "pass", "fail"]
QUANTILE = 0.99


@dataclass(frozen=True)
class ArmWindow:
    """What one arm (stable or canary) did during one analysis window."""

    requests: float
    errors: float                                   # answers with HTTP status >= 500
    # cumulative histogram of request seconds: upper bound (`le`, +inf included) -> count <= bound
    latency: Mapping[float, float] = field(default_factory=dict)
    shadow_agree: float = 0
    shadow_disagree: float = 0


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str


@dataclass(frozen=True)
class Check:
    """The result of one limit: `failed` only when both the limit and its test say so."""

    failed: bool
    text: str


# ---- the verdict ---------------------------------------------------------------------------

def judge(stable: ArmWindow, canary: ArmWindow, limits: Rollout) -> Verdict:
    """The verdict on one window of `canary` against `stable` under the rollout's limits."""
    problems = invalid_numbers("stable", stable) + invalid_numbers("canary", canary)
    if problems:
        return Verdict("fail", "invalid window, refusing to pass it: " + "; ".join(problems))
    short = [f"{arm} has {_count(w.requests)} requests" for arm, w in (("stable", stable), ("canary", canary))
             if w.requests < limits.min_requests]
    if short:
        return Verdict("wait", f"insufficient sample, keep waiting: {', '.join(short)} "
                               f"(min_requests {limits.min_requests} per arm)")
    checks = [check_errors(stable, canary, limits.max_error_rate_delta, limits.alpha),
              check_latency(stable, canary, limits.max_p99_ratio, limits.alpha)]
    if limits.min_agreement is not None and canary.shadow_agree + canary.shadow_disagree > 0:
        checks.append(check_agreement(canary, limits.min_agreement, limits.alpha))
    failed = [c.text for c in checks if c.failed]
    if failed:
        return Verdict("fail", "; ".join(failed))
    return Verdict("pass", "; ".join(c.text for c in checks))


def invalid_numbers(arm: str, window: ArmWindow) -> list[str]:
    """Why the numbers of one arm cannot be judged (NaN, infinite, negative, inconsistent); [] if they can."""
    values = {"requests": window.requests, "errors": window.errors, "shadow_agree": window.shadow_agree,
              "shadow_disagree": window.shadow_disagree,
              **{f"latency bucket le={le}": count for le, count in window.latency.items()}}
    problems = [f"{arm} {name} is {value}" for name, value in values.items()
                if not _is_finite(value) or value < 0]
    if any(isinstance(le, float) and math.isnan(le) for le in window.latency):
        problems.append(f"{arm} latency has a NaN bucket bound")
    if not problems and window.errors > window.requests:
        problems.append(f"{arm} has more errors ({_count(window.errors)}) than requests ({_count(window.requests)})")
    return problems


# ---- errors: Fisher's exact test -----------------------------------------------------------

def check_errors(stable: ArmWindow, canary: ArmWindow, max_delta: float, alpha: float) -> Check:
    """Fail when the canary's error rate exceeds stable's by more than `max_delta`, significantly."""
    stable_rate, canary_rate = stable.errors / stable.requests, canary.errors / canary.requests
    delta = canary_rate - stable_rate
    text = (f"error rate canary {_pct(canary_rate)} ({_count(canary.errors)}/{_count(canary.requests)}) vs "
            f"stable {_pct(stable_rate)} ({_count(stable.errors)}/{_count(stable.requests)}), "
            f"delta {_pct(delta)} (limit {_pct(max_delta)})")
    if delta <= max_delta:
        return Check(False, text)
    p = error_rate_p_value(stable, canary)
    if math.isnan(p):
        return Check(True, text + ", Fisher p is NaN")
    return Check(p < alpha, text + f", Fisher p={p:.3g} ({'<' if p < alpha else '>='} alpha {alpha})")


def error_rate_p_value(stable: ArmWindow, canary: ArmWindow) -> float:
    """One-sided Fisher exact p-value of 'the canary's error odds are greater than stable's'."""
    table = [[round(canary.errors), round(canary.requests - canary.errors)],
             [round(stable.errors), round(stable.requests - stable.errors)]]
    from scipy import stats
    return float(stats.fisher_exact(table, alternative="greater").pvalue)


# ---- latency: interpolated p99 and Mann-Whitney U ------------------------------------------

def check_latency(stable: ArmWindow, canary: ArmWindow, max_ratio: float, alpha: float) -> Check:
    """Fail when the canary's p99 exceeds `max_ratio` x stable's and its latencies are significantly larger."""
    stable_p99, canary_p99 = histogram_quantile(QUANTILE, stable.latency), histogram_quantile(QUANTILE, canary.latency)
    if math.isnan(stable_p99) or math.isnan(canary_p99):
        return Check(True, f"p99 latency is not computable (canary {canary_p99}, stable {stable_p99}): "
                           "the histograms are empty or lack a +Inf bucket")
    text = (f"p99 canary {_ms(canary_p99)} vs stable {_ms(stable_p99)} "
            f"(limit {max_ratio:g}x = {_ms(max_ratio * stable_p99)})")
    if canary_p99 <= max_ratio * stable_p99:
        return Check(False, text)
    p = latency_p_value(stable.latency, canary.latency)
    if math.isnan(p):
        return Check(True, text + ", Mann-Whitney p is NaN")
    return Check(p < alpha, text + f", Mann-Whitney p={p:.3g} ({'<' if p < alpha else '>='} alpha {alpha})")


def histogram_quantile(q: float, cumulative: Mapping[float, float]) -> float:
    """The q-quantile of a cumulative histogram, interpolated inside its bucket exactly as Prometheus'
    histogram_quantile does (bucketQuantile in promql/quantile.go); NaN when it has none."""
    buckets = sorted((float(le), float(count)) for le, count in cumulative.items())
    if len(buckets) < 2 or buckets[-1][0] != math.inf:
        return math.nan
    buckets = _monotonic(buckets)
    observations = buckets[-1][1]
    if observations == 0:
        return math.nan
    rank = q * observations
    b = next((i for i, (_, count) in enumerate(buckets[:-1]) if count >= rank), len(buckets) - 1)
    if b == len(buckets) - 1:
        return buckets[-2][0]                       # in the +Inf bucket: the largest finite bound
    if b == 0 and buckets[0][0] <= 0:
        return buckets[0][0]
    start, below = (0.0, 0.0) if b == 0 else buckets[b - 1]
    end, count = buckets[b]
    return start + (end - start) * (rank - below) / (count - below)


def _monotonic(buckets: list[tuple[float, float]]) -> list[tuple[float, float]]:
    # Prometheus' ensureMonotonic: counts scraped at slightly different moments may dip; carry the max
    out, highest = [], 0.0
    for le, count in buckets:
        highest = max(highest, count)
        out.append((le, highest))
    return out


def latency_p_value(stable: Mapping[float, float], canary: Mapping[float, float]) -> float:
    """One-sided Mann-Whitney U p-value of 'canary latencies are stochastically larger than stable's'.

    Each request becomes one observation at its bucket's index in the union of both arms' bounds
    (only the order of buckets is known, not the values inside one), so most observations tie;
    mannwhitneyu's asymptotic method corrects the variance for ties."""
    bounds = sorted({float(le) for le in (*stable, *canary)})
    stable_obs, canary_obs = bucket_observations(stable, bounds), bucket_observations(canary, bounds)
    if stable_obs.size == 0 or canary_obs.size == 0:
        return math.nan
    if np.ptp(np.concatenate([stable_obs, canary_obs])) == 0:
        return 1.0                                  # every request in one bucket: no evidence of a shift
    from scipy import stats
    result = stats.mannwhitneyu(canary_obs, stable_obs, alternative="greater", method="asymptotic")
    return float(result.pvalue)


def bucket_observations(cumulative: Mapping[float, float], bounds: list[float]) -> np.ndarray:
    """One observation per request: the index in `bounds` of the bucket that holds it."""
    buckets = _monotonic(sorted((float(le), float(count)) for le, count in cumulative.items()))
    per_bucket = np.diff([0.0, *(count for _, count in buckets)])
    indices = [bounds.index(le) for le, _ in buckets]
    return np.repeat(np.asarray(indices, dtype=np.int32), np.rint(per_bucket).astype(np.int64))


# ---- shadow agreement: binomial test -------------------------------------------------------

def check_agreement(canary: ArmWindow, floor: float, alpha: float) -> Check:
    """Fail when the shadow agreement rate is below `floor` and a binomial test says it truly is."""
    agree, total = round(canary.shadow_agree), round(canary.shadow_agree + canary.shadow_disagree)
    rate = agree / total
    text = f"shadow agreement {_pct(rate)} ({agree}/{total}, floor {_pct(floor)})"
    if rate >= floor:
        return Check(False, text)
    from scipy import stats
    p = float(stats.binomtest(agree, total, floor, alternative="less").pvalue)
    if math.isnan(p):
        return Check(True, text + ", binomial p is NaN")
    return Check(p < alpha, text + f", binomial p={p:.3g} ({'<' if p < alpha else '>='} alpha {alpha})")


# ---- formatting ----------------------------------------------------------------------------

def _is_finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except TypeError:
        return False


def _count(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:g}"


def _pct(rate: float) -> str:
    return f"{100 * rate:.2f}%"


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.3g} ms"
