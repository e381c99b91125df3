"""The store as the state sees it: what is committed comes back whole, counts continue, and
nothing that was counted before a restart counts again after it.

Each test runs a FleetState, commits it through Persistence into a real SQLite store in a
temporary directory, and starts a second FleetState from that store, as a restarted process
would.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from pathlib import Path

import msgspec
import pytest

from exporter.dialect import REPROBE_SECONDS, Verdicts
from exporter.ledger import Floor
from exporter.planner import Tracking
from exporter.selfmetrics import SelfMetrics
from exporter.snapshot import Persistence
from exporter.state import FleetState
from exporter.store import DATABASE, DirectoryLock, Store, StoreLocked
from tests.test_state import BATCH, BUCKETS, DEVICE, OTHER_BATCH, START, Clock, action, batch

TOKEN = "s3cr3t-token-never-stored"


def fleet(clock: Clock, metrics: SelfMetrics) -> FleetState:
    return FleetState(organization="acme", latency_buckets=BUCKETS, metrics=metrics, clock=clock)


def persistence(
    directory: Path, state: FleetState, metrics: SelfMetrics, marks: dict[str, Tracking],
    organization: str = "acme",
) -> Persistence:
    keeper = Persistence(lambda: Store.open(directory, organization), state, metrics,
                         marks=lambda: marks)
    assert keeper.open()
    return keeper


def counted(state: FleetState) -> dict[str, int]:
    return {status: n for status, _, n in state.transitions() if n}


def one_batch_read(tmp_path: Path) -> tuple[FleetState, SelfMetrics, Persistence]:
    """A watched device whose one batch was read, and a store attached to it."""
    clock, metrics = Clock(START), SelfMetrics()
    state = fleet(clock, metrics)
    state.watch(DEVICE)
    state.apply_actions(DEVICE, batch({"Pending": 1}), [action("c1", "Pending")])
    return state, metrics, persistence(tmp_path, state, metrics, {})


async def restarted(directory: Path, clock: Clock) -> tuple[FleetState, SelfMetrics, int]:
    metrics = SelfMetrics()
    state = fleet(clock, metrics)
    keeper = persistence(directory, state, metrics, {})
    devices = keeper.load()
    await keeper.close()
    return state, metrics, devices


async def test_a_restart_continues_counts_and_view_and_counts_nothing_twice(
    tmp_path: Path,
) -> None:
    clock, metrics = Clock(START), SelfMetrics()
    state = fleet(clock, metrics)
    state.watch(DEVICE, name="reception-pc", labels={"site": "madrid"})
    clock.now = START + 60
    sent = [action("c1", "Awaiting", sent=START + 20), action("c2", "Pending")]
    state.apply_actions(DEVICE, batch({"Awaiting": 1, "Pending": 1}), sent)
    state.poll_succeeded(DEVICE)
    metrics.observe_request("commands", "200", 0.1)
    marks = {DEVICE: Tracking(read_at=START + 60, checkin=START + 50, pending=1)}
    keeper = persistence(tmp_path, state, metrics, marks)
    assert await keeper.commit(keeper.collect())
    await keeper.close()
    before = counted(state)
    assert before == {"Pending": 2, "Awaiting": 1}

    again, again_metrics, devices = await restarted(tmp_path, clock)
    assert devices == 1
    assert counted(again) == before
    view = again.device_view(DEVICE)
    assert (view.name, dict(view.labels), view.watermark) == ("reception-pc", {"site": "madrid"},
                                                              START)
    assert not view.up  # not up until read again
    assert view.last_success == state.device_view(DEVICE).last_success
    assert [(b.id, b.counts) for b in view.batches] == [
        (BATCH, (("Awaiting", "pending", 1), ("Pending", "pending", 1)))
    ]
    assert again_metrics.api_requests[("commands", "200")] == 1
    # The same list read again after the restart counts nothing; an answer counts once.
    again.apply_actions(DEVICE, batch({"Awaiting": 1, "Pending": 1}), sent)
    assert counted(again) == before
    answered = [action("c1", "Acknowledged", sent=START + 20, received=START + 70),
                action("c2", "Pending")]
    clock.now = START + 80
    again.apply_actions(DEVICE, batch({"Acknowledged": 1, "Pending": 1}), answered)
    assert counted(again) == {"Pending": 2, "Awaiting": 1, "Acknowledged": 1}
    assert again.latency()["success"].count == 1


async def test_marks_come_back(tmp_path: Path) -> None:
    clock, metrics = Clock(START), SelfMetrics()
    state = fleet(clock, metrics)
    marks = {DEVICE: Tracking(read_at=1.0, checkin=2.0, summaries={BATCH: (("Pending", 1),)})}
    keeper = persistence(tmp_path, state, metrics, marks)
    assert await keeper.commit(keeper.collect())
    await keeper.close()
    loaded: dict[str, Tracking] = {}
    keeper = persistence(tmp_path, fleet(clock, SelfMetrics()), SelfMetrics(), loaded)
    keeper.load()
    await keeper.close()
    assert loaded == marks


async def test_only_what_changed_is_written_again(tmp_path: Path) -> None:
    state, _, keeper = one_batch_read(tmp_path)
    first = keeper.collect()
    assert set(first.devices) == {DEVICE} and set(first.ledger) == {(DEVICE, BATCH)}
    assert await keeper.commit(first)
    assert not keeper.collect()  # nothing moved: nothing to write
    state.apply_actions(DEVICE, batch({"Pending": 1}, batch_id=OTHER_BATCH),
                        [action("c9", "Pending")])
    second = keeper.collect()
    assert set(second.ledger) == {(DEVICE, OTHER_BATCH)}
    await keeper.close()


async def test_a_failed_write_is_retried_until_the_store_is_whole(tmp_path: Path) -> None:
    state, metrics, keeper = one_batch_read(tmp_path)
    real_write = keeper.store.write

    def full(_delta: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    keeper.store.write = full  # type: ignore[method-assign]
    assert not await keeper.commit(keeper.collect())
    assert not await keeper.commit(keeper.collect())
    assert metrics.storage_write_failures == 2 and metrics.storage_failing
    keeper.store.write = real_write  # type: ignore[method-assign]
    assert await keeper.commit(keeper.collect())
    assert not metrics.storage_failing
    await keeper.close()
    again, _, devices = await restarted(tmp_path, Clock(START))
    assert devices == 1 and counted(again) == counted(state)


async def test_a_second_process_on_the_directory_is_refused(tmp_path: Path) -> None:
    first = DirectoryLock(tmp_path)
    first.acquire()
    with pytest.raises(StoreLocked, match=str(tmp_path)) as refused:
        DirectoryLock(tmp_path).acquire()
    assert f"pid {os.getpid()}" in str(refused.value)
    first.release()
    DirectoryLock(tmp_path).acquire()  # free again once the holder is gone


@pytest.mark.parametrize(
    ("spoil", "kept_as"),
    [
        (lambda db: db.write_bytes(b"not a database at all" * 100), "unreadable"),
        (lambda db: _set_meta(db, "schema_version", "999"), "schema"),
        (lambda db: _set_meta(db, "organization", "another-org"), "organization"),
    ],
)
async def test_a_bad_store_is_moved_aside_and_a_clean_one_started(
    tmp_path: Path, spoil: object, kept_as: str
) -> None:
    clock, metrics = Clock(START), SelfMetrics()
    state = fleet(clock, metrics)
    state.watch(DEVICE)
    keeper = persistence(tmp_path, state, metrics, {})
    assert await keeper.commit(keeper.collect())
    await keeper.close()
    spoil(tmp_path / DATABASE)  # type: ignore[operator]
    _, _, devices = await restarted(tmp_path, clock)
    assert devices == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f"{DATABASE}.{kept_as}-")]


async def test_rows_that_do_not_decode_move_the_store_aside(tmp_path: Path) -> None:
    clock, metrics = Clock(START), SelfMetrics()
    state = fleet(clock, metrics)
    state.watch(DEVICE)
    keeper = persistence(tmp_path, state, metrics, {})
    assert await keeper.commit(keeper.collect())
    await keeper.close()
    with sqlite3.connect(tmp_path / DATABASE) as db:
        db.execute("UPDATE devices SET row = ?", (b"\xc1garbage",))
    again, _, devices = await restarted(tmp_path, clock)
    assert devices == 0 and again.watched() == []
    assert [p for p in tmp_path.iterdir() if p.name.startswith(f"{DATABASE}.undecodable-")]


@pytest.mark.parametrize(
    ("blob", "value"),
    [("self", [1, 2, 3]), ("counters", {"transitions": {"Pending": "many"}}),
     ("counters", {"latency": {"error": [1, 2]}})],
)
async def test_a_blob_of_another_shape_moves_the_store_aside(
    tmp_path: Path, blob: str, value: object
) -> None:
    clock, metrics = Clock(START), SelfMetrics()
    state = fleet(clock, metrics)
    state.watch(DEVICE)
    keeper = persistence(tmp_path, state, metrics, {})
    assert await keeper.commit(keeper.collect())
    await keeper.close()
    with sqlite3.connect(tmp_path / DATABASE) as db:
        db.execute("UPDATE blobs SET value = ? WHERE name = ?",
                   (msgspec.msgpack.encode(value), blob))
    again, _, devices = await restarted(tmp_path, clock)
    assert devices == 0 and again.watched() == []
    assert [p for p in tmp_path.iterdir() if p.name.startswith(f"{DATABASE}.undecodable-")]


async def test_pruning_floors_survive_a_restart_and_are_written_only_when_they_move(
    tmp_path: Path,
) -> None:
    clock, metrics = Clock(START), SelfMetrics()
    state = fleet(clock, metrics)
    state.watch(DEVICE)
    state.ledger.restore_floor(DEVICE, Floor(START - 600, START - 60))
    keeper = persistence(tmp_path, state, metrics, {})
    assert "floors" in keeper.collect().blobs
    assert await keeper.commit(keeper.collect())
    assert "floors" not in keeper.collect().blobs  # unchanged: not written again
    state.ledger.restore_floor(DEVICE, Floor(START - 300, START - 30))
    delta = keeper.collect()
    assert "floors" in delta.blobs and await keeper.commit(delta)
    await keeper.close()
    again, _, _ = await restarted(tmp_path, clock)
    assert again.ledger.floors() == {DEVICE: Floor(START - 300, START - 30)}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
async def test_a_read_only_directory_is_a_storage_failure_not_a_crash(tmp_path: Path) -> None:
    tmp_path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        metrics = SelfMetrics()
        keeper = Persistence(lambda: Store.open(tmp_path, "acme"), fleet(Clock(START), metrics),
                             metrics)
        assert not keeper.open()
        assert metrics.storage_write_failures == 1
        assert not await keeper.commit(keeper.collect())
        await keeper.close()
    finally:
        tmp_path.chmod(stat.S_IRWXU)


async def test_the_token_never_reaches_the_store(tmp_path: Path) -> None:
    clock, metrics = Clock(START), SelfMetrics()
    state = fleet(clock, metrics)
    state.watch(DEVICE, name="pc", info={"model": "x"})
    state.apply_actions(DEVICE, batch({"Pending": 1}), [action("c1", "Pending")])
    keeper = persistence(tmp_path, state, metrics, {})
    assert await keeper.commit(keeper.collect())
    await asyncio.sleep(0)
    await keeper.close()
    for path in tmp_path.iterdir():
        assert TOKEN.encode() not in path.read_bytes()


def _set_meta(path: Path, key: str, value: str) -> None:
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))


def test_without_a_store_no_change_is_noted() -> None:
    # Memory only (--storage.path=""): nothing collects the changes, so none may pile up.
    clock, metrics = Clock(START), SelfMetrics()
    state = fleet(clock, metrics)
    for n in range(50):
        device = f"{DEVICE[:-2]}{n:02d}"
        state.watch(device)
        state.apply_actions(device, batch({"Pending": 1}), [action("c1", "Pending")])
    assert state.view.changed is None and state.ledger.changed is None


async def test_query_verdicts_come_back_with_their_reprobe_due_on_time(tmp_path: Path) -> None:
    clock = [1000.0]
    verdicts = Verdicts(lambda: clock[0])
    verdicts.note(("devices", "sort"), "ignored")
    metrics = SelfMetrics()
    keeper = Persistence(lambda: Store.open(tmp_path, "acme"), fleet(Clock(START), metrics),
                         metrics, verdicts=verdicts)
    assert keeper.open()
    assert await keeper.commit(keeper.collect())
    await keeper.close()

    later = [50.0]  # another process: its monotonic clock starts elsewhere
    again = Verdicts(lambda: later[0])
    keeper = Persistence(lambda: Store.open(tmp_path, "acme"), fleet(Clock(START), SelfMetrics()),
                         SelfMetrics(), verdicts=again)
    assert keeper.open()
    keeper.load()
    await keeper.close()
    assert again[("devices", "sort")] == "ignored"
    assert not again.ask(("devices", "sort"), avoid=("ignored",))  # not re-probed at once
    later[0] += REPROBE_SECONDS + 5
    assert again.ask(("devices", "sort"), avoid=("ignored",))  # but when it is due
