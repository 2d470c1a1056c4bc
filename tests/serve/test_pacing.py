"""serve.api.pacing.RefusalPacer: when a refused connection may be refused again without waiting."""

from __future__ import annotations

import pytest

from serve.api.pacing import RefusalPacer

A, B = ("127.0.0.1", 50001), ("127.0.0.1", 50002)


def test_a_connection_is_held_for_what_is_left_of_its_retry_after_capped():
    pacer = RefusalPacer(max_hold_s=1.0, spread=0.0)
    assert pacer.hold_s(A, now=10.0) == 0.0                 # never refused: answered at once
    pacer.refused(A, retry_after_s=3.0, now=10.0)
    assert pacer.hold_s(A, now=10.25) == pytest.approx(0.75)             # capped at 1 s, not Retry-After's 3 s
    assert pacer.hold_s(B, now=10.25) == 0.0                # another connection is not held
    assert pacer.hold_s(A, now=11.0) == 0.0                 # it waited: answered at once
    pacer.refused(A, retry_after_s=0.5, now=12.0)
    assert pacer.hold_s(A, now=12.1) == pytest.approx(0.4)               # a Retry-After under the cap is kept


def test_holding_off_and_unknown_clients_hold_nothing():
    off = RefusalPacer(max_hold_s=0.0)
    off.refused(A, retry_after_s=1.0, now=0.0)
    assert off.hold_s(A, now=0.1) == 0.0 and len(off) == 0
    pacer = RefusalPacer(max_hold_s=1.0, spread=0.0)
    pacer.refused(None, retry_after_s=1.0, now=0.0)         # a server that gives no client address
    assert pacer.hold_s(None, now=0.1) == 0.0 and len(pacer) == 0


def test_expired_connections_are_forgotten_so_the_table_stays_bounded():
    pacer = RefusalPacer(max_hold_s=1.0, spread=0.0)
    for i in range(1000):                                   # 1000 connections refused over 10 s
        pacer.refused(("10.0.0.1", i), retry_after_s=1.0, now=i * 0.01)
    # at 10 s only those refused in the last second can still be held (plus a few not yet swept)
    assert len(pacer) <= 110, len(pacer)
    assert pacer.hold_s(("10.0.0.1", 999), now=10.0) > 0.9
    assert pacer.hold_s(("10.0.0.1", 0), now=10.0) == 0.0


def test_holds_of_connections_refused_together_end_spread_over_the_last_fifth():
    """Refused in one instant, they must not all be answered (and retry) in one instant again."""
    pacer = RefusalPacer(max_hold_s=1.0)                    # the server's default spread
    clients = [("10.0.0.2", i) for i in range(200)]
    for client in clients:
        pacer.refused(client, retry_after_s=3.0, now=5.0)
    holds = sorted(pacer.hold_s(c, now=5.0) for c in clients)
    assert 0.8 <= holds[0] and holds[-1] <= 1.0             # within the cap, at most a fifth shorter
    assert holds[-1] - holds[0] > 0.15                      # spread, not one instant
    assert len(set(holds)) > 150
    fixed = RefusalPacer(max_hold_s=1.0, spread=0.0, draw=lambda: 1.0)
    fixed.refused(A, retry_after_s=3.0, now=0.0)
    assert fixed.hold_s(A, now=0.0) == 1.0
    half = RefusalPacer(max_hold_s=1.0, draw=lambda: 0.5)
    half.refused(A, retry_after_s=0.5, now=0.0)
    assert half.hold_s(A, now=0.0) == pytest.approx(0.45)   # a Retry-After under the cap, a tenth off


def test_refusing_says_whether_a_429_went_out_within_the_last_second_holding_or_not():
    for max_hold_s in (1.0, 0.0):                           # holding off still counts the refusal
        pacer = RefusalPacer(max_hold_s=max_hold_s)
        assert not pacer.refusing(now=100.0)
        pacer.refused(None, retry_after_s=1.0, now=100.0)   # an unknown client too
        assert pacer.refusing(now=100.5)
        assert not pacer.refusing(now=101.0)
        assert pacer.refusing(within_s=2.0, now=101.0)
