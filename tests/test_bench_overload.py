"""bench/overload.py's judging of several rounds: each level's numbers are the medians over the
rounds, and the issue's targets are judged on those."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from overload import Level, median_levels, targets  # noqa: E402


def level(clients: str, concurrency: int, goodput: float, p99: float, ready_p99: float = 20.0,
          served: int = 0, errors: list[str] | None = None) -> Level:
    return Level(clients=clients, concurrency=concurrency, seconds=12.0, ok=int(goodput * 12), goodput_rps=goodput,
                 p50_ms=p99 / 2, p99_ms=p99, refused=100, clients_served=served, other={}, ready_p50_ms=5.0,
                 ready_p99_ms=ready_p99, ready_max_ms=ready_p99 * 2, ready_not_200=0, short_answers=0,
                 server_cpu_cores=1.5, loop_cpu_cores=1.0, client_cpu_cores=0.2, other_load_cores=0.0,
                 errors=errors or [])


def rounds(after_goodputs: list[float]) -> list[Level]:
    out = []
    for i, after in enumerate(after_goodputs):
        out += [level("plain", 32, 1800.0 + i, 30.0), level("plain", 64, 2000.0 + 10 * i, 40.0),
                level("retry at once", 1024, 1800.0, 90.0, served=900 + i, errors=[f"round {i}"]),
                level("retry after", 1024, after, 80.0, ready_p99=[20.0, 90.0, 30.0][i], served=800)]
    return out


def test_each_level_is_the_median_of_its_rounds_in_first_run_order():
    medians = median_levels(rounds([1700.0, 1950.0, 2000.0]))
    assert [(lv.clients, lv.concurrency) for lv in medians] == [
        ("plain", 32), ("plain", 64), ("retry at once", 1024), ("retry after", 1024)]
    plain64, at_once, after = medians[1], medians[2], medians[3]
    assert plain64.goodput_rps == 2010.0                       # of 2000, 2010, 2020
    assert after.goodput_rps == 1950.0 and after.ok == 1950 * 12
    assert after.ready_p99_ms == 30.0                          # one slow round does not decide it
    assert at_once.clients_served == 901 and isinstance(at_once.clients_served, int)
    assert at_once.errors == ["round 0", "round 1", "round 2"]


def test_targets_are_judged_on_the_medians_so_one_bad_round_neither_fails_nor_passes_them():
    one_low = {what: met for what, _, _, met in targets(median_levels(rounds([1500.0, 1950.0, 1980.0])))}
    assert one_low["goodput, retry after, 1024 / peak"]        # 1950 / 2010 = 0.97
    one_high = {what: met for what, _, _, met in targets(median_levels(rounds([2100.0, 1700.0, 1800.0])))}
    assert not one_high["goodput, retry after, 1024 / peak"]   # 1800 / 2010 = 0.90
    assert one_high["readiness p99 ms, worst level"]           # median 30 ms, not the round's 90
