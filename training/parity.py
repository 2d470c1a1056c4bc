"""The one comparison every parity and golden check uses: max abs difference, where non-finite
values are an infinite error.

Why not `max(worst, float(np.max(np.abs(a - b))))`: a NaN difference makes `np.max` NaN, and
Python's `max(worst, nan)` keeps `worst`, so an artifact answering NaN passed with "error 0".

Pure numpy on purpose: serve/ imports it (load-time golden checks) as well as training/ (export
parity), and neither may pull the other's heavy modules in through it.
"""

from __future__ import annotations

import math

import numpy as np

NON_FINITE = "non-finite"


def max_abs_error(expected: np.ndarray, actual: np.ndarray) -> float:
    """Max |actual - expected| in float64; inf when either side holds a NaN, or `actual` holds an
    Inf that `expected` does not hold at the same place (an Inf both hold equally counts 0).
    Never NaN, so `max(worst, ...)` over several outputs keeps an infinite error. Shapes must
    match: broadcasting would hide a missing row."""
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.shape != actual.shape:
        raise ValueError(f"shape {actual.shape} differs from the expected {expected.shape}")
    want, got = expected.astype(np.float64), actual.astype(np.float64)
    if np.isnan(want).any() or np.isnan(got).any():
        return math.inf
    # inf - inf is NaN here (replaced just below); a float64 overflow is rightly an infinite error
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(got - want)
    # an Inf both sides hold at the same place agrees (0); any other Inf gives an infinite diff
    diff = np.where(got == want, 0.0, diff)
    return float(np.max(diff, initial=0.0))


def describe_error(error: float) -> str:
    """An error for a message: its value, or "inf (non-finite outputs)" so that a NaN answer says so."""
    return f"{error:.3g}" if math.isfinite(error) else f"inf ({NON_FINITE} outputs: NaN or Inf)"
