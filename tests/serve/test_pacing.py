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


def test_a_connection_refused_again_when_it_comes_back_is_told_to_wait_twice_as_long_up_to_the_cap():
    pacer = RefusalPacer(max_hold_s=1.0, max_retry_after_s=8, spread=0.0)
    assert pacer.retry_after_s(A, 0.3, now=0.0) == 1        # never refused: the queue's estimate, whole seconds
    pacer.refused(A, 1, now=0.0)
    given = []
    now = 0.0
    for _ in range(5):                                      # it honours each Retry-After (and a tenth) and is refused again
        now += pacer._held[A][2] * 1.1
        given.append(pacer.retry_after_s(A, 0.3, now=now))
        pacer.refused(A, given[-1], now=now)
    assert given == [2, 4, 8, 8, 8]
    assert pacer.retry_after_s(B, 0.3, now=now) == 1        # another connection starts from the estimate
    assert pacer.retry_after_s(A, 12.2, now=now + 1) == 13  # an estimate longer than the doubling wins
    assert pacer.retry_after_s(A, 0.3, now=now + 16.5) == 1  # back later than twice its 8 s: a new spell
    # a client that retries at once is held as before (at most max_hold_s), whatever it was told
    assert pacer.hold_s(A, now=now + 0.1) == pytest.approx(0.9)


def test_doubling_off_keeps_the_estimate_and_doubling_works_with_holding_off():
    off = RefusalPacer(max_hold_s=1.0, max_retry_after_s=1, spread=0.0)
    off.refused(A, 1, now=0.0)
    assert off.retry_after_s(A, 0.3, now=1.1) == 1
    assert off.retry_after_s(A, 2.5, now=1.1) == 3
    no_holds = RefusalPacer(max_hold_s=0.0, max_retry_after_s=4)
    no_holds.refused(A, 1, now=0.0)
    assert no_holds.hold_s(A, now=0.1) == 0.0                # never held
    assert no_holds.retry_after_s(A, 0.3, now=1.1) == 2


def test_with_doubling_a_connection_is_remembered_twice_the_cap_and_then_forgotten():
    pacer = RefusalPacer(max_hold_s=1.0, max_retry_after_s=2, spread=0.0)
    for i in range(1000):                                   # 1000 connections refused over 10 s
        pacer.refused(("10.0.0.1", i), retry_after_s=1, now=i * 0.01)
    assert 395 <= len(pacer) <= 410, len(pacer)             # the last 4 s, plus a few not yet swept
    assert pacer.retry_after_s(("10.0.0.1", 999), 0.3, now=10.0) == 2


def test_with_retry_after_replaces_or_adds_the_header():
    from serve.api.pacing import with_retry_after

    assert with_retry_after([(b"content-type", b"x"), (b"retry-after", b"1")], 4) == [
        (b"content-type", b"x"), (b"retry-after", b"4")]
    assert with_retry_after([(b"Retry-After", b"1")], 2) == [(b"Retry-After", b"2")]
    assert with_retry_after([(b"content-type", b"x")], 3) == [(b"content-type", b"x"), (b"retry-after", b"3")]
