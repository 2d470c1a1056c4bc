"""The token scheduler with hand-written sampled tokens and no model (vLLM's test style)."""

from __future__ import annotations

import pytest

from serve.scheduler import FINISH_REASON, RequestStatus, TokenRequest, TokenScheduler

EOS = 0


def req(rid: str, prompt_len: int = 3, max_tokens: int = 4) -> TokenRequest:
    return TokenRequest(rid, list(range(1, prompt_len + 1)), max_tokens, frozenset({EOS}))


def step(s: TokenScheduler, tokens: dict[str, int] | int = 7):
    plan = s.schedule()
    ids = [r.request_id for r in (*plan.decode, *plan.prefill)]
    sampled = tokens if isinstance(tokens, dict) else {i: tokens for i in ids}
    return plan, s.update_from_output(plan, {i: sampled.get(i, 7) for i in ids})


def test_admission_fills_rows_and_the_rest_wait():
    s = TokenScheduler(max_rows=4, max_len=64)
    for i in range(10):
        s.add_request(req(f"r{i}"))
    plan, _ = step(s)
    assert [r.request_id for r in plan.prefill] == ["r0", "r1", "r2", "r3"]
    assert [r.row for r in plan.prefill] == [0, 1, 2, 3] and plan.decode == []
    assert s.num_running == 4 and s.num_waiting == 6
    plan, _ = step(s)
    assert [r.request_id for r in plan.decode] == ["r0", "r1", "r2", "r3"] and plan.prefill == []


def test_finished_rows_are_freed_compacted_and_refilled_between_steps():
    s = TokenScheduler(max_rows=4, max_len=64)
    for i in range(6):
        s.add_request(req(f"r{i}", max_tokens=8))
    step(s)
    _, finished = step(s, {"r1": EOS})                     # r1 samples end-of-text
    assert [r.request_id for r in finished] == ["r1"]
    assert FINISH_REASON[finished[0].status] == "stop" and finished[0].output_ids == [7]
    plan = s.schedule()
    # the last running row (r3) fills r1's hole, row 3 is reset and r4 is admitted into it
    assert plan.moves == [(3, 1)] and plan.freed_rows == [3]
    assert [(r.request_id, r.row) for r in plan.decode] == [("r0", 0), ("r3", 1), ("r2", 2)]
    assert [(r.request_id, r.row) for r in plan.prefill] == [("r4", 3)]


def test_compaction_moves_the_tail_into_holes():
    s = TokenScheduler(max_rows=4, max_len=64)
    for i in range(4):
        s.add_request(req(f"r{i}", max_tokens=8))
    step(s)
    s.finish("r0", RequestStatus.FINISHED_ABORTED)
    s.finish("r1", RequestStatus.FINISHED_ABORTED)
    plan = s.schedule()
    assert sorted(plan.moves) == [(2, 0), (3, 1)]
    assert plan.freed_rows == [2, 3]
    assert [(r.request_id, r.row) for r in plan.decode] == [("r2", 0), ("r3", 1)]


def test_length_limits_and_context_limits():
    s = TokenScheduler(max_rows=2, max_len=10)
    s.add_request(req("a", prompt_len=3, max_tokens=2))
    _, f1 = step(s)
    assert f1 == []
    _, f2 = step(s)
    assert [r.request_id for r in f2] == ["a"] and f2[0].status == RequestStatus.FINISHED_LENGTH
    assert f2[0].output_ids == [7, 7]
    with pytest.raises(ValueError, match="exceeds the context"):
        s.add_request(req("b", prompt_len=8, max_tokens=3))
    with pytest.raises(ValueError, match="empty prompt"):
        s.add_request(TokenRequest("c", [], 2))
    with pytest.raises(ValueError, match="max_tokens"):
        s.add_request(req("d", max_tokens=0))


def test_abort_of_a_waiting_request_removes_it_and_of_a_running_one_frees_its_row():
    s = TokenScheduler(max_rows=1, max_len=64)
    s.add_request(req("run", max_tokens=50))
    s.add_request(req("wait"))
    step(s)
    s.finish("wait", RequestStatus.FINISHED_ABORTED)
    assert s.num_waiting == 0
    s.finish("run", RequestStatus.FINISHED_ABORTED)
    plan = s.schedule()
    assert plan.freed_rows == [0] and plan.empty and not s.has_requests()


def test_prefill_budget_limits_admissions_per_step_but_never_starves():
    s = TokenScheduler(max_rows=8, max_len=512, max_prefill_tokens=250)
    for i in range(4):
        s.add_request(req(f"r{i}", prompt_len=100))
    plan, _ = step(s)
    assert [r.request_id for r in plan.prefill] == ["r0", "r1"]
    plan, _ = step(s)
    assert [r.request_id for r in plan.prefill] == ["r2", "r3"] and len(plan.decode) == 2
    big = TokenScheduler(max_rows=2, max_len=1024, max_prefill_tokens=10)
    big.add_request(req("long", prompt_len=500))
    assert [r.request_id for r in big.schedule().prefill] == ["long"]


def test_a_request_finished_while_its_step_ran_is_not_extended():
    s = TokenScheduler(max_rows=2, max_len=64)
    s.add_request(req("a", max_tokens=10))
    step(s)
    plan = s.schedule()
    s.finish("a", RequestStatus.FINISHED_STOPPED)          # e.g. a stop string found by the engine
    assert s.update_from_output(plan, {"a": 9}) == []
    assert s.running[0].output_ids == [7]


def test_status_ordering():
    assert not RequestStatus.RUNNING.is_finished and RequestStatus.FINISHED_LENGTH.is_finished
    assert FINISH_REASON[RequestStatus.FINISHED_LENGTH] == "length"
