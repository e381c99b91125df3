"""The cardinality guard: under ``metrics.max_series`` the exporter drops the most specific
labels first (docs/cardinality.md), says what it dropped, and every alert input survives.

The expected level for a ceiling, and the expected values at each level, are worked out here
from the unguarded scrape and the simulator's ground truth, never from the guard itself.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from structlog.testing import capture_logs
from test_exporter_e2e import Samples, make_exporter, poll, samples, select

from exporter.cli import Exporter
from exporter.exposition import GUARD_LEVELS, MAX_LABEL_VALUE, Exposition, truncation_mark
from exporter.landing import Bounds
from exporter.records import Action, Batch
from exporter.reloading import reload_configs
from exporter.selfmetrics import SelfMetrics
from exporter.server import Hooks, make_app
from exporter.simulator import Simulator
from exporter.state import FleetState
from exporter.statuses import classify

ACTIONS = "applivery_windows_command_actions"
COMMAND_INFO = "applivery_windows_command_info"
DEVICE_INFO = "applivery_windows_device_info"
# What alerts and recording rules read besides the action gauges (prometheus/*.yml).
ALERT_INPUTS = (
    "applivery_exporter_target_up",
    "applivery_exporter_last_success_timestamp_seconds",
    "applivery_windows_command_oldest_pending_sent_timestamp_seconds",
    "applivery_windows_command_action_transitions_total",
    "applivery_exporter_api_requests_total",
    "applivery_exporter_parse_problems_total",
    "applivery_exporter_config_last_reload_successful",
)
# Process metrics move between two scrapes; only their number of series matters here.
MOVING = ("process_", "python_", "applivery_exporter_series_dropped",
          "applivery_exporter_cardinality_guard_level", "applivery_exporter_api_request_duration",
          "applivery_exporter_poll_round_duration_seconds")


@pytest.fixture
async def fleet(make_simulator_server) -> AsyncIterator[tuple[Simulator, Exporter]]:
    sim, url = await make_simulator_server(seed=5, devices=6, batches_per_device=4)
    exporter = make_exporter(sim, url)
    await poll(exporter)
    sim.advance(1800)  # some pending and some answered actions
    await poll(exporter)
    yield sim, exporter
    await exporter.client.close()


def scrape(exporter: Exporter, max_series: int | None) -> Samples:
    exporter.exposition.max_series = max_series
    return samples(exporter)


def level_series(full: Samples) -> list[int]:
    """Series each guard level serves, counted from an unguarded scrape."""
    actions = [dict(k) for (n, k) in full if n == ACTIONS]
    by_status = {(a["device"], a["status"]) for a in actions}
    by_class = {(a["device"], a["status_class"]) for a in actions}
    classes = {a["status_class"] for a in actions}
    info = sum(1 for (n, _) in full if n == DEVICE_INFO)
    command_info = sum(1 for (n, _) in full if n == COMMAND_INFO)
    # The unguarded scrape already holds the guard's two gauges.
    rest = len(full) - len(actions) - info - command_info
    return [
        len(full),
        rest + len(by_status) + command_info + info,
        rest + len(by_status) + info,
        rest + len(by_class) + info,
        rest + len(by_class),
        rest + len(classes),
    ]


def truth_by_device_class(sim: Simulator) -> Counter[tuple[str, str]]:
    out: Counter[tuple[str, str]] = Counter()
    for device in sim.fleet.device_ids():
        for batch in sim.fleet.batch_ids(device):
            for status, count in sim.fleet.grouped_counts(device, batch).items():
                out[(device, classify(status).value)] += count
    return +out


def exported_by_device_class(found: Samples) -> Counter[tuple[str, str]]:
    """What the recording rule ``sum without (command, status)`` computes."""
    out: Counter[tuple[str, str]] = Counter()
    for key, value in select(found, ACTIONS).items():
        labels = dict(key)
        out[(labels["device"], labels["status_class"])] += int(value)
    return +out


def alert_inputs(found: Samples) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {k: v for k, v in found.items() if k[0] in ALERT_INPUTS}


def label_names(found: Samples, metric: str) -> set[str]:
    return {name for (n, key) in found if n == metric for name, _ in key}


async def test_no_ceiling_or_room_to_spare_serves_full_detail(fleet) -> None:
    _sim, exporter = fleet
    full = scrape(exporter, None)
    roomy = scrape(exporter, len(full) * 2)
    stable = lambda found: {k for k in found if not k[0].startswith(MOVING)}  # noqa: E731
    assert stable(roomy) == stable(full)
    assert select(roomy, "applivery_exporter_series_dropped") == {frozenset(): 0.0}
    assert select(roomy, "applivery_exporter_cardinality_guard_level") == {frozenset(): 0.0}


async def test_each_ceiling_drops_the_most_specific_labels_first(fleet) -> None:
    sim, exporter = fleet
    full = scrape(exporter, None)
    per_level = level_series(full)
    assert per_level == sorted(per_level, reverse=True) and len(set(per_level)) == 6
    truth = truth_by_device_class(sim)
    for expected_level, ceiling in enumerate(per_level):
        exporter.exposition.max_series = None  # no hysteresis from the previous ceiling
        exporter.exposition.refresh()
        found = scrape(exporter, ceiling)
        assert select(found, "applivery_exporter_cardinality_guard_level") == {
            frozenset(): float(expected_level)
        }
        assert len(found) == ceiling
        assert select(found, "applivery_exporter_series_dropped") == {
            frozenset(): float(len(full) - ceiling)
        }
        action_labels = label_names(found, ACTIONS)
        assert ("command" in action_labels) == (expected_level == 0)
        assert ("status" in action_labels) == (expected_level < 3)
        assert ("device" in action_labels) == (expected_level < 5)
        assert bool(select(found, COMMAND_INFO)) == (expected_level < 2)
        assert bool(select(found, DEVICE_INFO)) == (expected_level < 4)
        # Alerts read the same series at every level; the gauges add up to the truth.
        assert alert_inputs(found) == alert_inputs(full)
        if expected_level < 5:
            assert exported_by_device_class(found) == truth
        per_class = Counter()
        for (_, status_class), count in truth.items():
            per_class[status_class] += count
        exported_per_class = Counter()
        for key, value in select(found, ACTIONS).items():
            exported_per_class[dict(key)["status_class"]] += int(value)
        assert +exported_per_class == per_class


async def test_an_unreachable_ceiling_serves_the_floor_and_says_so(fleet) -> None:
    _sim, exporter = fleet
    full = scrape(exporter, None)
    floor = level_series(full)[-1]
    found = scrape(exporter, 1)
    assert len(found) == floor
    assert select(found, "applivery_exporter_target_up")  # per device: alerts need them
    assert "still over the ceiling" in exporter.exposition.guard_summary


async def test_the_log_says_so_once_per_change(fleet) -> None:
    sim, exporter = fleet
    per_level = level_series(scrape(exporter, None))
    with capture_logs() as logs:
        scrape(exporter, per_level[2])
        sim.advance(60)
        await poll(exporter)
        exporter.exposition.refresh()
        exporter.exposition.refresh()
    changes = [e for e in logs if e["event"] == "cardinality_guard"]
    assert len(changes) == 1
    assert changes[0]["level"] == 2
    assert changes[0]["removed"] == list(GUARD_LEVELS[1:3])
    assert changes[0]["log_level"] == "warning"


async def test_detail_returns_only_with_room_to_spare(fleet) -> None:
    _sim, exporter = fleet
    per_level = level_series(scrape(exporter, None))
    ceiling = per_level[1]
    scrape(exporter, ceiling)
    assert exporter.exposition.guard_level == 1
    # A second thing raises the level; when it goes, a tight fit does not restore detail.
    exporter.state.watch("65f0c0ffee65f0c0ffee9999", name="extra")
    exporter.exposition.refresh()
    assert exporter.exposition.guard_level >= 2
    exporter.state.unwatch("65f0c0ffee65f0c0ffee9999")
    exporter.exposition.refresh()
    assert per_level[1] == ceiling  # level 1 fits again, but with no room to spare
    assert exporter.exposition.guard_level >= 2
    # Lifting the ceiling well above the fleet restores full detail at once.
    found = scrape(exporter, per_level[0] * 2)
    assert exporter.exposition.guard_level == 0
    assert "command" in label_names(found, ACTIONS)


async def test_the_ceiling_comes_from_the_config_and_follows_reloads(
    make_simulator_server, tmp_path, monkeypatch
) -> None:
    sim, url = await make_simulator_server(seed=5, devices=4, batches_per_device=3)
    monkeypatch.setenv("APPLIVERY_API_TOKEN", sim.token)
    path = tmp_path / "config.yaml"
    exporter = make_exporter(sim, url, path=path, metrics={"max_series": 10})
    try:
        await poll(exporter)
        found = samples(exporter)
        assert exporter.exposition.max_series == 10
        assert "command" not in label_names(found, ACTIONS)
        assert select(found, "applivery_exporter_series_dropped") != {frozenset(): 0.0}
        path.write_text(path.read_text().replace("max_series: 10", "max_series: 100000"))
        assert await reload_configs(exporter) is None
        found = samples(exporter)
        assert "command" in label_names(found, ACTIONS)
        assert select(found, "applivery_exporter_series_dropped") == {frozenset(): 0.0}
    finally:
        await exporter.client.close()


async def test_landing_page_tells_what_was_dropped(fleet, aiohttp_client) -> None:
    _sim, exporter = fleet
    full = scrape(exporter, None)
    per_level = level_series(full)
    scrape(exporter, per_level[3])
    hooks = Hooks(
        exposition=exporter.exposition,
        state=exporter.state,
        ready=lambda: True,
        reload=lambda: None,  # type: ignore[arg-type,return-value]
        version="test",
        organization=lambda: "demo",
    )
    # Each request renders the page anew (by default a page is reused for a few seconds).
    client = await aiohttp_client(make_app(hooks, landing_bounds=Bounds(max_age_seconds=0)))
    page = await (await client.get("/")).text()
    assert f"{len(full) - per_level[3]} of {len(full)} series dropped" in page
    assert "summed over status" in page
    scrape(exporter, None)
    page = await (await client.get("/")).text()
    assert "Cardinality guard: off" in page


@pytest.mark.skipif(shutil.which("promtool") is None, reason="Debian promtool not installed")
async def test_promtool_accepts_every_level(fleet) -> None:
    _sim, exporter = fleet
    per_level = level_series(scrape(exporter, None))
    for ceiling in per_level:
        exporter.exposition.max_series = None
        exporter.exposition.refresh()
        exporter.exposition.max_series = ceiling
        exporter.exposition.refresh()
        body = exporter.exposition.body(openmetrics=False)
        result = subprocess.run(
            ["promtool", "check", "metrics"], input=body, capture_output=True, check=False
        )
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


async def test_long_names_sharing_a_prefix_stay_two_series(aiohttp_client) -> None:
    """Two 2,000-character batch names sharing 1,500 characters: truncated, they keep a
    prefix and a digest of the whole name, so OpenMetrics parsers see two rollouts, not the
    same series twice ("Invalid metric grouping")."""
    state = FleetState(organization="acme", latency_buckets=(1.0,), metrics=SelfMetrics(),
                       clock=lambda: 1_760_000_000.0)
    prefix = "P" * 1500
    names = [prefix + "a" * 500, prefix + "b" * 500]
    for n, name in enumerate(names):
        device = f"65f0c0ffee65f0c0ffee000{n}"
        state.watch(device)
        batch = Batch(id=f"65f0c0ffee65f0c0ffee100{n}", name=name, created_at=1_759_999_000.0)
        state.apply_actions(device, batch, [Action("1", "Pending")])
    exposition = Exposition(state, SelfMetrics(), version="test")
    hooks = Hooks(exposition=exposition, state=state, ready=lambda: True,
                  reload=lambda: None,  # type: ignore[arg-type,return-value]
                  version="test", organization=lambda: "acme")
    client = await aiohttp_client(make_app(hooks))
    response = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    body = await response.text()
    assert response.content_type == "application/openmetrics-text"
    rollouts = {
        sample.labels["rollout"]
        for family in parse_openmetrics(body)
        if family.name == "applivery_windows_rollout_devices"
        for sample in family.samples
    }
    assert len(rollouts) == 2
    assert {r[:MAX_LABEL_VALUE] for r in rollouts} == {"P" * MAX_LABEL_VALUE}
    assert {r[MAX_LABEL_VALUE:] for r in rollouts} == {truncation_mark(name) for name in names}
