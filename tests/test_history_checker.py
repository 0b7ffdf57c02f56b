"""The budget history checker (RELIABILITY C.24) on hand-made histories.

A checker that cannot fail proves nothing: each rule gets a history that keeps
it and one that breaks it, and a broken one must be rejected with a message
naming the operations at fault. Times are seconds on one made-up clock (wall
and monotonic alike); `p0.0/1/2` is process `p0.0`, thread 1, op 2.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from chaos._history import Event, History, HistoryError, Verdict, check, line, parse

AMOUNT = Decimal(10)


def event(
    op_id: str, kind: str, f: str, at: float, value: dict[str, Any] | None = None
) -> Event:
    """Return one event of op `process/thread/op` at time `at`."""
    process, thread, op = op_id.split("/")
    return Event(
        process=process,
        thread=int(thread),
        op=int(op),
        type=kind,  # type: ignore[arg-type]  # the tests pass valid literals
        f=f,  # type: ignore[arg-type]  # the tests pass valid literals
        value=value,
        wall=at,
        mono=at,
    )


def spend(
    op_id: str,
    cost: int,
    actual: int,
    start: float,
    end: float | None = None,
    result: str = "ok",
) -> list[Event]:
    """A spend invoked at `start`, ending `result` at `end` (None: never, its process killed)."""
    events = [
        event(
            op_id,
            "invoke",
            "spend",
            start,
            {"cost": cost, "actual": actual, "run": "r"},
        )
    ]
    if end is not None:
        events.append(event(op_id, result, "spend", end, {"status": result}))
    return events


def read(
    op_id: str, used: int, start: float, end: float, held: int = 0, holds: int = 0
) -> list[Event]:
    """A read invoked at `start` that returned `used`, `held` and `holds` at `end`."""
    seen = {"used": str(used), "held": str(held), "holds": holds}
    return [
        event(op_id, "invoke", "read", start),
        event(op_id, "ok", "read", end, seen),
    ]


def judge(
    *ops: list[Event], final: int, crashed: tuple[str, ...] = ("p9.0",)
) -> Verdict:
    """Check the history made of `ops` against a budget of `AMOUNT`."""
    history = History.of([e for op in ops for e in op], crashed=crashed)
    return check(history, amount=AMOUNT, final_used=Decimal(final))


def only_problem(verdict: Verdict) -> str:
    """Return the verdict's one problem (and fail if it has another number)."""
    assert not verdict.valid
    assert len(verdict.problems) == 1, verdict.problems
    return verdict.problems[0]


# -- valid histories -------------------------------------------------------------------


def test_sequential_spends_and_reads_that_add_up_are_valid() -> None:
    """An ok spend, a read seeing it, a refused spend and a read seeing no change are valid."""
    verdict = judge(
        spend("p0.0/0/0", 5, 4, 1, 2),
        read("p1.0/0/0", 4, 3, 4),
        spend("p0.0/0/1", 9, 9, 5, 6, result="fail"),
        read("p1.0/0/1", 4, 7, 8),
        final=4,
    )

    assert verdict.valid, verdict.problems
    assert verdict.applied == ()
    assert verdict.counts == {"spend:ok": 1, "spend:fail": 1, "read:ok": 2}


@pytest.mark.parametrize(
    ("used", "held", "holds"), [(0, 0, 0), (0, 5, 1), (4, 0, 0)], ids=str
)
def test_a_read_concurrent_with_a_spend_may_see_it_before_during_or_after(
    used: int, held: int, holds: int
) -> None:
    """A read overlapping a spend may see nothing yet, its hold, or its settlement."""
    verdict = judge(
        spend("p0.0/0/0", 5, 4, 1, 4),
        read("p1.0/0/0", used, 2, 3, held=held, holds=holds),
        final=4,
    )

    assert verdict.valid, verdict.problems


@pytest.mark.parametrize(
    ("final", "applied"),
    [
        (4, ()),
        (10, (("p9.0/0/0", "cost", Decimal(6)),)),
        (6, (("p9.0/0/0", "actual", Decimal(2)),)),
    ],
    ids=["not-applied", "lapsed-at-cost", "settled-at-actual"],
)
def test_a_killed_spend_may_have_added_nothing_its_cost_or_its_actual(
    final: int, applied: tuple[tuple[str, str, Decimal], ...]
) -> None:
    """An info spend (its process killed) explains the final counter with 0, its cost or its actual, and the verdict says which."""
    verdict = judge(
        spend("p0.0/0/0", 5, 4, 1, 2),
        spend("p9.0/0/0", 6, 2, 3),
        read("p1.0/0/0", 4, 4, 5),
        final=final,
    )

    assert verdict.valid, verdict.problems
    assert verdict.applied == applied
    assert verdict.info == 1


def test_a_settlement_above_its_estimate_may_overrun_the_amount_by_that_much() -> None:
    """A spend reserving 8 that settles at 12 leaves the counter at 12 of 10: allowed, since only that overrun went past."""
    verdict = judge(
        spend("p0.0/0/0", 8, 12, 1, 2), read("p1.0/0/0", 12, 3, 4), final=12
    )

    assert verdict.valid, verdict.problems


def test_many_killed_spends_are_explained_together() -> None:
    """Several info spends are chosen among at once: here two applied (one at cost, one at actual) and one not."""
    verdict = judge(
        spend("p9.0/0/0", 3, 1, 1),
        spend("p9.0/1/0", 4, 2, 1),
        spend("p9.0/2/0", 7, 5, 1),
        final=8,
    )

    assert verdict.valid, verdict.problems
    assert sum(n for _, _, n in verdict.applied) == 8
    assert len(verdict.applied) == 2


# -- invalid histories ---------------------------------------------------------------


def test_a_read_beyond_the_amount_is_an_overspend_naming_the_read() -> None:
    """A read seeing used 8 and held 5 of a budget of 10 is rejected as an overspend."""
    verdict = judge(
        spend("p0.0/0/0", 8, 8, 1, 2),
        spend("p0.0/1/0", 5, 5, 3, 6),
        read("p1.0/0/0", 8, 4, 5, held=5, holds=1),
        final=13,
    )

    overspends = [p for p in verdict.problems if p.startswith("overspend")]
    assert len(overspends) == 2, verdict.problems  # the read, and the final counter
    assert "p1.0/0/0" in overspends[0]
    assert "used + held = 13 > 10" in overspends[0]
    assert "final counter 13 > 10" in overspends[1]


def test_a_killed_spend_counted_twice_is_rejected_naming_it() -> None:
    """A final counter that needs an info spend's cost twice is unexplained, and the message names that spend."""
    verdict = judge(spend("p0.0/0/0", 2, 2, 1, 2), spend("p9.0/0/0", 3, 1, 3), final=8)

    problem = only_problem(verdict)
    assert problem.startswith("final counter unexplained: 8")
    assert "p9.0/0/0 (cost 3, actual 1)" in problem
    assert verdict.applied == ()


def test_a_read_missing_a_spend_completed_before_it_is_rejected() -> None:
    """A read invoked after a spend was ok, seeing none of it, is out of its interval; the message names both."""
    verdict = judge(spend("p0.0/0/0", 5, 4, 1, 2), read("p1.0/0/0", 0, 3, 4), final=4)

    problem = only_problem(verdict)
    assert problem.startswith("read out of its interval: ok read p1.0/0/0")
    assert "below 4" in problem
    assert "p0.0/0/0" in problem


def test_a_read_seeing_a_spend_invoked_after_it_is_rejected() -> None:
    """A read that completed before a spend began, yet saw it, is out of its interval."""
    verdict = judge(read("p1.0/0/0", 4, 1, 2), spend("p0.0/0/0", 5, 4, 3, 4), final=4)

    problem = only_problem(verdict)
    assert problem.startswith("read out of its interval: ok read p1.0/0/0")
    assert "above 0" in problem


def test_a_read_seeing_holds_nobody_could_have_taken_is_rejected() -> None:
    """A read seeing 3 held while no spend was in flight is out of its interval."""
    verdict = judge(
        spend("p0.0/0/0", 5, 4, 1, 2),
        read("p1.0/0/0", 4, 3, 4, held=3, holds=1),
        final=4,
    )

    problem = only_problem(verdict)
    assert "p1.0/0/0" in problem
    assert "at most 0 spends of cost 0" in problem


def test_reads_that_do_not_overlap_and_go_down_are_rejected_naming_both() -> None:
    """Two reads, each within its interval, where the later saw less than the earlier: non-monotonic."""
    verdict = judge(
        spend("p0.0/0/0", 5, 4, 1, 10),
        read("p1.0/0/0", 4, 2, 3),
        read("p2.0/0/0", 0, 4, 5),
        final=4,
    )

    problem = only_problem(verdict)
    assert problem.startswith("non-monotonic reads: ok read p1.0/0/0 (used 4")
    assert "ok read p2.0/0/0 (used 0" in problem


def test_a_final_counter_below_what_a_read_saw_is_rejected_naming_the_read() -> None:
    """The final counter, read after every op, cannot be below what a read saw."""
    verdict = judge(
        spend("p0.0/0/0", 5, 4, 1, 2),
        spend("p9.0/0/0", 3, 3, 3),
        read("p1.0/0/0", 7, 4, 5),
        final=4,
    )

    problem = only_problem(verdict)
    assert problem.startswith("non-monotonic reads: ok read p1.0/0/0 (used 7")
    assert "final counter 4" in problem


def test_a_final_counter_the_ops_do_not_add_up_to_is_rejected() -> None:
    """A final counter one more than the ok spends settled, with no info spend to explain it, is rejected."""
    verdict = judge(spend("p0.0/0/0", 5, 4, 1, 2), final=5, crashed=())

    problem = only_problem(verdict)
    assert problem.startswith("final counter unexplained: 5 is the ok spends' 4 plus 1")
    assert "(none)" in problem


def test_a_refused_spend_adds_nothing() -> None:
    """A final counter that counts a refused spend is unexplained."""
    verdict = judge(
        spend("p0.0/0/0", 5, 4, 1, 2),
        spend("p0.0/0/1", 2, 2, 3, 4, result="fail"),
        final=6,
    )

    assert only_problem(verdict).startswith("final counter unexplained: 6")


def test_ops_that_do_not_pair_up_are_problems_naming_them() -> None:
    """An op left open by a process that was not killed, an ending never invoked, and two ops of one thread overlapping are each a problem."""
    verdict = judge(
        spend("p0.0/0/0", 1, 1, 1),  # p0.0 was not killed
        [event("p0.0/1/5", "ok", "spend", 2)],
        spend("p1.0/0/0", 1, 1, 1, 4),
        spend("p1.0/0/1", 1, 1, 3, 5),
        final=2,
        crashed=(),
    )

    assert verdict.problems == (
        "op p0.0/1/5 ends (ok) but was never invoked",
        "op p0.0/0/0 never ended though process p0.0 was not killed",
        "op p1.0/0/1 began before op p1.0/0/0 of its thread ended",
    )


def test_raise_for_problems_lists_them() -> None:
    """An invalid verdict raises an AssertionError carrying its problems; a valid one does not."""
    bad = judge(spend("p0.0/0/0", 5, 4, 1, 2), final=5)
    good = judge(spend("p0.0/0/0", 5, 4, 1, 2), final=4)

    good.raise_for_problems()
    with pytest.raises(AssertionError, match="final counter unexplained"):
        bad.raise_for_problems()


# -- the history file ----------------------------------------------------------------


def test_a_history_file_drops_the_half_line_a_kill_left() -> None:
    """The last line cut short by a kill is dropped; whole lines, with or without a newline at the end, are kept."""
    first, second = spend("p0.0/0/0", 5, 4, 1, 2)
    whole = f"{line(first)}\n{line(second)}"

    assert parse(whole + "\n") == [first, second]
    assert parse(whole) == [first, second]
    assert parse(whole + "\n" + line(first)[:17]) == [first, second]


def test_a_read_without_its_counter_is_an_error() -> None:
    """An ok read whose value lacks used, held or holds is not a history."""
    events = [
        event("p1.0/0/0", "invoke", "read", 1),
        event("p1.0/0/0", "ok", "read", 2, {"used": "1"}),
    ]

    with pytest.raises(HistoryError, match=r"p1\.0/0/0: a read's ok needs used"):
        History.of(events, crashed=())


def test_a_bad_line_before_the_last_is_an_error() -> None:
    """A line that is not an event anywhere but at the end means the file is not a history."""
    first, second = spend("p0.0/0/0", 5, 4, 1, 2)

    with pytest.raises(HistoryError, match=r"h\.jsonl:1: not a history event"):
        parse(f"{line(first)[:17]}\n{line(second)}\n", source="h.jsonl")
