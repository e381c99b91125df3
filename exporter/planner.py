"""The budget strategy's plan: which devices a round reads, as one pure policy.

Only a device's check-in (an OMA-DM session) changes an action, and the device list says
when each device last checked in. So every watched device is *due* at some moment, for a
reason:

- ``new``: never read; due at once (nothing of it is known);
- ``pending``: it checked in since its last read and had actions pending, which its session
  certainly moved; due from the first check-in after that read (checking in again while it
  waits does not send it to the back of the queue);
- ``answers``: the last read came while its session was still answering and left actions
  pending; due again soon, each look half as long again after the check-in as the one
  before, until as long as nine answers in ten took (:func:`answer_wait`, at most
  ``ANSWER_SECONDS``);
- ``checkin``: it checked in since its last read with nothing known pending; due from that
  check-in, likewise. A session is the only moment a device answers, so a batch the
  exporter has not seen yet shows its answers only in a read after one; and creating a
  batch pushes its device into a session, so such a session most likely ran a new batch;
- ``sweep``: nothing announced a change. Only the sweep finds what no check-in announces: a
  batch whose push did not reach its device (pending until the device's next session), an
  administrator's cancel. A device silent for ``SILENCE_HORIZON`` is due since its last
  read; one that checked in more recently counts its time unread only in the proportion it
  has been silent (its next session, read as a check-in, would show a new batch anyway).

A round takes, while its credit lasts, the new devices, then the pending ones, then answers
and check-ins together, oldest due first (a look for answers ``ANSWER_LEAD_ROUNDS`` ahead),
keeping at least ``SWEEP_SHARE`` of the credit for the sweep while sweep devices wait.
Everything here is a function of its arguments.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from exporter.histogram import Histogram

# The constants, and what each trades:
# Reading a device soon after its check-in may find its answers still on their way (a session
# goes on after lastStatusReportTime moves): it is looked at again ANSWER_FIRST after the
# check-in, then each time ANSWER_GROWTH times as long after it, the last look as long after
# the check-in as nine answers in ten took (ANSWER_QUANTILE of receivedAt - sentAt, once
# ANSWERS_KNOWN were seen), at most ANSWER_SECONDS. Answers take seconds but spread far: one
# wait long enough for most of them would hold back the quick ones, while growing looks show
# each answer within half its own delay, for at most a dozen looks per session (six when nine
# answers in ten come within 15 s). A larger growth spends fewer looks; a smaller one shows
# answers sooner.
ANSWER_FIRST = 2.0
ANSWER_GROWTH = 1.5
ANSWER_SECONDS = 150.0
ANSWER_QUANTILE = 0.9
ANSWERS_KNOWN = 50
# Of each round's credit, this much at least goes to the sweep while sweep devices wait. More
# finds unannounced batches and cancels sooner; less reads check-ins sooner on a tight budget.
SWEEP_SHARE = 0.25
# Silent this long, a device's whole time unread counts for the sweep; one that checked in
# more recently counts it in proportion. Longer favours silent devices (where unannounced
# batches wait) more; shorter sweeps every device alike.
SILENCE_HORIZON = 3600.0
# A look for answers ranks as though due this many rounds before a check-in: the look
# finishes a batch already known, while most check-ins show nothing new. More holds the
# check-ins back where sessions come faster than the budget reads them (and a batch no read
# had shown waits longest); less delays the answers of known batches during a rollout.
ANSWER_LEAD_ROUNDS = 2.0
# Unspent credit carries over up to this many rounds' worth. More absorbs bursts of check-ins;
# less keeps the request rate flat (the budget is per hour, bursts count too).
CREDIT_ROUNDS = 2.0


class Reason(IntEnum):
    """Why a device is due (:func:`queue_order` says in which order a round takes them)."""

    NEW = 0
    PENDING = 1
    ANSWERS = 2
    CHECKIN = 3
    SWEEP = 4


@dataclass(slots=True)
class Tracking:
    """What the plan knows of one watched device."""

    read_at: float | None = None  # scheduler clock at the start of the last complete read
    checkin: float | None = None  # newest lastStatusReportTime seen (upstream's clock)
    checkin_read: float | None = None  # ``checkin`` as known when the last read started
    first_unread: float | None = None  # the first check-in seen after the last read
    pending: int = 0  # batches with pending actions at the last read
    # Pending batches whose actions were read: their summary then. Finished ones need no
    # entry (the state knows they cannot change), so this stays small.
    summaries: dict[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)
    # Configured batches that answered 404, and when (scheduler clock): asked again later.
    dropped: dict[str, float] = field(default_factory=dict)

    @property
    def checked_in(self) -> bool:
        """A check-in happened after the last read (so something may have changed)."""
        if self.checkin is None or self.read_at is None:
            return False
        return self.checkin_read is None or self.checkin > self.checkin_read

    @property
    def waiting_since(self) -> float | None:
        """The check-in the device has been due from since its last read: the first one
        seen after it, so that a device which checks in again while it waits keeps its place
        in the queue instead of going to its back."""
        if not self.checked_in:
            return None
        first = self.first_unread
        if first is None or (self.checkin_read is not None and first <= self.checkin_read):
            return self.checkin
        return first

    def saw_checkin(self, moment: float) -> None:
        """A check-in time the device list showed."""
        if self.checkin is not None and moment <= self.checkin:
            return
        if not self.checked_in:
            self.first_unread = moment
        self.checkin = moment


@dataclass(frozen=True, slots=True)
class Due:
    at: float
    reason: Reason


def due(
    tracking: Tracking,
    now: float,
    *,
    answer_seconds: float = ANSWER_SECONDS,
) -> Due:
    """When the device should next be read, and why (see the module's docstring)."""
    if tracking.read_at is None:
        return Due(-math.inf, Reason.NEW)
    if (since := tracking.waiting_since) is not None:
        return Due(since, Reason.PENDING if tracking.pending else Reason.CHECKIN)
    if (look := answers_look(tracking, answer_seconds)) is not None and look <= now:
        return Due(look, Reason.ANSWERS)
    if tracking.checkin is None:
        return Due(tracking.read_at, Reason.SWEEP)
    silent = min(1.0, max(0.0, now - tracking.checkin) / SILENCE_HORIZON)
    return Due(now - (now - tracking.read_at) * silent, Reason.SWEEP)


def answers_look(tracking: Tracking, answer_seconds: float = ANSWER_SECONDS) -> float | None:
    """When to look again for the answers of the device's last session: ANSWER_GROWTH times
    as long after the check-in as the last read came (ANSWER_FIRST at least),
    ``answer_seconds`` at most; None once a read came that late, or when no action was left
    pending."""
    if not tracking.pending or tracking.checkin is None or tracking.read_at is None:
        return None
    since = tracking.read_at - tracking.checkin
    if since >= answer_seconds:
        return None
    return tracking.checkin + min(answer_seconds, max(ANSWER_FIRST, ANSWER_GROWTH * since))


def answer_wait(latencies: Iterable[Histogram]) -> float:
    """How long after a session its answers are due: the latency bucket bound under which
    ANSWER_QUANTILE of the answers seen came, at most ANSWER_SECONDS (and that until
    ANSWERS_KNOWN answers were seen)."""
    merged: list[int] | None = None
    bounds: tuple[float, ...] = ()
    for histogram in latencies:
        counts = histogram.cumulative()
        merged = counts if merged is None else [a + b for a, b in zip(merged, counts, strict=True)]
        bounds = histogram.buckets
    if merged is None or merged[-1] < ANSWERS_KNOWN:
        return ANSWER_SECONDS
    wanted = ANSWER_QUANTILE * merged[-1]
    for bound, count in zip(bounds, merged, strict=False):
        if count >= wanted:
            return min(bound, ANSWER_SECONDS)
    return ANSWER_SECONDS


def cost(tracking: Tracking, commands: Sequence[str] | None) -> int:
    """Requests one read of the device is expected to take: its batches (the history, or
    each configured batch still served), plus the actions of pending batches after a check-in
    (their actions moved), plus one for a device never read (some actions, most likely)."""
    reads = 1 if commands is None else max(1, len(commands) - len(tracking.dropped))
    if tracking.read_at is None:
        return reads + 1
    return reads + (tracking.pending if tracking.checked_in else 0)


@dataclass(frozen=True, slots=True)
class Candidate:
    device: str
    due: Due
    cost: int


def plan(
    candidates: Iterable[Candidate], credit: float, round_seconds: float
) -> tuple[list[str], int]:
    """The devices a round reads, in order, and the requests they are expected to cost.

    Devices never read go first; then announced changes (:func:`queue_order`), leaving
    ``SWEEP_SHARE`` of the credit to the sweep while sweep devices wait; then the sweep; then
    announced changes again with what the sweep left. When the head of a queue does not fit
    in the credit, the round ends there: the credit saved is that device's next round
    (cheaper devices behind it must not keep it waiting for ever).
    """
    lead = ANSWER_LEAD_ROUNDS * round_seconds
    ordered = sorted(candidates, key=lambda c: queue_order(c, lead))
    new = [c for c in ordered if c.due.reason == Reason.NEW]
    announced = [c for c in ordered if Reason.NEW < c.due.reason < Reason.SWEEP]
    sweep = [c for c in ordered if c.due.reason == Reason.SWEEP]
    taken: list[Candidate] = []
    share = credit * (1 - SWEEP_SHARE) if sweep else credit
    # ``all`` stops at the first queue whose head did not fit.
    all(_take(queue, taken, limit, credit) for queue, limit in (
        (new, credit), (announced, share), (sweep, credit), (announced, credit)))
    return [c.device for c in taken], sum(c.cost for c in taken)


def queue_order(candidate: Candidate, lead: float) -> tuple[bool, float, Reason, str]:
    """The order of a queue: pending devices that checked in first (their session certainly
    moved an action); then looks for answers and check-ins by due time, a look ranking
    ``lead`` seconds earlier than it is due. Looks do not simply go first: where sessions
    come faster than the budget reads them, that kept every check-in behind an endless
    stream of looks, and the batches no read had shown yet waited longest."""
    due = candidate.due
    at = due.at - lead if due.reason == Reason.ANSWERS else due.at
    return (due.reason != Reason.PENDING, at, due.reason, candidate.device)


def _take(queue: list[Candidate], taken: list[Candidate], limit: float, credit: float) -> bool:
    """Move candidates from the head of ``queue`` to ``taken`` while the total stays within
    ``limit`` (the head may go up to ``credit``); False when the head did not fit."""
    spent = sum(c.cost for c in taken)
    moved = 0
    for candidate in queue:
        if spent + candidate.cost > (credit if moved == 0 else limit):
            break
        taken.append(candidate)
        spent += candidate.cost
        moved += 1
    head_fitted = moved > 0 or not queue
    del queue[:moved]
    return head_fitted
