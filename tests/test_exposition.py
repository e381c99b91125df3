"""Exposition: both formats parse, values equal the state, hostile labels stay contained,
incremental refresh equals a full render, a self-metrics change leaves the fleet part alone,
gzip round-trips as one member (Prometheus reads it whole), negotiation, promtool."""

from __future__ import annotations

import asyncio
import gzip
import random
import shutil
import subprocess
import tracemalloc
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text
from promstack import PROMETHEUS_BIN, ScrapeTarget, eventually, require_binaries, running_prometheus

from exporter import devicestore
from exporter.exposition import (
    BLOCK_DEVICES,
    MAX_LABEL_VALUE,
    RENDER_STEP_DEVICES,
    TRUNCATED,
    Exposition,
    wants_openmetrics,
)
from exporter.records import Action, Batch
from exporter.selfmetrics import SelfMetrics
from exporter.server import Hooks, make_app
from exporter.server import metrics as serve_metrics
from exporter.state import FleetState

START = 1_760_000_000.0
DEV_A = "65f0c0ffee65f0c0ffee0001"
DEV_B = "SERIAL-0042"
BATCH_1 = "65f0c0ffee65f0c0ffee1001"
BATCH_2 = "65f0c0ffee65f0c0ffee1002"
BUCKETS = (1.0, 5.0, 60.0)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def samples(body: bytes, *, openmetrics: bool) -> Samples:
    parse = parse_openmetrics if openmetrics else parse_text
    out: Samples = {}
    for family in parse(body.decode()):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = sample.value
    return out


def key(metric: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return metric, frozenset(labels.items())


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
def metrics() -> SelfMetrics:
    return SelfMetrics()


@pytest.fixture
def state(clock: Clock, metrics: SelfMetrics) -> FleetState:
    fleet = FleetState(organization="acme", latency_buckets=BUCKETS, metrics=metrics, clock=clock)
    fleet.watch(DEV_A, name="reception-pc", labels={"site": "madrid"}, info={"serial": "S-1"})
    fleet.watch(DEV_B)
    clock.now = START + 60
    return fleet


def scenario(state: FleetState, clock: Clock, metrics: SelfMetrics) -> None:
    """Device A: batch 1 answered between polls (3 actions), batch 2 still waiting; B down."""
    state.apply_actions(
        DEV_A,
        Batch(id=BATCH_1, name="Store policy", created_at=START + 10),
        [
            Action("1", "Acknowledged", sent_at=START + 20, received_at=START + 23),
            Action("2", "Acknowledged", sent_at=START + 20, received_at=START + 30),
            Action("3", "NotSupported", sent_at=START + 20, received_at=START + 80),
        ],
    )
    state.apply_actions(
        DEV_A,
        Batch(id=BATCH_2, created_at=START - 500),
        [Action("1", "Awaiting", sent_at=START - 400), Action("2", "Pending")],
    )
    state.poll_succeeded(DEV_A)
    state.poll_failed(DEV_B, "timeout")
    metrics.observe_request("actions", "200", 0.2)
    metrics.observe_request("commands", "timeout", 10.0)
    metrics.budget_requests_per_hour = 9000
    metrics.touch()


def make(state: FleetState, metrics: SelfMetrics, **kw: Any) -> Exposition:
    kw.setdefault("registry", CollectorRegistry())  # deterministic: no process metrics
    return Exposition(state, metrics, version="1.2.3", **kw)


# --- content ---------------------------------------------------------------------------------


@pytest.mark.parametrize("openmetrics", [False, True])
def test_values_equal_the_scenario(
    state: FleetState, clock: Clock, metrics: SelfMetrics, openmetrics: bool
) -> None:
    scenario(state, clock, metrics)
    got = samples(make(state, metrics).body(openmetrics=openmetrics), openmetrics=openmetrics)
    actions = "applivery_windows_command_actions"
    org = {"organization": "acme"}
    a1 = {**org, "device": DEV_A, "command": BATCH_1}
    a2 = {**org, "device": DEV_A, "command": BATCH_2}
    expected = {
        key(actions, **a1, status="Acknowledged", status_class="success"): 2,
        key(actions, **a1, status="NotSupported", status_class="error"): 1,
        key(actions, **a2, status="Awaiting", status_class="pending"): 1,
        key(actions, **a2, status="Pending", status_class="pending"): 1,
        key(
            "applivery_windows_command_oldest_pending_sent_timestamp_seconds",
            **org,
            device=DEV_A,
        ): START - 500,  # the Pending action waits since its batch was created
        key(
            "applivery_windows_device_info",
            **org,
            device=DEV_A,
            name="reception-pc",
            site="madrid",
            serial="S-1",
        ): 1,
        key("applivery_windows_device_info", **org, device=DEV_B, name=""): 1,
        key("applivery_windows_command_info", **a1, name="Store policy"): 1,
        key("applivery_exporter_target_up", **org, device=DEV_A): 1,
        key("applivery_exporter_target_up", **org, device=DEV_B): 0,
        key("applivery_exporter_last_success_timestamp_seconds", **org, device=DEV_A): START + 60,
        key("applivery_exporter_api_requests_total", api_endpoint="actions", code="200"): 1,
        key("applivery_exporter_api_requests_total", api_endpoint="commands", code="timeout"): 1,
        key("applivery_exporter_api_budget_requests_per_hour"): 9000,
        key("applivery_exporter_poll_round_duration_seconds"): 0,
        key("applivery_exporter_config_last_reload_successful"): 1,
        key("applivery_exporter_build_info", version="1.2.3"): 1,
    }
    for kind in ("timestamp", "unknown_status", "schema"):
        expected[key("applivery_exporter_parse_problems_total", kind=kind)] = 0
    transitions = "applivery_windows_command_action_transitions_total"
    for status, status_class, count in [
        ("Pending", "pending", 3),
        ("Awaiting", "pending", 3),
        ("Acknowledged", "success", 2),
        ("NotSupported", "error", 1),
        ("UnexpectedError", "error", 0),
    ]:
        expected[key(transitions, **org, status=status, status_class=status_class)] = count
    latency = "applivery_windows_command_ack_latency_seconds"
    success = {**org, "status_class": "success"}
    error = {**org, "status_class": "error"}
    expected |= {
        key(f"{latency}_bucket", **success, le="1.0"): 0,
        key(f"{latency}_bucket", **success, le="5.0"): 1,
        key(f"{latency}_bucket", **success, le="60.0"): 2,
        key(f"{latency}_bucket", **success, le="+Inf"): 2,
        key(f"{latency}_sum", **success): 13.0,
        key(f"{latency}_count", **success): 2,
        key(f"{latency}_bucket", **error, le="60.0"): 1,
        key(f"{latency}_sum", **error): 60.0,
        key(f"{latency}_count", **error): 1,
    }
    duration = "applivery_exporter_api_request_duration_seconds"
    expected |= {
        key(f"{duration}_bucket", api_endpoint="commands", le="5.0"): 0,
        key(f"{duration}_bucket", api_endpoint="commands", le="10.0"): 1,
        key(f"{duration}_count", api_endpoint="commands"): 1,
        key(f"{duration}_sum", api_endpoint="actions"): 0.2,
    }
    assert {k: got.get(k) for k in expected} == expected
    # Nothing about commands beyond the scenario, and every known status counted from 0.
    assert {k for k in got if k[0] == actions} == {k for k in expected if k[0] == actions}
    assert len([k for k in got if k[0] == transitions]) == 65


def test_formats_differ_only_where_the_specs_do(
    state: FleetState, clock: Clock, metrics: SelfMetrics
) -> None:
    scenario(state, clock, metrics)
    exposition = make(state, metrics)
    text = exposition.body(openmetrics=False).decode()
    om = exposition.body(openmetrics=True).decode()
    assert "# TYPE applivery_windows_command_action_transitions_total counter\n" in text
    assert "# TYPE applivery_windows_command_action_transitions counter\n" in om
    assert om.endswith("# EOF\n") and "# EOF" not in text
    assert samples(text.encode(), openmetrics=False) == samples(om.encode(), openmetrics=True)


def test_every_series_that_names_a_device_names_its_organization(
    state: FleetState, clock: Clock, metrics: SelfMetrics
) -> None:
    # Rules aggregate device series per organization across shards: none may lack it.
    scenario(state, clock, metrics)
    got = samples(make(state, metrics).body(openmetrics=False), openmetrics=False)
    with_device = {name for name, labels in got if any(k == "device" for k, _ in labels)}
    assert {"applivery_exporter_target_up", "applivery_exporter_last_success_timestamp_seconds"} \
        <= with_device
    for name, labels in got:
        if any(k == "device" for k, _ in labels):
            assert ("organization", "acme") in labels, (name, labels)


def test_expired_and_unwatched_devices_leave(
    state: FleetState, clock: Clock, metrics: SelfMetrics
) -> None:
    scenario(state, clock, metrics)
    exposition = make(state, metrics)
    clock.now = START + 1000
    state.poll_failed(DEV_A, "HTTP 503")
    clock.now = START + 1301  # staleness counts from the first failure
    assert state.expire(300) == [DEV_A, DEV_B]
    state.unwatch(DEV_B)
    assert exposition.refresh()
    got = samples(exposition.body(openmetrics=False), openmetrics=False)
    names = {name for name, labels in got if ("device", DEV_A) in labels}
    assert names == {
        "applivery_windows_device_info",
        "applivery_exporter_target_up",
        "applivery_exporter_last_success_timestamp_seconds",
    }
    assert got[key("applivery_exporter_target_up", organization="acme", device=DEV_A)] == 0
    assert not any(("device", DEV_B) in labels for _, labels in got)
    transitions = key(
        "applivery_windows_command_action_transitions_total",
        organization="acme",
        status="Acknowledged",
        status_class="success",
    )
    assert got[transitions] == 2  # counters stay when devices leave


def test_default_registry_adds_process_and_platform_metrics(
    state: FleetState, metrics: SelfMetrics
) -> None:
    exposition = Exposition(state, metrics, version="1.2.3")
    for openmetrics in (False, True):
        names = {
            name
            for name, _ in samples(
                exposition.body(openmetrics=openmetrics), openmetrics=openmetrics
            )
        }
        assert "python_info" in names
        assert "process_cpu_seconds_total" in names


# --- hostile values ---------------------------------------------------------------------------

HOSTILE = 'quote " backslash \\ newline \n tab \t cr \r brace } equals = comma , end\\'


@pytest.mark.parametrize("openmetrics", [False, True])
def test_hostile_label_values_are_escaped(
    state: FleetState, metrics: SelfMetrics, openmetrics: bool
) -> None:
    huge = "x" * 3_000_000
    state.watch(DEV_A, name=HOSTILE, labels={"site": huge, "bad key!": HOSTILE})
    state.apply_actions(
        DEV_A,
        Batch(id=HOSTILE, name=HOSTILE + "\ud800", created_at=START - 10),
        [Action("1", HOSTILE), Action("2", huge)],
    )
    body = make(state, metrics).body(openmetrics=openmetrics)
    assert len(body) < 100_000
    got = samples(body, openmetrics=openmetrics)
    info = next(dict(labels) for name, labels in got if name == "applivery_windows_device_info")
    assert info["name"] == HOSTILE
    assert info["bad_key_"] == HOSTILE
    assert info["site"] == "x" * MAX_LABEL_VALUE + TRUNCATED
    statuses = {
        dict(labels)["status"]
        for name, labels in got
        if name == "applivery_windows_command_actions"
    }
    assert statuses == {HOSTILE, "x" * MAX_LABEL_VALUE + TRUNCATED}
    command = next(dict(labels) for name, labels in got if name == "applivery_windows_command_info")
    assert command["command"] == HOSTILE
    assert command["name"] == HOSTILE + "?"  # a lone surrogate cannot be UTF-8


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


STATUSES = ["Pending", "Awaiting", "Acknowledged", "NotSupported", "Cancel", "Mystery"]


def random_step(rng: random.Random, state: FleetState, clock: Clock, metrics: SelfMetrics) -> None:
    clock.now += rng.uniform(0, 30)
    device = rng.choice([DEV_A, DEV_B, "65f0c0ffee65f0c0ffee0003"])
    roll = rng.random()
    if roll < 0.5:
        if device not in state.watched():
            state.watch(device, name=rng.choice([None, "kiosk", 'q"uote']))
        batch_id = rng.choice([BATCH_1, BATCH_2])
        listed = [
            Action(
                str(i),
                rng.choice(STATUSES),
                sent_at=clock.now - rng.uniform(0, 100),
                received_at=clock.now if rng.random() < 0.5 else None,
            )
            for i in range(rng.randint(0, 5))
        ]
        name = rng.choice([None, "Policy"])
        state.apply_actions(device, Batch(id=batch_id, name=name, created_at=START), listed)
    elif roll < 0.6:
        state.poll_succeeded(device)
    elif roll < 0.7:
        state.poll_failed(device, "timeout")
    elif roll < 0.75:
        state.expire(60)
    elif roll < 0.8:
        state.drop_batch(device, BATCH_2)
    elif roll < 0.85:
        state.unwatch(device)
    elif roll < 0.9:
        state.watch(device, name="renamed", labels={"site": rng.choice(["a", "b"])})
    else:
        metrics.observe_request("actions", rng.choice(["200", "503"]), rng.uniform(0, 2))


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

FLEET_SIZE = BLOCK_DEVICES * 2 + 17  # three blocks per per-device family


def fleet_of(state: FleetState, count: int = FLEET_SIZE) -> list[str]:
    """``count`` more watched devices, each with a named batch of four actions, polled."""
    devices = [f"65f0c0ffee65f0c0ff{i:06d}" for i in range(count)]
    for i, device in enumerate(devices):
        state.watch(device, name=f"pc-{i:04d}", labels={"site": f"site-{i % 5}"})
        state.apply_actions(
            device,
            Batch(id=BATCH_1, name="Baseline", created_at=START + 10),
            [
                Action(str(a), STATUSES[(i + a) % 4], sent_at=START + 20, received_at=START + 40)
                for a in range(4)
            ],
        )
        state.poll_succeeded(device)
    return devices


def single_member(packed: bytes) -> bytes:
    """The body of a gzip stream that must be exactly one member (curl stops reading after
    the first one)."""
    decompressor = zlib.decompressobj(wbits=31)
    plain = decompressor.decompress(packed) + decompressor.flush()
    assert decompressor.eof and decompressor.unused_data == b""
    return plain


def changed_samples(before: Samples, after: Samples) -> set[str]:
    """Names of the samples whose value moved, appeared or went."""
    return {k[0] for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


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


ACCEPTS = {False: "text/plain", True: "application/openmetrics-text; version=1.0.0"}


def serving(exposition: Exposition, state: FleetState) -> Hooks:
    """What the routes need, for an exposition served on its own."""
    return Hooks(
        exposition=exposition,
        state=state,
        ready=lambda: True,
        reload=lambda: None,  # type: ignore[arg-type,return-value]
        version="test",
        organization=lambda: "acme",
    )


async def test_scrapes_during_a_round_return_bodies_that_were_published_whole(
    state: FleetState, clock: Clock, metrics: SelfMetrics, aiohttp_client: Any
) -> None:
    devices = fleet_of(state)
    exposition = make(state, metrics)
    published: dict[bool, set[bytes]] = {
        om: {exposition.body(openmetrics=om)} for om in (False, True)
    }
    hooks = serving(exposition, state)
    client = await aiohttp_client(make_app(hooks), auto_decompress=False)
    rng = random.Random(5)
    done = asyncio.Event()

    async def round_() -> None:
        """Requests and device reads as a round makes them, rendered as the render loop
        does: in steps, the event loop serving scrapes in between."""
        for step in range(60):
            for _ in range(3):
                metrics.observe_request("actions", rng.choice(["200", "429"]), rng.random())
            if step % 2:
                clock.now += 1
                state.poll_succeeded(rng.choice(devices))
            if step % 5 == 0:
                state.apply_actions(
                    rng.choice(devices), Batch(id=BATCH_2), [Action("1", rng.choice(STATUSES))]
                )
            for _ in exposition.refresh_steps():
                await asyncio.sleep(0)
            for om in (False, True):
                published[om].add(exposition.body(openmetrics=om))
            await asyncio.sleep(0.005)
        done.set()

    scraped: list[tuple[bool, bytes]] = []

    async def scraper(openmetrics: bool, compressed: bool) -> None:
        headers = {
            "Accept": ACCEPTS[openmetrics],
            "Accept-Encoding": "gzip" if compressed else "identity",
        }
        while not done.is_set():
            response = await client.get("/metrics", headers=headers)
            assert response.status == 200
            raw = await response.read()
            assert int(response.headers["Content-Length"]) == len(raw)
            assert (response.headers.get("Content-Encoding") == "gzip") == compressed
            scraped.append((openmetrics, single_member(raw) if compressed else raw))

    await asyncio.gather(
        round_(), *(scraper(om, gz) for om in (False, True) for gz in (False, True))
    )
    assert len(scraped) >= 8
    for openmetrics, body in scraped:
        assert body in published[openmetrics]
    for openmetrics in (False, True):
        body = scraped[[om for om, _ in scraped].index(openmetrics)][1]
        samples(body, openmetrics=openmetrics)
    response = await client.head("/metrics", headers={"Accept-Encoding": "identity"})
    assert response.status == 200 and await response.read() == b""
    assert int(response.headers["Content-Length"]) == len(exposition.body(openmetrics=False))


@pytest.mark.integration
async def test_prometheus_reads_the_whole_gzip_stream_in_both_formats(
    state: FleetState, clock: Clock, metrics: SelfMetrics, aiohttp_server: Any
) -> None:
    require_binaries(PROMETHEUS_BIN)
    fleet_of(state)
    scenario(state, clock, metrics)
    exposition = make(state, metrics)
    hooks = serving(exposition, state)
    app = make_app(hooks)
    encodings: list[tuple[str, str]] = []

    async def text(request: web.Request) -> web.StreamResponse:
        # Prometheus asks for OpenMetrics first; this path serves the text format.
        return await handle(request.clone(headers={**request.headers, "Accept": "text/plain"}))

    async def handle(request: web.Request) -> web.StreamResponse:
        encodings.append((request.path, request.headers.get("Accept-Encoding", "")))
        return await serve_metrics(request)

    app.router.add_get("/text", text)
    app.router.add_get("/om", handle)
    server = await aiohttp_server(app)
    address = f"127.0.0.1:{server.port}"
    lines = {
        om: sum(
            1 for line in exposition.body(openmetrics=om).splitlines()
            if line and not line.startswith(b"#")
        )
        for om in (False, True)
    }
    async with running_prometheus(
        [ScrapeTarget(address, job="om", metrics_path="/om"),
         ScrapeTarget(address, job="text", metrics_path="/text")]
    ) as prometheus:

        async def scraped_all(job: str, openmetrics: bool) -> bool:
            found = await prometheus.query(f'scrape_samples_scraped{{job="{job}"}}')
            return bool(found) and float(found[0]["value"][1]) == lines[openmetrics]

        await eventually(lambda: scraped_all("om", True), what="whole OpenMetrics body")
        await eventually(lambda: scraped_all("text", False), what="whole text body")
        # A self-metrics change: a new last piece after the fleet's, compressed earlier.
        for _ in range(5):
            metrics.observe_request("devices", "200", 0.05)
        assert exposition.refresh()

        async def latest(job: str) -> bool:
            found = await prometheus.query(
                f'applivery_exporter_api_requests_total{{job="{job}",api_endpoint="devices"}}'
            )
            return bool(found) and found[0]["value"][1] == "5"

        await eventually(lambda: latest("om"), what="self part after a change (OpenMetrics)")
        await eventually(lambda: latest("text"), what="self part after a change (text)")
        # The first section's family, from the first piece on: every series arrived.
        actions = await prometheus.query('count(applivery_windows_command_actions{job="om"})')
        body = exposition.body(openmetrics=True)
        assert int(actions[0]["value"][1]) == body.count(b"\napplivery_windows_command_actions{")
    assert {path for path, _ in encodings} == {"/om", "/text"}
    assert all("gzip" in accepted for _, accepted in encodings)


# --- negotiation ---------------------------------------------------------------------------

PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, False),
        ("", False),
        ("*/*", False),
        ("text/plain", False),
        ("text/plain;version=0.0.4", False),
        ("application/openmetrics-text", True),
        ("application/openmetrics-text; version=1.0.0; charset=utf-8", True),
        ("application/openmetrics-text;version=0.0.1", False),
        ("application/openmetrics-text;version=0.0.1,application/openmetrics-text", True),
        ("text/plain;version=1.0.0,application/openmetrics-text", False),
        ("text/plain;version=0.0.4,application/openmetrics-text;version=1.0.0", True),
        ("application/json, application/openmetrics-text;q=0.1", True),
        (PROMETHEUS_ACCEPT, True),
    ],
)
def test_wants_openmetrics(accept: str | None, expected: bool) -> None:
    assert wants_openmetrics(accept) is expected
    # Same answer as prometheus_client's own negotiation.
    content_type = choose_encoder(accept or "")[1]
    assert content_type.startswith("application/openmetrics-text") is expected


# --- promtool ------------------------------------------------------------------------------


@pytest.mark.integration
def test_promtool_check_metrics_is_clean(
    state: FleetState, clock: Clock, metrics: SelfMetrics
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed")
    scenario(state, clock, metrics)
    state.watch(DEV_B, name=HOSTILE, labels={"site": "y" * 5000})
    body = Exposition(state, metrics, version="1.2.3").body(openmetrics=False)
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == b"" and result.stderr.strip() == b""
