"""The plan, rule by rule: when each device is due and why, what a read costs, which devices
a round takes, and whether pushes reach the devices."""

from __future__ import annotations

import math

import pytest

from exporter.histogram import Histogram
from exporter.planner import (
    ANSWER_SECONDS,
    ANSWERS_KNOWN,
    PUSH_READS,
    SWEEP_SHARE,
    Candidate,
    Due,
    PushCheck,
    Reason,
    Tracking,
    answer_wait,
    cost,
    due,
    plan,
)

NOW = 10_000.0


@pytest.mark.parametrize(
    ("tracking", "pushes_reach", "expected"),
    [
        # Never read: due at once.
        (Tracking(), True, Due(-math.inf, Reason.NEW)),
        # Checked in since the last read with actions pending: due at that check-in.
        (Tracking(read_at=9_500, checkin=9_900, checkin_read=9_000, pending=2), True,
         Due(9_900, Reason.PENDING)),
        (Tracking(read_at=9_500, checkin=9_900, checkin_read=9_000, pending=2), False,
         Due(9_900, Reason.PENDING)),
        # Checked in with nothing known pending: a hint of a new batch where pushes reach,
        # else it waits in the sweep since its last read.
        (Tracking(read_at=9_500, checkin=9_800, checkin_read=9_000), True,
         Due(9_800, Reason.CHECKIN)),
        (Tracking(read_at=9_500, checkin=9_800, checkin_read=9_000), False,
         Due(9_500, Reason.SWEEP)),
        # A check-in never seen before the last read counts as after it.
        (Tracking(read_at=9_500, checkin=9_800), True, Due(9_800, Reason.CHECKIN)),
        # Read 10 s into its session with actions pending: again once the answers are due.
        (Tracking(read_at=9_010, checkin=9_000, checkin_read=9_000, pending=1), True,
         Due(9_000 + ANSWER_SECONDS, Reason.ANSWERS)),
        # ... not before they are due, and not after a read that came late enough.
        (Tracking(read_at=NOW - 10, checkin=NOW - 20, checkin_read=NOW - 20, pending=1), False,
         Due(NOW - 10, Reason.SWEEP)),
        (Tracking(read_at=9_000 + ANSWER_SECONDS + 1, checkin=9_000, checkin_read=9_000,
                  pending=1), False, Due(9_000 + ANSWER_SECONDS + 1, Reason.SWEEP)),
        # The sweep: silent for an hour or more (or without check-in times, or where pushes
        # do not reach), due since the last read...
        (Tracking(read_at=2_000, checkin=900, checkin_read=900), True, Due(2_000, Reason.SWEEP)),
        (Tracking(read_at=9_600), True, Due(9_600, Reason.SWEEP)),
        (Tracking(read_at=2_000, checkin=9_100, checkin_read=9_100), False,
         Due(2_000, Reason.SWEEP)),
        # ... a device that checked in 15 minutes ago counts a quarter of its time unread.
        (Tracking(read_at=2_000, checkin=NOW - 900, checkin_read=NOW - 900), True,
         Due(NOW - (NOW - 2_000) / 4, Reason.SWEEP)),
    ],
)
def test_due(tracking: Tracking, pushes_reach: bool, expected: Due) -> None:
    assert due(tracking, NOW, pushes_reach=pushes_reach) == expected


@pytest.mark.parametrize(
    ("tracking", "commands", "expected"),
    [
        (Tracking(), None, 2),  # the history, and some actions most likely
        (Tracking(read_at=1, checkin=5, checkin_read=5, pending=3), None, 1),  # no news
        (Tracking(read_at=1, checkin=6, checkin_read=5, pending=3), None, 4),  # three moved
        (Tracking(read_at=1, checkin=5, checkin_read=5), ("a" * 24, "b" * 24), 2),
        (Tracking(read_at=1, dropped={"a" * 24: 0.0}), ("a" * 24, "b" * 24), 1),
    ],
)
def test_cost(tracking: Tracking, commands: tuple[str, ...] | None, expected: int) -> None:
    assert cost(tracking, commands) == expected


def candidates(reason: Reason, count: int, *, each: int = 1) -> list[Candidate]:
    return [Candidate(f"{reason.name.lower()}-{i:02}", Due(float(i), reason), each)
            for i in range(count)]


@pytest.mark.parametrize(
    ("queues", "credit", "expected"),
    [
        # Announced changes leave SWEEP_SHARE of the credit to waiting sweep devices...
        ({Reason.PENDING: 20, Reason.SWEEP: 20}, 8,
         {Reason.PENDING: 8 - int(8 * SWEEP_SHARE), Reason.SWEEP: int(8 * SWEEP_SHARE)}),
        # ... and take it all when nothing waits for the sweep.
        ({Reason.PENDING: 20}, 8, {Reason.PENDING: 8}),
        # What the sweep does not use goes back to them.
        ({Reason.PENDING: 20, Reason.SWEEP: 1}, 8, {Reason.PENDING: 7, Reason.SWEEP: 1}),
        # Never read first, then by reason: pending, answers, check-ins.
        ({Reason.NEW: 2, Reason.PENDING: 2, Reason.ANSWERS: 2, Reason.CHECKIN: 2}, 5,
         {Reason.NEW: 2, Reason.PENDING: 2, Reason.ANSWERS: 1}),
        ({Reason.SWEEP: 3}, 0, {}),
    ],
)
def test_plan_shares_the_credit(
    queues: dict[Reason, int], credit: float, expected: dict[Reason, int]
) -> None:
    pool = [c for reason, count in queues.items() for c in candidates(reason, count)]
    chosen, planned = plan(pool, credit)
    taken = {reason: sum(d.startswith(reason.name.lower()) for d in chosen) for reason in Reason}
    assert {r: n for r, n in taken.items() if n} == expected
    assert planned == len(chosen) <= credit


def test_plan_takes_each_queue_oldest_due_first() -> None:
    pool = candidates(Reason.CHECKIN, 5)[::-1] + candidates(Reason.SWEEP, 5)[::-1]
    chosen, _ = plan(pool, 4)
    assert chosen == ["checkin-00", "checkin-01", "checkin-02", "sweep-00"]


def test_a_device_that_does_not_fit_keeps_the_credit_for_itself() -> None:
    # Credit for one request: the round saves it for the unread device, which costs two,
    # rather than spend it on the cheap one behind it and keep the new one waiting.
    pool = [Candidate("new", Due(-math.inf, Reason.NEW), 2),
            Candidate("old", Due(1.0, Reason.SWEEP), 1)]
    assert plan(pool, 1) == ([], 0)
    assert plan(pool, 3) == (["new", "old"], 3)
    # The head of a queue may go past the announced share, never past the credit.
    pool = [Candidate("pending", Due(1.0, Reason.PENDING), 7), *candidates(Reason.SWEEP, 3)]
    assert plan(pool, 8) == (["pending", "sweep-00"], 8)


def test_push_check_needs_a_clear_difference_to_change_its_mind() -> None:
    check = PushCheck()
    assert check.pushes_reach
    # Sessions with nothing pending show changes as rarely as sweep reads: no news in them.
    flips = 0
    for i in range(20 * PUSH_READS):
        flips += check.record(Reason.CHECKIN, i % 10 == 0)
        flips += check.record(Reason.SWEEP, i % 10 == 0)
    assert check.pushes_reach and flips == 0  # about equal shares never flip it
    for _ in range(5 * PUSH_READS):  # pushes stop reaching: sessions show nothing
        flips += check.record(Reason.CHECKIN, False) + check.record(Reason.SWEEP, True)
    assert not check.pushes_reach and flips == 1
    for _ in range(5 * PUSH_READS):  # and come back
        flips += check.record(Reason.CHECKIN, True) + check.record(Reason.SWEEP, False)
    assert check.pushes_reach and flips == 2


def test_push_check_ignores_reads_that_test_nothing() -> None:
    check = PushCheck()
    shares = (check.checkin_share, check.sweep_share)
    for reason in (Reason.NEW, Reason.PENDING, Reason.ANSWERS):
        assert not check.record(reason, True)
    assert (check.checkin_share, check.sweep_share) == shares


def histogram(*latencies: float) -> Histogram:
    observed = Histogram((1.0, 5.0, 15.0, 60.0, 300.0))
    for seconds in latencies:
        observed.observe(seconds)
    return observed


@pytest.mark.parametrize(
    ("histograms", "expected"),
    [
        ([], ANSWER_SECONDS),  # nothing seen yet
        ([histogram(*[2.0] * (ANSWERS_KNOWN - 1))], ANSWER_SECONDS),  # too few to tell
        ([histogram(*[2.0] * 90, *[40.0] * 10)], 5.0),  # nine in ten within 5 s
        ([histogram(*[2.0] * 60), histogram(*[40.0] * 40)], 60.0),  # classes merged
        ([histogram(*[900.0] * 100)], ANSWER_SECONDS),  # never longer than the ceiling
    ],
)
def test_answer_wait(histograms: list[Histogram], expected: float) -> None:
    assert answer_wait(histograms) == expected


def test_answers_are_due_after_the_wait_given() -> None:
    read_early = Tracking(read_at=9_002, checkin=9_000, checkin_read=9_000, pending=1)
    assert due(read_early, 9_004, answer_seconds=5.0).reason == Reason.SWEEP
    assert due(read_early, 9_005, answer_seconds=5.0) == Due(9_005, Reason.ANSWERS)
