"""The view: what is exported of each watched device and each of its batches.

Per device: its name, labels and info, whether its last read succeeded, its check-in and
upstream state from the device list, and per batch currently listed the counts of its
latest action list (or summary). Dropping a batch from the view forgets nothing the ledger
counted. Each change moves a generation number, so exposition.py re-renders only what moved.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from exporter.counters import CLASSES
from exporter.devicehealth import COMPLIANCE_VALUES, NO_HEALTH, DeviceHealth, bounded_versions
from exporter.records import Action
from exporter.statuses import StatusTable

EMPTY: Mapping[str, str] = MappingProxyType({})
# Upstream device states (docs/upstream-api.md), exported even when no device is in one.
DEVICE_STATES = ("ACTIVE", "PROVISIONING", "DELETE_REQUESTED", "DELETED", "UNKNOWN")
# Upstream device state of a watched device the device list has not shown.
NOT_LISTED = "not_listed"

Summary = tuple[tuple[str, int], ...]


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
    health: DeviceHealth = NO_HEALTH

    @property
    def polled(self) -> bool:
        """A read of the device ended since it was watched (or restored): it is up, or
        its last read failed."""
        return self.up or self.last_error is not None


class DeviceGenerations(NamedTuple):
    """When each exported part of a device last changed (values of ``FleetView.generation``)."""

    info: int
    status: int
    commands: int


@dataclass(slots=True)
class BatchState:
    """The exported view of one batch, from its latest list or summary."""

    name: str | None = None
    created_at: float | None = None
    # Last summary applied (from apply_summary or the batch passed to apply_actions).
    summary: Summary | None = None
    from_actions: bool = False  # counts come from an action list (else from the summary)
    # The counts equal ``summary``'s: the last list was neither short nor stale.
    agrees: bool = False
    # status index -> count, the exported gauges (counts > 0 only). Replaced, never
    # changed in place, so a reference taken before a read shows what it exported.
    counts: dict[int, int] = field(default_factory=dict)
    oldest_pending: float | None = None

    def exported(self) -> tuple[str | None, dict[int, int], float | None]:
        return self.name, self.counts, self.oldest_pending

    def kept(self) -> tuple[object, ...]:
        """What the store keeps of it: what is exported, and what decides the next read."""
        return self.exported(), self.summary, self.from_actions, self.agrees


@dataclass(slots=True)
class Poll:
    """How the device's reads are going (wall clock)."""

    up: bool = False
    polled: bool = False
    last_success: float | None = None
    last_error: str | None = None
    failing_since: float | None = None  # the first failed read in a row
    expired: bool = False


@dataclass(slots=True)
class DeviceState:
    watermark: float  # upstream clock: statuses before it are history
    watched_at: float  # wall clock
    name: str | None
    labels: Mapping[str, str]
    info: Mapping[str, str]
    poll: Poll = field(default_factory=Poll)
    check_in: float | None = None
    state: str = NOT_LISTED
    batches: dict[str, BatchState] = field(default_factory=dict)
    generations: DeviceGenerations = field(default_factory=lambda: DeviceGenerations(0, 0, 0))
    problems: frozenset[str] = frozenset()  # problem kinds of its device document counted
    health: DeviceHealth = NO_HEALTH  # compliance and OS version as the device list showed


class FleetView:
    def __init__(self, statuses: StatusTable, wall_clock: Callable[[], float]) -> None:
        self.statuses = statuses
        self._wall_clock = wall_clock
        self.generation = 0
        self.devices: dict[str, DeviceState] = {}
        # Watched devices per upstream state, kept as devices are watched and listed.
        self._device_states: Counter[str] = Counter(dict.fromkeys(DEVICE_STATES, 0))
        # Watched devices per compliance value and per OS version (in first-seen order).
        self._compliance: Counter[str] = Counter(dict.fromkeys(COMPLIANCE_VALUES, 0))
        self._os_versions: Counter[str] = Counter()
        # Devices whose stored row is out of date (the store takes them; unwatched too);
        # None while no store keeps this view.
        self.changed: set[str] | None = None

    def bump(self) -> int:
        self.generation += 1
        return self.generation

    def _moved(self, dev: DeviceState, device: str, **parts: bool) -> None:
        generation = self.bump()
        dev.generations = dev.generations._replace(
            **{part: generation for part, moved in parts.items() if moved}
        )
        self.note(device)

    def note(self, device: str) -> None:
        """The device's stored row is out of date."""
        if self.changed is not None:
            self.changed.add(device)

    # --- membership --------------------------------------------------------------------------

    def watch(
        self, device: str, watermark: float, *, name: str | None,
        labels: Mapping[str, str], info: Mapping[str, str],
    ) -> None:
        labels = MappingProxyType(dict(labels))
        info = MappingProxyType(dict(info))
        known = self.devices.get(device)
        if known is None:
            self.add(device, DeviceState(watermark, self._wall_clock(), name, labels, info))
        elif (known.name, dict(known.labels), dict(known.info)) != (name, dict(labels), dict(info)):
            known.name, known.labels, known.info = name, labels, info
            self._moved(known, device, info=True)

    def add(self, device: str, dev: DeviceState) -> None:
        """A device enters the view (watched, or restored from the store over the one the
        config watched before the store was read)."""
        known = self.devices.get(device)
        if known is not None:
            self._left_state(known.state)
            self._count_health(known.health, -1)
        self.devices[device] = dev
        self._device_states[dev.state] += 1
        self._count_health(dev.health, 1)
        self._moved(dev, device, info=True, status=True, commands=True)

    def unwatch(self, device: str) -> None:
        dev = self.devices.pop(device, None)
        if dev is not None:
            self._left_state(dev.state)
            self._count_health(dev.health, -1)
            self.bump()
            self.note(device)

    def listed(
        self, device: str, *, state: str | None, check_in: float | None,
        health: DeviceHealth = NO_HEALTH,
    ) -> None:
        dev = self.devices.get(device)
        if dev is None:
            return
        listed = NOT_LISTED if state is None else state
        newest = dev.check_in if check_in is None else max(check_in, dev.check_in or check_in)
        if (listed, newest) != (dev.state, dev.check_in):
            self._left_state(dev.state)
            self._device_states[listed] += 1
            dev.state, dev.check_in = listed, newest
            self._moved(dev, device, status=True)
        health = _newer_health(dev.health, health)
        if health != dev.health:
            self._count_health(dev.health, -1)
            self._count_health(health, 1)
            labels_moved = (health.compliance, health.os_version) != (
                dev.health.compliance, dev.health.os_version
            )
            dev.health = health
            self._moved(dev, device, info=labels_moved, status=True)

    def _count_health(self, health: DeviceHealth, sign: int) -> None:
        self._compliance[health.compliance] += sign
        versions = self._os_versions
        versions[health.os_label] += sign
        if not versions[health.os_label]:
            # Forgotten when no device is on it: upstream may send any number over time.
            del versions[health.os_label]

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

    def compliance(self) -> dict[str, int]:
        """Watched devices per compliance value, every value (zeros too)."""
        return dict(self._compliance)

    def os_versions(self) -> dict[str, int]:
        """Watched devices per OS version, bounded (devicehealth.MAX_OS_VERSIONS)."""
        return bounded_versions(self._os_versions)

    # --- polls -------------------------------------------------------------------------------

    def poll_succeeded(self, device: str) -> None:
        dev = self.devices.get(device)
        if dev is None:
            return
        expired = dev.poll.expired
        dev.poll = Poll(up=True, polled=True, last_success=self._wall_clock())
        self._moved(dev, device, status=True, commands=expired)

    def poll_failed(self, device: str, reason: str) -> None:
        dev = self.devices.get(device)
        if dev is None:
            return
        poll = dev.poll
        changed = poll.up or not poll.polled or poll.last_error != reason
        poll.up, poll.polled, poll.last_error = False, True, reason
        if poll.failing_since is None:
            poll.failing_since = self._wall_clock()
        if changed:
            self._moved(dev, device, status=True)

    def expire(self, stale_after_seconds: float) -> list[str]:
        """Drop the command series of devices whose reads have failed, in a row, for longer
        than ``stale_after_seconds`` since the first failure."""
        now = self._wall_clock()
        expired = []
        for device, dev in self.devices.items():
            poll = dev.poll
            if poll.up or poll.failing_since is None or poll.expired:
                continue
            if now - poll.failing_since > stale_after_seconds:
                # The ledger stays: when the device is back, nothing counts twice.
                poll.expired = True
                self._moved(dev, device, commands=True)
                expired.append(device)
        return expired

    # --- batches -----------------------------------------------------------------------------

    def batch(self, device: str, batch_id: str) -> BatchState | None:
        dev = self.devices.get(device)
        return dev.batches.get(batch_id) if dev is not None else None

    def batch_changed(self, device: str, before: tuple[object, ...], after: BatchState) -> None:
        """``before``: the batch's ``kept()`` before a read."""
        if after.exported() != before[0]:
            self._moved(self.devices[device], device, commands=True)
        elif after.kept() != before:
            self.note(device)  # its summary or agreement: not exported, but stored

    def summary_counts(self, summary: Summary) -> dict[int, int]:
        counts: dict[int, int] = {}
        for status, count in summary:
            if count > 0:
                index = self.statuses.intern(status)
                counts[index] = counts.get(index, 0) + count
        return counts

    def list_counts(
        self, actions: list[Action], created_at: float | None
    ) -> tuple[dict[int, int], float | None]:
        """The gauges of an action list (one copy of each action): counts per status, and the
        oldest pending moment."""
        counts: dict[int, int] = {}
        oldest: float | None = None
        for action in actions:
            status = self.statuses.intern(action.status)
            counts[status] = counts.get(status, 0) + 1
            if self.statuses.pending[status]:
                moment = action.sent_at if action.sent_at is not None else created_at
                if moment is not None and (oldest is None or moment < oldest):
                    oldest = moment
        return counts, oldest

    def has_pending(self, counts: Mapping[int, int]) -> bool:
        return self.statuses.any_pending(counts)

    def retain_batches(self, device: str, batch_ids: Collection[str]) -> None:
        """Keep only these batches in the view (the ledger keeps every entry)."""
        dev = self.devices.get(device)
        if dev is None:
            return
        keep = set(batch_ids)
        gone = [b for b in dev.batches if b not in keep]
        for batch_id in gone:
            del dev.batches[batch_id]
        if gone:
            self._moved(dev, device, commands=True)

    def drop_batch(self, device: str, batch_id: str) -> None:
        """The batch leaves the view (a 404); its ledger entry stays."""
        dev = self.devices.get(device)
        if dev is not None and dev.batches.pop(batch_id, None) is not None:
            self._moved(dev, device, commands=True)

    # --- reads -------------------------------------------------------------------------------

    def device_view(self, device: str, *, with_batches: bool = True) -> DeviceView:
        """What is exported for one device; ``with_batches=False`` skips the batch tables
        (and so the counts and oldest pending) for a cheap look at name, labels and status."""
        dev = self.devices[device]
        poll = dev.poll
        batches: tuple[BatchView, ...] = ()
        if with_batches and not poll.expired:
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
            up=poll.up,
            last_success=poll.last_success,
            last_error=poll.last_error,
            expired=poll.expired,
            check_in=dev.check_in,
            state=dev.state,
            class_counts=MappingProxyType(class_counts),
            oldest_pending=min(moments) if moments else None,
            batches=batches,
            health=dev.health,
        )

    def _batch_view(self, batch_id: str, batch: BatchState) -> BatchView:
        names, classes = self.statuses.names, self.statuses.classes
        counts = sorted((names[s], classes[s], n) for s, n in batch.counts.items())
        return BatchView(
            batch_id, batch.name, batch.created_at, tuple(counts), batch.oldest_pending
        )


def _newer_health(known: DeviceHealth, shown: DeviceHealth) -> DeviceHealth:
    """``shown`` unless it predates the compliance check already known: a lagging replica
    of the device list cannot undo a newer check (as with the check-in)."""
    if known.last_check is not None and shown.last_check is not None:
        return known if shown.last_check < known.last_check else shown
    return shown
