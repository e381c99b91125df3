"""The device store: one rendered entry per watched device, rendered again by the columns
whose generation moved; a column's blocks are the entries' lines in device order, and a
device's change re-joins its block alone; the fleet's sums equal a recount; both jobs pause
on work done, so no step grows with the fleet."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Generator

import pytest

from exporter import devicestore
from exporter.devicestore import BLOCK_DEVICES, Column, DeviceStore, Pace
from exporter.records import Action, Batch
from exporter.rollouts import RolloutTotals
from exporter.selfmetrics import SelfMetrics
from exporter.state import FleetState

START = 1_760_000_000.0
STATUSES = ["Pending", "Awaiting", "Acknowledged", "NotSupported", "Cancel"]
ALL_COLUMNS = tuple(Column)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(clock: Clock) -> FleetState:
    return FleetState(organization="acme", latency_buckets=(1.0, 60.0), metrics=SelfMetrics(),
                      clock=clock)


def device_id(i: int) -> str:
    return f"65f0c0ffee65f0c0ff{i:06d}"


def watch(state: FleetState, clock: Clock, count: int, batches: int = 1) -> list[str]:
    devices = [device_id(i) for i in range(count)]
    for i, device in enumerate(devices):
        state.watch(device, name=f"pc-{i}", labels={"site": f"s{i % 3}"})
    clock.now += 60
    for i, device in enumerate(devices):
        for b in range(batches):
            state.apply_actions(
                device, Batch(id=f"{b:024d}", name=f"Policy {b}", created_at=START + 10),
                [Action(str(a), STATUSES[(i + a + b) % 5], sent_at=START + 20) for a in range(4)],
            )
        state.poll_succeeded(device)
    return devices


def run(job: Generator[None, None, None]) -> int:
    """Run a stepwise job to its end; the pauses it made."""
    return sum(1 for _ in job)


def refreshed(store: DeviceStore, state: FleetState) -> DeviceStore:
    run(store.update(state, Pace()))
    run(store.join(ALL_COLUMNS, Pace()))
    return store


def test_an_entry_holds_the_device_s_lines_of_each_column(
    state: FleetState, clock: Clock
) -> None:
    [device] = watch(state, clock, 1)
    [entry] = refreshed(DeviceStore(coarse=False), state).entries()
    lines = dict(zip(Column, entry.lines, strict=True))
    assert lines[Column.INFO].startswith(b"applivery_windows_device_info{")
    assert lines[Column.UP] == (
        f'applivery_exporter_target_up{{organization="acme",device="{device}"}} 1\n'.encode()
    )
    assert lines[Column.ACTIONS].count(b"\n") == 4
    assert lines[Column.COMMAND_INFO].count(b"\n") == 1
    assert lines[Column.CHECK_IN] == b""  # not in a device list yet
    assert lines[Column.BY_STATUS] == lines[Column.BY_CLASS] == b""  # the guard is off
    [coarse] = refreshed(DeviceStore(coarse=True), state).entries()
    assert coarse.lines[Column.BY_STATUS].count(b"\n") == 4
    assert coarse.lines[Column.BY_CLASS].startswith(b"applivery_windows_command_actions{")


def test_only_the_columns_whose_generation_moved_are_rendered_again(
    state: FleetState, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    [device] = watch(state, clock, 1)
    store = refreshed(DeviceStore(coarse=False), state)
    [before] = store.entries()
    reads: list[bool] = []
    real = state.device_view
    monkeypatch.setattr(state, "device_view", lambda d, *, with_batches=True: (
        reads.append(with_batches) or real(d, with_batches=with_batches)
    ))
    clock.now += 60
    state.poll_succeeded(device)
    [after] = refreshed(store, state).entries()
    assert reads == [False]  # the batch tables are not read for a poll status
    rendered = {c for c in Column if after.lines[c] is not before.lines[c]}
    assert Column.LAST_SUCCESS in rendered
    assert rendered <= {Column.UP, Column.LAST_SUCCESS, Column.CHECK_IN}  # the poll status
    assert after.lines[Column.UP] == before.lines[Column.UP]
    assert after.lines[Column.LAST_SUCCESS] != before.lines[Column.LAST_SUCCESS]
    assert after.rollouts is before.rollouts


def test_blocks_are_the_entries_lines_in_device_order(state: FleetState, clock: Clock) -> None:
    devices = watch(state, clock, BLOCK_DEVICES * 2 + 3)
    store = refreshed(DeviceStore(coarse=True), state)
    entries = store.entries()
    assert [e.lines[Column.INFO] for e in entries] == [
        e.lines[Column.INFO] for e in sorted(entries, key=lambda e: e.lines[Column.INFO])
    ]
    for column in Column:
        blocks = store.blocks(column)
        assert len(blocks) == 3
        assert b"".join(blocks) == b"".join(e.lines[column] for e in entries)
    assert len(entries) == len(devices)


def test_a_device_change_re_joins_its_block_alone(state: FleetState, clock: Clock) -> None:
    devices = watch(state, clock, BLOCK_DEVICES * 3)
    store = refreshed(DeviceStore(coarse=False), state)
    before = {column: store.blocks(column) for column in Column}
    state.apply_actions(devices[BLOCK_DEVICES + 7], Batch(id="9" * 24, name="New"),
                        [Action("n", "Pending")])
    refreshed(store, state)
    for column in Column:
        moved = [i for i, (a, b) in enumerate(zip(before[column], store.blocks(column),
                                                  strict=True)) if a is not b]
        # A block whose lines were rendered again to equal bytes is not joined again.
        expected = [1] if column in (Column.ACTIONS, Column.COMMAND_INFO) else []
        assert moved == expected, column


def test_forgetting_renders_every_device_again_and_keeps_equal_blocks(
    state: FleetState, clock: Clock
) -> None:
    watch(state, clock, BLOCK_DEVICES + 1)
    store = refreshed(DeviceStore(coarse=False), state)
    before = store.blocks(Column.ACTIONS)
    entries = store.entries()
    store.forget(coarse=True)
    refreshed(store, state)
    assert all(a is not b for a, b in zip(entries, store.entries(), strict=True))
    assert all(a is b for a, b in zip(before, store.blocks(Column.ACTIONS), strict=True))
    assert store.blocks(Column.BY_CLASS) != [b"", b""]


def random_step(rng: random.Random, state: FleetState, clock: Clock, devices: list[str]) -> None:
    clock.now += rng.uniform(0, 30)
    device = rng.choice(devices)
    roll = rng.random()
    if roll < 0.5:
        if device not in state.watched():
            state.watch(device)
        state.apply_actions(
            device, Batch(id=rng.choice(["1" * 24, "2" * 24]), name=rng.choice([None, "P", "Q"]),
                          created_at=START + rng.randrange(3)),
            [Action(str(i), rng.choice(STATUSES)) for i in range(rng.randint(0, 4))],
        )
    elif roll < 0.7:
        state.poll_succeeded(device)
    elif roll < 0.8:
        state.drop_batch(device, "2" * 24)
    elif roll < 0.9:
        state.unwatch(device)
    else:
        state.expire(60)


def test_the_fleet_s_sums_equal_a_recount(state: FleetState, clock: Clock) -> None:
    rng = random.Random(9)
    devices = watch(state, clock, 12)
    store = DeviceStore(coarse=True)
    for _ in range(300):
        random_step(rng, state, clock, devices)
        refreshed(store, state)
        entries = store.entries()
        assert store.series.lines == [
            sum(e.lines[c].count(b"\n") for e in entries) for c in Column
        ]
        classes: Counter[str] = Counter()
        recount = RolloutTotals()
        for entry in entries:
            classes.update(dict(entry.class_counts))
            recount.replace((), entry.rollouts)
        assert +store.series.classes == +classes
        assert store.rollouts.top() == recount.top()


def test_a_device_unwatched_while_paused_leaves_at_the_next_update(
    state: FleetState, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devicestore, "RENDER_STEP_DEVICES", 10)
    devices = watch(state, clock, 30)
    store = DeviceStore(coarse=False)
    update = store.update(state, Pace())
    next(update)
    state.unwatch(devices[-1])  # not rendered yet
    state.unwatch(devices[0])  # rendered already
    run(update)
    run(store.join(ALL_COLUMNS, Pace()))  # every device in the order has its entry
    assert len(store.entries()) == 29
    refreshed(store, state)
    assert len(store.entries()) == 28
    assert devices[0].encode() not in b"".join(store.blocks(Column.UP))


def test_steps_are_bounded_by_work_not_by_the_fleet(
    state: FleetState, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devicestore, "RENDER_STEP_DEVICES", 10)
    monkeypatch.setattr(devicestore, "LOOK_STEP_DEVICES", 25)
    monkeypatch.setattr(devicestore, "JOIN_STEP_BYTES", 20_000)
    monkeypatch.setattr(devicestore, "BLOCK_DEVICES", 10)
    devices = watch(state, clock, 100)
    store = DeviceStore(coarse=False)
    assert run(store.update(state, Pace())) == 10  # a pause after every 10 rendered
    block = sum(len(line) for entry in store.entries()[:10] for line in entry.lines)
    assert 10_000 < block < 20_000
    assert run(store.join(ALL_COLUMNS, Pace())) == 5  # a pause after every 2 blocks
    # One device read: the others are only looked at, a pause after every 25.
    state.poll_succeeded(devices[50])
    assert run(store.update(state, Pace())) == 4
    # Devices with many batches: a pause once a step rendered RENDER_STEP_BYTES.
    monkeypatch.setattr(devicestore, "RENDER_STEP_BYTES", 30_000)
    sizes: list[int] = []
    real = devicestore.render_device

    def render(*args: object, **kwargs: object) -> devicestore.Entry:
        entry = real(*args, **kwargs)  # type: ignore[arg-type]
        sizes.append(sum(map(len, entry.lines)))
        return entry

    monkeypatch.setattr(devicestore, "render_device", render)
    watch(state, clock, 20, batches=12)
    steps = []
    for _ in store.update(state, Pace()):
        steps.append(sizes[:])
        sizes.clear()
    steps.append(sizes)
    assert sum(map(len, steps)) == 20 and len(steps) >= 4
    assert all(sum(step[:-1]) < 30_000 for step in steps)
