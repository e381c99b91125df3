"""The device store: per watched device, its sample lines already rendered, as bytes.

As kube-state-metrics' metrics store keeps one rendered entry per object, the store keeps one
:class:`Entry` per device: its lines of each per-device family (a **column**: one bytes
object per family, or per detail of the action gauges that the cardinality guard may serve
instead), re-rendered only when the device's generations moved. A writer walks the columns
in the order of the body; to give it few large sections instead of one per device, a
column's lines are joined in **blocks** of ``BLOCK_DEVICES`` consecutive devices, and a
device's change re-joins its block alone.

The store also keeps what the fleet's sums take from each entry (rollout parts; sample lines
per column and actions per status class for the guard), moved by each entry replaced, so no
refresh walks the whole fleet to sum it.

Both jobs run in steps (generators) that pause when a :class:`Pace` says a step did enough,
so that the event loop serving scrapes never waits for a whole fleet.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from exporter.devicehealth import NO_HEALTH
from exporter.families import (
    ACTIONS,
    CHECK_IN,
    COMMAND_INFO,
    COMPLIANCE_CHECK,
    DEVICE_INFO,
    LAST_SUCCESS,
    OLDEST_PENDING,
    TARGET_UP,
    escape_label_value,
    format_value,
    join_labels,
    label_name,
)
from exporter.rollouts import Part, RolloutTotals, device_parts
from exporter.state import DeviceGenerations, DeviceView, FleetState

# Devices whose lines of one column are joined (and compressed) together: a device's change
# costs its block, a few hundred kB at most, instead of the whole family.
BLOCK_DEVICES = 256

# What one step of a stepwise job may do before it pauses: each bound is about ten
# milliseconds of work (bench/scale.py, 5,000 devices of 20 batches), whatever the fleet's size.
RENDER_STEP_DEVICES = 200  # devices rendered
RENDER_STEP_BYTES = 256 << 10  # bytes of lines rendered (devices with many batches)
LOOK_STEP_DEVICES = 2_000  # devices whose generations are compared
JOIN_STEP_BYTES = 4 << 20  # bytes of blocks joined


class Column(IntEnum):
    """A per-device family's lines, at one detail: the index of an entry's lines."""

    ACTIONS = 0
    BY_STATUS = 1  # the action gauges summed over command (guard levels 1 and 2)
    BY_CLASS = 2  # ... and over status: per status_class (levels 3 and 4)
    OLDEST = 3
    INFO = 4
    COMMAND_INFO = 5
    UP = 6
    LAST_SUCCESS = 7
    CHECK_IN = 8
    COMPLIANCE_CHECK = 9


_STATUS_COLUMNS = (Column.UP, Column.LAST_SUCCESS, Column.CHECK_IN, Column.COMPLIANCE_CHECK)
_COMMAND_COLUMNS = (Column.ACTIONS, Column.OLDEST, Column.COMMAND_INFO)
_COARSE_COLUMNS = (Column.BY_STATUS, Column.BY_CLASS)


@dataclass(frozen=True, slots=True)
class Entry:
    """One device's rendered lines (indexed by :class:`Column`; the coarse columns empty
    while the guard is off) and what the fleet's sums take from it."""

    generations: DeviceGenerations
    lines: tuple[bytes, ...]
    rollouts: tuple[Part, ...]
    class_counts: tuple[tuple[str, int], ...] = ()


# --- rendering one device ---------------------------------------------------------------------


def _device_labels(organization: str, device: str) -> str:
    return join_labels((("organization", organization), ("device", device)))


def info_lines(organization: str, view: DeviceView) -> bytes:
    pairs = [("organization", organization), ("device", view.device), ("name", view.name or "")]
    health = view.health
    if health != NO_HEALTH:  # absent until the device list shows the device
        pairs += [("compliance", health.compliance), ("os_version", health.os_label)]
    taken = {name for name, _ in pairs}
    for key, value in [*view.labels.items(), *view.info.items()]:
        name = label_name(key)
        if name is not None and name not in taken:
            taken.add(name)
            pairs.append((name, value))
    return f"{DEVICE_INFO.name}{{{join_labels(pairs)}}} 1\n".encode(errors="replace")


def status_lines(organization: str, view: DeviceView) -> tuple[bytes, ...]:
    """Lines of target_up, last_success, the check-in time and the compliance check time."""
    base = _device_labels(organization, view.device)
    lines = [f"{TARGET_UP.name}{{{base}}} {1 if view.up else 0}\n", "", "", ""]
    moments = (
        (1, LAST_SUCCESS.name, view.last_success),
        (2, CHECK_IN.name, view.check_in),
        (3, COMPLIANCE_CHECK.name, view.health.last_check),
    )
    for index, name, moment in moments:
        if moment is not None:
            lines[index] = f"{name}{{{base}}} {format_value(moment)}\n"
    return tuple(line.encode(errors="replace") for line in lines)


def _format_status_labels(status: str, status_class: str) -> str:
    return f',status="{escape_label_value(status)}",status_class="{status_class}"}} '


# A handful of statuses make most lines; an odd long one from upstream is not kept.
_cached_status_labels = functools.lru_cache(maxsize=1024)(_format_status_labels)


def _status_labels(status: str, status_class: str) -> str:
    """The end of an action gauge's labels, after its device and command."""
    if len(status) > 64:
        return _format_status_labels(status, status_class)
    return _cached_status_labels(status, status_class)


def command_lines(organization: str, view: DeviceView) -> tuple[bytes, bytes, bytes]:
    """Lines of the action gauges, the oldest pending action and the batch names."""
    base = _device_labels(organization, view.device)
    actions: list[str] = []
    infos: list[str] = []
    for batch in view.batches:
        labels = f'{base},command="{escape_label_value(batch.id)}"'
        head = f"{ACTIONS.name}{{{labels}"
        actions += (
            f"{head}{_status_labels(status, status_class)}{count}\n"
            for status, status_class, count in batch.counts
        )
        if batch.name is not None:
            infos.append(
                f'{COMMAND_INFO.name}{{{labels},name="{escape_label_value(batch.name)}"}} 1\n'
            )
    oldest = ""
    if view.oldest_pending is not None:
        oldest = f"{OLDEST_PENDING.name}{{{base}}} {format_value(view.oldest_pending)}\n"
    return (
        "".join(actions).encode(errors="replace"),
        oldest.encode(errors="replace"),
        "".join(infos).encode(errors="replace"),
    )


def coarse_lines(organization: str, view: DeviceView) -> tuple[bytes, bytes]:
    """The action gauges summed over ``command``, and over ``command`` and ``status``."""
    base = _device_labels(organization, view.device)
    by_status: Counter[tuple[str, str]] = Counter()
    for batch in view.batches:
        for status, status_class, count in batch.counts:
            by_status[(status, status_class)] += count
    status_lines = "".join(
        f"{ACTIONS.name}{{{base}{_status_labels(status, status_class)}{count}\n"
        for (status, status_class), count in sorted(by_status.items())
    )
    class_lines = "".join(
        f'{ACTIONS.name}{{{base},status_class="{status_class}"}} {count}\n'
        for status_class, count in sorted(view.class_counts.items())
        if count
    )
    return status_lines.encode(errors="replace"), class_lines.encode(errors="replace")


def render_device(
    organization: str,
    state: FleetState,
    device: str,
    generations: DeviceGenerations,
    previous: Entry | None,
    *,
    coarse: bool = False,
) -> Entry:
    """The device's entry: only the columns whose generation moved since ``previous`` are
    rendered again (the batch tables are read only when the commands moved)."""
    old = previous.generations if previous is not None else None
    commands_moved = old is None or old.commands != generations.commands
    view = state.device_view(device, with_batches=commands_moved)
    lines = list(previous.lines) if previous is not None else [b""] * len(Column)
    if old is None or old.info != generations.info:
        lines[Column.INFO] = info_lines(organization, view)
    if old is None or old.status != generations.status:
        _put(lines, _STATUS_COLUMNS, status_lines(organization, view))
    if previous is not None and not commands_moved:
        return Entry(generations, tuple(lines), previous.rollouts, previous.class_counts)
    _put(lines, _COMMAND_COLUMNS, command_lines(organization, view))
    if not coarse:
        _put(lines, _COARSE_COLUMNS, (b"", b""))
        return Entry(generations, tuple(lines), device_parts(view.batches))
    _put(lines, _COARSE_COLUMNS, coarse_lines(organization, view))
    class_counts = tuple((c, n) for c, n in view.class_counts.items() if n)
    return Entry(generations, tuple(lines), device_parts(view.batches), class_counts)


def _put(lines: list[bytes], columns: Iterable[Column], values: Iterable[bytes]) -> None:
    for column, value in zip(columns, values, strict=True):
        lines[column] = value


# --- what the fleet's sums take from each entry -------------------------------------------------


class SeriesTotals:
    """Sample lines per column and actions per status class, summed over the entries: moved
    by each entry replaced, so the guard weighs the fleet without walking it."""

    def __init__(self) -> None:
        self.lines = [0] * len(Column)
        self.classes: Counter[str] = Counter()

    def replace(self, old: Entry | None, new: Entry | None) -> None:
        for entry, sign in ((old, -1), (new, 1)):
            if entry is not None:
                for column, lines in enumerate(entry.lines):
                    self.lines[column] += sign * lines.count(b"\n")
                for status_class, count in entry.class_counts:
                    self.classes[status_class] += sign * count


# --- pacing --------------------------------------------------------------------------------


@dataclass(slots=True)
class Pace:
    """Work done since a stepwise job last paused, against what one step may do."""

    rendered: int = 0
    rendered_bytes: int = 0
    looked: int = 0
    joined_bytes: int = 0

    def spend(
        self, *, rendered: int = 0, rendered_bytes: int = 0, looked: int = 0,
        joined_bytes: int = 0,
    ) -> bool:
        """Count work done; True when the step is full (the caller pauses, counting anew)."""
        self.rendered += rendered
        self.rendered_bytes += rendered_bytes
        self.looked += looked
        self.joined_bytes += joined_bytes
        full = (
            self.rendered >= RENDER_STEP_DEVICES
            or self.rendered_bytes >= RENDER_STEP_BYTES
            or self.looked >= LOOK_STEP_DEVICES
            or self.joined_bytes >= JOIN_STEP_BYTES
        )
        if full:
            self.restart()
        return full

    def restart(self) -> None:
        """A pause: the next step starts from nothing."""
        self.rendered = self.rendered_bytes = self.looked = self.joined_bytes = 0


# --- the store ---------------------------------------------------------------------------------


class Block(NamedTuple):
    """One column's lines of ``BLOCK_DEVICES`` consecutive devices: each device's bytes (to
    tell whether any moved) and their join."""

    sources: tuple[bytes, ...]
    joined: bytes


_UNJOINED = Block((), b"")


class DeviceStore:
    """Entries of the watched devices, in device order, and their columns joined in blocks.
    ``coarse``: the guard is on, so entries hold the coarse columns and are weighed."""

    def __init__(self, *, coarse: bool) -> None:
        self.coarse = coarse
        self._entries: dict[str, Entry] = {}
        self._order: list[str] = []
        self._watched: list[str] = []  # FleetState's list the order was last taken from
        # Blocks holding a device rendered since they were last joined; None: every block.
        self._dirty: set[int] | None = None
        self._blocks: dict[Column, list[Block]] = {}
        self.rollouts = RolloutTotals()
        self.series = SeriesTotals()

    def forget(self, *, coarse: bool) -> None:
        """Drop every entry and what was summed from them, to render them all again (the
        joined blocks stay: equal lines rendered again keep their block)."""
        self.coarse = coarse
        self._entries = {}
        self._watched = []
        self._set_order([])
        self.rollouts = RolloutTotals()
        self.series = SeriesTotals()

    def update(self, state: FleetState, pace: Pace) -> Generator[None, None, None]:
        """Render again the devices whose generations moved, in steps. Changes made while
        paused are seen by the next update."""
        self._follow(state.watched())
        organization, entries = state.organization, self._entries
        generations_of = state.device_generations
        unwatched = False
        for index, device in enumerate(self._order):
            try:
                generations = generations_of(device)
            except KeyError:
                unwatched = True  # while paused: the next update drops it
                continue
            previous = entries.get(device)
            if previous is not None and previous.generations == generations:
                # Most devices, most of the time: counted here without a call.
                pace.looked += 1
                if pace.looked >= LOOK_STEP_DEVICES:
                    pace.restart()
                    yield
                continue
            fresh = render_device(
                organization, state, device, generations, previous, coarse=self.coarse
            )
            entries[device] = fresh
            if self._dirty is not None:
                self._dirty.add(index // BLOCK_DEVICES)
            self._sum(previous, fresh)
            if pace.spend(rendered=1, rendered_bytes=sum(map(len, fresh.lines)), looked=1):
                yield
        if unwatched:  # every device of the order has an entry: blocks are made from them
            self._set_order([device for device in self._order if device in self._entries])

    def _follow(self, watched: list[str]) -> None:
        """Take the watched set: devices no longer watched leave, new ones come in order."""
        if watched == self._watched:  # the same list as last time: no set built
            return
        self._watched = watched
        if len(watched) == len(self._order) and set(watched) == set(self._order):
            return
        self._set_order(sorted(watched))
        for gone in self._entries.keys() - set(watched):
            self._sum(self._entries.pop(gone), None)

    def _set_order(self, order: list[str]) -> None:
        self._order = order
        self._dirty = None  # blocks hold other devices now

    def _sum(self, old: Entry | None, new: Entry | None) -> None:
        """Move the fleet's sums from ``old`` to ``new`` (one device's entry)."""
        self.rollouts.replace(old.rollouts if old else (), new.rollouts if new else ())
        if self.coarse:  # only the guard weighs the fleet
            self.series.replace(old, new)

    def join(self, columns: tuple[Column, ...], pace: Pace) -> Generator[None, None, None]:
        """Join again the blocks of ``columns`` that hold a device rendered since (all of
        them for columns not joined before, or after the order changed), in steps."""
        if tuple(self._blocks) != columns:
            # A column kept keeps its blocks (and so the identity of sections that stay).
            self._blocks = {column: self._blocks.get(column, []) for column in columns}
            self._dirty = None
        count = -(-len(self._order) // BLOCK_DEVICES)
        for blocks in self._blocks.values():
            del blocks[count:]
            blocks.extend([_UNJOINED] * (count - len(blocks)))
        todo = range(count) if self._dirty is None else sorted(self._dirty)
        self._dirty = set()
        for index in todo:
            devices = self._order[index * BLOCK_DEVICES : (index + 1) * BLOCK_DEVICES]
            entries = [self._entries[device] for device in devices]
            joined = sum(self._join_block(column, index, entries) for column in columns)
            if pace.spend(looked=len(entries), joined_bytes=joined):
                yield

    def _join_block(self, column: Column, index: int, entries: list[Entry]) -> int:
        """Join one block of one column if any of its lines moved; the bytes joined."""
        sources = tuple(entry.lines[column] for entry in entries)
        blocks = self._blocks[column]
        if sources == blocks[index].sources:
            return 0
        blocks[index] = Block(sources, b"".join(sources))
        return len(blocks[index].joined)

    def entries(self) -> list[Entry]:
        """The entries in device order."""
        return [self._entries[device] for device in self._order]

    def blocks(self, column: Column) -> list[bytes]:
        """The column's lines, block after block (after :meth:`join` of that column)."""
        return [block.joined for block in self._blocks[column]]
