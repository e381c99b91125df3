"""The plan, rule by rule: when each device is due and why, when a session's answers are
looked for, what a read costs, and which devices a round takes."""

from __future__ import annotations

import math
from typing import Any

import pytest
from scripted import START, Upstream, actions, batch_id, device_id, iso

from exporter.histogram import Histogram
from exporter.planner import (
    ANSWER_FIRST,
    ANSWER_GROWTH,
    ANSWER_LEAD_ROUNDS,
    ANSWER_SECONDS,
    ANSWERS_KNOWN,
    SWEEP_SHARE,
    Candidate,
    Due,
    Reason,
    Tracking,
    answer_wait,
    answers_look,
    cost,
    due,
    plan,
    queue_order,
)

NOW = 10_000.0
ROUND = 2.0  # poll.interval_seconds


@pytest.mark.parametrize(
    ("tracking", "expected"),
    [
        # Never read: due at once.
        (Tracking(), Due(-math.inf, Reason.NEW)),
        # Checked in since the last read with actions pending: due at that check-in.
        (Tracking(read_at=9_500, checkin=9_900, checkin_read=9_000, pending=2),
         Due(9_900, Reason.PENDING)),
        # Checked in with nothing known pending: due at that check-in too (its session may
        # have answered a batch not seen yet, or been pushed by a new one).
        (Tracking(read_at=9_500, checkin=9_800, checkin_read=9_000), Due(9_800, Reason.CHECKIN)),
        # A check-in never seen before the last read counts as after it.
        (Tracking(read_at=9_500, checkin=9_800), Due(9_800, Reason.CHECKIN)),
        # Read 10 s into its session with actions pending: looked at again at 15 s.
        (Tracking(read_at=9_010, checkin=9_000, checkin_read=9_000, pending=1),
         Due(9_000 + 10 * ANSWER_GROWTH, Reason.ANSWERS)),
        # ... not before that look is due, and not after a read that came late enough.
        # (The sweep then counts its time unread in the proportion it has been silent.)
        (Tracking(read_at=NOW - 2, checkin=NOW - 10, checkin_read=NOW - 10, pending=1),
         Due(NOW - 2 * 10 / 3600, Reason.SWEEP)),
        (Tracking(read_at=9_000 + ANSWER_SECONDS + 1, checkin=9_000, checkin_read=9_000,
                  pending=1), Due(NOW - (NOW - 9_151) * 1_000 / 3600, Reason.SWEEP)),
        # The sweep: silent for an hour or more (or without check-in times), due since the
        # last read...
        (Tracking(read_at=2_000, checkin=900, checkin_read=900), Due(2_000, Reason.SWEEP)),
        (Tracking(read_at=9_600), Due(9_600, Reason.SWEEP)),
        # ... a device that checked in 15 minutes ago counts a quarter of its time unread.
        (Tracking(read_at=2_000, checkin=NOW - 900, checkin_read=NOW - 900),
         Due(NOW - (NOW - 2_000) / 4, Reason.SWEEP)),
    ],
)
def test_due(tracking: Tracking, expected: Due) -> None:
    assert due(tracking, NOW) == expected


def test_a_device_that_checks_in_again_while_it_waits_keeps_its_place() -> None:
    tracking = Tracking(read_at=9_000, checkin=8_990, checkin_read=8_990)
    assert tracking.waiting_since is None  # read since its last check-in
    tracking.saw_checkin(9_100)
    tracking.saw_checkin(9_400)  # again, before it was read
    tracking.saw_checkin(9_300)  # an older time from a stale page changes nothing
    assert tracking.checkin == 9_400
    assert due(tracking, NOW) == Due(9_100, Reason.CHECKIN)
    # Once read, the next check-in is the first again.
    tracking.read_at, tracking.checkin_read = 9_500, tracking.checkin
    tracking.saw_checkin(9_700)
    assert due(tracking, NOW) == Due(9_700, Reason.CHECKIN)


def session(read_after: float, *, pending: int = 1) -> Tracking:
    """A device read ``read_after`` seconds after its check-in at 9,000."""
    return Tracking(read_at=9_000 + read_after, checkin=9_000, checkin_read=9_000,
                    pending=pending)


@pytest.mark.parametrize(
    ("tracking", "wait", "expected"),
    [
        # Read at once: the first look ANSWER_FIRST after the check-in.
        (session(0.5), 60.0, 9_000 + ANSWER_FIRST),
        # Each look ANSWER_GROWTH times as long after the check-in as the read before it...
        (session(8.0), 60.0, 9_000 + 8 * ANSWER_GROWTH),
        # ... the last as long after it as the wait given, and none after that.
        (session(50.0), 60.0, 9_060.0),
        (session(60.0), 60.0, None),
        # Nothing left pending, nothing to look for.
        (session(0.5, pending=0), 60.0, None),
        (Tracking(read_at=9_000, pending=1), 60.0, None),  # no check-in known
    ],
)
def test_answers_are_looked_for_at_growing_intervals(
    tracking: Tracking, wait: float, expected: float | None
) -> None:
    assert answers_look(tracking, wait) == expected


def test_looks_for_answers_are_few_even_when_an_answer_never_comes() -> None:
    looks, tracking = 0, session(0.5)
    while (look := answers_look(tracking, ANSWER_SECONDS)) is not None:
        tracking, looks = session(look - 9_000), looks + 1
    assert looks <= 12


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
        # Never read first, then pending; answers and check-ins by due time, a look
        # ROUND * ANSWER_LEAD_ROUNDS ahead (the reason breaks ties).
        ({Reason.NEW: 2, Reason.PENDING: 2, Reason.ANSWERS: 2, Reason.CHECKIN: 2}, 5,
         {Reason.NEW: 2, Reason.PENDING: 2, Reason.ANSWERS: 1}),
        ({Reason.SWEEP: 3}, 0, {}),
    ],
)
def test_plan_shares_the_credit(
    queues: dict[Reason, int], credit: float, expected: dict[Reason, int]
) -> None:
    pool = [c for reason, count in queues.items() for c in candidates(reason, count)]
    chosen, planned = plan(pool, credit, ROUND)
    taken = {reason: sum(d.startswith(reason.name.lower()) for d in chosen) for reason in Reason}
    assert {r: n for r, n in taken.items() if n} == expected
    assert planned == len(chosen) <= credit


def test_plan_takes_each_queue_oldest_due_first() -> None:
    pool = candidates(Reason.CHECKIN, 5)[::-1] + candidates(Reason.SWEEP, 5)[::-1]
    chosen, _ = plan(pool, 4, ROUND)
    assert chosen == ["checkin-00", "checkin-01", "checkin-02", "sweep-00"]


@pytest.mark.parametrize(
    ("pool", "lead", "expected"),
    [
        # A pending device that checked in goes first, however recent its check-in...
        ([(Reason.CHECKIN, 1.0), (Reason.PENDING, 9.0)], 4.0, ["pending", "checkin"]),
        # ... while looks for answers and check-ins go by due time, a look ``lead`` ahead.
        ([(Reason.ANSWERS, 5.0), (Reason.CHECKIN, 3.0)], 0.0, ["checkin", "answers"]),
        ([(Reason.ANSWERS, 5.0), (Reason.CHECKIN, 3.0)], 4.0, ["answers", "checkin"]),
        ([(Reason.ANSWERS, 8.0), (Reason.CHECKIN, 3.0)], 4.0, ["checkin", "answers"]),
        # Ranking at the same moment: by reason.
        ([(Reason.CHECKIN, 4.0), (Reason.ANSWERS, 4.0)], 0.0, ["answers", "checkin"]),
    ],
)
def test_queue_order(pool: list[tuple[Reason, float]], lead: float, expected: list[str]) -> None:
    queue = [Candidate(reason.name.lower(), Due(at, reason), 1) for reason, at in pool]
    assert [c.device for c in sorted(queue, key=lambda c: queue_order(c, lead))] == expected


def test_looks_for_answers_never_starve_an_older_check_in() -> None:
    # Sessions come faster than the credit reads them: every round brings 12 looks for
    # answers and pays for 8. A check-in due at 10 s is read as soon as the looks ranking
    # before it (due ANSWER_LEAD_ROUNDS later at most) are paid for, however many come after.
    credit, per_round, waiting_since = 8, 12, 10.0
    pool = [Candidate("checkin", Due(waiting_since, Reason.CHECKIN), 1)]
    read_in = None
    for number in range(30):
        now = ROUND * number
        pool += [Candidate(f"look-{now}-{i}", Due(now, Reason.ANSWERS), 1)
                 for i in range(per_round)]
        chosen, _ = plan(pool, credit, ROUND)
        if "checkin" in chosen:
            read_in = number
            break
        pool = [c for c in pool if c.device not in chosen]
    ranking_before = waiting_since + ANSWER_LEAD_ROUNDS * ROUND
    looks_before = per_round * (int(ranking_before / ROUND) + 1)
    assert read_in == math.ceil((looks_before + 1) / credit) - 1


def test_a_device_that_does_not_fit_keeps_the_credit_for_itself() -> None:
    # Credit for one request: the round saves it for the unread device, which costs two,
    # rather than spend it on the cheap one behind it and keep the new one waiting.
    pool = [Candidate("new", Due(-math.inf, Reason.NEW), 2),
            Candidate("old", Due(1.0, Reason.SWEEP), 1)]
    assert plan(pool, 1, ROUND) == ([], 0)
    assert plan(pool, 3, ROUND) == (["new", "old"], 3)
    # The head of a queue may go past the announced share, never past the credit.
    pool = [Candidate("pending", Due(1.0, Reason.PENDING), 7), *candidates(Reason.SWEEP, 3)]
    assert plan(pool, 8, ROUND) == (["pending", "sweep-00"], 8)


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


def test_answers_are_due_at_their_look_and_no_later_than_the_wait_given() -> None:
    read = session(4.0)  # the next look would be at 6 s; the wait given ends it at 5 s
    assert due(read, 9_004.9, answer_seconds=5.0).reason == Reason.SWEEP
    assert due(read, 9_005, answer_seconds=5.0) == Due(9_005, Reason.ANSWERS)
    assert due(session(5.0), 9_100, answer_seconds=5.0).reason == Reason.SWEEP


# --- the plan over HTTP: a session's answers, looked for as they come --------------------


async def test_late_answers_show_within_half_their_delay_without_reading_every_round(
    make_rig: Any,
) -> None:
    # 60 quiet devices and credit for about four requests a round (one of them the check-in
    # look): the sweep alone comes back to a device about every 25 rounds.
    upstream = Upstream()
    quiet = START - 3600
    upstream.devices = [{"id": device_id(n), "lastStatusReportTime": iso(quiet)}
                        for n in range(60)]
    rig = await make_rig(upstream, devices=[], discovery={"devices": {}}, budget_on_clock=True,
                         api={"requests_per_hour": 4 * 3600}, poll={"interval_seconds": 1})
    for _ in range(60):
        await rig.poll(advance=1.0)
    assert rig.exporter.scheduler.ready
    # One device checks in with a new batch of three actions, which it answers 1.5 s, 6 s
    # and 20 s after its check-in (the list shows the check-in at once, newest first).
    device, batch, session = device_id(0), batch_id(1), rig.clock[0]
    answers = {"a-0": 1.5, "a-1": 6.0, "a-2": 20.0}
    upstream.add(device, batch, actions(3, "Awaiting", at=session), created=session - 5)
    upstream.devices[0]["lastStatusReportTime"] = iso(session)
    shown: dict[str, float] = {}
    reads = upstream.history_reads[device]
    while len(shown) < 3 and rig.clock[0] < session + 60:
        now = rig.clock[0]
        upstream.actions[batch] = [
            {"cmdId": cmd, "status": "Success" if now >= session + delay else "Awaiting",
             "sentAt": iso(session), **({"receivedAt": iso(session + delay)}
                                        if now >= session + delay else {})}
            for cmd, delay in answers.items()
        ]
        await rig.poll(advance=1.0)
        views = rig.exporter.state.device_view(device).batches
        succeeded = sum(n for view in views if view.id == batch
                        for status, _, n in view.counts if status == "Success")
        for cmd in list(answers)[:succeeded]:  # answers come in the order of their delays
            shown.setdefault(cmd, rig.clock[0] - session - answers[cmd])
    # Each answer shows within half its delay (ANSWER_FIRST at least) and one round.
    assert shown.keys() == answers.keys()
    for cmd, late in shown.items():
        assert late <= max(ANSWER_FIRST, answers[cmd] * (ANSWER_GROWTH - 1)) + 1.0, (cmd, late)
    # ... for a few reads of the device, not one every round.
    assert upstream.history_reads[device] - reads <= 8 < rig.clock[0] - session
