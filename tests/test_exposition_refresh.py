"""Exposition, refreshing: only what changed is rendered again, and an incremental refresh
equals a full render; steps pause and changes made meanwhile show next time; gzip is
computed once per change; a self-metrics change neither copies nor compresses the fleet, and
a device read changes its blocks alone."""

from __future__ import annotations

import gzip
import random
import tracemalloc
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from exposition_rig import (
    BATCH_1,
    BATCH_2,
    DEV_A,
    START,
    STATUSES,
    Clock,
    changed_samples,
    fleet_of,
    key,
    make,
    random_step,
    samples,
    scenario,
    single_member,
)
from prometheus_client import CollectorRegistry

from exporter import devicestore
from exporter.exposition import BLOCK_DEVICES, RENDER_STEP_DEVICES
from exporter.records import Action, Batch
from exporter.selfmetrics import SelfMetrics
from exporter.state import FleetState

pytest_plugins = ("exposition_rig",)  # its fixtures: clock, metrics, state


# --- caching and incremental refresh --------------------------------------------------------


def test_refresh_only_when_something_changed(
    state: FleetState, clock: Clock, metrics: SelfMetrics
) -> None:
    exposition = make(state, metrics)
    body = exposition.body(openmetrics=False)
    assert exposition.refresh() is False
    assert exposition.body(openmetrics=False) is body
    state.apply_actions(DEV_A, Batch(id=BATCH_1), [Action("1", "Pending")])
    assert exposition.refresh() is True
    assert b'status="Pending"' in exposition.body(openmetrics=False)
    metrics.parse_problem("schema")
    assert exposition.refresh() is True
    assert b'applivery_exporter_parse_problems_total{kind="schema"} 1\n' in exposition.body(
        openmetrics=False
    )




def test_incremental_refresh_equals_a_full_render(
    state: FleetState, clock: Clock, metrics: SelfMetrics
) -> None:
    rng = random.Random(7)
    registry = CollectorRegistry()
    incremental = make(state, metrics, registry=registry)
    for _ in range(400):
        random_step(rng, state, clock, metrics)
        incremental.refresh()
        full = make(state, metrics, registry=registry)
        for openmetrics in (False, True):
            assert incremental.body(openmetrics=openmetrics) == full.body(openmetrics=openmetrics)
    samples(incremental.body(openmetrics=True), openmetrics=True)


@pytest.mark.parametrize("max_series", [10**9, 1])  # guard on at level 0; at its last level
def test_the_guard_weighs_an_incrementally_refreshed_fleet_as_a_full_render(
    state: FleetState, clock: Clock, metrics: SelfMetrics, max_series: int
) -> None:
    rng = random.Random(11)
    registry = CollectorRegistry()
    incremental = make(state, metrics, registry=registry, max_series=max_series)
    for _ in range(300):
        random_step(rng, state, clock, metrics)
        incremental.refresh()
        full = make(state, metrics, registry=registry, max_series=max_series)
        assert (incremental.series_total, incremental.guard_level) == (
            full.series_total, full.guard_level
        )
        assert incremental.body(openmetrics=False) == full.body(openmetrics=False)


def test_a_stepwise_refresh_pauses_and_changes_made_meanwhile_show_next_time(
    state: FleetState, clock: Clock, metrics: SelfMetrics
) -> None:
    devices = [f"65f0c0ffee65f0c0ff{i:06d}" for i in range(RENDER_STEP_DEVICES * 3)]
    for device in devices:
        state.watch(device)
        state.apply_actions(device, Batch(id=BATCH_1), [Action("1", "Pending")])
    registry = CollectorRegistry()
    exposition = make(state, metrics, registry=registry)
    for device in devices:
        state.apply_actions(device, Batch(id=BATCH_1), [Action("1", "Awaiting", sent_at=START)])
    steps = exposition.refresh_steps()
    next(steps)  # paused after the first slice of devices
    # Meanwhile the poller moves on: a device already rendered changes, one goes, one comes.
    state.apply_actions(devices[0], Batch(id=BATCH_2), [Action("2", "Pending")])
    state.unwatch(devices[-1])
    state.watch("65f0c0ffee65f0c0ffeeffff")
    pauses = 1
    while True:
        try:
            next(steps)
            pauses += 1
        except StopIteration as done:
            assert done.value is True
            break
    assert pauses == 2  # after 200 and 400 of the 599 devices still watched
    samples(exposition.body(openmetrics=True), openmetrics=True)  # whole and parseable
    assert exposition.refresh() is True  # what changed while paused is not lost
    full = make(state, metrics, registry=registry)
    for openmetrics in (False, True):
        assert exposition.body(openmetrics=openmetrics) == full.body(openmetrics=openmetrics)


def test_a_new_ceiling_while_a_refresh_is_paused_renders_every_device_next_time(
    state: FleetState, clock: Clock, metrics: SelfMetrics
) -> None:
    # A reload lands on the event loop between two steps of a refresh: the paused refresh
    # finishes with the devices it holds, and the next one renders the fleet under the new
    # ceiling, weighed as a full render weighs it.
    devices = fleet_of(state, RENDER_STEP_DEVICES * 3)
    registry = CollectorRegistry()
    exposition = make(state, metrics, registry=registry, max_series=10**9)
    clock.now += 60
    for device in devices:  # a round: every device read, each found a new batch
        state.apply_actions(device, Batch(id=BATCH_2, name="New", created_at=START + 50),
                            [Action("x", "Pending"), Action("y", "Acknowledged")])
        state.poll_succeeded(device)
    steps = exposition.refresh_steps()
    next(steps)
    exposition.max_series = 10**8
    for _ in steps:
        pass
    assert exposition.refresh() is True
    full = make(state, metrics, registry=registry, max_series=10**8)
    assert exposition.body(openmetrics=False) == full.body(openmetrics=False)
    clock.now += 1
    state.poll_succeeded(devices[0])  # the next device read moves the totals from there on
    exposition.refresh()
    full = make(state, metrics, registry=registry, max_series=10**8)
    assert exposition.series_total == full.series_total
    assert exposition.rollouts() == full.rollouts()
    assert exposition.body(openmetrics=False) == full.body(openmetrics=False)


# --- gzip ---------------------------------------------------------------------------------------


def test_gzip_round_trips_and_is_computed_once_per_change(
    state: FleetState, clock: Clock, metrics: SelfMetrics
) -> None:
    scenario(state, clock, metrics)
    exposition = make(state, metrics)
    for openmetrics in (False, True):
        packed = exposition.gzip_body(openmetrics=openmetrics)
        assert gzip.decompress(packed) == exposition.body(openmetrics=openmetrics)
        assert exposition.gzip_body(openmetrics=openmetrics) is packed
    before = exposition.gzip_body(openmetrics=False)
    state.poll_failed(DEV_A, "timeout")
    exposition.refresh()
    after = exposition.gzip_body(openmetrics=False)
    assert after != before
    assert gzip.decompress(after) == exposition.body(openmetrics=False)


def test_gzip_from_threads_while_refreshing(
    state: FleetState, clock: Clock, metrics: SelfMetrics
) -> None:
    exposition = make(state, metrics)
    rng = random.Random(3)
    with ThreadPoolExecutor(4) as pool:
        for _ in range(30):
            random_step(rng, state, clock, metrics)
            exposition.refresh()
            futures = [pool.submit(exposition.gzip_body, openmetrics=om) for om in (0, 1) * 4]
            bodies = {exposition.body(openmetrics=om) for om in (False, True)}
            for future in futures:
                assert gzip.decompress(future.result()) in bodies


# --- the self part apart from the fleet ------------------------------------------------------

def test_a_self_metrics_change_neither_copies_nor_compresses_the_fleet(
    state: FleetState, clock: Clock, metrics: SelfMetrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the public surface the exporter always had (refresh, body, gzip_body): before
    # the fleet part was kept apart, every API request cost a copy of the whole body per
    # format and a gzip of each.
    fleet_of(state)
    scenario(state, clock, metrics)
    exposition = make(state, metrics)
    for openmetrics in (False, True):
        exposition.gzip_body(openmetrics=openmetrics)
    size = len(exposition.body(openmetrics=False))
    assert size > 300_000
    rendered: list[str] = []
    real_render = devicestore.render_device
    monkeypatch.setattr(
        devicestore,
        "render_device",
        lambda organization, state, device, *a, **kw: rendered.append(device)
        or real_render(organization, state, device, *a, **kw),
    )
    compressed: list[int] = []
    real_compress, real_compressobj = zlib.compress, zlib.compressobj

    def compress(data: bytes, *args: Any, **kwargs: Any) -> bytes:
        compressed.append(len(data))
        return real_compress(data, *args, **kwargs)

    class CountingCompressobj:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._inner = real_compressobj(*args, **kwargs)

        def compress(self, data: bytes) -> bytes:
            compressed.append(len(data))
            return self._inner.compress(data)

        def flush(self, *args: Any) -> bytes:
            return self._inner.flush(*args)

    monkeypatch.setattr(zlib, "compress", compress)
    monkeypatch.setattr(zlib, "compressobj", CountingCompressobj)
    before = {om: samples(exposition.body(openmetrics=om), openmetrics=om) for om in (0, 1)}
    metrics.observe_request("actions", "200", 0.3)
    tracemalloc.start()
    try:
        assert exposition.refresh() is True
        allocated = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rendered == []
    assert allocated < size / 8, (allocated, size)  # the self parts: ~15 kB, ~33 kB allocated
    for openmetrics in (False, True):
        plain = exposition.body(openmetrics=openmetrics)
        assert gzip.decompress(exposition.gzip_body(openmetrics=openmetrics)) == plain
        after = samples(plain, openmetrics=openmetrics)
        assert changed_samples(before[openmetrics], after) == {
            "applivery_exporter_api_requests_total",
            "applivery_exporter_api_request_duration_seconds_bucket",
            "applivery_exporter_api_request_duration_seconds_sum",
            "applivery_exporter_api_request_duration_seconds_count",
        }
        ok = key("applivery_exporter_api_requests_total", api_endpoint="actions", code="200")
        assert after[ok] == before[openmetrics][ok] + 1
    assert 0 < sum(compressed) < size / 20, (sum(compressed), size)


def test_a_self_metrics_change_keeps_every_fleet_section_and_piece(
    state: FleetState, clock: Clock, metrics: SelfMetrics
) -> None:
    fleet_of(state)
    scenario(state, clock, metrics)
    exposition = make(state, metrics)
    parts = {om: exposition.parts(openmetrics=om) for om in (False, True)}
    packed = {om: exposition.gzip_parts(openmetrics=om) for om in (False, True)}
    metrics.parse_problem("schema")
    metrics.touch()
    assert exposition.refresh() is True
    for openmetrics in (False, True):
        fleet, own = parts[openmetrics][:-1], parts[openmetrics][-1]
        now = exposition.parts(openmetrics=openmetrics)
        assert len(now) == len(parts[openmetrics]) > 3 * 7  # blocks of 7 per-device families
        assert all(new is old for new, old in zip(now[:-1], fleet, strict=True))
        assert now[-1] is not own and b"parse_problems" in now[-1]
        assert now[-1].endswith(b"# EOF\n") == bool(openmetrics)
        # gzip: header, one piece per section, the trailer; only the last two are new.
        pieces = exposition.gzip_parts(openmetrics=openmetrics)
        assert len(pieces) == len(now) + 2
        old_pieces = packed[openmetrics]
        assert all(new is old for new, old in zip(pieces[:-2], old_pieces[:-2], strict=True))
        assert single_member(b"".join(pieces)) == exposition.body(openmetrics=openmetrics)
        samples(exposition.body(openmetrics=openmetrics), openmetrics=openmetrics)
    # The text and OpenMetrics bodies share every section of samples: one deflate each.
    shared = set(map(id, exposition.parts(openmetrics=False))) & set(
        map(id, exposition.parts(openmetrics=True))
    )
    assert len(shared) >= 3 * 7


def test_a_device_read_changes_only_its_blocks(
    state: FleetState, clock: Clock, metrics: SelfMetrics
) -> None:
    devices = fleet_of(state)
    exposition = make(state, metrics)
    before = exposition.parts(openmetrics=False)
    clock.now += 60
    state.poll_succeeded(devices[-1])  # in the last block: its last_success line moves
    metrics.observe_request("commands", "200", 0.1)
    assert exposition.refresh() is True
    after = exposition.parts(openmetrics=False)
    assert len(after) == len(before)
    moved = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a is not b]
    assert len(moved) == 2  # that block of last-success lines, and the self part
    assert moved[-1] == len(after) - 1
    line = f'{{organization="acme",device="{devices[-1]}"}} {clock.now!r}\n'.encode()
    assert after[moved[0]].startswith(b"applivery_exporter_last_success_timestamp_seconds")
    assert line not in before[moved[0]] and line in after[moved[0]]
    assert single_member(exposition.gzip_body(openmetrics=False)) == exposition.body(
        openmetrics=False
    )


def test_a_guard_level_change_re_joins_every_block(
    state: FleetState, clock: Clock, metrics: SelfMetrics
) -> None:
    devices = fleet_of(state)
    exposition = make(state, metrics, max_series=10**9)
    ceiling = exposition.series_total + 5
    exposition.max_series = ceiling  # level 0, just under the ceiling
    exposition.refresh()
    assert exposition.guard_level == 0
    # One device, in one block of three, gains enough series to raise the level.
    state.apply_actions(
        devices[0],
        Batch(id="65f0c0ffee65f0c0ffee9999", name="Big", created_at=START + 50),
        [Action(f"big-{a}", STATUSES[a % 4], sent_at=START + 60) for a in range(100)],
    )
    exposition.refresh()
    assert exposition.guard_level > 0
    full = make(state, metrics, max_series=ceiling)
    assert full.guard_level == exposition.guard_level
    for openmetrics in (False, True):
        assert exposition.body(openmetrics=openmetrics) == full.body(openmetrics=openmetrics)


def test_gzip_parts_are_one_member_equal_to_the_body_through_every_change(
    state: FleetState, clock: Clock, metrics: SelfMetrics
) -> None:
    devices = fleet_of(state, BLOCK_DEVICES + 5)
    rng = random.Random(11)
    exposition = make(state, metrics)
    for step in range(150):
        random_step(rng, state, clock, metrics)
        if step % 3 == 0:
            state.poll_succeeded(rng.choice(devices))
        if step % 7 == 0:
            state.apply_actions(
                rng.choice(devices), Batch(id=BATCH_2), [Action("9", rng.choice(STATUSES))]
            )
        if step % 11 == 0:
            state.unwatch(rng.choice(devices))  # blocks shift
        exposition.refresh()
        for openmetrics in (False, True):
            plain = exposition.body(openmetrics=openmetrics)
            assert single_member(exposition.gzip_body(openmetrics=openmetrics)) == plain
    full = make(state, metrics)
    for openmetrics in (False, True):
        assert exposition.body(openmetrics=openmetrics) == full.body(openmetrics=openmetrics)
        samples(full.body(openmetrics=openmetrics), openmetrics=openmetrics)
