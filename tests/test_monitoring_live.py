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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from promstack import (
    ALERTMANAGER_BIN,
    AMTOOL_BIN,
    PROMETHEUS_BIN,
    PROMTOOL_BIN,
    Alertmanager,
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
from test_dashboard import DEFAULT_VARIABLES, grafana_queries, load_dashboard, recorded_names
from test_dashboard import substitute as substitute_variables
from test_rules import load_generator

from exporter.cli import build_exporter, serve
from exporter.client import TokenSource
from exporter.config import parse_config
from exporter.simulator import Simulator, wire
from exporter.statuses import StatusClass, classify
from exporter.store import DirectoryLock
from exporter.targets import Shard

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "prometheus" / "alerts.yml"
RECORDING = ROOT / "prometheus" / "recording.yml"
GUIDE = ROOT / "docs" / "monitoring.md"
JOB = "applivery-mdm-exporter"

# At 600x a device that opens an OMA-DM session every 5-30 minutes does so every 0.5-3 s,
# so batches are sent, answered and polled many times within a test.
SPEED = 600.0
DEVICES = 10
# Organic activity: ~0.4 new batches per real second in all, a few finished actions per
# second, ~6 % of them errors. Much more would drown a burst within seconds: the ratio over
# 5m covers everything since Prometheus started.
NEW_BATCHES_PER_DEVICE_HOUR = 0.25
CHATTY_INTERVAL = 30 * 60.0  # devices with sessions at most this far apart take the bursts
POLL_SECONDS = 1.0

ERROR_ALERTS = frozenset({"AppliveryCommandErrorSpike", "AppliveryCommandErrorRatioHigh"})
ALERT_WINDOW = 30.0  # real seconds a scenario runs after its stack is up
BURST_BATCHES = 40  # ~300 actions: ratio stays over 0.5 for the whole window
BURST_ERROR_RATIO = 0.9
DATA_TIMEOUT = 45.0

ERRORS = 'status_class="error"'
ERROR_STAGES = (
    f"sum(instance_status_class:applivery_windows_command_actions:sum{{{ERRORS}}})",
    f"sum(instance_status_class:applivery_windows_command_action_transitions:rate5m{{{ERRORS}}})",
    "job:applivery_windows_command_action_errors_per_final:ratio_rate5m",
    "job:applivery_windows_command_action_errors_per_final:ratio_rate1h",
)

SimulatorFactory = Callable[..., Awaitable[tuple[Simulator, str]]]


# --- the stack ------------------------------------------------------------------------------


def exporter_config_yaml(
    base_url: str, organization: str, poll_seconds: float = POLL_SECONDS
) -> str:
    """Discovery of every device, polls every second, a budget that never slows a round.
    Durations on the upstream's time line (batch age, discovery refresh) are simulated."""
    return yaml.safe_dump(
        {
            "organization": organization,
            "api": {"base_url": base_url, "requests_per_hour": 10_000_000, "page_size": 100},
            "poll": {"interval_seconds": poll_seconds, "stale_after_rounds": 30},
            "discovery": {
                "devices": {"refresh_seconds": 7 * 86400},
                "batches": {"max_age": "30d", "max_per_device": 40},
            },
        }
    )


@contextlib.asynccontextmanager
async def running_exporter(
    sim: Simulator,
    base_url: str,
    *,
    shard: Shard | None = None,
    poll_seconds: float = POLL_SECONDS,
    storage: Path | None = None,
) -> AsyncIterator[str]:
    """The exporter (or one shard of it) serving /metrics on 127.0.0.1 until the block ends;
    yields host:port once it is ready (every device it owns polled once). ``storage``: its
    --storage.path (None: state in memory only)."""
    config = parse_config(
        exporter_config_yaml(base_url, sim.organization, poll_seconds), source="<live>"
    )
    exporter = build_exporter(
        config, TokenSource(value=sim.token), config_path=None, shard=shard, clock=sim.clock.now,
        storage=None if storage is None else DirectoryLock(storage),
    )
    address = f"127.0.0.1:{free_port()}"
    stop = asyncio.Event()
    task = asyncio.create_task(serve(exporter, address, stop=stop, signals=False))
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


@dataclass(slots=True)
class Interference:
    """Upstream misbehaviour a test switches on, answered before the simulator's own app:
    devices whose routes answer 404 (as a device unknown upstream does), and a number of
    requests, the next ones whose path contains ``throttle_path``, answered 429."""

    unknown_devices: set[str] = field(default_factory=set)
    throttle_next: int = 0
    throttle_path: str = ""
    throttled: int = 0

    def middleware(self) -> Any:
        @web.middleware
        async def interfere(request: web.Request, handler: Any) -> web.StreamResponse:
            if self.throttle_next > 0 and self.throttle_path in request.path:
                self.throttle_next -= 1
                self.throttled += 1
                return web.Response(status=429, text="Too many requests.",
                                    headers={"Retry-After": "0"})  # fmt: skip
            parts = request.path.split("/")
            if any(device in parts for device in self.unknown_devices):
                return web.Response(status=404, body=wire.failure(3001, "Entity not found"),
                                    content_type="application/json")  # fmt: skip
            return await handler(request)

        return interfere


async def serve_simulator(
    aiohttp_server: Any, sim: Simulator, interference: Interference
) -> str:
    """The simulator's app behind interference on a real server; its base URL."""
    app = sim.app()
    app.middlewares.insert(0, interference.middleware())
    server = await aiohttp_server(app)
    return str(server.make_url("/v1"))


async def start_simulator(make_simulator_server: SimulatorFactory) -> tuple[Simulator, str]:
    # start=None: the simulated clock starts at the wall clock, so ages computed by
    # Prometheus from time() (stale polls, stuck actions) stay meaningful.
    return await make_simulator_server(
        seed=5,
        devices=DEVICES,
        speed=SPEED,
        start=None,
        new_batches_per_device_hour=NEW_BATCHES_PER_DEVICE_HOUR,
        # New batches one device at a time, at the same rate: a rollout lands on half the
        # fleet at once or not at all within a run, and the clean run's volume of finished
        # actions swung by it below the spike's guard. The history still holds rollouts.
        rollout_share=0.0,
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


async def positive(prometheus: Prometheus, expr: str) -> float | None:
    """The value of expr when it is above 0 (no data, NaN, is not)."""
    value = await scalar(prometheus, expr)
    return value if value > 0 else None


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
    aiohttp_server: Any, tmp_path: Path
) -> None:
    require_binaries(PROMETHEUS_BIN)
    sim = Simulator(
        seed=5,
        devices=DEVICES,
        speed=SPEED,
        start=None,
        new_batches_per_device_hour=NEW_BATCHES_PER_DEVICE_HOUR,
    )
    # The table of silent devices with pending actions needs one: by the simulator's account,
    # a device that stopped checking in over a day ago for good and holds work.
    silent = silent_devices_with_work(sim)
    assert silent, "the simulated fleet has no silent device holding a pending action"
    interference = Interference()
    base_url = await serve_simulator(aiohttp_server, sim, interference)
    async with (
        # With a store, as deployed by default: the exporters table shows its last write.
        running_exporter(sim, base_url, storage=tmp_path / "state") as address,
        running_prometheus([ScrapeTarget(address)], rule_files=[RECORDING]) as prometheus,
    ):
        await scraped(prometheus)
        # The error-only panels (error ratio, devices with most errors) need errors, and the
        # table of devices failing their polls needs one: a device upstream no longer knows.
        created = inject_error_burst(sim, batches=4, error_ratio=1.0)
        bursting = {device for device, _ in created}
        unknown = next(d for d in reversed(sim.fleet.device_ids()) if d not in bursting)
        interference.unknown_devices.add(unknown)
        queries = grafana_queries(load_dashboard())
        recorded = sorted(recorded_names(RECORDING))
        await until_all_have_data(prometheus, queries + recorded, DATA_TIMEOUT)

        # The silent devices holding work are in their table (others may be too: a device
        # that checks in rarely can be silent for a moment).
        (table_query, _) = panel_queries("Silent devices with pending actions")
        listed = {s["metric"]["device"] for s in await prometheus.query(table_query)}
        assert silent <= listed, (silent, listed)

        # Errors reached every stage: action gauges, transition rates, the ratio. (A stage
        # may have data before the burst does: the transition series exist from 0, and a
        # recorded rate follows the scrape that counted the burst by a rule evaluation.)
        for expr in ERROR_STAGES:
            value = await eventually(lambda e=expr: positive(prometheus, e),
                                     timeout=DATA_TIMEOUT, interval=1, what=f"{expr} > 0")
            assert value > 0, expr
        classes = {
            series["metric"]["status_class"]
            for series in await prometheus.query(
                "sum by (status_class) "
                "(instance_status_class:applivery_windows_command_actions:sum > 0)"
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
                f"sum(applivery_windows_command_action_transitions_total{{{ERRORS}}})",
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


def silent_devices_with_work(sim: Simulator) -> set[str]:
    """Devices whose sessions have stopped for good, whose last check-in is older than the
    silence threshold of prometheus/params.yml (with a minute to spare), and that hold an
    action still pending."""
    generator = load_generator()
    after = generator.load_params().seconds("AppliveryDevicesSilent", "after")
    now = sim.clock.now()
    return {
        device.id
        for device in sim.fleet.devices
        if device.offline_since is not None
        and device.offline_since <= now
        and device.last_report is not None
        and device.last_report < time.time() - after - 60
        and any(not action.final for batch in device.batches for action in batch.actions)
    }


def panel_queries(title: str) -> list[str]:
    """The queries of one dashboard panel, its variables substituted."""
    (panel,) = [p for p in load_dashboard()["panels"] if p.get("title") == title]
    return [substitute_variables(t["expr"], DEFAULT_VARIABLES) for t in panel["targets"]]


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


# --- 2. an error burst alerts end to end; a clean run does not ---------------------------------


@dataclass(frozen=True, slots=True)
class AlertingStack:
    sim: Simulator
    exporter: str  # host:port of /metrics
    prometheus: Prometheus
    alertmanager: Alertmanager
    sink: AlertSink
    immediate_rules: Path  # the copy of alerts.yml without `for`


@contextlib.asynccontextmanager
async def alerting_stack(
    make_simulator_server: SimulatorFactory, aiohttp_server: Any, directory: Path
) -> AsyncIterator[AlertingStack]:
    """Simulator, exporter, Prometheus with the project's rules and Alertmanager notifying a
    webhook served here. The alerts are loaded twice: as written, and as a copy with every
    ``for`` removed (expressions, thresholds and volume guards untouched) whose firing alerts
    reach Alertmanager in seconds while the originals wait out their ``for``."""
    require_binaries(PROMETHEUS_BIN, ALERTMANAGER_BIN)
    sink = AlertSink()
    receiver = await aiohttp_server(sink.app())
    sim, base_url = await start_simulator(make_simulator_server)
    immediate = immediate_alerts(ALERTS, directory)
    async with (
        running_exporter(sim, base_url) as address,
        running_alertmanager(str(receiver.make_url(sink.path))) as alertmanager,
        running_prometheus(
            [ScrapeTarget(address)],
            rule_files=[RECORDING, ALERTS, immediate],
            alertmanager=alertmanager.address,
        ) as prometheus,
    ):
        await scraped(prometheus)
        await eventually(
            lambda: _knows_alertmanager(prometheus, alertmanager),
            what="Prometheus sends to the Alertmanager",
        )
        yield AlertingStack(sim, address, prometheus, alertmanager, sink, immediate)


async def _knows_alertmanager(prometheus: Prometheus, alertmanager: Alertmanager) -> bool:
    async with prometheus.session.get(prometheus.url + "/api/v1/alertmanagers") as resp:
        body = await resp.json()
    active = body["data"]["activeAlertmanagers"]
    return any(alertmanager.address in entry["url"] for entry in active)


async def alert_states(prometheus: Prometheus, rule_file: Path, alert: str) -> set[str]:
    """States of an alerting rule loaded from rule_file (inactive, pending, firing)."""
    return {
        rule["state"]
        for group in await prometheus.rules("alert")
        if Path(group["file"]).resolve() == rule_file.resolve()
        for rule in group["rules"]
        if rule["name"] == alert
    }


def delivered(sink: AlertSink, names: frozenset[str] | set[str]) -> list[dict[str, Any]]:
    return [a for a in sink.alerts("firing") if a["labels"]["alertname"] in names]


async def until_delivered(sink: AlertSink, name: str, timeout: float) -> list[dict[str, Any]]:
    async def probe() -> list[dict[str, Any]]:
        return delivered(sink, {name})

    return await eventually(probe, timeout=timeout, what=f"{name} delivered to the webhook")


async def test_error_burst_reaches_the_webhook_as_error_spike(
    make_simulator_server: SimulatorFactory, aiohttp_server: Any, tmp_path: Path
) -> None:
    spike_ratio, spike_volume, _ = rule_thresholds("AppliveryCommandErrorSpike")
    high_ratio, high_volume, _ = rule_thresholds("AppliveryCommandErrorRatioHigh")
    assert max(spike_ratio, high_ratio) < BURST_ERROR_RATIO
    started = time.monotonic()
    async with alerting_stack(make_simulator_server, aiohttp_server, tmp_path) as stack:
        created = inject_error_burst(stack.sim, BURST_BATCHES, BURST_ERROR_RATIO)
        # Enough finished actions to pass both volume guards, by the simulator's count.
        assert burst_actions(stack.sim, created) >= 1.5 * max(spike_volume, high_volume)
        remaining = ALERT_WINDOW - (time.monotonic() - started)

        (spike, *_) = await until_delivered(stack.sink, "AppliveryCommandErrorSpike", remaining)
        assert spike["labels"]["severity"] == "critical"
        assert spike["labels"]["organization"] == stack.sim.organization
        assert spike["labels"]["job"] == JOB
        assert "instance" not in spike["labels"]  # one alert for the deployment
        assert spike["annotations"]["runbook_url"].endswith("#appliverycommanderrorspike")
        assert "%" in spike["annotations"]["description"]

        # Still firing (the burst holds the condition, not a blip), and the rule as written
        # has started its `for` clock on the same condition.
        spiking = "AppliveryCommandErrorSpike"
        assert await alert_states(stack.prometheus, stack.immediate_rules, spiking) == {"firing"}
        assert await alert_states(stack.prometheus, ALERTS, spiking) == {"pending"}

        remaining = ALERT_WINDOW - (time.monotonic() - started)
        (high, *_) = await until_delivered(
            stack.sink, "AppliveryCommandErrorRatioHigh", max(remaining, 5.0)
        )
        assert high["labels"]["severity"] == "warning"
        assert high["labels"]["organization"] == stack.sim.organization

        # The burst is what fired them: the simulator answered mostly errors.
        await eventually(lambda: _resolved(stack.sim, created), what="burst answered")
        answered = burst_actions(stack.sim, created)
        assert error_answers(stack.sim, created) / answered > spike_ratio


async def test_clean_run_of_the_same_length_alerts_no_errors(
    make_simulator_server: SimulatorFactory, aiohttp_server: Any, tmp_path: Path
) -> None:
    _, spike_volume, _ = rule_thresholds("AppliveryCommandErrorSpike")
    started = time.monotonic()
    async with alerting_stack(make_simulator_server, aiohttp_server, tmp_path) as stack:
        began = time.time()
        await asyncio.sleep(max(0.0, ALERT_WINDOW - (time.monotonic() - started)))
        prometheus = stack.prometheus
        active = {a["labels"]["alertname"] for a in await prometheus.alerts()}
        assert not active & ERROR_ALERTS, active
        assert delivered(stack.sink, ERROR_ALERTS) == []

        # Not a quiet fleet: finished actions passed the spike's volume guard and some of
        # them were errors, so the ratio condition itself kept the alerts silent.
        volume = await prometheus.query_range(
            "job:applivery_windows_command_action_final_transitions:rate5m * 300",
            began,
            time.time(),
            1,
        )
        assert max(values_over_time(volume)) >= spike_volume
        errors = await scalar(
            prometheus, f"sum(applivery_windows_command_action_transitions_total{{{ERRORS}}})"
        )
        assert errors > 0


def values_over_time(result: list[dict[str, Any]]) -> list[float]:
    return [float(v) for series in result for _, v in series["values"]]


# --- 3. the wiring guide: its paths exist and its commands work ---------------------------------

_REPO_PATH = re.compile(r"`((?:prometheus|grafana|docs|tests|deploy|exporter)/[^`\s]*)`")
_SHELL_BLOCK = re.compile(r"```sh\n(.*?)```", re.S)
_YAML_BLOCK = re.compile(r"```yaml\n(.*?)```", re.S)
# Inline commands with a file argument (a bare "promtool test rules" in prose is a name).
_INLINE_COMMAND = re.compile(r"(?<!`)`((?:promtool|amtool) [^`]*/[^`]*)`(?!`)")


def guide_commands() -> list[list[str]]:
    """Command lines of the guide's sh blocks, and promtool/amtool lines quoted in its text."""
    text = GUIDE.read_text()
    lines = [line for block in _SHELL_BLOCK.findall(text) for line in block.splitlines()]
    lines += _INLINE_COMMAND.findall(text)
    return [shlex.split(line) for line in lines if line.strip() and not line.startswith("#")]


def guide_yaml() -> list[dict[str, Any]]:
    return [yaml.safe_load(block) for block in _YAML_BLOCK.findall(GUIDE.read_text())]


def test_readme_links_the_guide() -> None:
    assert "docs/monitoring.md" in (ROOT / "README.md").read_text()


def test_every_path_the_guide_names_exists() -> None:
    named = set(_REPO_PATH.findall(GUIDE.read_text()))
    assert named
    missing = [p for p in sorted(named) if not any(ROOT.glob(p.rstrip("/")))]
    assert missing == []


def test_the_guides_check_commands_pass_from_the_repository_root() -> None:
    tools = {"promtool": PROMTOOL_BIN, "amtool": AMTOOL_BIN}
    checks = [argv for argv in guide_commands() if argv[0] in tools]
    assert {argv[0] for argv in checks} == set(tools)
    for argv in checks:
        (binary,) = require_binaries(tools[argv[0]])
        # The guide's globs are expanded as a shell would.
        args = [str(p) for a in argv[1:] for p in (sorted(ROOT.glob(a)) if "*" in a else [a])]
        result = subprocess.run(
            [binary, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, f"{shlex.join(argv)}:\n{result.stdout}{result.stderr}"


def test_the_guides_copy_and_test_commands_name_real_files() -> None:
    commands = guide_commands()
    copies = [argv for argv in commands if argv[0] == "cp"]
    assert copies
    for argv in copies:
        assert (ROOT / argv[1]).is_file(), shlex.join(argv)
    pytests = [argv for argv in commands if argv[:3] == ["python", "-m", "pytest"]]
    assert pytests
    for argv in pytests:
        for path in argv[3:]:
            assert (ROOT / path).is_file(), shlex.join(argv)


def test_the_guides_grafana_steps_put_the_dashboard_where_provisioning_looks() -> None:
    commands = guide_commands()
    (provider,) = yaml.safe_load(
        (ROOT / "grafana/provisioning/dashboards/applivery-mdm-exporter.yml").read_text()
    )["providers"]
    folder = provider["options"]["path"].rstrip("/")
    dashboard = "grafana/dashboards/applivery-mdm-exporter.json"
    assert ["mkdir", "-p", folder] in commands
    assert any(argv[:2] == ["cp", dashboard] and argv[2].rstrip("/") == folder for argv in commands)


def test_the_guides_snippets_match_the_example_configuration() -> None:
    example = yaml.safe_load((ROOT / "prometheus" / "prometheus.example.yml").read_text())
    snippets = guide_yaml()
    scrape = next(s for s in snippets if "scrape_configs" in s)
    rules = next(s for s in snippets if "rule_files" in s)
    (job,) = scrape["scrape_configs"]
    assert job["job_name"] == JOB
    (example_job,) = [j for j in example["scrape_configs"] if j["job_name"] == JOB]
    assert job == {key: example_job[key] for key in job}, (job, example_job)
    assert sorted(rules["rule_files"]) == sorted(example["rule_files"])
    # The job name the guide tells to keep is the one the alerts select on.
    assert f'job="{JOB}"' in ALERTS.read_text()
