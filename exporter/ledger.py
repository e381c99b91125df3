"""The ledger: per action, what it has entered. The single source of exactly-once truth.

Keyed by (device, batch, cmdId), each action holds one ``ActionRecord``: the statuses it has
entered, the furthest rank it reached, whether its ``receivedAt`` was seen, and the
parse-problem kinds counted for it. Records are interned (a few dozen distinct ones in
practice), so each action costs a pointer. The ledger does not depend on what the latest
response lists: a batch that answers 404, leaves the history window or is briefly listed
short keeps its entries, so its actions never count again. Entries are pruned only by age.

Counting rules (docs/design.md, "Exactly-once rules"):

- each status counts at most once per action, ever; a status already entered counts
  nothing, whatever came between;
- a step back (a status before the furthest rank reached, e.g. ``Pending`` after an answer)
  is a stale read and counts nothing;
- statuses skipped between two reads are filled in when their evidence is there
  (``Awaiting`` when ``sentAt`` is set);
- at first sight a status counts only when its own timestamp is after the device's
  threshold (its watermark; for a batch no newer than one pruned since, also past that
  entry's last sight): history is never counted. Seen before, a new status counts unless its
  own timestamp puts it before the threshold;
- the latency ``receivedAt - sentAt`` once per action, when ``receivedAt`` first appears;
- an action's setting result once, when it first reaches a final status and that status
  counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from exporter.counters import FleetCounters
from exporter.records import FUTURE_SLACK_SECONDS, NO_PROBLEMS, Action, Batch
from exporter.statuses import Rank, StatusTable

PENDING, AWAITING = "Pending", "Awaiting"
# A ledger entry outlives discovery.batches.max_age by this much (clock skew, late pages).
LEDGER_MARGIN_SECONDS = 86400.0
# The share of the retention period by which a stored seen_at may lag the true one; the
# store adds it back on load, so an entry is pruned that much later, never earlier.
SEEN_AT_STEP = 1 / 1000
# Distinct records shared between actions (a few dozen in practice): each action then
# holds a pointer, not a record of its own. Bounded against a pathological upstream.
_MAX_SHARED_RECORDS = 1 << 14


def ledger_retention(max_age_seconds: float) -> float:
    """How long the ledger remembers a batch no response has shown: as long as discovery may
    list it again, and a margin more."""
    return max_age_seconds + LEDGER_MARGIN_SECONDS


class ActionRecord(NamedTuple):
    """What one action has entered, as far as this ledger knows."""

    entered: frozenset[str] = frozenset()  # statuses entered (names as upstream spells them)
    reached: Rank = Rank.PENDING  # the furthest rank entered
    received: bool = False  # its receivedAt was seen (its latency is settled)
    problems: frozenset[str] = NO_PROBLEMS  # parse-problem kinds counted for it


NEW_ACTION = ActionRecord()


@dataclass(slots=True)
class LedgerEntry:
    """The ledger of one batch: what its actions entered, whatever the latest list says."""

    seen_at: float  # upstream clock, last time a response showed the batch
    created_at: float | None = None
    problems: frozenset[str] = NO_PROBLEMS  # problem kinds of the batch document counted
    # cmdId -> record; replaced, never changed in place (the store encodes it off the loop)
    actions: dict[str, ActionRecord] = field(default_factory=dict)
    # seen_at as the store last took it: a read that only moves seen_at is saved once per
    # SEEN_AT_STEP of retention, not on every round.
    stored_seen_at: float = -math.inf


class Floor(NamedTuple):
    """What pruning left of a device's forgotten entries: a first sight of a batch created
    no later than ``newest_created`` (it may be one of them, come back) counts only statuses
    after ``counted_until``."""

    newest_created: float
    counted_until: float


class Ledger:
    def __init__(
        self,
        statuses: StatusTable,
        counters: FleetCounters,
        count_problem: Callable[[str], None],
        retention_seconds: float,
    ) -> None:
        self.statuses = statuses
        self.counters = counters
        self.retention_seconds = retention_seconds
        self._count_problem = count_problem
        # device -> batch -> entry; survives unwatch and whatever the view drops.
        self._entries: dict[str, dict[str, LedgerEntry]] = {}
        self._floors: dict[str, Floor] = {}
        self._pruned_at: float | None = None
        self._shared: dict[ActionRecord, ActionRecord] = {}
        # (device, batch) entries changed since the store last took them; None while no
        # store keeps this ledger (nothing would take them: they must not pile up).
        self.changed: set[tuple[str, str]] | None = None

    # --- bookkeeping -------------------------------------------------------------------------

    def share(self, record: ActionRecord) -> ActionRecord:
        shared = self._shared.get(record)
        if shared is not None:
            return shared
        if len(self._shared) < _MAX_SHARED_RECORDS:
            self._shared[record] = record
        return record

    def count_problems(self, kinds: frozenset[str], already: frozenset[str]) -> frozenset[str]:
        """Count the kinds not counted before; returns the kinds now counted."""
        fresh = kinds - already
        for kind in sorted(fresh):
            self._count_problem(kind)
        return already | fresh if fresh else already

    def threshold(self, device: str, watermark: float, created_at: float | None) -> float:
        """Statuses seen at first sight count only when their timestamps are after this."""
        floor = self._floors.get(device)
        if floor is None:
            return watermark
        if created_at is not None and created_at > floor.newest_created:
            return watermark  # newer than anything forgotten: cannot be one of them
        return max(watermark, floor.counted_until)

    def entry(self, device: str, batch: Batch, now: float) -> LedgerEntry:
        """The ledger entry of ``batch``, created on first sight; its problems counted once."""
        batches = self._entries.setdefault(device, {})
        entry = batches.get(batch.id)
        if entry is None:
            entry = batches[batch.id] = LedgerEntry(seen_at=now, created_at=batch.created_at)
        else:
            entry.seen_at = now
            if batch.created_at is not None and batch.created_at != entry.created_at:
                entry.created_at = batch.created_at
                entry.stored_seen_at = -math.inf
        if batch.problems:
            problems = self.count_problems(batch.problems, entry.problems)
            if problems is not entry.problems:
                entry.problems, entry.stored_seen_at = problems, -math.inf
        changed = self.changed
        step = self.retention_seconds * SEEN_AT_STEP
        if changed is not None and now - entry.stored_seen_at > step:
            changed.add((device, batch.id))
        return entry

    # --- counting ----------------------------------------------------------------------------

    def record(
        self, key: tuple[str, str], entry: LedgerEntry, threshold: float,
        created_at: float | None, actions: Sequence[Action],
    ) -> None:
        """Enter each listed action (one copy each) in the ledger, counting what it entered
        for the first time."""
        records = entry.actions
        changed = False
        for action in actions:
            cmd = action.cmd_id
            status = self.statuses.intern(action.status)
            previous = records.get(cmd)
            if previous is None:
                self.counters.setting_counts(action)
                record = self._first_sight(threshold, created_at, status, action)
            else:
                record = self._seen_again(previous, threshold, created_at, status, action)
            if record is not previous:
                if not changed:
                    # Copied, not changed in place: the store may be encoding the dict it
                    # took at the last commit on its own thread.
                    records, changed = dict(records), True
                records[cmd] = self.share(record)
        if changed:
            entry.actions = records
            if self.changed is not None:
                self.changed.add(key)

    def _path(self, entered: frozenset[str], status: int, action: Action) -> list[str]:
        """Statuses the action entered to reach ``status`` that it lacks, in order."""
        name = self.statuses.names[status]
        path = [PENDING]
        if self.statuses.ranks[status] >= Rank.AWAITING and (
            name == AWAITING or action.sent_at is not None
        ):
            path.append(AWAITING)
        if name not in (PENDING, AWAITING):
            path.append(name)
        return [s for s in path if s not in entered]

    def _first_sight(
        self, threshold: float, created_at: float | None, status: int, action: Action
    ) -> ActionRecord:
        path = self._path(frozenset(), status, action)
        for name in path:
            moment = self._moment(name, created_at, action)
            if moment is not None and moment > threshold:
                self.counters.entered(self.statuses.intern(name), action, first_final=True)
        received = action.received_at is not None
        if received and action.received_at > threshold:  # type: ignore[operator]
            self.counters.latency_observed(status, action)
        return ActionRecord(
            entered=frozenset(path),
            reached=self.statuses.ranks[status],
            received=received,
            problems=self.count_problems(action.problems, NO_PROBLEMS),
        )

    def _seen_again(
        self,
        previous: ActionRecord,
        threshold: float,
        created_at: float | None,
        status: int,
        action: Action,
    ) -> ActionRecord:
        problems = self.count_problems(action.problems, previous.problems)
        record = previous if problems is previous.problems else previous._replace(
            problems=problems
        )
        rank = self.statuses.ranks[status]
        if rank < previous.reached:
            return record  # a stale read: behind what this action already reached
        path = self._path(previous.entered, status, action)
        for name in path:
            # Seen before, a new status came after that sight, unless its own timestamp says
            # otherwise (the sight was a lagging replica's view of the time before watching).
            moment = self._moment(name, created_at, action)
            if moment is None or moment > threshold:
                self.counters.entered(
                    self.statuses.intern(name), action,
                    first_final=previous.reached < Rank.FINAL,
                )
        if path or rank > previous.reached:
            record = record._replace(
                entered=previous.entered.union(path), reached=max(rank, previous.reached)
            )
        if action.received_at is not None and not previous.received:
            record = record._replace(received=True)
            if action.received_at > threshold:
                self.counters.latency_observed(status, action)
        return record

    def _moment(self, name: str, created_at: float | None, action: Action) -> float | None:
        """When the action entered status ``name``, by its own timestamps (None if unknown)."""
        if name == PENDING:
            return created_at
        if name == AWAITING:
            return action.sent_at
        status_class = self.statuses.classes[self.statuses.intern(name)]
        if status_class == "canceled" and action.canceled_at is not None:
            return action.canceled_at
        # A status of unknown class may be a cancellation by another name: an
        # administrator's cancel carries canceledAt and no receivedAt.
        return action.received_at if action.received_at is not None else action.canceled_at

    # --- age ---------------------------------------------------------------------------------

    def prune(self, now: float, watched: Callable[[str], bool]) -> int:
        """Forget entries not seen for the retention period; returns how many went.

        Cheap to call every round: the walk runs at most once per hundredth of the period.
        """
        retention = self.retention_seconds
        if self._pruned_at is not None and now - self._pruned_at < retention / 100:
            return 0
        self._pruned_at = now
        horizon = now - retention
        pruned = 0
        for device in list(self._entries):
            batches = self._entries[device]
            old = [b for b, e in batches.items() if e.seen_at < horizon]
            for batch_id in old:
                self._forget(device, batches.pop(batch_id), now)
                if self.changed is not None:
                    self.changed.add((device, batch_id))
            pruned += len(old)
            if not batches:
                del self._entries[device]
                if not watched(device):
                    # Watched again later, it gets a watermark newer than any floor.
                    self._floors.pop(device, None)
        return pruned

    def _forget(self, device: str, entry: LedgerEntry, now: float) -> None:
        # What that entry counted had timestamps up to a day past its last sight (later
        # ones are refused as garbage), so first sights count after that, and at most from
        # now on (a retention shorter than that day: tests).
        counted_until = min(entry.seen_at + FUTURE_SLACK_SECONDS, now)
        created = entry.created_at if entry.created_at is not None else math.inf
        floor = self._floors.get(device, Floor(created, counted_until))
        self._floors[device] = Floor(
            max(floor.newest_created, created), max(floor.counted_until, counted_until)
        )

    # --- reads -------------------------------------------------------------------------------

    def get(self, device: str, batch_id: str) -> LedgerEntry | None:
        return self._entries.get(device, {}).get(batch_id)

    def entered(self, device: str, batch_id: str, cmd_id: str) -> frozenset[str]:
        """The statuses the ledger holds for one action (for tests and the soak's checks)."""
        entry = self.get(device, batch_id)
        record = entry.actions.get(cmd_id, NEW_ACTION) if entry is not None else NEW_ACTION
        return record.entered

    def tracked_actions(self) -> int:
        """Actions in the ledger."""
        return sum(len(e.actions) for b in self._entries.values() for e in b.values())

    def entries(self) -> Iterator[tuple[str, str, LedgerEntry]]:
        for device, batches in self._entries.items():
            for batch_id, entry in batches.items():
                yield device, batch_id, entry

    def floors(self) -> dict[str, Floor]:
        return dict(self._floors)

    # --- the store ---------------------------------------------------------------------------

    def restore_entry(self, device: str, batch_id: str, entry: LedgerEntry) -> None:
        """A stored entry, its records already shared (``share``)."""
        self._entries.setdefault(device, {})[batch_id] = entry

    def restore_floor(self, device: str, floor: Floor) -> None:
        self._floors[device] = floor
