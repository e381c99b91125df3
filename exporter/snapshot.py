"""What the store keeps, row by row, and the loop that keeps it: durable before visible.

``Persistence.collect()`` takes, in one event-loop step, every row that changed since the
last commit: the ledger entries and device views marked changed, the fleet's counters and
the exporter's own, the planner's marks. Ledger and counters are taken in the same step,
so the store never holds a count without the ledger entry that stops it counting again,
nor the reverse. ``commit()`` writes them in one transaction on the store's own thread;
the render loop publishes a /metrics body only after the commit of what it shows.

Rows are msgspec structs encoded as MessagePack arrays: typed on the way back (a row that
does not decode is a bad store, moved aside), and small (a tracked action costs its cmdId
and one small int).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import Any, NamedTuple

import msgspec
import structlog

from exporter.devicehealth import UNKNOWN, DeviceHealth
from exporter.dialect import Verdicts
from exporter.fleetview import BatchState, DeviceState, Poll
from exporter.ledger import SEEN_AT_STEP, ActionRecord, Floor, LedgerEntry
from exporter.planner import Tracking
from exporter.selfmetrics import SelfMetrics
from exporter.state import FleetState
from exporter.statuses import Rank
from exporter.store import Delta, DirectoryLock, Loaded, Store, StoreUnusable

log = structlog.get_logger("exporter.snapshot")

# How often a store that could not be opened is tried again (opening is cheap).
REOPEN_SECONDS = 5.0


class BatchRow(msgspec.Struct, array_like=True):
    id: str
    name: str | None
    created_at: float | None
    summary: list[tuple[str, int]] | None
    from_actions: bool
    agrees: bool
    counts: dict[str, int]  # status name -> count
    oldest_pending: float | None


class DeviceRow(msgspec.Struct, array_like=True):
    watermark: float
    watched_at: float
    name: str | None
    labels: dict[str, str]
    info: dict[str, str]
    last_success: float | None
    check_in: float | None
    state: str
    problems: list[str]
    batches: list[BatchRow]
    # Appended with defaults: rows stored before devices had health still decode.
    compliance: str = UNKNOWN
    compliance_check: float | None = None
    os_version: str | None = None


class EntryRow(msgspec.Struct, array_like=True):
    seen_at: float
    created_at: float | None
    problems: list[str]
    # The distinct records of the batch's actions (a few), and per action its index there.
    records: list[tuple[list[str], int, bool, list[str]]]
    cmds: list[str]
    record_of: list[int]


class SavedHistogram(msgspec.Struct):
    counts: list[int]
    sum: float
    count: int


class SavedCounters(msgspec.Struct):
    """FleetCounters.saved()'s shape: a blob of another shape does not decode."""

    transitions: dict[str, int] = msgspec.field(default_factory=dict)
    latency: dict[str, SavedHistogram] = msgspec.field(default_factory=dict)
    settings: list[tuple[str, str, list[int]]] = msgspec.field(default_factory=list)


class SavedSelf(msgspec.Struct):
    """self_metrics_blob()'s shape."""

    api_requests: list[tuple[str, str, int]] = msgspec.field(default_factory=list)
    api_durations: dict[str, tuple[list[int], float, int]] = msgspec.field(default_factory=dict)
    parse_problems: dict[str, int] = msgspec.field(default_factory=dict)
    poll_rounds: int = 0
    poll_failures: dict[str, int] = msgspec.field(default_factory=dict)


_encode = msgspec.msgpack.Encoder().encode
_DEVICE = msgspec.msgpack.Decoder(DeviceRow)
_ENTRY = msgspec.msgpack.Decoder(EntryRow)
_TRACKING = msgspec.msgpack.Decoder(Tracking)
_FLOORS = msgspec.msgpack.Decoder(dict[str, tuple[float, float]])
_COUNTERS = msgspec.msgpack.Decoder(SavedCounters)
_SELF = msgspec.msgpack.Decoder(SavedSelf)
_VERDICTS = msgspec.msgpack.Decoder(list[tuple[str, str, str, float, float]])


# --- rows ----------------------------------------------------------------------------------


class TakenDevice(NamedTuple):
    """A device as a commit took it: the values of its fields, each replaced on change and
    never changed in place (labels, info, a batch's counts and summary), so its row is
    encoded on the store's thread while the loop goes on, like a ledger entry's."""

    dev: tuple[Any, ...]
    # Per batch: id, name, created_at, summary, from_actions, agrees, counts, oldest_pending.
    batches: tuple[tuple[Any, ...], ...]


def taken_device(dev: DeviceState) -> TakenDevice:
    return TakenDevice(
        (dev.watermark, dev.watched_at, dev.name, dev.labels, dev.info, dev.poll.last_success,
         dev.check_in, dev.state, dev.problems, dev.health),
        tuple(
            (batch_id, b.name, b.created_at, b.summary, b.from_actions, b.agrees, b.counts,
             b.oldest_pending)
            for batch_id, b in dev.batches.items()
        ),
    )


def device_row(dev: DeviceState | TakenDevice, names: Sequence[str]) -> bytes:
    """``names``: the status names by index (the table only grows)."""
    taken = dev if isinstance(dev, TakenDevice) else taken_device(dev)
    watermark, watched_at, name, labels, info, last_success, check_in, state, problems, health = (
        taken.dev
    )
    batches = [
        BatchRow(
            batch_id, batch_name, created_at, list(summary) if summary is not None else None,
            from_actions, agrees, {names[s]: n for s, n in counts.items()}, oldest_pending,
        )
        for batch_id, batch_name, created_at, summary, from_actions, agrees, counts,
        oldest_pending in taken.batches
    ]
    return _encode(DeviceRow(
        watermark, watched_at, name, dict(labels), dict(info), last_success, check_in, state,
        sorted(problems), batches, health.compliance, health.last_check, health.os_version,
    ))


def restored_device(row: DeviceRow, intern: Callable[[str], int]) -> DeviceState:
    """The device as stored; not up until it is read again (its last success stays)."""
    batches = {
        b.id: BatchState(
            name=b.name, created_at=b.created_at,
            summary=tuple(b.summary) if b.summary is not None else None,
            from_actions=b.from_actions, agrees=b.agrees,
            counts={intern(status): n for status, n in b.counts.items()},
            oldest_pending=b.oldest_pending,
        )
        for b in row.batches
    }
    return DeviceState(
        watermark=row.watermark, watched_at=row.watched_at, name=row.name,
        labels=MappingProxyType(row.labels), info=MappingProxyType(row.info),
        poll=Poll(last_success=row.last_success), check_in=row.check_in, state=row.state,
        batches=batches, problems=frozenset(row.problems),
        health=DeviceHealth(row.compliance, row.compliance_check, row.os_version),
    )


class TakenEntry(NamedTuple):
    """A ledger entry as a commit took it: immutable values only (its actions dict is
    replaced on change, never changed in place), so its row is encoded on the store's
    thread while the loop goes on."""

    seen_at: float
    created_at: float | None
    problems: frozenset[str]
    actions: Mapping[str, ActionRecord]


def taken(entry: LedgerEntry) -> TakenEntry:
    return TakenEntry(entry.seen_at, entry.created_at, entry.problems, entry.actions)


def entry_row(entry: TakenEntry) -> bytes:
    index: dict[ActionRecord, int] = {}
    record_of = [index.setdefault(r, len(index)) for r in entry.actions.values()]
    records = [
        (sorted(r.entered), int(r.reached), r.received, sorted(r.problems)) for r in index
    ]
    return _encode(EntryRow(
        entry.seen_at, entry.created_at, sorted(entry.problems), records,
        list(entry.actions), record_of,
    ))


def encoded(delta: Delta, names: Sequence[str]) -> Delta:
    """``delta`` with its device and ledger rows encoded (on the store's thread)."""
    delta.devices = {
        device: device_row(row, names) if isinstance(row, TakenDevice) else row
        for device, row in delta.devices.items()
    }
    delta.ledger = {
        key: entry_row(row) if isinstance(row, TakenEntry) else row
        for key, row in delta.ledger.items()
    }
    return delta


def restored_entry(
    row: EntryRow, step: float, share: Callable[[ActionRecord], ActionRecord]
) -> LedgerEntry:
    records = [
        share(ActionRecord(frozenset(e), Rank(r), received, frozenset(p)))
        for e, r, received, p in row.records
    ]
    if len(row.cmds) != len(row.record_of):
        raise ValueError("ledger row: cmds and records differ in length")
    # A stored seen_at lags the true one by up to a step: prune that much later, not earlier.
    seen_at = row.seen_at + step
    entry = LedgerEntry(seen_at, row.created_at, frozenset(row.problems))
    entry.actions = dict(zip(row.cmds, map(records.__getitem__, row.record_of), strict=True))
    entry.stored_seen_at = seen_at
    return entry


def self_metrics_blob(metrics: SelfMetrics) -> bytes:
    """The exporter's own counters (gauges are recomputed by the running process)."""
    return _encode({
        "api_requests": [[e, c, n] for (e, c), n in metrics.api_requests.items()],
        "api_durations": {
            e: [h.counts, h.sum, h.count] for e, h in metrics.api_durations.items()
        },
        "parse_problems": dict(metrics.parse_problems),
        "poll_rounds": metrics.poll_rounds,
        "poll_failures": dict(metrics.poll_failures),
    })


def restore_self_metrics(metrics: SelfMetrics, saved: SavedSelf) -> None:
    for endpoint, code, n in saved.api_requests:
        metrics.api_requests[(endpoint, code)] += n
    for endpoint, (counts, total, count) in saved.api_durations.items():
        histogram = metrics.api_durations.get(endpoint)
        if histogram is not None and len(counts) == len(histogram.counts):
            histogram.counts, histogram.sum, histogram.count = counts, total, count
    metrics.parse_problems.update(saved.parse_problems)
    metrics.poll_rounds += saved.poll_rounds
    metrics.poll_failures.update(saved.poll_failures)
    metrics.touch()


def tracking_row(tracking: Tracking) -> bytes:
    return _encode(tracking)


# --- the loop ------------------------------------------------------------------------------


class Persistence:
    """Takes what changed from the state and commits it, off the event loop."""

    def __init__(
        self,
        opener: Callable[[], Store],
        state: FleetState,
        metrics: SelfMetrics,
        marks: Callable[[], MutableMapping[str, Tracking]] = dict,
        lock: DirectoryLock | None = None,
        verdicts: Verdicts | None = None,
    ) -> None:
        """``opener`` opens the store (again, after a failure); ``lock`` is the directory's,
        released on close."""
        self._opener = opener
        self._lock = lock
        self._verdicts = verdicts
        # From now on the state notes what changes, for collect() to take; what it holds
        # already is all new to the store.
        state.view.changed, state.ledger.changed = set(state.view.devices), set(
            (d, b) for d, b, _ in state.ledger.entries()
        )
        self.store: Store | None = None
        self._opened_at = -math.inf  # monotonic, last attempt to open
        self._state = state
        self._metrics = metrics
        self._marks = marks
        # The store's own thread: SQLite wants one writer, and the loop must not wait on it.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        # Each device's plan marks as last written: compared as bytes, which the write
        # needs anyway (b"": a delete still to write).
        self._stored_marks: dict[str, bytes] = {}
        self._stored_blobs: dict[str, bytes] = {}

    # --- start -------------------------------------------------------------------------------

    def open(self) -> bool:
        """Open the store; an unusable one (read-only directory, I/O error) is a storage
        failure like any other: counted, logged once, tried again later."""
        self._opened_at = time.monotonic()
        try:
            self.store = self._opener()
        except StoreUnusable as exc:
            if self._metrics.storage_failed():
                log.error("storage_unusable", reason=str(exc))
            return False
        return True

    def load(self) -> int:
        """Put the stored fleet back into the state; returns the devices restored. Rows are
        decoded before anything is applied: a store that does not decode is moved aside
        and the exporter starts clean."""
        assert self.store is not None
        try:
            decoded = _decode(self.store.load())
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as exc:
            self.store = self.store.discard(f"undecodable ({exc})")
            return 0
        state = self._state
        intern = state.counters.statuses.intern
        for device, row in decoded["devices"].items():
            state.view.add(device, restored_device(row, intern))
        step = state.ledger.retention_seconds * SEEN_AT_STEP
        share = state.ledger.share
        for device, batch_id, row in decoded["ledger"]:
            state.ledger.restore_entry(device, batch_id, restored_entry(row, step, share))
        for device, floor in decoded["floors"].items():
            state.ledger.restore_floor(device, Floor(*floor))
        state.counters.restore(decoded["counters"])
        restore_self_metrics(self._metrics, decoded["self"])
        if self._verdicts is not None:
            self._verdicts.restore(decoded["verdicts"], time.time())
        marks = self._marks()
        for device, tracking in decoded["marks"].items():
            marks[device] = tracking
            self._stored_marks[device] = tracking_row(tracking)
        # What was just loaded is what the store holds: nothing to write back.
        state.view.changed.clear()
        state.ledger.changed.clear()
        self._stored_blobs["floors"] = _encode(state.ledger.floors())
        state.view.bump()
        return len(decoded["devices"])

    # --- each render -------------------------------------------------------------------------

    def collect(self) -> Delta:
        """Every row that changed, taken in this one step (see the module docstring)."""
        state, delta = self._state, Delta()
        if self.store is None:  # nothing to write to: a reopened store takes everything
            return delta
        view, ledger = state.view, state.ledger
        for device in view.changed:
            dev = view.devices.get(device)
            delta.devices[device] = taken_device(dev) if dev is not None else None  # type: ignore[assignment]
        view.changed = set()
        for key in ledger.changed:
            entry = ledger.get(*key)
            delta.ledger[key] = taken(entry) if entry is not None else None  # type: ignore[assignment]
            if entry is not None:
                entry.stored_seen_at = entry.seen_at
        ledger.changed = set()
        blobs = {
            "floors": _encode(ledger.floors()),
            "counters": _encode(state.counters.saved()),
            "self": self_metrics_blob(self._metrics),
        }
        if self._verdicts is not None:
            # Whole seconds: the same verdicts make the same bytes, and are not written again.
            blobs["verdicts"] = _encode([
                (*row[:3], round(row[3]), round(row[4]))
                for row in self._verdicts.saved(time.time())
            ])
        delta.blobs = {k: v for k, v in blobs.items() if self._stored_blobs.get(k) != v}
        self._collect_marks(delta)
        return delta

    def _collect_marks(self, delta: Delta) -> None:
        marks = self._marks()
        for device, tracking in marks.items():
            row = tracking_row(tracking)
            if self._stored_marks.get(device) != row:
                delta.marks[device] = self._stored_marks[device] = row
        for device in [d for d in self._stored_marks if d not in marks]:
            delta.marks[device] = None
            del self._stored_marks[device]

    async def flush(self) -> bool:
        """Commit whatever changed, now (at shutdown: what the last render did not take)."""
        return await self.commit(self.collect())

    async def commit(self, delta: Delta) -> bool:
        """Write ``delta`` in one transaction; on failure, its rows are taken again next
        time (the state marks them changed once more), so the store becomes whole."""
        if self.store is None:
            if time.monotonic() - self._opened_at > REOPEN_SECONDS and self.open():
                self._rewrite_all()
            return False
        if not delta:
            return True
        loop = asyncio.get_running_loop()
        try:
            store = self.store
            names = self._state.counters.statuses.names
            await loop.run_in_executor(
                self._thread, lambda: store.write(encoded(delta, names))
            )
        except Exception as exc:  # disk full, permission lost, I/O error: never fatal
            self._failed(delta, exc)
            return False
        self._stored_blobs.update(delta.blobs)
        if self._metrics.storage_written(time.time()):
            log.info("storage_write_recovered")
        return True

    def _failed(self, delta: Delta, exc: Exception) -> None:
        state = self._state
        state.view.changed.update(delta.devices)
        state.ledger.changed.update(delta.ledger)  # taken again, whatever their seen_at
        for device, row in delta.marks.items():
            if row is None:
                self._stored_marks[device] = b""  # still to delete
            else:
                self._stored_marks.pop(device, None)
        if self._metrics.storage_failed():  # the first failure in a row: one line
            log.error("storage_write_failed", reason=f"{type(exc).__name__}: {exc}",
                      directory=str(self.store.directory) if self.store else None)

    def _rewrite_all(self) -> None:
        """A store opened late (or after a failure) gets everything at the next commit."""
        state = self._state
        state.view.changed.update(state.view.devices)
        state.ledger.changed.update((d, b) for d, b, _ in state.ledger.entries())
        self._stored_marks.clear()
        self._stored_blobs.clear()

    async def close(self) -> None:
        if self.store is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._thread, self.store.close)
        self._thread.shutdown(wait=True)
        if self._lock is not None:
            self._lock.release()


def _decode(loaded: Loaded) -> dict[str, Any]:
    blobs = loaded.blobs
    return {
        "devices": {d: _DEVICE.decode(row) for d, row in loaded.devices.items()},
        "ledger": [(d, b, _ENTRY.decode(row)) for d, b, row in loaded.ledger],
        "marks": {d: _TRACKING.decode(row) for d, row in loaded.marks.items()},
        "floors": _FLOORS.decode(blobs["floors"]) if "floors" in blobs else {},
        # Checked against their shapes here, so that a bad blob moves the store aside
        # before anything is restored; restored as plain data.
        "counters": msgspec.to_builtins(_COUNTERS.decode(blobs.get("counters", b"\x80"))),
        "self": _SELF.decode(blobs.get("self", b"\x80")),
        "verdicts": _VERDICTS.decode(blobs["verdicts"]) if "verdicts" in blobs else [],
    }
