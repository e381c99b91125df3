"""Exposition: both formats parse, values equal the state, hostile labels stay contained,
incremental refresh equals a full render, gzip round-trips, negotiation, promtool."""

from __future__ import annotations

import gzip
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from exporter.exposition import (
    MAX_LABEL_VALUE,
    RENDER_STEP_DEVICES,
    TRUNCATED,
    Exposition,
    wants_openmetrics,
)
from exporter.records import Action, Batch
from exporter.selfmetrics import SelfMetrics
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
    assert pauses == 3  # after 200 and 400 of the 599 devices still watched, between bodies
    samples(exposition.body(openmetrics=True), openmetrics=True)  # whole and parseable
    assert exposition.refresh() is True  # what changed while paused is not lost
    full = make(state, metrics, registry=registry)
    for openmetrics in (False, True):
        assert exposition.body(openmetrics=openmetrics) == full.body(openmetrics=openmetrics)


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
