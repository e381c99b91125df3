"""The simulated fleet: devices, command batches and actions living on one event heap.

Pure of HTTP. Everything that happens to the fleet is an event on a heap ordered by
(time, sequence): batch creations, device check-ins (OMA-DM sessions), device answers and
administrator cancellations. :meth:`Fleet.run_until` applies events in that order, each at
its own timestamp, so nothing is ever visible before the moment it carries, and a fixed seed
gives the same history whatever the real-time pace of the requests.

History is made by the same machinery: the builder pushes the creation of every historical
batch and runs the heap up to the start. While building, a device checks in only when it has
work (check-ins are memoryless, so the first check-in after a creation is drawn then);
afterwards every online device checks in on its own schedule.

Creating a batch sends a push notification (WNS) that asks the device for a session; a
device that is awake answers it within seconds, one that is asleep or rarely connected
often does not, and its batch waits for the next scheduled session. Which pushes land is
drawn from a generator of its own, so the fleet a seed builds does not depend on it.

Batches come one device at a time, or as *rollouts*: an administrator pushes one policy to
a share of the fleet, which makes one batch per device under one name within a couple of
minutes. About half of the new batches, and some of the history, belong to rollouts; the
newest rollout of the history went out shortly before the start and is still under way.

Devices out of the ordinary, a few of each in any fleet of ``QUIRKS_FROM`` devices or more:
silent for days before the start, going silent soon after it (their sessions stop, their
actions stay pending), ``DELETE_REQUESTED`` (silent as well) and ``PROVISIONING`` (enrolled
minutes ago, ``ACTIVE`` at its first session after ``PROVISIONING_SPAN``). One setting fails
on one hardware model every time (``catalog.MODEL_FAILURE``).

Action path: ``Pending`` → ``Awaiting`` (``sentAt`` = check-in) → a final status
(``receivedAt`` a few seconds later, or at a later check-in), or → ``Cancel`` by the
administrator (``canceledAt``) from either pending status. Device-side cancellations
(``OperationCanceled``…) are answers: they carry both ``receivedAt`` and ``canceledAt``.

All timestamps are whole milliseconds, as upstream serialises them.
"""

from __future__ import annotations

import gc
import hashlib
import heapq
import itertools
import math
import random
from bisect import bisect_right
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

from exporter.simulator import catalog
from exporter.simulator.catalog import Config, Policy
from exporter.simulator.clock import SimClock
from exporter.simulator.faults import Faults
from exporter.simulator.validation import parse_commands
from exporter.statuses import PENDING_STATUSES, StatusClass, classify

PENDING = "Pending"
AWAITING = "Awaiting"

DAY = 86400.0
HOUR = 3600.0
MINUTE = 60.0

HISTORY_DAYS = 14.0
RECENT_SHARE = 0.15  # history batches created in the last RECENT_SPAN before the start
RECENT_SPAN = 2 * 3600.0
STUCK_SHARE = 0.04  # actions a device leaves unanswered until a later session
DEVICE_CANCEL_SHARE = 0.01
ACTION_CANCEL_SHARE = 0.01
BATCH_CANCEL_SHARE = 0.02
MIN_INTERVAL = 30.0  # seconds between two sessions of one device, at least
MAX_ANSWER_DELAY = 120.0
_DELAY_MU, _DELAY_SIGMA = math.log(2.0), 0.9  # lognormal answer delay: median 2 s
_PUSH_MU, _PUSH_SIGMA = math.log(15.0), 1.0  # push to session: median 15 s
MAX_PUSH_DELAY = 600.0
ROLLOUT_SHARE = 0.5  # of the new batches, those that belong to a rollout
ROLLOUT_REACH = (0.3, 0.7)  # share of the fleet one rollout targets
ROLLOUT_SPREAD = 120.0  # seconds from a rollout's first batch to its last
USER_POLICY_SHARE = 0.1  # single batches for the device's user, where it has one

# Device states (docs/upstream-api.md §5.1).
ACTIVE, PROVISIONING, DELETE_REQUESTED = "ACTIVE", "PROVISIONING", "DELETE_REQUESTED"
PROVISIONING_SPAN = HOUR  # from enrollment to the end of the setup sessions
# Devices out of the ordinary, as shares of the fleet; every fleet of QUIRKS_FROM devices or
# more has at least one of each, smaller ones (most tests) only what the shares round to.
SILENT, GOING_SILENT = "silent", "going-silent"
QUIRKS: tuple[tuple[str, float], ...] = (
    (SILENT, 0.03), (GOING_SILENT, 0.03), (DELETE_REQUESTED, 0.02), (PROVISIONING, 0.01),
)
QUIRKS_FROM = 10

# Heap event kinds.
_CREATE, _CHECKIN, _ANSWER, _CANCEL_ACTION, _CANCEL_BATCH, _ARRIVAL, _ROLLOUT = range(7)
_MEAN_REACH = sum(ROLLOUT_REACH) / 2

_CUM_ERROR_WEIGHTS = tuple(itertools.accumulate(catalog.ERROR_WEIGHTS))


class Event(NamedTuple):
    """An action entering a status (ground truth for tests)."""

    time: float
    device_id: str
    batch_id: str
    cmd_id: str
    status: str
    status_class: str


class Device:
    __slots__ = (
        "batches", "enrolled", "error_share", "id", "imei", "index", "inflight", "json",
        "last_report", "mean_interval", "model", "name", "next_checkin", "offline_since",
        "open", "os", "segment", "serial", "state", "tags", "user", "win_id",
    )

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        # Batches with actions that can still change, in creation order (a dict as an ordered set).
        self.open: dict[Batch, None] = {}
        self.inflight: set[Action] = set()  # answers on their way
        self.next_checkin: float | None = None
        self.last_report: float | None = None
        self.offline_since: float | None = None  # its sessions stop then (past or future)
        self.state = ACTIVE
        self.json: bytes | None = None

    @property
    def online(self) -> bool:
        """Whether the device keeps checking in for good."""
        return self.offline_since is None

    def online_at(self, moment: float) -> bool:
        return self.offline_since is None or moment < self.offline_since


class Batch:
    __slots__ = (
        "actions", "created", "deleted", "device", "error_ratio", "id", "json", "name",
        "open_count", "updated",
    )

    def __init__(self, batch_id: str, device: Device, name: str, created: float) -> None:
        self.id = batch_id
        self.device = device
        self.name = name
        self.created = created
        self.updated = created
        self.actions: list[Action] = []
        self.open_count = 0
        self.error_ratio: float | None = None  # set for bursts: resolve mostly into errors
        self.deleted = False
        self.json: bytes | None = None

    def touch(self, moment: float) -> None:
        if moment > self.updated:
            self.updated = moment
        self.json = None


class Action:
    __slots__ = (
        "_cmd_id", "batch", "canceled", "code", "config", "data", "index", "json", "received",
        "sent", "status",
    )

    def __init__(self, batch: Batch, index: int, config: Config) -> None:
        self.batch = batch
        self.index = index
        self.config = config
        self.status = PENDING
        self.code: int | None = None
        self.sent: float | None = None
        self.received: float | None = None
        self.canceled: float | None = None
        self.data: tuple[tuple[str, str], ...] | None = None  # device results, once answered
        self.json: bytes | None = None
        self._cmd_id: str | None = None

    @property
    def cmd_id(self) -> str:
        # Derived on demand: a fleet of millions of actions keeps no strings it never serves.
        if self._cmd_id is None:
            self._cmd_id = _cmd_id(self.batch.id, self.index)
        return self._cmd_id

    @property
    def key(self) -> str:
        """Stable identity for per-entity fault decisions."""
        return f"{self.batch.id}/{self.index}"

    @property
    def final(self) -> bool:
        return self.status not in PENDING_STATUSES


def _cmd_id(batch_id: str, index: int) -> str:
    # Shaped like upstream's "cmd-550e8400-e29b-41d4", fixed by the batch and position.
    digest = hashlib.blake2b(f"{batch_id}/{index}".encode(), digest_size=8).hexdigest()
    return f"cmd-{digest[:8]}-{digest[8:12]}-{digest[12:16]}"


def millis(moment: float) -> float:
    """``moment`` truncated to whole milliseconds (never after it)."""
    return math.floor(moment * 1000.0) / 1000.0


class UnknownEntity(LookupError):
    """No such device, or no such batch on that device."""


class Fleet:
    """Devices, batches and actions of one organization, and the events that move them."""

    def __init__(
        self,
        *,
        seed: int,
        devices: int,
        clock: SimClock,
        faults: Faults,
        batches_per_device: int = 5,
        actions_per_batch: tuple[int, int] = (3, 12),
        record_events: bool = True,
        new_batches_per_device_hour: float = 0.25,
        push: bool = True,
        checkin_seconds: float | None = None,
        rollout_share: float = ROLLOUT_SHARE,
    ) -> None:
        low, high = actions_per_batch
        if devices < 0 or batches_per_device < 0 or not 1 <= low <= high:
            raise ValueError("devices, batches_per_device and actions_per_batch out of range")
        self.clock = clock
        self.faults = faults
        self.record_events = record_events
        self._actions_per_batch = (low, high)
        self._arrival_rate = new_batches_per_device_hour / HOUR
        # Every device's mean time between sessions, when given (else each draws its own).
        self._checkin_seconds = checkin_seconds
        self._rollout_share = rollout_share
        self._rng = random.Random(f"{seed}/fleet")
        self._push_rng = random.Random(f"{seed}/push") if push else None
        self._heap: list[tuple[float, int, int, object, object]] = []
        self._seq = itertools.count()
        self._lazy = True  # building history: devices check in only when they have work
        self._history_end = clock.start
        self._events: list[tuple[float, Action, str]] = []
        self._acks: list[tuple[float, float, Action]] = []
        self._devices: list[Device] = []
        self._lookup: dict[str, Device] = {}
        self._batches: dict[str, Batch] = {}
        self._oid_counter = self._rng.getrandbits(24)
        self._oid_process = tuple(self._rng.getrandbits(40) for _ in range(3))
        self.organization_id = self._object_id(clock.start - 900 * DAY)
        self.enterprise_id = self._object_id(clock.start - 899 * DAY)
        self.now = clock.start
        self._build(devices, batches_per_device)

    # --- queries ---------------------------------------------------------------------------

    @property
    def devices(self) -> Sequence[Device]:
        return self._devices

    def device_ids(self) -> list[str]:
        self.sync()
        return [device.id for device in self._devices]

    def device(self, key: str) -> Device:
        """A device by its 24-hex id, serial number or IMEI."""
        device = self._lookup.get(key) or self._lookup.get(key.lower())
        if device is None:
            raise UnknownEntity(key)
        return device

    def find_device(self, key: str) -> Device | None:
        try:
            return self.device(key)
        except UnknownEntity:
            return None

    def batch(self, device: Device, batch_id: str) -> Batch:
        batch = self._batches.get(batch_id.lower())
        if batch is None or batch.device is not device:
            raise UnknownEntity(batch_id)
        return batch

    def batch_ids(self, device_id: str) -> list[str]:
        self.sync()
        return [batch.id for batch in self.device(device_id).batches]

    def grouped_counts(self, device_id: str, batch_id: str) -> dict[str, int]:
        """Actions per status as the API serves them (``unknown_status`` renames included)."""
        self.sync()
        batch = self.batch(self.device(device_id), batch_id)
        return dict(Counter(self.shown_status(action) for action in batch.actions))

    def shown_status(self, action: Action, status: str | None = None) -> str:
        status = action.status if status is None else status
        if not self.faults.data_active:
            return status
        return self.faults.shown_status(action.key, status, status not in PENDING_STATUSES)

    def events_since(self, moment: float) -> list[Event]:
        """Every status an action entered at a time after ``moment``, in time order."""
        self.sync()
        start = bisect_right(self._events, moment, key=lambda event: event[0])
        events = []
        for when, action, status in self._events[start:]:
            shown = self.shown_status(action, status)
            batch = action.batch
            events.append(
                Event(when, batch.device.id, batch.id, action.cmd_id, shown, classify(shown).value)
            )
        return events

    def acks_since(self, moment: float) -> list[tuple[float, str]]:
        """(receivedAt − sentAt, status class) of every answer received after ``moment``."""
        self.sync()
        start = bisect_right(self._acks, moment, key=lambda ack: ack[0])
        return [
            (latency, classify(self.shown_status(action)).value)
            for _, latency, action in self._acks[start:]
        ]

    # --- changes from outside --------------------------------------------------------------

    def sync(self) -> None:
        """Apply everything due up to the clock's present."""
        self.run_until(self.clock.now())

    def run_until(self, moment: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= moment:
            when, _, kind, subject, extra = heapq.heappop(heap)
            self._apply(when, kind, subject, extra)
        if moment > self.now:
            self.now = moment

    def create_batch(
        self,
        device_id: str,
        commands: list[dict[str, object]] | list[Config],
        name: str | None = None,
        *,
        error_ratio: float | None = None,
    ) -> str:
        """Create a batch now, all actions ``Pending`` (what ``POST .../commands`` does).

        ``commands`` are create-body items (``{"config": {...}}``) or config tuples.
        ``error_ratio`` makes the batch resolve at the next check-in, that share into errors.
        """
        if all(isinstance(command, tuple) for command in commands):
            configs: list[Config] = list(commands)  # type: ignore[arg-type]
        else:
            configs = parse_commands(commands)
        self.sync()
        device = self.device(device_id)
        batch = self._create(
            device, millis(self.now), configs, name or _default_name(configs), error_ratio
        )
        return batch.id

    def create_random_batch(
        self, device_id: str, *, error_ratio: float | None = None
    ) -> str:
        self.sync()
        device = self.device(device_id)
        configs, name = self._random_commands(device)
        batch = self._create(device, millis(self.now), configs, name, error_ratio)
        return batch.id

    def delete_batch(self, device_id: str, batch_id: str) -> None:
        """Upstream deletion: the batch and its actions are gone (pending events fizzle)."""
        self.sync()
        device = self.device(device_id)
        batch = self.batch(device, batch_id)
        batch.deleted = True
        device.batches.remove(batch)
        device.open.pop(batch, None)
        device.inflight.difference_update(batch.actions)
        del self._batches[batch.id]

    def random_device(self) -> Device:
        return self._rng.choice(self._devices)

    # --- building --------------------------------------------------------------------------

    def _build(self, count: int, batches_per_device: int) -> None:
        # Millions of live objects and no garbage: collector passes would only cost time.
        enabled = gc.isenabled()
        gc.disable()
        try:
            self._build_history(count, batches_per_device)
        finally:
            if enabled:
                gc.enable()

    def _build_history(self, count: int, batches_per_device: int) -> None:
        start = self.now
        quirks = self._quirks(count)
        for index in range(count):
            self._devices.append(self._new_device(index, start, quirks.get(index)))
        taken = self._plan_history_rollouts(start, batches_per_device)
        for device in self._devices:
            self._plan_history(device, start, batches_per_device - taken[device])
        self.run_until(start)
        self._lazy = False
        self._events.sort(key=_first)
        self._acks.sort(key=_first)
        for device in self._devices:
            self._settle_last_report(device, start)
            if device.online_at(start) and device.next_checkin is None:
                self._schedule_checkin(device, start)
        if self._devices and self._arrival_rate > 0:
            self._schedule_arrival(start)
            if self._rollout_share > 0:
                self._schedule_rollout(start)

    def _quirks(self, count: int) -> dict[int, str]:
        """Which devices (by index) are out of the ordinary, and how."""
        wanted = [(kind, _quirk_count(share, count)) for kind, share in QUIRKS]
        chosen = iter(self._rng.sample(range(count), min(count, sum(n for _, n in wanted))))
        return {index: kind for kind, n in wanted for index in itertools.islice(chosen, n)}

    def _new_device(self, index: int, start: float, quirk: str | None) -> Device:
        rng = self._rng
        device = Device()
        device.index = index
        if quirk == PROVISIONING:  # enrolled minutes ago, still in its setup sessions
            device.enrolled = millis(start - rng.uniform(10.0, 40.0) * MINUTE)
            device.state = PROVISIONING
        else:
            device.enrolled = millis(start - rng.uniform(20.0, 500.0) * DAY)
        device.id = self._object_id(device.enrolled)
        site, site_code, segment = rng.choice(_SITES)
        role, role_code = _pick_weighted(rng, _ROLES)
        device.name = f"{site_code}-{role_code}-{index + 1:04d}"
        tags = [site, role]
        if rng.random() < 0.1:
            tags.append("pilot")
        device.tags = tuple(tags)
        device.segment = segment
        maker = rng.choices(_MAKERS, weights=_MAKER_WEIGHTS)[0]
        device.serial = self._unique(lambda: _serial(rng, maker))
        portable, fixed = _MODELS[maker]
        device.model = rng.choice(portable if role == "laptop" else fixed)
        device.imei = self._unique(lambda: _imei(rng)) if rng.random() < 0.35 else None
        device.win_id = _guid(rng)
        device.os = rng.choice(_OS_VERSIONS)
        device.user = _user(rng) if role in ("laptop", "desktop") else None
        device.mean_interval = self._checkin_seconds or _mean_interval(rng)
        device.offline_since = self._silence(device, start, quirk)
        device.error_share = _error_share(rng)
        for key in (device.id, device.serial, device.imei):
            if key is not None:
                self._lookup[key] = device
        return device

    def _silence(self, device: Device, start: float, quirk: str | None) -> float | None:
        """When the device stops checking in, if it does; sets the pace of the quirky ones."""
        rng = self._rng
        if quirk == PROVISIONING:
            device.mean_interval = rng.uniform(3.0, 10.0) * MINUTE  # setup syncs often
            return None
        if quirk == GOING_SILENT:  # chatty until then, so that the silence shows
            device.mean_interval = rng.uniform(5.0, 30.0) * MINUTE
            return millis(start + rng.uniform(10.0, 60.0) * MINUTE)
        if quirk == SILENT:
            since = start - rng.uniform(1.5, 20.0) * DAY
        elif quirk == DELETE_REQUESTED:  # an unenrolment the device never came to collect
            device.state = DELETE_REQUESTED
            since = start - rng.uniform(1.0, 10.0) * DAY
        else:
            return None
        return millis(max(since, device.enrolled + DAY))

    def _unique(self, make: object) -> str:
        while True:
            value = make()  # type: ignore[operator]
            if value not in self._lookup:
                return value

    def _plan_history(self, device: Device, start: float, count: int) -> None:
        rng = self._rng
        earliest = max(device.enrolled, start - HISTORY_DAYS * DAY)
        span = start - earliest
        # Denser towards the present; a share lands in the last hours, so that a fleet
        # starts with work still pending as well as finished history.
        for _ in range(count):
            if rng.random() < RECENT_SHARE:
                created = millis(start - min(span, RECENT_SPAN) * rng.random())
            else:
                created = millis(start - span * rng.random() ** 2)
            self._push(created, _CREATE, device, None)

    def _plan_history_rollouts(self, start: float, batches_per_device: int) -> Counter[Device]:
        """Rollouts in the history; each takes one of ``batches_per_device`` on its devices.

        The newest went out minutes before the start, so a fleet starts with one under
        way: most of its devices have yet to check in, some never will.
        """
        rng = self._rng
        taken: Counter[Device] = Counter()
        for number in range(batches_per_device // 2):
            if number == 0:
                when = start - ROLLOUT_SPREAD - rng.uniform(3.0, 20.0) * MINUTE
            else:
                when = start - HISTORY_DAYS * DAY * rng.random() ** 2 - ROLLOUT_SPREAD
            taken.update(self._roll_out(when))
        return taken

    def _settle_last_report(self, device: Device, start: float) -> None:
        """The last session before the start, consistent with what it sent and did not send."""
        bound = start if device.offline_since is None else min(start, device.offline_since)
        for batch in device.open:
            if any(action.status == PENDING for action in batch.actions):
                bound = min(bound, batch.created)
                break
        drawn = millis(bound - self._rng.expovariate(1.0 / device.mean_interval))
        candidates = [drawn, device.enrolled]
        if device.last_report is not None:
            candidates.append(device.last_report)
        device.last_report = max(candidates)
        device.json = None

    # --- the event heap --------------------------------------------------------------------

    def _push(self, when: float, kind: int, subject: object, extra: object) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), kind, subject, extra))

    def _apply(self, when: float, kind: int, subject: object, extra: object) -> None:
        if kind == _ANSWER:
            self._answer(when, subject, extra)  # type: ignore[arg-type]
        elif kind == _CHECKIN:
            if subject.next_checkin == when:  # type: ignore[attr-defined]
                self._checkin(when, subject)  # type: ignore[arg-type]
        elif kind == _CREATE:
            # A rollout's batch carries its commands; a single one draws them now.
            planned: tuple[list[Config], str] | None = extra  # type: ignore[assignment]
            configs, name = planned or self._random_commands(subject)  # type: ignore[arg-type]
            self._create(subject, when, configs, name, None)  # type: ignore[arg-type]
        elif kind == _CANCEL_ACTION:
            self._cancel(when, subject)  # type: ignore[arg-type]
        elif kind == _CANCEL_BATCH:
            for action in subject.actions:  # type: ignore[attr-defined]
                self._cancel(when, action)
        elif kind == _ARRIVAL:
            device = self.random_device()
            configs, name = self._random_commands(device)
            self._create(device, when, configs, name, None)
            self._schedule_arrival(when)
        elif kind == _ROLLOUT:
            self._roll_out(when)
            self._schedule_rollout(when)

    def _schedule_checkin(self, device: Device, after: float) -> None:
        interval = max(MIN_INTERVAL, self._rng.expovariate(1.0 / device.mean_interval))
        device.next_checkin = millis(after + interval)
        self._push(device.next_checkin, _CHECKIN, device, None)

    def _schedule_arrival(self, after: float) -> None:
        rate = self._arrival_rate * len(self._devices) * (1.0 - self._rollout_share)
        self._push(millis(after + self._rng.expovariate(rate)), _ARRIVAL, None, None)

    def _schedule_rollout(self, after: float) -> None:
        # Each reaches about _MEAN_REACH of the fleet: rollouts make ROLLOUT_SHARE of the
        # new batches at this pace.
        rate = self._arrival_rate * self._rollout_share / _MEAN_REACH
        self._push(millis(after + self._rng.expovariate(rate)), _ROLLOUT, None, None)

    def _roll_out(self, when: float) -> list[Device]:
        """One policy pushed to a share of the fleet: a batch per device, all of one name."""
        rng = self._rng
        planned = self._compose(rng.choice(catalog.ROLLOUTS))
        enrolled = [device for device in self._devices if device.enrolled < when]
        if not enrolled:
            return []
        reach = max(1, round(rng.uniform(*ROLLOUT_REACH) * len(enrolled)))
        targets = rng.sample(enrolled, reach)
        for device in targets:  # as the console or a script works through the devices
            self._push(millis(when + rng.uniform(0.0, ROLLOUT_SPREAD)), _CREATE, device, planned)
        return targets

    def _create(
        self,
        device: Device,
        when: float,
        configs: Sequence[Config],
        name: str,
        error_ratio: float | None,
    ) -> Batch:
        batch = Batch(self._object_id(when), device, name, when)
        batch.error_ratio = error_ratio
        batch.actions = [Action(batch, index, config) for index, config in enumerate(configs)]
        batch.open_count = len(batch.actions)
        device.batches.append(batch)
        device.open[batch] = None
        self._batches[batch.id] = batch
        if self.record_events:
            self._events.extend((when, action, PENDING) for action in batch.actions)
        if error_ratio is None:
            self._plan_cancellations(batch, when)
        if self._lazy and device.next_checkin is None:
            self._schedule_checkin(device, when)
        elif not self._lazy:
            self._push_notification(device, when)
        return batch

    def _push_notification(self, device: Device, when: float) -> None:
        """A session soon after ``when``, when the push reaches the device."""
        rng = self._push_rng
        if rng is None or not device.online_at(when) or rng.random() >= _push_reach(device):
            return
        delay = min(MAX_PUSH_DELAY, 1.0 + math.exp(_PUSH_MU + _PUSH_SIGMA * rng.gauss()))
        moment = millis(when + delay)
        if device.next_checkin is None or moment < device.next_checkin:
            # The scheduled session's event stays on the heap and is skipped when it comes
            # (see _apply): a device keeps one schedule.
            device.next_checkin = moment
            self._push(moment, _CHECKIN, device, None)

    def _plan_cancellations(self, batch: Batch, when: float) -> None:
        rng = self._rng
        if rng.random() < BATCH_CANCEL_SHARE:
            self._push(millis(when + rng.expovariate(1.0 / (2 * HOUR))), _CANCEL_BATCH, batch, None)
        for action in batch.actions:
            if rng.random() < ACTION_CANCEL_SHARE:
                moment = millis(when + rng.expovariate(1.0 / HOUR))
                self._push(moment, _CANCEL_ACTION, action, None)

    def _checkin(self, when: float, device: Device) -> None:
        device.next_checkin = None
        if device.offline_since is not None and when >= device.offline_since:
            return
        device.last_report = when
        device.json = None
        if device.state == PROVISIONING and when >= device.enrolled + PROVISIONING_SPAN:
            device.state = ACTIVE
        rng = self._rng
        waiting = False
        # While history is built nobody can look, so answers due before the start need no
        # trip through the heap (the event log is sorted once at the end of the build).
        direct: list[tuple[float, Action, tuple[str, int | None]]] = []
        for batch in device.open:
            changed = False
            burst = batch.error_ratio is not None
            for action in batch.actions:
                if action.status == PENDING:
                    self._enter(action, when, AWAITING)
                    action.sent = when
                    changed = True
                if action.status != AWAITING or action in device.inflight:
                    continue
                if not burst and rng.random() < STUCK_SHARE:
                    waiting = True
                    continue
                outcome = self._outcome(device, batch, action)
                delay = min(MAX_ANSWER_DELAY, math.exp(_DELAY_MU + _DELAY_SIGMA * rng.gauss()))
                answered = millis(when + 0.05 + delay)
                if self._lazy and answered <= self._history_end:
                    direct.append((answered, action, outcome))
                else:
                    device.inflight.add(action)
                    self._push(answered, _ANSWER, action, outcome)
            if changed:
                batch.touch(when)
        for answered, action, outcome in direct:
            self._answer(answered, action, outcome)
        if not self._lazy or waiting:
            self._schedule_checkin(device, when)

    def _outcome(self, device: Device, batch: Batch, action: Action) -> tuple[str, int | None]:
        rng = self._rng
        failure = catalog.MODEL_FAILURE
        if (batch.error_ratio is None and device.model == failure.model
                and action.config[0] == failure.path):
            return failure.status, catalog.status_code(failure.status)
        share = device.error_share if batch.error_ratio is None else batch.error_ratio
        draw = rng.random()
        if draw < share:
            status = rng.choices(catalog.ERROR_STATUSES, cum_weights=_CUM_ERROR_WEIGHTS)[0]
        elif batch.error_ratio is None and draw < share + DEVICE_CANCEL_SHARE:
            status = rng.choice(catalog.DEVICE_CANCELS)
        else:
            status = _success(rng, action.config)
        return status, catalog.status_code(status)

    def _answer(self, when: float, action: Action, outcome: tuple[str, int | None]) -> None:
        device = action.batch.device
        device.inflight.discard(action)
        if action.batch.deleted or action.status != AWAITING:
            return  # canceled meanwhile, or gone
        status, code = outcome
        action.code = code
        action.received = when
        if classify(status) is StatusClass.CANCELED:
            action.canceled = when
        else:
            action.data = _results(action.config, status)
        self._enter(action, when, status)
        if self.record_events and action.sent is not None:
            self._acks.append((when, when - action.sent, action))
        self._close(action, when)

    def _cancel(self, when: float, action: Action) -> None:
        if action.batch.deleted or action.status not in PENDING_STATUSES:
            return
        action.batch.device.inflight.discard(action)
        action.canceled = when
        self._enter(action, when, catalog.ADMIN_CANCEL)
        self._close(action, when)

    def _enter(self, action: Action, when: float, status: str) -> None:
        action.status = status
        action.json = None
        if self.record_events:
            self._events.append((when, action, status))

    def _close(self, action: Action, when: float) -> None:
        batch = action.batch
        batch.touch(when)
        batch.open_count -= 1
        if batch.open_count == 0:
            batch.device.open.pop(batch, None)

    # --- drawing ---------------------------------------------------------------------------

    def _random_commands(self, device: Device) -> tuple[list[Config], str]:
        """A single batch: any policy, now and then one for the device's user."""
        rng = self._rng
        if device.user is not None and rng.random() < USER_POLICY_SHARE:
            user_id, email, _ = device.user
            policies = catalog.user_policies(_user_sid(user_id), email)
        else:
            policies = catalog.POLICIES
        return self._compose(rng.choice(policies))

    def _compose(self, policy: Policy) -> tuple[list[Config], str]:
        """The policy's commands, cut or filled up with settings to a drawn batch size."""
        rng = self._rng
        low, high = self._actions_per_batch
        count = rng.randint(low, high)
        core = policy.configs
        if count <= len(core):
            return [core[i] for i in sorted(rng.sample(range(len(core)), count))], policy.name
        pool = catalog.FILL.get(policy.name, catalog.COMMANDS)
        extra = count - len(core)
        if extra <= len(pool):
            fill = rng.sample(pool, extra)
        else:
            fill = [rng.choice(pool) for _ in range(extra)]
        return [*core, *fill], policy.name

    def _object_id(self, moment: float) -> str:
        """A Mongo ObjectId: creation second, process id, counter."""
        self._oid_counter = (self._oid_counter + 1) & 0xFFFFFF
        process = self._oid_process[self._oid_counter % len(self._oid_process)]
        return f"{int(moment) & 0xFFFFFFFF:08x}{process:010x}{self._oid_counter:06x}"


def _first(item: tuple[float, object, object]) -> float:
    return item[0]


def _default_name(configs: Sequence[Config]) -> str:
    path, action, _, _ = configs[0]
    leaf = path.rstrip("/").rsplit("/", 1)[-1]
    more = f" (+{len(configs) - 1} more)" if len(configs) > 1 else ""
    return f"{action} {leaf}{more}"


def _success(rng: random.Random, config: Config) -> str:
    action = config[1]
    if action == "Delete" and rng.random() < 0.25:
        return "DeleteWithoutArchive"
    draw = rng.random()
    if draw < 0.003:
        return "ConflictDetectedResolvedServerCommandWinning"
    if draw < 0.005:
        return "AuthenticationAccepted"
    return "Acknowledged"


def _results(config: Config, status: str) -> tuple[tuple[str, str], ...]:
    """What the device returned: the node value for a successful Get, nothing otherwise."""
    if config[1] == "Get" and classify(status) is StatusClass.SUCCESS:
        fmt = config[3]
        return (("format", fmt), ("value", catalog.GET_RESULTS.get(fmt, "")))
    return ()


# --- device profiles ---------------------------------------------------------------------------

_SITES = (
    ("madrid", "MAD", 1), ("barcelona", "BCN", 2), ("london", "LON", 3),
    ("new-york", "NYC", 4), ("berlin", "BER", 5),
)
_ROLES = (
    ("laptop", "LT", 0.55), ("desktop", "DT", 0.25), ("kiosk", "KSK", 0.12), ("pos", "POS", 0.08),
)
_OS_VERSIONS = (
    ("10.0.22631.4460", "Windows 11 23H2"),
    ("10.0.26100.2314", "Windows 11 24H2"),
    ("10.0.26100.3194", "Windows 11 24H2"),
    ("10.0.19045.5131", "Windows 10 22H2"),
)
# Makers by share, told apart by their serial numbers' style, and their models: portable
# (laptops) and fixed (desktops, kiosks, tills).
_MAKERS = ("Dell", "HP", "Lenovo", "Microsoft")
_MAKER_WEIGHTS = (0.4, 0.3, 0.2, 0.1)
_MODELS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Dell": (("Latitude 5440", "Latitude 7440"), ("OptiPlex 7010",)),
    "HP": (("HP EliteBook 840 G10", "HP ProBook 450 G9"), ("HP ProDesk 400 G9",)),
    "Lenovo": (("ThinkPad T14 Gen 4", "ThinkPad X1 Carbon Gen 11"), ("ThinkCentre M70q Gen 4",)),
    "Microsoft": (("Surface Laptop 5", "Surface Pro 9"), ("Surface Pro 9",)),
}
_FIRST = ("Ana", "Luis", "Marta", "John", "Priya", "Jonas", "Chen", "Lucia", "Omar", "Sofia")
_LAST = ("Garcia", "Smith", "Muller", "Rossi", "Khan", "Lopez", "Novak", "Kim", "Silva", "Weber")
_ALNUM = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"


def _pick_weighted(
    rng: random.Random, table: tuple[tuple[str, str, float], ...]
) -> tuple[str, str]:
    draw = rng.random() * sum(weight for _, _, weight in table)
    for name, code, weight in table:
        draw -= weight
        if draw < 0:
            return name, code
    return table[-1][0], table[-1][1]


def _serial(rng: random.Random, maker: str) -> str:
    if maker == "Dell":  # service tag
        return "".join(rng.choice(_ALNUM) for _ in range(7))
    if maker == "HP":
        return "5CG" + "".join(rng.choice(_ALNUM) for _ in range(7))
    if maker == "Lenovo":
        return "PF" + "".join(rng.choice(_ALNUM) for _ in range(6))
    return "".join(rng.choice("0123456789") for _ in range(12))  # Surface


def _imei(rng: random.Random) -> str:
    body = "35" + "".join(rng.choice("0123456789") for _ in range(12))
    total = 0
    for position, char in enumerate(reversed(body)):
        digit = int(char)
        if position % 2 == 0:  # doubled digits, counted from the check digit's left
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return body + str((10 - total % 10) % 10)


def _guid(rng: random.Random) -> str:
    text = f"{rng.getrandbits(128):032X}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def _user(rng: random.Random) -> tuple[str, str, str]:
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    email = f"{first.lower()}.{last.lower()}@example.com"
    return f"{rng.getrandbits(96):024x}", email, f"{first} {last}"


def _user_sid(user_id: str) -> str:
    """The user's Entra ID SID (S-1-12-1 and four numbers), fixed by the user's id."""
    digest = hashlib.blake2b(user_id.encode(), digest_size=16).digest()
    parts = (int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4))
    return "S-1-12-1-" + "-".join(map(str, parts))


def _quirk_count(share: float, count: int) -> int:
    wanted = round(share * count)
    return max(1, wanted) if count >= QUIRKS_FROM else wanted


def _mean_interval(rng: random.Random) -> float:
    """Mean seconds between a device's sessions."""
    draw = rng.random()
    if draw < 0.77:
        return rng.uniform(5, 60) * MINUTE
    if draw < 0.93:
        return rng.uniform(2, 12) * HOUR
    return rng.uniform(1, 3) * DAY


def _push_reach(device: Device) -> float:
    """Share of pushes that wake a session: devices that sync often are usually awake."""
    if device.mean_interval <= HOUR:
        return 0.95
    if device.mean_interval <= 12 * HOUR:
        return 0.6
    return 0.25


def _error_share(rng: random.Random) -> float:
    draw = rng.random()
    if draw < 0.8:
        return rng.uniform(0.02, 0.08)
    if draw < 0.95:
        return rng.uniform(0.1, 0.25)
    return rng.uniform(0.4, 0.7)  # a device with a broken policy stack
