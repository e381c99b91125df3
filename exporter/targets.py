"""Which devices are watched, and under which key: configured entries merged with
discovery's members, this shard's part of them. Plain data; the scheduler applies the
changes to the state and the plan.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from exporter.config import DeviceConfig
from exporter.records import Device


@dataclass(frozen=True, slots=True)
class Shard:
    index: int
    total: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``INDEX/TOTAL`` with 0 <= INDEX < TOTAL."""
        index_text, sep, total_text = text.partition("/")
        if not sep or not index_text.isdecimal() or not total_text.isdecimal():
            raise ValueError(f"--shard must be INDEX/TOTAL (e.g. 0/3), got {text!r}")
        index, total = int(index_text), int(total_text)
        if total < 1 or index >= total:
            raise ValueError(f"--shard index must be below total, got {text!r}")
        return cls(index, total)

    def owns(self, device: str) -> bool:
        # A stable hash (not Python's salted hash()) so every replica agrees on the split.
        digest = hashlib.sha256(device.lower().encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.total == self.index


@dataclass(frozen=True, slots=True)
class Target:
    """One watched device: from the config, or discovered."""

    device: str
    name: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    commands: tuple[str, ...] | None = None
    info: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_config(cls, device: DeviceConfig) -> Target:
        return cls(device.id, device.name, device.labels, device.commands)

    @classmethod
    def discovered(cls, device: Device) -> Target:
        info = {"serial": device.serial, "imei": device.imei, "win_id": device.win_id}
        return cls(
            device.id,
            device.name,
            info=tuple((k, v) for k, v in info.items() if v),
        )


@dataclass(frozen=True, slots=True)
class Changes:
    """What a merge changed: devices no longer watched, and the new or changed targets with
    what each was before (None for a new one), in the order of the watched devices."""

    unwatched: tuple[str, ...] = ()
    changed: tuple[tuple[Target, Target | None], ...] = ()
    discovered_moved: bool = False  # discovery's members are not those of its last list


class Watchlist:
    """The watched devices and the keys they go by.

    Shards split the fleet by each device's canonical 24-hex id when discovery knows it, so
    a device configured by serial number or IMEI and also discovered is watched by exactly
    one shard, once. An explicit entry wins (its name, labels and commands are what the
    user asked for) and keeps the id it was configured by as its key.
    """

    def __init__(self, shard: Shard | None = None) -> None:
        self._shard = shard
        self._configured: tuple[DeviceConfig, ...] = ()
        self._discovered: dict[str, Target] = {}
        self._targets: dict[str, Target] = {}
        self._aliases: dict[str, str] = {}  # lower-case id, serial or IMEI -> target key
        self._shown: set[str] = set()  # watched devices discovery's last list showed

    @property
    def targets(self) -> dict[str, Target]:
        """Watched key -> target (the live mapping: read, do not change)."""
        return self._targets

    @property
    def discovered_count(self) -> int:
        """How many devices discovery's last list had."""
        return len(self._discovered)

    def reconfigure(self, configured: Sequence[DeviceConfig], *, discovering: bool) -> Changes:
        """New configured entries; without discovery its members are forgotten."""
        self._configured = tuple(configured)
        if not discovering:
            self._discovered, self._shown = {}, set()
        return self._merge()

    def discover(self, devices: Sequence[Device]) -> Changes:
        """Discovery's members from its whole list; remembers the watched devices it showed."""
        discovered = {d.id: Target.discovered(d) for d in devices}
        moved = discovered != self._discovered
        self._discovered = discovered
        changes = self._merge(moved)
        self._shown = {key for key in map(self.key_of, devices) if key is not None}
        return changes

    def key_of(self, device: Device) -> str | None:
        """The watched key a listed device goes by (its id, serial or IMEI), if watched."""
        for ident in (device.id, device.serial, device.imei):
            if ident:
                key = self._aliases.get(ident.lower())
                if key is not None:
                    return key
        return None

    def configured_only(self) -> set[str]:
        """Watched configured devices that discovery's last list did not show."""
        configured = {d.id for d in self._configured if d.id in self._targets}
        return configured - self._shown

    def _owns(self, device: str) -> bool:
        return self._shard is None or self._shard.owns(device)

    def _merge(self, discovered_moved: bool = False) -> Changes:
        wanted = self._wanted(self._canonical())
        changes = Changes(
            unwatched=tuple(self._targets.keys() - wanted.keys()),
            changed=tuple(_changed(wanted.items(), self._targets)),
            discovered_moved=discovered_moved,
        )
        self._targets = wanted
        self._aliases = {key.lower(): key for key in wanted}
        return changes

    def _canonical(self) -> dict[str, str]:
        """Lower-case id, serial or IMEI -> the discovered id it names."""
        canonical: dict[str, str] = {}
        for device_id, target in self._discovered.items():
            canonical[device_id.lower()] = device_id
            for key, value in target.info:
                if key in ("serial", "imei"):
                    canonical.setdefault(value.lower(), device_id)
        return canonical

    def _wanted(self, canonical: dict[str, str]) -> dict[str, Target]:
        wanted: dict[str, Target] = {}
        claimed: set[str] = set()  # discovered ids that a configured entry names
        for device in self._configured:
            owner = canonical.get(device.id.lower())
            if owner is not None:
                claimed.add(owner)
            if self._owns(owner or device.id):
                wanted[device.id] = Target.from_config(device)
        for device_id, target in self._discovered.items():
            if device_id not in claimed and self._owns(device_id):
                wanted[device_id] = target
        return wanted


def _changed(
    wanted: Iterable[tuple[str, Target]], before: dict[str, Target]
) -> Iterable[tuple[Target, Target | None]]:
    for key, target in wanted:
        previous = before.get(key)
        if previous != target:
            yield target, previous
