"""Exposition: both formats parse, values equal the state, hostile labels stay contained,
scrapes during a round get bodies published whole, Prometheus reads the whole gzip stream,
negotiation, promtool. Refreshing: test_exposition_refresh.py."""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
from typing import Any

import pytest
from aiohttp import web
from exposition_rig import (
    BATCH_1,
    BATCH_2,
    DEV_A,
    DEV_B,
    START,
    STATUSES,
    Clock,
    fleet_of,
    key,
    make,
    samples,
    scenario,
    single_member,
)
from prometheus_client.exposition import choose_encoder
from promstack import PROMETHEUS_BIN, ScrapeTarget, eventually, require_binaries, running_prometheus

from exporter.exposition import (
    MAX_LABEL_VALUE,
    TRUNCATED,
    Exposition,
    truncation_mark,
    wants_openmetrics,
)
from exporter.records import Action, Batch
from exporter.selfexposition import BUILD_LABELS
from exporter.selfmetrics import SelfMetrics
from exporter.server import Hooks, make_app
from exporter.server import metrics as serve_metrics
from exporter.state import FleetState

pytest_plugins = ("exposition_rig",)  # its fixtures: clock, metrics, state


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
        key("applivery_exporter_build_info", version="1.2.3", **BUILD_LABELS): 1,
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
    assert info["site"] == "x" * MAX_LABEL_VALUE + truncation_mark(huge)
    statuses = {
        dict(labels)["status"]
        for name, labels in got
        if name == "applivery_windows_command_actions"
    }
    assert statuses == {HOSTILE, "x" * MAX_LABEL_VALUE + truncation_mark(huge)}
    assert truncation_mark(huge).startswith(TRUNCATED)
    command = next(dict(labels) for name, labels in got if name == "applivery_windows_command_info")
    assert command["command"] == HOSTILE
    assert command["name"] == HOSTILE + "?"  # a lone surrogate cannot be UTF-8


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
