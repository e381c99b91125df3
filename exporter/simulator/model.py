"""The simulated fleet's entities: devices, command batches and actions, and their identifiers.

Plain mutable records, no behaviour beyond derived fields: the fleet (``fleet.py``) and the
sessions (``sessions.py``) move them. A fleet of millions of actions keeps them in
``__slots__`` and derives what it can on demand.

All timestamps are whole milliseconds, as upstream serialises them (:func:`millis`).
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, NamedTuple

from exporter.simulator.catalog import Config
from exporter.statuses import PENDING_STATUSES

if TYPE_CHECKING:
    from exporter.simulator.health import Standing

DAY = 86400.0
HOUR = 3600.0
MINUTE = 60.0

PENDING = "Pending"
AWAITING = "Awaiting"

# Device states (docs/upstream-api.md §5.1).
ACTIVE, PROVISIONING, DELETE_REQUESTED = "ACTIVE", "PROVISIONING", "DELETE_REQUESTED"


class Event(NamedTuple):
    """An action entering a status (ground truth for tests)."""

    time: float
    device_id: str
    batch_id: str
    cmd_id: str
    status: str
    status_class: str


@dataclass(frozen=True, slots=True)
class Profile:
    """What a device reports about itself; a change (new tags, say) replaces the record."""

    enrolled: float
    name: str
    tags: tuple[str, ...]
    segment: int
    serial: str
    model: str
    imei: str | None
    win_id: str
    os: tuple[str, str]  # (version, version name)
    user: tuple[str, str, str] | None  # (id, email, display name)


class Device:
    """One enrolled device: its profile, habits and the work it has been sent."""

    __slots__ = (
        "batches", "error_share", "health", "id", "inflight", "json", "last_report",
        "mean_interval", "next_checkin", "offline_since", "open", "profile", "state",
    )

    def __init__(
        self,
        device_id: str,
        profile: Profile,
        *,
        state: str,
        mean_interval: float,
        offline_since: float | None,
        error_share: float,
    ) -> None:
        self.id = device_id
        self.profile = profile
        self.state = state
        self.mean_interval = mean_interval  # mean seconds between two sessions
        self.offline_since = offline_since  # its sessions stop then (past or future)
        self.error_share = error_share  # of its answers, those that are errors
        self.batches: list[Batch] = []
        # Batches with actions that can still change, in creation order (a dict as an ordered set).
        self.open: dict[Batch, None] = {}
        self.inflight: set[Action] = set()  # answers on their way
        self.next_checkin: float | None = None
        self.last_report: float | None = None
        self.json: bytes | None = None
        self.health: Standing | None = None  # compliance and build (health.py), once enrolled

    @property
    def online(self) -> bool:
        """Whether the device keeps checking in for good."""
        return self.offline_since is None

    def online_at(self, moment: float) -> bool:
        return self.offline_since is None or moment < self.offline_since

    # The profile's fields, read as the device's own (the routes and tests name them so);
    # their types are the profile's.
    enrolled = property(attrgetter("profile.enrolled"))
    name = property(attrgetter("profile.name"))
    tags = property(attrgetter("profile.tags"))
    segment = property(attrgetter("profile.segment"))
    serial = property(attrgetter("profile.serial"))
    model = property(attrgetter("profile.model"))
    imei = property(attrgetter("profile.imei"))
    win_id = property(attrgetter("profile.win_id"))
    os = property(attrgetter("profile.os"))
    user = property(attrgetter("profile.user"))


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


class UnknownEntity(LookupError):
    """No such device, or no such batch on that device."""


class ObjectIds:
    """Mongo ObjectIds as upstream makes them: creation second, process id, counter."""

    __slots__ = ("_counter", "_processes")

    def __init__(self, rng: random.Random) -> None:
        self._counter = rng.getrandbits(24)
        # Several processes, as behind a load balancer: ids of one second differ beyond the
        # counter too.
        self._processes = tuple(rng.getrandbits(40) for _ in range(3))

    def make(self, moment: float) -> str:
        self._counter = (self._counter + 1) & 0xFFFFFF
        process = self._processes[self._counter % len(self._processes)]
        return f"{int(moment) & 0xFFFFFFFF:08x}{process:010x}{self._counter:06x}"


def _cmd_id(batch_id: str, index: int) -> str:
    # Shaped like upstream's "cmd-550e8400-e29b-41d4", fixed by the batch and position.
    digest = hashlib.blake2b(f"{batch_id}/{index}".encode(), digest_size=8).hexdigest()
    return f"cmd-{digest[:8]}-{digest[8:12]}-{digest[12:16]}"


def millis(moment: float) -> float:
    """``moment`` truncated to whole milliseconds (never after it)."""
    return math.floor(moment * 1000.0) / 1000.0
