"""The simulated fleet: devices, command batches and actions living on one event heap.

Pure of HTTP. Everything that happens to the fleet is an event on the time line
(``timeline.py``): batch creations, device check-ins (OMA-DM sessions), device answers and
administrator cancellations. :meth:`Fleet.run_until` applies events in time order, so nothing
is ever visible before the moment it carries, and a fixed seed gives the same history
whatever the real-time pace of the requests.

History is made by the same machinery: the builder pushes the creation of every historical
batch (single ones and rollouts) and runs the heap up to the start. The newest rollout of
the history went out shortly before the start and is still under way.

The parts: ``model.py`` (the entities), ``profiles.py`` (who the devices are),
``workload.py`` (what administrators send), ``sessions.py`` (how actions move once sent),
``health.py`` (compliance and Windows builds, moved by the sessions and their answers).
"""

from __future__ import annotations

import gc
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from exporter.simulator.catalog import Config
from exporter.simulator.clock import SimClock
from exporter.simulator.faults import DEVICE_OPTIONAL, Faults
from exporter.simulator.health import (
    BAD_FORMS,
    Compliance,
    ComplianceFlip,
    Health,
    served,
    served_form,
)
from exporter.simulator.model import (
    DAY,
    HOUR,
    MINUTE,
    PENDING,
    Action,
    Batch,
    Device,
    Event,
    ObjectIds,
    UnknownEntity,
    millis,
)
from exporter.simulator.profiles import choose_quirks, new_device
from exporter.simulator.sessions import Sessions
from exporter.simulator.timeline import (
    ANSWER,
    ARRIVAL,
    CANCEL_ACTION,
    CANCEL_BATCH,
    CHECKIN,
    CREATE,
    ROLLOUT,
    Agenda,
    Journal,
)
from exporter.simulator.validation import parse_commands
from exporter.simulator.workload import (
    MEAN_REACH,
    ROLLOUT_SHARE,
    ROLLOUT_SPREAD,
    Commands,
    default_name,
    random_commands,
    roll_out,
)
from exporter.statuses import PENDING_STATUSES, classify

# The entities are imported from here by the benchmarks.
__all__ = [
    "Action", "Batch", "Compliance", "ComplianceFlip", "Device", "Event", "Fleet", "Pace",
    "UnknownEntity",
]

HISTORY_DAYS = 14.0
RECENT_SHARE = 0.15  # history batches created in the last RECENT_SPAN before the start
RECENT_SPAN = 2 * 3600.0


@dataclass(frozen=True, slots=True)
class Pace:
    """How much work the fleet gets, and how often its devices come for it."""

    actions_per_batch: tuple[int, int]
    arrival_rate: float  # new batches per device and second
    checkin_seconds: float | None  # every device's mean time between sessions, if given
    rollout_share: float


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
        os_versions: int | None = None,
    ) -> None:
        low, high = actions_per_batch
        if devices < 0 or batches_per_device < 0 or not 1 <= low <= high:
            raise ValueError("devices, batches_per_device and actions_per_batch out of range")
        self.clock = clock
        self.faults = faults
        self._pace = Pace(
            (low, high), new_batches_per_device_hour / HOUR, checkin_seconds, rollout_share
        )
        self._rng = random.Random(f"{seed}/fleet")
        self._agenda = Agenda()
        self._journal = Journal(record_events)
        push_rng = random.Random(f"{seed}/push") if push else None
        # Its own stream: health's draws leave every other field a seed builds as it was.
        self._health = Health(random.Random(f"{seed}/health"), self._journal, os_versions)
        self._sessions = Sessions(
            self._rng, push_rng, self._agenda, self._journal, clock.start, self._health
        )
        self._devices: list[Device] = []
        self._lookup: dict[str, Device] = {}  # by id, serial number and IMEI
        self._batches: dict[str, Batch] = {}
        self._ids = ObjectIds(self._rng)
        self.organization_id = self._ids.make(clock.start - 900 * DAY)
        self.enterprise_id = self._ids.make(clock.start - 899 * DAY)
        self.now = clock.start
        self._build(devices, batches_per_device)

    @property
    def record_events(self) -> bool:
        return self._journal.record

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
        events = []
        for when, action, status in self._journal.events_after(moment):
            shown = self.shown_status(action, status)
            batch = action.batch
            events.append(
                Event(when, batch.device.id, batch.id, action.cmd_id, shown, classify(shown).value)
            )
        return events

    def compliance(self, device_id: str) -> Compliance:
        """The device's compliance as its document serves it now (faults included)."""
        self.sync()
        device = self.device(device_id)
        faults = self.faults
        bad = faults.stable("bad_compliance", device.id)
        pick = faults.pick("bad_compliance", device.id, BAD_FORMS) if bad else None
        dropped = None
        if faults.stable("missing_fields", device.id):
            dropped = faults.pick("missing_fields", device.id, DEVICE_OPTIONAL)
        return served(device.health, served_form(bad, pick, dropped, device.health))

    def compliance_flips_since(self, moment: float) -> list[ComplianceFlip]:
        """Every compliance change after ``moment``, in time order (not what faults serve)."""
        self.sync()
        return self._journal.flips_after(moment)

    def acks_since(self, moment: float) -> list[tuple[float, str]]:
        """(receivedAt − sentAt, status class) of every answer received after ``moment``."""
        self.sync()
        return [
            (latency, classify(self.shown_status(action)).value)
            for _, latency, action in self._journal.acks_after(moment)
        ]

    # --- changes from outside --------------------------------------------------------------

    def sync(self) -> None:
        """Apply everything due up to the clock's present."""
        self.run_until(self.clock.now())

    def run_until(self, moment: float) -> None:
        for when, _, kind, subject, extra in self._agenda.due(moment):
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
            device, millis(self.now), configs, name or default_name(configs), error_ratio
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
        self._enroll(count, start)
        taken = self._plan_history_rollouts(start, batches_per_device)
        for device in self._devices:
            self._plan_history(device, start, batches_per_device - taken[device])
        self.run_until(start)
        self._sessions.building = False
        for device in self._devices:
            self._settle_last_report(device, start)
            if device.online_at(start) and device.next_checkin is None:
                self._sessions.schedule_checkin(device, start)
        self._journal.sort()
        if self._devices and self._pace.arrival_rate > 0:
            self._schedule_arrival(start)
            if self._pace.rollout_share > 0:
                self._schedule_rollout(start)

    def _enroll(self, count: int, start: float) -> None:
        quirks = choose_quirks(self._rng, count)
        for index in range(count):
            device = new_device(
                self._rng, self._ids, index, start, quirks.get(index),
                taken=self._lookup, checkin_seconds=self._pace.checkin_seconds,
            )
            self._health.enroll(device, index, start)
            for key in (device.id, device.profile.serial, device.profile.imei):
                if key is not None:
                    self._lookup[key] = device
            self._devices.append(device)

    def _plan_history(self, device: Device, start: float, count: int) -> None:
        rng = self._rng
        earliest = max(device.profile.enrolled, start - HISTORY_DAYS * DAY)
        span = start - earliest
        # Denser towards the present; a share lands in the last hours, so that a fleet
        # starts with work still pending as well as finished history.
        for _ in range(count):
            if rng.random() < RECENT_SHARE:
                created = millis(start - min(span, RECENT_SPAN) * rng.random())
            else:
                created = millis(start - span * rng.random() ** 2)
            self._agenda.push(created, CREATE, device, None)

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
        candidates = [drawn, device.profile.enrolled]
        if device.last_report is not None:
            candidates.append(device.last_report)
        device.last_report = max(candidates)
        device.json = None
        self._health.settled(device)

    # --- the event heap --------------------------------------------------------------------

    def _apply(self, when: float, kind: int, subject: object, extra: object) -> None:
        sessions = self._sessions
        if kind == ANSWER:
            sessions.answer(when, subject, extra)  # type: ignore[arg-type]
        elif kind == CHECKIN:
            sessions.checkin(when, subject)  # type: ignore[arg-type]
        elif kind == CREATE:
            # A rollout's batch carries its commands; a single one draws them now.
            planned: Commands | None = extra  # type: ignore[assignment]
            configs, name = planned or self._random_commands(subject)  # type: ignore[arg-type]
            self._create(subject, when, configs, name, None)  # type: ignore[arg-type]
        elif kind == CANCEL_ACTION:
            sessions.cancel(when, subject)  # type: ignore[arg-type]
        elif kind == CANCEL_BATCH:
            for action in subject.actions:  # type: ignore[attr-defined]
                sessions.cancel(when, action)
        elif kind == ARRIVAL:
            device = self.random_device()
            configs, name = self._random_commands(device)
            self._create(device, when, configs, name, None)
            self._schedule_arrival(when)
        elif kind == ROLLOUT:
            self._roll_out(when)
            self._schedule_rollout(when)

    def _schedule_arrival(self, after: float) -> None:
        pace = self._pace
        rate = pace.arrival_rate * len(self._devices) * (1.0 - pace.rollout_share)
        self._agenda.push(millis(after + self._rng.expovariate(rate)), ARRIVAL, None, None)

    def _schedule_rollout(self, after: float) -> None:
        # Each reaches about MEAN_REACH of the fleet: rollouts make rollout_share of the
        # new batches at this pace.
        rate = self._pace.arrival_rate * self._pace.rollout_share / MEAN_REACH
        self._agenda.push(millis(after + self._rng.expovariate(rate)), ROLLOUT, None, None)

    def _roll_out(self, when: float) -> list[Device]:
        sizes = self._pace.actions_per_batch
        planned, creations = roll_out(self._rng, self._devices, when, sizes)
        for moment, device in creations:
            self._agenda.push(moment, CREATE, device, planned)
        return [device for _, device in creations]

    def _random_commands(self, device: Device) -> Commands:
        return random_commands(self._rng, device, self._pace.actions_per_batch)

    def _create(
        self,
        device: Device,
        when: float,
        configs: Sequence[Config],
        name: str,
        error_ratio: float | None,
    ) -> Batch:
        batch = Batch(self._ids.make(when), device, name, when)
        batch.error_ratio = error_ratio
        batch.actions = [Action(batch, index, config) for index, config in enumerate(configs)]
        batch.open_count = len(batch.actions)
        device.batches.append(batch)
        device.open[batch] = None
        self._batches[batch.id] = batch
        self._sessions.created(batch, when)
        return batch
