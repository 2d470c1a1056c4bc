"""Shadow traffic: a share of the requests routed to a model's primary also runs on the shadow
alias's version; its answer is compared with the primary's and dropped. Only the comparison is
kept: `zooserve_shadow_requests_total{model,alias,result}` (agree, disagree, dropped, error) and
the histogram `zooserve_shadow_difference{model,alias}`.

The copy never delays or fails the primary: it starts after the primary has its answer, as a
task of its own, and its failures are counted, never raised. Copies wait behind live work: at
most `max_in_flight` copies per model run at once, and a copy is dropped (and counted) when
that many are running, when the shadow version's queue is past half full, or when the queue
refuses it; a live request is never the one refused.

What "agree" means, per kind (`compare_*` below, pure functions):
- classifiers: the same top-1 class on every row; the difference is the max |logit difference|;
- other tensors (forecasts, images from the same seed): max |difference| within the tolerance
  the shadow version's export parity used (default 1e-4);
- token models: the same tokens; the difference is the share of positions that differ. Only
  greedy (temperature 0) or seeded requests are copied: an unseeded sample has nothing to agree with.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable

import numpy as np

from model_registry import Manifest, Shadow
from serve.metrics import Metrics
from serve.routing import shadow_sampled
from training.parity import max_abs_error

log = logging.getLogger("zooserve.shadow")

DIFFERENCE_BUCKETS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0, 10.0, 100.0)
DEFAULT_TOLERANCE = 1e-4


def compare_tensors(kind: str, primary: dict[str, np.ndarray], shadow: dict[str, np.ndarray],
                    tolerance: float) -> tuple[bool, float]:
    """(agree, max |difference|) of two answers with the same outputs; NaN never agrees."""
    if set(primary) != set(shadow):
        return False, math.inf
    try:            # the parity checks' own comparison: NaN, or an Inf on one side only, is inf
        worst = max((max_abs_error(a, shadow[name]) for name, a in primary.items()), default=0.0)
    except ValueError:                                   # a shape differs
        return False, math.inf
    if kind == "classify":
        first = next(iter(primary))
        a, b = primary[first], shadow[first]
        agree = bool(a.size == 0 or (np.argmax(a, axis=-1) == np.argmax(b, axis=-1)).all())
        return agree and math.isfinite(worst), worst
    return worst <= tolerance, worst


def compare_tokens(primary: list[list[int]], shadow: list[list[int]]) -> tuple[bool, float]:
    """(agree, share of token positions that differ) over every choice; a length mismatch differs."""
    positions = differing = 0
    for a, b in zip(primary, shadow, strict=True):
        positions += max(len(a), len(b))
        differing += sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
    share = differing / positions if positions else 0.0
    return differing == 0, share


def parity_tolerance(manifest: Manifest) -> float:
    return max((p.tolerance for p in manifest.parity), default=DEFAULT_TOLERANCE)


class ShadowTraffic:
    """One server's shadow copies: which requests to copy, the copies in flight, the metrics."""

    def __init__(self, metrics: Metrics, max_in_flight: int = 32, rng: random.Random | None = None):
        self.max_in_flight, self.rng = max_in_flight, rng or random.Random()
        self.in_flight: dict[str, int] = {}
        self.tasks: set[asyncio.Task] = set()
        self.results = metrics.shadow_results
        self.differences = metrics.shadow_differences

    def wanted(self, model: str, shadow: Shadow | None, primary_alias: str | None, primary_version: int,
               shadow_version: int | None) -> bool:
        """Copy this request? Only requests the routing sent to another version than the shadow's."""
        if shadow is None or shadow_version is None or shadow_version == primary_version:
            return False
        if primary_alias == shadow.alias:
            return False
        return shadow_sampled(shadow.percent, self.rng.random())

    def admit(self, model: str, alias: str, queue_depth: int, max_queue: int) -> bool:
        """Room for one more copy behind live work? Else it is dropped and counted."""
        if self.in_flight.get(model, 0) >= self.max_in_flight or queue_depth * 2 > max_queue:
            self.results.labels(model, alias, "dropped").inc()
            return False
        return True

    def start(self, model: str, alias: str, run: Callable[[], Awaitable[tuple[bool, float]]]) -> None:
        """Run one admitted copy as its own task: `run()` gives (agree, difference)."""
        self.in_flight[model] = self.in_flight.get(model, 0) + 1
        task = asyncio.get_running_loop().create_task(self._copy(model, alias, run))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _copy(self, model: str, alias: str, run: Callable[[], Awaitable[tuple[bool, float]]]) -> None:
        from serve.batching import Closed, QueueFull

        try:
            agree, difference = await run()
        except (QueueFull, Closed):
            self.results.labels(model, alias, "dropped").inc()
        except Exception as exc:  # noqa: BLE001 - the shadow's failure is counted, never the caller's
            log.warning("shadow copy of %s on %s failed: %s", model, alias, exc)
            self.results.labels(model, alias, "error").inc()
        else:
            self.results.labels(model, alias, "agree" if agree else "disagree").inc()
            self.differences.labels(model, alias).observe(difference if np.isfinite(difference) else 1e300)
        finally:
            self.in_flight[model] -= 1

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
