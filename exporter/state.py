"""FleetState: what the exporter knows about each watched device, batch and action.

The scheduler applies poll results here; exposition.py and the landing page read it. No I/O:
the only notion of time is the injected clock.

Two separate things live here:

- **The ledger**, the single source of exactly-once truth. Per action, keyed by
  (device, batch, cmdId), one small int: the set of statuses the action has entered, the
  furthest step it reached on ``Pending -> Awaiting -> in progress -> final``, whether its
  ``receivedAt`` was seen, and which parse-problem kinds were counted. It does not depend
  on what the latest response lists: a batch that answers 404, leaves the history window
  or is briefly listed short keeps its entries, so its actions never count again. Entries
  are pruned only by age (not seen for ``ledger_retention_seconds``).
- **The view**, the exported per-batch gauges: the counts of the latest list (or summary)
  of each batch currently watched. Dropping a batch from the view forgets nothing.

Counting rules (docs/design.md, "Exactly-once rules"):

- each status counts at most once per action, ever; a status already in the ledger counts
  nothing, whatever came between;
- a step back (a status before the furthest one reached, e.g. ``Pending`` after an answer)
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
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from exporter.histogram import Histogram
from exporter.records import FUTURE_SLACK_SECONDS, PROBLEM_KINDS, SCHEMA, Action, Batch
from exporter.selfmetrics import SelfMetrics
from exporter.settings import operation, setting
from exporter.statuses import KNOWN_STATUSES, StatusClass, classify

_EMPTY: Mapping[str, str] = MappingProxyType({})

# Status indexes: the 65 known names first, in upstream order, so these two are fixed.
PENDING = KNOWN_STATUSES.index("Pending")
AWAITING = KNOWN_STATUSES.index("Awaiting")

CLASSES: tuple[str, ...] = tuple(c.value for c in StatusClass)
FINAL_CLASSES: tuple[str, ...] = tuple(c for c in CLASSES if c != StatusClass.PENDING.value)

# Distinct unknown status names kept as they are; later ones become OTHER_STATUS, so an
# upstream that invents names cannot grow the series for ever.
MAX_UNKNOWN_STATUSES = 100
OTHER_STATUS = "other"
# Distinct settings counted under their own name; later ones under OTHER_SETTING.
MAX_SETTINGS = 500
OTHER_SETTING = "other"
# Raw (path, operation) pairs remembered with their counts (cleared when full: a cache).
_SETTING_CACHE_SIZE = 4096
# Upstream device states (docs/upstream-api.md), exported even when no device is in one.
DEVICE_STATES = ("ACTIVE", "PROVISIONING", "DELETE_REQUESTED", "DELETED", "UNKNOWN")
# Upstream device state of a watched device the device list has not shown.
NOT_LISTED = "not_listed"

# How far each status is along Pending -> Awaiting -> in progress -> final. A read below the
# furthest step an action reached is stale.
_RANK_PENDING, _RANK_AWAITING, _RANK_PROGRESS, _RANK_FINAL = range(4)

# Layout of the per-action ledger int, low bits first: problem kinds counted, receivedAt
# seen, furthest rank (2 bits), then one bit per status index entered.
_PROBLEM_BIT = {kind: 1 << i for i, kind in enumerate(PROBLEM_KINDS)}
_PROBLEM_MASK = (1 << len(PROBLEM_KINDS)) - 1
_RECEIVED = 1 << len(PROBLEM_KINDS)
_RANK_SHIFT = len(PROBLEM_KINDS) + 1
_RANK_MASK = 0b11 << _RANK_SHIFT
_ENTERED_SHIFT = _RANK_SHIFT + 2
# A ledger entry outlives discovery.batches.max_age by this much (clock skew, late pages).
LEDGER_MARGIN_SECONDS = 86400.0
# Distinct ledger ints shared between actions (a few dozen in practice): each action then
# holds a pointer, not an int of its own. Bounded against a pathological upstream.
_MAX_SHARED_INTS = 1 << 14


def ledger_retention(max_age_seconds: float) -> float:
    """How long the ledger remembers a batch no response has shown: as long as discovery may
    list it again, and a margin more."""
    return max_age_seconds + LEDGER_MARGIN_SECONDS


def problem_bits(kinds: Iterable[str]) -> int:
    bits = 0
    for kind in kinds:
        bits |= _PROBLEM_BIT.get(kind, 0)
    return bits


@dataclass(frozen=True, slots=True)
class BatchView:
    id: str
    name: str | None
    created_at: float | None
    # (status, status_class, count), sorted by status, counts > 0 only.
    counts: tuple[tuple[str, str, int], ...]
    oldest_pending: float | None


@dataclass(frozen=True, slots=True)
class DeviceView:
    device: str
    name: str | None
    labels: Mapping[str, str]
    info: Mapping[str, str]
    watermark: float
    up: bool
    polled: bool
    last_success: float | None
    last_error: str | None
    # True after expire(): the command series left /metrics until the next success.
    expired: bool
    # From the device list: lastStatusReportTime and the upstream state (NOT_LISTED before).
    check_in: float | None
    state: str
    class_counts: Mapping[str, int]
    oldest_pending: float | None
    batches: tuple[BatchView, ...]


class DeviceGenerations(NamedTuple):
    """When each exported part of a device last changed (values of ``FleetState.generation``)."""

    info: int
    status: int
    commands: int


@dataclass(slots=True)
class _Entry:
    """The ledger of one batch: what its actions entered, whatever the latest list says."""

    seen_at: float  # upstream clock, last time a response showed the batch
    created_at: float | None = None
    problems: int = 0  # problem kinds of the batch document already counted
    actions: dict[str, int] = field(default_factory=dict)  # cmdId -> ledger int


@dataclass(slots=True)
class _Batch:
    """The exported view of one batch, from its latest list or summary."""

    name: str | None = None
    created_at: float | None = None
    # Last summary applied (from apply_summary or the batch passed to apply_actions).
    summary: tuple[tuple[str, int], ...] | None = None
    from_actions: bool = False  # counts come from an action list (else from the summary)
    # The counts equal ``summary``'s: the last list was neither short nor stale.
    agrees: bool = False
    # status index -> count, the exported gauges (counts > 0 only). Replaced, never
    # changed in place, so a reference taken before a read shows what it exported.
    counts: dict[int, int] = field(default_factory=dict)
    oldest_pending: float | None = None

    def exported(self) -> tuple[str | None, dict[int, int], float | None]:
        return self.name, self.counts, self.oldest_pending


@dataclass(slots=True)
class _Device:
    watermark: float
    watched_at: float  # wall clock, for staleness
    name: str | None
    labels: Mapping[str, str]
    info: Mapping[str, str]
    up: bool = False
    polled: bool = False
    last_success: float | None = None
    last_error: str | None = None
    failing_since: float | None = None  # wall clock of the first failed read in a row
    expired: bool = False
    check_in: float | None = None
    state: str = NOT_LISTED
    batches: dict[str, _Batch] = field(default_factory=dict)
    info_gen: int = 0
    status_gen: int = 0
    commands_gen: int = 0
    problems: int = 0  # problem kinds of its device document already counted


class FleetState:
    def __init__(
        self,
        *,
        organization: str,
        latency_buckets: Sequence[float],
        metrics: SelfMetrics,
        clock: Callable[[], float] = time.time,
        wall_clock: Callable[[], float] | None = None,
        ledger_retention_seconds: float = ledger_retention(7 * 86400.0),
    ) -> None:
        """``clock`` is the upstream's time line (watermarks are compared with upstream
        timestamps); ``wall_clock`` dates polls and staleness. They differ only when the
        upstream runs in accelerated time (the simulator). A ledger entry is kept until its
        batch has not been seen for ``ledger_retention_seconds`` (on ``clock``)."""
        self.organization = organization
        # Sorted, finite and unique: the renderer adds +Inf, and OpenMetrics rejects disorder.
        self.latency_buckets = tuple(
            sorted({float(b) for b in latency_buckets if math.isfinite(b)})
        )
        self.ledger_retention_seconds = ledger_retention_seconds
        self._metrics = metrics
        self._clock = clock
        self._wall_clock = wall_clock or clock
        self.generation = 0
        # Moves when the fleet-wide counters (transitions, latency) change.
        self.counters_generation = 0
        self._devices: dict[str, _Device] = {}
        # Watched devices per upstream state, kept as devices are watched and listed.
        self._device_states: Counter[str] = Counter(dict.fromkeys(DEVICE_STATES, 0))
        # device -> batch -> entry; survives unwatch, drop_batch and retain_batches.
        self._ledger: dict[str, dict[str, _Entry]] = {}
        # device -> (newest createdAt among its pruned entries, a day past their last
        # sight): a first sight of a batch created no later than the former (it may be one
        # of them, come back) counts only statuses after the latter.
        self._floors: dict[str, tuple[float, float]] = {}
        self._pruned_at: float | None = None
        self._status_names: list[str] = list(KNOWN_STATUSES)
        self._status_index: dict[str, int] = {s: i for i, s in enumerate(KNOWN_STATUSES)}
        self._status_class: list[str] = [classify(s).value for s in KNOWN_STATUSES]
        self._status_rank: list[int] = [_rank(s) for s in KNOWN_STATUSES]
        self._unknown_statuses = 0
        self._shared_ints: dict[int, int] = {}
        # Every known status starts at 0 so the first increase shows in rate().
        self._transitions: list[int] = [0] * len(KNOWN_STATUSES)
        self._latency: dict[str, Histogram] = {c: Histogram(self.latency_buckets) for c in CLASSES}
        # (setting, operation) -> actions that reached a final status there, per class of
        # FINAL_CLASSES. Created at 0 when an action of the pair is first seen, so that its
        # first result shows in increase() (a series born at 1 hides it).
        self._settings: dict[tuple[str, str], list[int]] = {}
        self._setting_names: set[str] = set()
        # (config.path, config.action) as sent -> its counts in _settings.
        self._counts_of: dict[tuple[str | None, str | None], list[int]] = {}
        self._events = 0  # counter moves: transitions, latencies, new setting pairs

    # --- bookkeeping -----------------------------------------------------------------------

    def _bump(self) -> int:
        self.generation += 1
        return self.generation

    def _intern(self, status: str) -> int:
        index = self._status_index.get(status)
        if index is not None:
            return index
        if self._unknown_statuses >= MAX_UNKNOWN_STATUSES and status != OTHER_STATUS:
            return self._intern(OTHER_STATUS)
        self._unknown_statuses += 1
        index = len(self._status_names)
        self._status_names.append(status)
        self._status_index[status] = index
        self._status_class.append(classify(status).value)
        self._status_rank.append(_rank(status))
        self._transitions.append(0)
        return index

    def _shared(self, value: int) -> int:
        shared = self._shared_ints.get(value)
        if shared is not None:
            return shared
        if len(self._shared_ints) < _MAX_SHARED_INTS:
            self._shared_ints[value] = value
        return value

    def _count_problems(self, kinds: frozenset[str], already: int) -> int:
        """Count the kinds not counted before; returns the bits now counted."""
        fresh = problem_bits(kinds) & ~already
        if fresh:
            for kind, bit in _PROBLEM_BIT.items():
                if fresh & bit:
                    self._metrics.parse_problem(kind)
        return already | fresh

    # --- watched devices -------------------------------------------------------------------

    def watch(
        self,
        device: str,
        *,
        name: str | None = None,
        labels: Mapping[str, str] = _EMPTY,
        info: Mapping[str, str] = _EMPTY,
    ) -> None:
        labels = MappingProxyType(dict(labels))
        info = MappingProxyType(dict(info))
        known = self._devices.get(device)
        if known is None:
            generation = self._bump()
            self._devices[device] = _Device(
                watermark=self._clock(),
                watched_at=self._wall_clock(),
                name=name,
                labels=labels,
                info=info,
                info_gen=generation,
                status_gen=generation,
                commands_gen=generation,
            )
            self._device_states[NOT_LISTED] += 1
        elif (known.name, dict(known.labels), dict(known.info)) != (name, dict(labels), dict(info)):
            known.name, known.labels, known.info = name, labels, info
            known.info_gen = self._bump()

    def device_problems(self, device: str, kinds: frozenset[str]) -> None:
        """Problems of a watched device's document in the device list, each kind once."""
        dev = self._devices.get(device)
        if dev is not None and kinds:
            dev.problems = self._count_problems(kinds, dev.problems)

    def device_listed(self, device: str, *, state: str | None, check_in: float | None) -> None:
        """What the device list shows of a watched device: its state (``None``: not listed)
        and its last check-in (the newest seen is kept: a lagging replica cannot undo it)."""
        dev = self._devices.get(device)
        if dev is None:
            return
        listed = NOT_LISTED if state is None else state
        newest = dev.check_in if check_in is None else max(check_in, dev.check_in or check_in)
        if (listed, newest) != (dev.state, dev.check_in):
            self._left_state(dev.state)
            self._device_states[listed] += 1
            dev.state, dev.check_in = listed, newest
            dev.status_gen = self._bump()

    def unwatch(self, device: str) -> None:
        """Stop exporting the device; its ledger stays until pruned by age."""
        dev = self._devices.pop(device, None)
        if dev is not None:
            self._left_state(dev.state)
            self._bump()

    def watched(self) -> list[str]:
        return list(self._devices)

    def _left_state(self, state: str) -> None:
        """A watched device is no longer in ``state``: an undocumented one that no device
        holds any more is forgotten (upstream may send any number of them over time)."""
        self._device_states[state] -= 1
        if not self._device_states[state] and state not in DEVICE_STATES:
            del self._device_states[state]

    def device_states(self) -> dict[str, int]:
        """Watched devices per upstream state: the documented ones (zeros too), and any
        other state a watched device is in (``NOT_LISTED`` among them)."""
        return dict(self._device_states)

    # --- applying a poll -------------------------------------------------------------------

    def needs_actions(self, device: str, batch: Batch) -> bool:
        dev = self._devices.get(device)
        if dev is None:
            return False
        known = dev.batches.get(batch.id)
        if known is None:
            # A summary that did not decode cleanly cannot vouch for the batch: its actions
            # are read once, and the action list is the truth from then on.
            history = (
                batch.finished
                and batch.updated_at is not None
                and batch.updated_at <= self._threshold(device, dev, batch.created_at)
                and SCHEMA not in batch.problems
            )
            return not history
        # Our own view must be finished too, and agree with the summary: a summary can run
        # ahead of the action list, and a list can be briefly short or stale.
        settled = not any(self._status_class[s] == "pending" for s in known.counts)
        return not (batch.finished and settled and _agrees(known, batch))

    def agrees(self, device: str, batch: Batch) -> bool:
        """The exported view of ``batch`` matches its summary (an action list with the same
        counts per status, or that summary itself): nothing was missed or read stale."""
        dev = self._devices.get(device)
        known = dev.batches.get(batch.id) if dev is not None else None
        return known is not None and _agrees(known, batch)

    def _summary_counts(self, summary: tuple[tuple[str, int], ...]) -> dict[int, int]:
        counts: dict[int, int] = {}
        for status, count in summary:
            if count > 0:
                index = self._intern(status)
                counts[index] = counts.get(index, 0) + count
        return counts

    def now(self) -> float:
        """The upstream's time line (check-ins and batch times are on it)."""
        return self._clock()

    def future_limit(self) -> float:
        """Upstream timestamps after this are not moments but garbage: the reader treats
        them as missing (records.until)."""
        return self.now() + FUTURE_SLACK_SECONDS

    def _threshold(self, device: str, dev: _Device, created_at: float | None) -> float:
        """Statuses seen at first sight count only when their timestamps are after this."""
        pruned = self._floors.get(device)
        if pruned is None:
            return dev.watermark
        newest_pruned, floor = pruned
        if created_at is not None and created_at > newest_pruned:
            return dev.watermark  # newer than anything forgotten: cannot be one of them
        return max(dev.watermark, floor)

    def _entry(self, device: str, batch: Batch) -> _Entry:
        """The ledger entry of ``batch``, created on first sight; its problems counted once."""
        batches = self._ledger.get(device)
        if batches is None:
            batches = self._ledger[device] = {}
        entry = batches.get(batch.id)
        now = self._clock()
        if entry is None:
            entry = batches[batch.id] = _Entry(seen_at=now, created_at=batch.created_at)
        else:
            entry.seen_at = now
            if batch.created_at is not None:
                entry.created_at = batch.created_at
        entry.problems = self._count_problems(batch.problems, entry.problems)
        return entry

    @staticmethod
    def _view(dev: _Device, batch: Batch) -> tuple[_Batch, tuple[object, ...]]:
        """The view of ``batch`` (created on first sight) with its name and creation time
        brought up to date, and what it exported before."""
        known = dev.batches.get(batch.id)
        if known is None:
            known = dev.batches[batch.id] = _Batch()
        before = known.exported()
        if batch.name is not None:
            known.name = batch.name
        if batch.created_at is not None:
            known.created_at = batch.created_at
        return known, before

    def apply_summary(self, device: str, batch: Batch) -> None:
        dev = self._devices.get(device)
        if dev is None:
            return
        self._entry(device, batch)
        known, before = self._view(dev, batch)
        # Counts from actions are the truth; the summary only stands in for them when no
        # action list was applied, or when it disagrees with the one that was.
        if not known.from_actions or batch.summary != known.summary:
            known.counts = self._summary_counts(batch.summary or ())
            # A summary standing in for a list it contradicts vouches for nothing: read again.
            known.agrees = not known.from_actions
            pending = any(self._status_class[s] == "pending" for s in known.counts)
            known.oldest_pending = known.created_at if pending else None
        if batch.summary is not None:
            known.summary = batch.summary
        if known.exported() != before:
            dev.commands_gen = self._bump()

    def apply_actions(self, device: str, batch: Batch, actions: Sequence[Action]) -> None:
        dev = self._devices.get(device)
        if dev is None:
            return
        entry = self._entry(device, batch)
        known, before = self._view(dev, batch)
        events_before = self._events
        threshold = self._threshold(device, dev, known.created_at)
        known.counts, known.oldest_pending = self._record(
            entry.actions, threshold, known.created_at, actions
        )
        known.summary, known.from_actions = batch.summary, True
        # Judged once per list, not on every round that finds the summary unchanged.
        known.agrees = batch.summary is not None and known.counts == self._summary_counts(
            batch.summary
        )
        if self._events != events_before:
            self.counters_generation = self._bump()
        if known.exported() != before:
            dev.commands_gen = self._bump()

    def _record(
        self,
        ledger: dict[str, int],
        threshold: float,
        created_at: float | None,
        actions: Sequence[Action],
    ) -> tuple[dict[int, int], float | None]:
        """Enter each listed action in the ledger; the gauges of this list."""
        counts: dict[int, int] = {}
        oldest: float | None = None
        seen: set[str] = set()
        # Reversed: when a shifted page repeats an action, its later copy is the newer one.
        for action in reversed(actions):
            cmd = action.cmd_id
            if cmd in seen:
                continue
            seen.add(cmd)
            status = self._intern(action.status)
            previous = ledger.get(cmd)
            if previous is None:
                self._setting_counts(action)
                value = self._first_sight(threshold, created_at, status, action)
            else:
                value = self._seen_again(previous, threshold, created_at, status, action)
            if value != previous:
                ledger[cmd] = self._shared(value)
            counts[status] = counts.get(status, 0) + 1
            if self._status_class[status] == "pending":
                moment = action.sent_at if action.sent_at is not None else created_at
                if moment is not None and (oldest is None or moment < oldest):
                    oldest = moment
        return counts, oldest

    def _path(self, value: int, status: int, action: Action) -> list[int]:
        """Statuses the action entered to reach ``status`` that the ledger lacks, in order."""
        rank = self._status_rank[status]
        path = [PENDING]
        if rank >= _RANK_AWAITING and (status == AWAITING or action.sent_at is not None):
            path.append(AWAITING)
        if status not in (PENDING, AWAITING):
            path.append(status)
        entered = value >> _ENTERED_SHIFT
        return [s for s in path if not entered >> s & 1]

    def _mark(self, value: int, statuses: Iterable[int], rank: int) -> int:
        for status in statuses:
            value |= 1 << (status + _ENTERED_SHIFT)
        if rank > (value & _RANK_MASK) >> _RANK_SHIFT:
            value = (value & ~_RANK_MASK) | rank << _RANK_SHIFT
        return value

    def _first_sight(
        self, threshold: float, created_at: float | None, status: int, action: Action
    ) -> int:
        path = self._path(0, status, action)
        for entered in path:
            moment = self._moment(entered, created_at, action)
            if moment is not None and moment > threshold:
                self._enter(entered, action, first_final=True)
        value = self._count_problems(action.problems, 0)
        value = self._mark(value, path, self._status_rank[status])
        if action.received_at is not None:
            value |= _RECEIVED
            if action.received_at > threshold:
                self._observe_latency(status, action)
        return value

    def _seen_again(
        self,
        previous: int,
        threshold: float,
        created_at: float | None,
        status: int,
        action: Action,
    ) -> int:
        value = self._count_problems(action.problems, previous & _PROBLEM_MASK)
        value |= previous & ~_PROBLEM_MASK
        rank = self._status_rank[status]
        reached = (previous & _RANK_MASK) >> _RANK_SHIFT
        if rank < reached:
            return value  # a stale read: behind what this action already reached
        path = self._path(previous, status, action)
        for entered in path:
            # Seen before, a new status came after that sight, unless its own timestamp says
            # otherwise (the sight was a lagging replica's view of the time before watching).
            moment = self._moment(entered, created_at, action)
            if moment is None or moment > threshold:
                self._enter(entered, action, first_final=reached < _RANK_FINAL)
        value = self._mark(value, path, rank)
        if action.received_at is not None and not value & _RECEIVED:
            value |= _RECEIVED
            if action.received_at > threshold:
                self._observe_latency(status, action)
        return value

    def _moment(self, status: int, created_at: float | None, action: Action) -> float | None:
        """When the action entered ``status``, by its own timestamps (None if unknown)."""
        if status == PENDING:
            return created_at
        if status == AWAITING:
            return action.sent_at
        if self._status_class[status] == "canceled" and action.canceled_at is not None:
            return action.canceled_at
        # A status of unknown class may be a cancellation by another name: an
        # administrator's cancel carries canceledAt and no receivedAt.
        return action.received_at if action.received_at is not None else action.canceled_at

    def _enter(self, status: int, action: Action, *, first_final: bool) -> None:
        """Count ``status`` entered; a final one also counts for the action's setting, when
        ``first_final`` (the action reached no final status before)."""
        self._transitions[status] += 1
        self._events += 1
        if first_final and self._status_rank[status] == _RANK_FINAL:
            results = self._setting_counts(action)
            results[FINAL_CLASSES.index(self._status_class[status])] += 1

    def _setting_counts(self, action: Action) -> list[int]:
        """The result counts of the action's (setting, operation), created at 0."""
        raw = (action.path, action.operation)
        counts = self._counts_of.get(raw)  # every new action asks: normalize once per path
        if counts is None:
            key = (self._setting(action.path), operation(action.operation))
            counts = self._settings.get(key)
            if counts is None:
                counts = self._settings[key] = [0] * len(FINAL_CLASSES)
                self._events += 1  # a new pair's series, at 0, move the counters too
            if len(self._counts_of) >= _SETTING_CACHE_SIZE:
                self._counts_of.clear()
            self._counts_of[raw] = counts
        return counts

    def _setting(self, path: str | None) -> str:
        """The setting label of a CSP path: one of MAX_SETTINGS names, then OTHER_SETTING."""
        name = setting(path)
        if name not in self._setting_names:
            if len(self._setting_names) >= MAX_SETTINGS:
                return OTHER_SETTING
            self._setting_names.add(name)
        return name

    def _observe_latency(self, status: int, action: Action) -> None:
        if action.sent_at is None or action.received_at is None:
            return
        seconds = action.received_at - action.sent_at
        if seconds >= 0:
            self._latency[self._status_class[status]].observe(seconds)
            self._events += 1

    def retain_batches(self, device: str, batch_ids: Collection[str]) -> None:
        """Keep only these batches in the view (the ledger keeps every entry)."""
        dev = self._devices.get(device)
        if dev is None:
            return
        keep = set(batch_ids)
        gone = [b for b in dev.batches if b not in keep]
        for batch_id in gone:
            del dev.batches[batch_id]
        if gone:
            dev.commands_gen = self._bump()

    def drop_batch(self, device: str, batch_id: str) -> None:
        """The batch leaves the view (a 404); its ledger entry stays."""
        dev = self._devices.get(device)
        if dev is not None and dev.batches.pop(batch_id, None) is not None:
            dev.commands_gen = self._bump()

    def prune_ledger(self) -> int:
        """Forget entries not seen for the retention period; returns how many went.

        Cheap to call every round: the walk runs at most once per hundredth of the period.
        """
        now = self._clock()
        retention = self.ledger_retention_seconds
        if self._pruned_at is not None and now - self._pruned_at < retention / 100:
            return 0
        self._pruned_at = now
        horizon = now - retention
        pruned = 0
        for device in list(self._ledger):
            batches = self._ledger[device]
            old = [b for b, e in batches.items() if e.seen_at < horizon]
            for batch_id in old:
                entry = batches.pop(batch_id)
                # What that entry counted had timestamps up to a day past its last sight
                # (later ones are refused as garbage), so first sights count after that,
                # and at most from now on (a retention shorter than that day: tests).
                floor = min(entry.seen_at + FUTURE_SLACK_SECONDS, now)
                created = entry.created_at if entry.created_at is not None else math.inf
                newest, highest = self._floors.get(device, (created, floor))
                self._floors[device] = (max(newest, created), max(highest, floor))
            pruned += len(old)
            if not batches:
                del self._ledger[device]
                if device not in self._devices:
                    # Watched again later, it gets a watermark newer than any floor.
                    self._floors.pop(device, None)
        return pruned

    def poll_succeeded(self, device: str) -> None:
        dev = self._devices.get(device)
        if dev is None:
            return
        dev.up, dev.polled, dev.last_error, dev.failing_since = True, True, None, None
        dev.last_success = self._wall_clock()
        dev.status_gen = self._bump()
        if dev.expired:
            dev.expired = False
            dev.commands_gen = dev.status_gen

    def poll_failed(self, device: str, reason: str) -> None:
        dev = self._devices.get(device)
        if dev is None:
            return
        changed = dev.up or not dev.polled or dev.last_error != reason
        if dev.failing_since is None:
            dev.failing_since = self._wall_clock()
        dev.up, dev.polled, dev.last_error = False, True, reason
        if changed:
            dev.status_gen = self._bump()

    def expire(self, stale_after_seconds: float) -> list[str]:
        """Drop the command series of devices whose reads have failed, in a row, for longer
        than ``stale_after_seconds`` since the first failure."""
        now = self._wall_clock()
        expired = []
        for device, dev in self._devices.items():
            if dev.up or dev.failing_since is None or dev.expired:
                continue
            if now - dev.failing_since > stale_after_seconds:
                # The ledger stays: when the device is back, nothing counts twice.
                dev.expired = True
                dev.commands_gen = self._bump()
                expired.append(device)
        return expired

    # --- reads -----------------------------------------------------------------------------

    def device_generations(self, device: str) -> DeviceGenerations:
        dev = self._devices[device]
        return DeviceGenerations(dev.info_gen, dev.status_gen, dev.commands_gen)

    def device_view(self, device: str, *, with_batches: bool = True) -> DeviceView:
        """What is exported for one device; ``with_batches=False`` skips the batch tables
        (and so the counts and oldest pending) for a cheap look at name, labels and status."""
        dev = self._devices[device]
        batches: tuple[BatchView, ...] = ()
        if with_batches and not dev.expired:
            batches = tuple(self._batch_view(b, dev.batches[b]) for b in sorted(dev.batches))
        class_counts = dict.fromkeys(CLASSES, 0)
        for view in batches:
            for _, status_class, count in view.counts:
                class_counts[status_class] += count
        moments = [b.oldest_pending for b in batches if b.oldest_pending is not None]
        return DeviceView(
            device=device,
            name=dev.name,
            labels=dev.labels,
            info=dev.info,
            watermark=dev.watermark,
            up=dev.up,
            polled=dev.polled,
            last_success=dev.last_success,
            last_error=dev.last_error,
            expired=dev.expired,
            check_in=dev.check_in,
            state=dev.state,
            class_counts=MappingProxyType(class_counts),
            oldest_pending=min(moments) if moments else None,
            batches=batches,
        )

    def _batch_view(self, batch_id: str, batch: _Batch) -> BatchView:
        names, classes = self._status_names, self._status_class
        counts = sorted((names[s], classes[s], n) for s, n in batch.counts.items())
        return BatchView(
            batch_id, batch.name, batch.created_at, tuple(counts), batch.oldest_pending
        )

    def transitions(self) -> list[tuple[str, str, int]]:
        """(status, status_class, count) for every status ever interned, known ones first."""
        names, classes = self._status_names, self._status_class
        return [(names[i], classes[i], n) for i, n in enumerate(self._transitions)]

    def latency(self) -> Mapping[str, Histogram]:
        """Latency histogram per status_class (read-only use)."""
        return MappingProxyType(self._latency)

    def setting_results(self) -> list[tuple[str, str, str, int]]:
        """(setting, operation, status_class, count) of every pair seen, zeros included."""
        return [
            (name, op, status_class, count)
            for (name, op), counts in sorted(self._settings.items())
            for status_class, count in zip(FINAL_CLASSES, counts, strict=True)
        ]

    def entered(self, device: str, batch_id: str, cmd_id: str) -> frozenset[str]:
        """The statuses the ledger holds for one action (for tests and the soak's checks)."""
        value = self._ledger.get(device, {}).get(batch_id, _Entry(0.0)).actions.get(cmd_id, 0)
        entered = value >> _ENTERED_SHIFT
        names = self._status_names
        return frozenset(names[i] for i in range(len(names)) if entered >> i & 1)

    def tracked_actions(self) -> int:
        """Actions in the ledger."""
        return sum(len(e.actions) for b in self._ledger.values() for e in b.values())


def _agrees(known: _Batch, batch: Batch) -> bool:
    """``known`` agreed with the summary it was read with, and ``batch`` still has it."""
    return known.agrees and batch.summary is not None and batch.summary == known.summary


def _rank(status: str) -> int:
    if status == "Pending":
        return _RANK_PENDING
    if status == "Awaiting":
        return _RANK_AWAITING
    return _RANK_PROGRESS if classify(status) is StatusClass.PENDING else _RANK_FINAL
