"""The running exporter under a real Prometheus and a real Alertmanager.

The simulator serves its API on a real aiohttp server with its fleet changing in accelerated
time; the exporter runs in this process (``build_exporter`` + ``serve``) on a free port, its
watermarks on the simulator's time line; Prometheus scrapes it every second and evaluates
the project's rule files. What a test expects comes from the simulator's ground truth or from
the thresholds written in the rule files, never from the exporter itself.

Also checks the wiring guide (docs/monitoring.md): its paths exist and its commands work.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import shlex
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from promstack import (
    AMTOOL_BIN,
    PROMETHEUS_BIN,
    PROMTOOL_BIN,
    AlertSink,
    ApiError,
    Prometheus,
    ScrapeTarget,
    eventually,
    free_port,
    immediate_alerts,
    require_binaries,
    running_alertmanager,
    running_prometheus,
)
from test_dashboard import grafana_queries, load_dashboard, recorded_names

from exporter.cli import build_exporter, serve
from exporter.client import TokenSource
from exporter.config import parse_config
from exporter.simulator import Simulator
from exporter.statuses import StatusClass, classify

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "prometheus" / "alerts.yml"
RECORDING = ROOT / "prometheus" / "recording.yml"
GUIDE = ROOT / "docs" / "monitoring.md"
JOB = "applivery-mdm-exporter"

# At 600x a device that opens an OMA-DM session every 5-30 minutes does so every 0.5-3 s,
# so batches are sent, answered and polled many times within a test.
SPEED = 600.0
DEVICES = 10
NEW_BATCHES_PER_DEVICE_HOUR = 2.0  # organic activity: ~1 new batch every 3 s in all
CHATTY_INTERVAL = 30 * 60.0  # devices with sessions at most this far apart take the bursts
POLL_SECONDS = 1.0

ERROR_ALERTS = frozenset({"AppliveryCommandErrorSpike", "AppliveryCommandErrorRatioHigh"})
ALERT_WINDOW = 45.0  # real seconds a scenario runs after its stack is up
BURST_BATCHES = 16
BURST_ERROR_RATIO = 0.9
DATA_TIMEOUT = 45.0

SimulatorFactory = Callable[..., Awaitable[tuple[Simulator, str]]]


# --- the stack ------------------------------------------------------------------------------


def exporter_config_yaml(base_url: str, organization: str) -> str:
    """Discovery of every device, polls every second, a budget that never slows a round.
    Durations on the upstream's time line (batch age, discovery refresh) are simulated."""
    return yaml.safe_dump(
        {
            "organization": organization,
            "api": {"base_url": base_url, "requests_per_hour": 10_000_000, "page_size": 100},
            "poll": {"interval_seconds": POLL_SECONDS, "stale_after_rounds": 30},
            "discovery": {
                "devices": {"refresh_seconds": 7 * 86400},
                "batches": {"max_age": "30d", "max_per_device": 40},
            },
        }
    )


@contextlib.asynccontextmanager
async def running_exporter(sim: Simulator, base_url: str) -> AsyncIterator[str]:
    """The exporter serving /metrics on 127.0.0.1 until the block ends; yields host:port
    once it is ready (every device polled once)."""
    config = parse_config(exporter_config_yaml(base_url, sim.organization), source="<live>")
    exporter = build_exporter(
        config, TokenSource(value=sim.token), config_path=None, clock=sim.clock.now
    )
    address = f"127.0.0.1:{free_port()}"
    stop = asyncio.Event()
    task = asyncio.create_task(serve(exporter, address, stop=stop))
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:

            async def ready() -> bool:
                if task.done():
                    task.result()  # raises why serve() ended
                    raise RuntimeError("the exporter stopped before it became ready")
                async with session.get(f"http://{address}/-/ready") as resp:
                    return resp.status == 200

            await eventually(ready, timeout=30, what="exporter ready")
        yield address
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def start_simulator(make_simulator_server: SimulatorFactory) -> tuple[Simulator, str]:
    # start=None: the simulated clock starts at the wall clock, so ages computed by
    # Prometheus from time() (stale polls, stuck actions) stay meaningful.
    return await make_simulator_server(
        seed=5,
        devices=DEVICES,
        speed=SPEED,
        start=None,
        new_batches_per_device_hour=NEW_BATCHES_PER_DEVICE_HOUR,
    )


def inject_error_burst(sim: Simulator, batches: int, error_ratio: float) -> list[tuple[str, str]]:
    """Batches on the devices that check in often, so they resolve within seconds."""
    chatty = [d.id for d in sim.fleet.devices if d.online and d.mean_interval <= CHATTY_INTERVAL]
    assert chatty, "the simulated fleet has no device that checks in often"
    return [
        pair
        for index in range(batches)
        for pair in sim.burst(chatty[index % len(chatty)], 1, error_ratio)
    ]


def burst_actions(sim: Simulator, created: list[tuple[str, str]]) -> int:
    return sum(sum(sim.fleet.grouped_counts(device, batch).values()) for device, batch in created)


async def scraped(prometheus: Prometheus) -> None:
    await eventually(
        lambda: prometheus.query(f'up{{job="{JOB}"}} == 1'), what="exporter scraped", timeout=20
    )


# --- reading answers ------------------------------------------------------------------------------


def values(result: list[dict[str, Any]]) -> list[float]:
    """Sample values of an instant query's vector (or scalar) result."""
    if result and isinstance(result[0], dict):
        return [float(series["value"][1]) for series in result]
    if len(result) == 2 and not isinstance(result[0], dict):  # scalar: [time, value]
        return [float(result[1])]  # type: ignore[arg-type]
    return []


def has_data(result: list[dict[str, Any]]) -> bool:
    """At least one series with a number (NaN, what 0/0 gives, is no data to show)."""
    return any(not math.isnan(v) for v in values(result))


async def without_data(prometheus: Prometheus, queries: list[str]) -> list[str]:
    """The queries that return no data yet; a query Prometheus rejects fails at once."""
    missing = []
    for query in queries:
        try:
            result = await prometheus.query(query)
        except ApiError as exc:
            pytest.fail(f"Prometheus rejects {query!r}: {exc}")
        if not has_data(result):
            missing.append(query)
    return missing


async def until_all_have_data(prometheus: Prometheus, queries: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while missing := await without_data(prometheus, queries):
        if time.monotonic() > deadline:
            pytest.fail(f"no data after {timeout}s from:\n" + "\n".join(missing))
        await asyncio.sleep(1)


async def scalar(prometheus: Prometheus, expr: str) -> float:
    """The single value of expr; NaN when it has none."""
    found = values(await prometheus.query(expr))
    assert len(found) <= 1, (expr, found)
    return found[0] if found else math.nan


def rule_thresholds(alert: str) -> tuple[float, float, int]:
    """(ratio threshold, minimum finished actions, window seconds) written in alerts.yml."""
    document = yaml.safe_load(ALERTS.read_text())
    (rule,) = [r for g in document["groups"] for r in g["rules"] if r.get("alert") == alert]
    expr = " ".join(rule["expr"].split())
    match = re.fullmatch(
        r"\S+:ratio_rate(?P<window>\d+[mh]) > (?P<ratio>[\d.]+) and "
        r"\S+:rate(?P=window) \* (?P<seconds>\d+) >= (?P<volume>\d+)",
        expr,
    )
    assert match, f"{alert}: unexpected expression {expr!r}"
    seconds = int(match["seconds"])
    assert seconds == {"5m": 300, "1h": 3600}[match["window"]], expr
    return float(match["ratio"]), float(match["volume"]), seconds


# --- 1. the dashboard and the recording rules against live data -------------------------------


async def test_every_dashboard_query_and_recorded_series_has_live_data(
    make_simulator_server: SimulatorFactory,
) -> None:
    require_binaries(PROMETHEUS_BIN)
    sim, base_url = await start_simulator(make_simulator_server)
    async with (
        running_exporter(sim, base_url) as address,
        running_prometheus([ScrapeTarget(address)], rule_files=[RECORDING]) as prometheus,
    ):
        await scraped(prometheus)
        # The error-only panels (error ratio, devices with most errors) need errors.
        created = inject_error_burst(sim, batches=4, error_ratio=1.0)
        queries = grafana_queries(load_dashboard())
        recorded = sorted(recorded_names(RECORDING))
        await until_all_have_data(prometheus, queries + recorded, DATA_TIMEOUT)

        # Errors reached every stage: gauges, counters, their rates and the ratio.
        errors = 'status_class="error"'
        assert await scalar(
            prometheus, f"sum(instance_status_class:applivery_windows_command_actions:sum{{{errors}}})"
        ) > 0
        assert await scalar(
            prometheus,
            "sum(instance_status_class:applivery_windows_command_action_transitions:rate5m"
            f"{{{errors}}})",
        ) > 0
        assert await scalar(
            prometheus, "instance:applivery_windows_command_action_errors_per_final:ratio_rate5m"
        ) > 0
        classes = {
            series["metric"]["status_class"]
            for series in await prometheus.query(
                "sum by (status_class) (instance_status_class:applivery_windows_command_actions:sum)"
            )
        }
        assert {"pending", "success", "error"} <= classes, classes

        # Every error the burst brought back is counted: once the simulator has answered
        # every action of the burst, the exported counter reaches the simulator's tally.
        await eventually(
            lambda: _resolved(sim, created), timeout=DATA_TIMEOUT, what="burst answered"
        )
        burst_errors = error_answers(sim, created)
        assert burst_errors > 0
        await eventually(
            lambda: _at_least(
                prometheus,
                f"sum(applivery_windows_command_action_transitions_total{{{errors}}})",
                burst_errors,
            ),
            what=f"at least {burst_errors} error transitions in Prometheus",
        )

        unhealthy = [
            (rule["name"], rule.get("lastError"))
            for group in await prometheus.rules()
            for rule in group["rules"]
            if rule["health"] != "ok"
        ]
        assert unhealthy == []


async def _resolved(sim: Simulator, created: list[tuple[str, str]]) -> bool:
    return not any(
        n and classify(status) is StatusClass.PENDING
        for device, batch in created
        for status, n in sim.fleet.grouped_counts(device, batch).items()
    )


def error_answers(sim: Simulator, created: list[tuple[str, str]]) -> int:
    return sum(
        n
        for device, batch in created
        for status, n in sim.fleet.grouped_counts(device, batch).items()
        if classify(status) is StatusClass.ERROR
    )


async def _at_least(prometheus: Prometheus, expr: str, minimum: float) -> bool:
    return await scalar(prometheus, expr) >= minimum
