"""FleetState: what the exporter knows about each watched device, batch and action.

The scheduler applies poll results here; exposition.py and the landing page read it. No I/O:
the only notion of time is the injected clock.

Exactly-once. Per action, keyed by (device, batch, cmdId), the state keeps one small int: the
last status seen (as an index into an interned table), whether ``receivedAt`` was already
observed, which parse-problem kinds were already counted, and whether the action is absent
from the latest list. Transitions and latencies are derived by comparing each poll with that
int, so re-polls, retries and repeated lists never count twice. The rules (design.md,
docs/architecture.md):

- seen before in status P, now S != P: forward along ``Pending -> Awaiting -> final`` count
  every status after P up to S (``Awaiting`` only when ``sentAt`` is set); any other change
  (final -> final, a step back) counts S;
- first sight: count each status on the path up to S whose own timestamp is after the
  device's watermark; a missing timestamp counts nothing;
- latency ``receivedAt - sentAt`` once per action, when ``receivedAt`` first appears on an
  action seen before without it, or on first sight when ``receivedAt`` is after the watermark.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from exporter.histogram import Histogram
from exporter.records import PROBLEM_KINDS, SCHEMA, Action, Batch
from exporter.selfmetrics import SelfMetrics
from exporter.statuses import KNOWN_STATUSES, StatusClass, classify

_EMPTY: Mapping[str, str] = MappingProxyType({})

# Status indexes: the 65 known names first, in upstream order, so these two are fixed.
PENDING = KNOWN_STATUSES.index("Pending")
AWAITING = KNOWN_STATUSES.index("Awaiting")

CLASSES: tuple[str, ...] = tuple(c.value for c in StatusClass)

# Layout of the per-action int: status index above the flag bits.
_PROBLEM_BIT = {kind: 1 << i for i, kind in enumerate(PROBLEM_KINDS)}
_PROBLEM_MASK = (1 << len(PROBLEM_KINDS)) - 1
_RECEIVED = 1 << len(PROBLEM_KINDS)
_ABSENT = _RECEIVED << 1
_STATUS_SHIFT = len(PROBLEM_KINDS) + 2


def problem_bits(kinds: Iterable[str]) -> int:
    bits = 0
    for kind in kinds:
        bits |= _PROBLEM_BIT.get(kind, 0)
    return bits


@dataclass(frozen=True, slots=True)
class BatchView:
    id: str
    name: str | None
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
    class_counts: Mapping[str, int]
    oldest_pending: float | None
    batches: tuple[BatchView, ...]


class DeviceGenerations(NamedTuple):
    """When each exported part of a device last changed (values of ``FleetState.generation``)."""

    info: int
    status: int
    commands: int


@dataclass(slots=True)
class _Batch:
    name: str | None = None
    created_at: float | None = None
    # Last summary applied (from apply_summary or the batch passed to apply_actions).
    summary: tuple[tuple[str, int], ...] | None = None
    # cmdId -> packed int; None while only the summary is known (history).
    actions: dict[str, int] | None = None
    # status index -> count, the exported gauges (counts > 0 only).
    counts: dict[int, int] = field(default_factory=dict)
    oldest_pending: float | None = None
    problems: int = 0


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
    expired: bool = False
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
    ) -> None:
        """``clock`` is the upstream's time line (watermarks are compared with upstream
        timestamps); ``wall_clock`` dates polls and staleness. They differ only when the
        upstream runs in accelerated time (the simulator)."""
        self.organization = organization
        # Sorted, finite and unique: the renderer adds +Inf, and OpenMetrics rejects disorder.
        self.latency_buckets = tuple(
            sorted({float(b) for b in latency_buckets if math.isfinite(b)})
        )
        self._metrics = metrics
        self._clock = clock
        self._wall_clock = wall_clock or clock
        self.generation = 0
        # Moves when the fleet-wide counters (transitions, latency) change.
        self.counters_generation = 0
        self._devices: dict[str, _Device] = {}
        self._status_names: list[str] = list(KNOWN_STATUSES)
        self._status_index: dict[str, int] = {s: i for i, s in enumerate(KNOWN_STATUSES)}
        self._status_class: list[str] = [classify(s).value for s in KNOWN_STATUSES]
        # Shared int objects for the packed per-action values (ints above 256 are not cached
        # by CPython; sharing them saves ~28 bytes per tracked action).
        self._ints: list[int] = list(range(len(KNOWN_STATUSES) << _STATUS_SHIFT))
        # Every known status starts at 0 so the first increase shows in rate().
        self._transitions: list[int] = [0] * len(KNOWN_STATUSES)
        self._latency: dict[str, Histogram] = {c: Histogram(self.latency_buckets) for c in CLASSES}
        self._events = 0  # transitions and latencies recorded, to tell when counters moved

    # --- bookkeeping -----------------------------------------------------------------------

    def _bump(self) -> int:
        self.generation += 1
        return self.generation

    def _intern(self, status: str) -> int:
        index = self._status_index.get(status)
        if index is None:
            index = len(self._status_names)
            self._status_names.append(status)
            self._status_index[status] = index
            self._status_class.append(classify(status).value)
            self._transitions.append(0)
            self._ints.extend(range(len(self._ints), (index + 1) << _STATUS_SHIFT))
        return index

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
        elif (known.name, dict(known.labels), dict(known.info)) != (name, dict(labels), dict(info)):
            known.name, known.labels, known.info = name, labels, info
            known.info_gen = self._bump()

    def device_problems(self, device: str, kinds: frozenset[str]) -> None:
        """Problems of a watched device's document in the device list, each kind once."""
        dev = self._devices.get(device)
        if dev is not None and kinds:
            dev.problems = self._count_problems(kinds, dev.problems)

    def unwatch(self, device: str) -> None:
        if self._devices.pop(device, None) is not None:
            self._bump()

    def watched(self) -> list[str]:
        return list(self._devices)

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
                and batch.updated_at <= dev.watermark
                and SCHEMA not in batch.problems
            )
            return not history
        # Our own view must be finished too: a summary can run ahead of the action list.
        settled = not any(self._status_class[s] == "pending" for s in known.counts)
        return not (batch.finished and batch.summary == known.summary and settled)

    def _batch_seen(self, dev: _Device, batch: Batch) -> _Batch:
        """The state of ``batch``, created on first sight; its problems counted once."""
        known = dev.batches.get(batch.id)
        if known is None:
            known = dev.batches[batch.id] = _Batch()
        known.problems = self._count_problems(batch.problems, known.problems)
        return known

    @property
    def events(self) -> int:
        """Transitions and latencies recorded so far: moves when a read showed a change."""
        return self._events

    def apply_summary(self, device: str, batch: Batch) -> None:
        dev = self._devices.get(device)
        if dev is None:
            return
        known = self._batch_seen(dev, batch)
        before = (known.name, known.counts, known.oldest_pending)
        self._remember_batch(known, batch)
        # Counts from actions are the truth; the summary only stands in for them when no
        # action list was applied, or when it disagrees with the one that was.
        if known.actions is None or batch.summary != known.summary:
            known.counts = {}
            for status, count in batch.summary or ():
                if count > 0:
                    index = self._intern(status)
                    known.counts[index] = known.counts.get(index, 0) + count
            pending = any(self._status_class[s] == "pending" for s in known.counts)
            known.oldest_pending = known.created_at if pending else None
        if batch.summary is not None:
            known.summary = batch.summary
        if (known.name, known.counts, known.oldest_pending) != before:
            dev.commands_gen = self._bump()

    def apply_actions(self, device: str, batch: Batch, actions: Sequence[Action]) -> None:
        dev = self._devices.get(device)
        if dev is None:
            return
        known = self._batch_seen(dev, batch)
        before = (known.name, known.counts, known.oldest_pending)
        self._remember_batch(known, batch)
        known.summary = batch.summary
        events_before = self._events
        fresh, counts, oldest = self._diff_actions(dev.watermark, known, actions)
        known.actions, known.counts, known.oldest_pending = fresh, counts, oldest
        if self._events != events_before:
            self.counters_generation = self._bump()
        if (known.name, known.counts, known.oldest_pending) != before:
            dev.commands_gen = self._bump()

    @staticmethod
    def _remember_batch(known: _Batch, batch: Batch) -> None:
        if batch.name is not None:
            known.name = batch.name
        if batch.created_at is not None:
            known.created_at = batch.created_at

    def _enter(self, status: int) -> None:
        self._transitions[status] += 1
        self._events += 1

    def _diff_actions(
        self, watermark: float, known: _Batch, actions: Sequence[Action]
    ) -> tuple[dict[str, int], dict[int, int], float | None]:
        old = known.actions if known.actions is not None else {}
        ints = self._ints
        fresh: dict[str, int] = {}
        counts: dict[int, int] = {}
        oldest: float | None = None
        # Reversed: when a shifted page repeats an action, its later copy is the newer one.
        for action in reversed(actions):
            cmd = action.cmd_id
            if cmd in fresh:
                continue
            status = self._intern(action.status)
            previous = old.get(cmd)
            if previous is None:
                flags = self._first_sight(watermark, known.created_at, status, action)
            else:
                flags = self._seen_again(previous, status, action)
            fresh[cmd] = ints[(status << _STATUS_SHIFT) | flags]
            counts[status] = counts.get(status, 0) + 1
            if self._status_class[status] == "pending":
                moment = action.sent_at if action.sent_at is not None else known.created_at
                if moment is not None and (oldest is None or moment < oldest):
                    oldest = moment
        self._keep_absent(old, fresh)
        return fresh, counts, oldest

    @staticmethod
    def _keep_absent(old: Mapping[str, int], fresh: dict[str, int]) -> None:
        """Remember actions missing from this list, so a page that shifted under pagination
        cannot make them look new next time. Bounded: when absent ones outnumber present
        ones, the batch really changed and they are forgotten."""
        absent = [(cmd, code) for cmd, code in old.items() if cmd not in fresh]
        if absent and len(absent) <= len(fresh):
            for cmd, code in absent:
                fresh[cmd] = code | _ABSENT

    def _first_sight(
        self, watermark: float, created_at: float | None, status: int, action: Action
    ) -> int:
        if created_at is not None and created_at > watermark:
            self._enter(PENDING)
        if status != PENDING and action.sent_at is not None and action.sent_at > watermark:
            self._enter(AWAITING)
        if status not in (PENDING, AWAITING):
            moment = self._final_moment(status, action)
            if moment is not None and moment > watermark:
                self._enter(status)
        flags = self._count_problems(action.problems, 0)
        if action.received_at is not None:
            flags |= _RECEIVED
            if action.received_at > watermark:
                self._observe_latency(status, action)
        return flags

    def _seen_again(self, previous: int, status: int, action: Action) -> int:
        last = previous >> _STATUS_SHIFT
        if status != last:
            if last == PENDING and status != AWAITING and action.sent_at is not None:
                self._enter(AWAITING)  # answered between two polls
            self._enter(status)
        flags = self._count_problems(action.problems, previous & _PROBLEM_MASK)
        flags |= previous & _RECEIVED
        if action.received_at is not None and not flags & _RECEIVED:
            flags |= _RECEIVED
            self._observe_latency(status, action)
        return flags

    def _final_moment(self, status: int, action: Action) -> float | None:
        if self._status_class[status] == "canceled" and action.canceled_at is not None:
            return action.canceled_at
        # A status of unknown class may be a cancellation by another name: an
        # administrator's cancel carries canceledAt and no receivedAt.
        return action.received_at if action.received_at is not None else action.canceled_at

    def _observe_latency(self, status: int, action: Action) -> None:
        if action.sent_at is None or action.received_at is None:
            return
        seconds = action.received_at - action.sent_at
        if seconds >= 0:
            self._latency[self._status_class[status]].observe(seconds)
            self._events += 1

    def retain_batches(self, device: str, batch_ids: Collection[str]) -> None:
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
        dev = self._devices.get(device)
        if dev is not None and dev.batches.pop(batch_id, None) is not None:
            dev.commands_gen = self._bump()

    def poll_succeeded(self, device: str) -> None:
        dev = self._devices.get(device)
        if dev is None:
            return
        dev.up, dev.polled, dev.last_error = True, True, None
        dev.last_success = self._wall_clock()
        dev.status_gen = self._bump()
        if dev.expired:
            dev.expired = False
            dev.commands_gen = dev.status_gen

    def poll_failed(self, device: str, reason: str) -> None:
        dev = self._devices.get(device)
        if dev is None:
            return
        changed = dev.up or not dev.polled
        dev.up, dev.polled, dev.last_error = False, True, reason
        if changed:
            dev.status_gen = self._bump()

    def expire(self, stale_after_seconds: float) -> list[str]:
        now = self._wall_clock()
        expired = []
        for device, dev in self._devices.items():
            if dev.up or not dev.polled or dev.expired:
                continue
            since = dev.last_success if dev.last_success is not None else dev.watched_at
            if now - since > stale_after_seconds:
                # The per-action memory stays: when the device is back, nothing counts twice.
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
            class_counts=MappingProxyType(class_counts),
            oldest_pending=min(moments) if moments else None,
            batches=batches,
        )

    def _batch_view(self, batch_id: str, batch: _Batch) -> BatchView:
        names, classes = self._status_names, self._status_class
        counts = sorted((names[s], classes[s], n) for s, n in batch.counts.items())
        return BatchView(batch_id, batch.name, tuple(counts), batch.oldest_pending)

    def transitions(self) -> list[tuple[str, str, int]]:
        """(status, status_class, count) for every status ever interned, known ones first."""
        names, classes = self._status_names, self._status_class
        return [(names[i], classes[i], n) for i, n in enumerate(self._transitions)]

    def latency(self) -> Mapping[str, Histogram]:
        """Latency histogram per status_class (read-only use)."""
        return MappingProxyType(self._latency)

    def tracked_actions(self) -> int:
        return sum(
            len(b.actions) for d in self._devices.values() for b in d.batches.values() if b.actions
        )
