"""Fleet health (compliance and OS versions) from the device list, against the simulator.

Expected values come from the simulator's ground truth (``fleet.compliance``, the devices'
builds, its request counts), never from the exporter itself.
"""

from __future__ import annotations

from collections import Counter
from types import MappingProxyType
from typing import Any

import msgspec
import pytest
from test_exporter_e2e import make_exporter, poll, samples, select

from exporter import records
from exporter.devicehealth import (
    COMPLIANT,
    MAX_OS_VERSIONS,
    NO_HEALTH,
    NON_COMPLIANT,
    OTHER,
    UNKNOWN,
    DeviceHealth,
    bounded_versions,
)
from exporter.fleetview import DeviceState
from exporter.landing import device_row as landing_row
from exporter.records import SCHEMA, TIMESTAMP, decode_device
from exporter.simulator import Simulator
from exporter.snapshot import DeviceRow, device_row, restored_device

COMPLIANCE = "applivery_windows_devices_compliance"
OS_VERSION = "applivery_windows_devices_os_version"
LAST_CHECK = "applivery_windows_device_compliance_last_check_timestamp_seconds"


def truth_compliance(sim: Simulator) -> Counter[str]:
    values = Counter(dict.fromkeys((COMPLIANT, NON_COMPLIANT, UNKNOWN), 0))
    for device in sim.fleet.device_ids():
        compliant = sim.fleet.compliance(device).compliant
        values[UNKNOWN if compliant is None else COMPLIANT if compliant else NON_COMPLIANT] += 1
    return values


def by_label(found: Any, name: str, label: str) -> dict[str, float]:
    return {dict(key)[label]: value for key, value in select(found, name).items()}


# --- decoding (pure) ---------------------------------------------------------------------------


def _device(summary: object = None, **extra: object) -> dict[str, object]:
    raw: dict[str, object] = {"id": "d1", "state": "ACTIVE", **extra}
    if summary is not None:
        raw["summary"] = summary
    return raw


def test_a_device_without_a_summary_is_unknown_and_no_problem() -> None:
    device = decode_device(_device())
    assert device is not None
    assert device.health == NO_HEALTH
    assert device.problems == frozenset()


def test_null_compliance_is_a_device_in_setup_not_a_problem() -> None:
    device = decode_device(_device({"compliance": None, "osVersion": "10.0.26100.7623"}))
    assert device is not None
    assert device.health == DeviceHealth(UNKNOWN, None, "10.0.26100.7623")
    assert device.problems == frozenset()


def test_compliance_object_is_read() -> None:
    raw = _device({"compliance": {"compliant": False, "lastCheck": "2026-02-10T10:00:00Z"}})
    device = decode_device(raw)
    assert device is not None
    assert device.health == DeviceHealth(NON_COMPLIANT, 1_770_717_600.0, None)
    assert device.problems == frozenset()


@pytest.mark.parametrize(
    ("compliance", "kinds"),
    [
        ("compliant", {SCHEMA}),
        ({"lastCheck": "2026-02-10T10:00:00Z"}, {SCHEMA}),
        ({"compliant": "yes", "lastCheck": "yesterday"}, {SCHEMA, TIMESTAMP}),
    ],
)
def test_a_malformed_compliance_is_unknown_and_a_problem(
    compliance: object, kinds: set[str]
) -> None:
    device = decode_device(_device({"compliance": compliance}))
    assert device is not None
    assert device.health.compliance == UNKNOWN
    assert device.problems == kinds


def test_os_versions_past_the_limit_are_other_and_unknown_is_no_version() -> None:
    counts = {f"v{index}": 1 for index in range(MAX_OS_VERSIONS + 5)} | {UNKNOWN: 2, "gone": 0}
    bounded = bounded_versions(counts)
    assert bounded[OTHER] == 5
    assert bounded[UNKNOWN] == 2
    assert "gone" not in bounded
    assert len(bounded) == MAX_OS_VERSIONS + 2


# --- the store -----------------------------------------------------------------------------------


def test_the_store_round_trips_health_and_reads_rows_stored_before_it() -> None:
    health = DeviceHealth(NON_COMPLIANT, 1_770_717_600.5, "10.0.22631.6491")
    dev = DeviceState(1.0, 2.0, "pc", MappingProxyType({}), MappingProxyType({}), health=health)
    row = msgspec.msgpack.decode(device_row(dev, []), type=DeviceRow)
    assert restored_device(row, lambda status: 0).health == health
    old = msgspec.msgpack.encode([1.0, 2.0, "pc", {}, {}, None, None, "ACTIVE", [], []])
    restored = restored_device(msgspec.msgpack.decode(old, type=DeviceRow), lambda status: 0)
    assert restored.health == NO_HEALTH


# --- over HTTP ---------------------------------------------------------------------------


async def test_compliance_gauges_follow_the_simulator_through_flips(make_simulator_server):
    sim, url = await make_simulator_server(
        seed=3, devices=12, batches_per_device=2, new_batches_per_device_hour=4.0
    )
    start = sim.clock.now()
    exporter = make_exporter(sim, url)
    try:
        await poll(exporter)
        for _ in range(24):
            sim.advance(1800)
            await poll(exporter)
            found = samples(exporter)
            assert Counter(by_label(found, COMPLIANCE, "compliance")) == truth_compliance(sim)
        flips = sim.fleet.compliance_flips_since(start)
        assert {flip.compliant for flip in flips} == {True, False}, "the fleet should flip"
        checks = {dict(k)["device"]: v for k, v in select(found, LAST_CHECK).items()}
        for device in sim.fleet.device_ids():
            truth = sim.fleet.compliance(device).last_check
            assert checks.get(device) == (pytest.approx(truth, abs=1) if truth else None)
    finally:
        await exporter.client.close()


async def test_150_versions_are_exported_as_100_and_other(make_simulator_server):
    sim, url = await make_simulator_server(
        devices=160, os_versions=150, batches_per_device=1, max_limit=100
    )
    exporter = make_exporter(sim, url)
    try:
        await poll(exporter)
        versions = by_label(samples(exporter), OS_VERSION, "os_version")
        truth = Counter(sim.fleet.device(d).profile.os[0] for d in sim.fleet.device_ids())
        assert len(truth) == 150
        named = {version: n for version, n in versions.items() if version != OTHER}
        assert len(named) == MAX_OS_VERSIONS
        assert all(truth[version] == n for version, n in named.items())
        assert versions[OTHER] == sum(truth.values()) - sum(named.values()) > 0
    finally:
        await exporter.client.close()


async def _requests_by_route(make_simulator_server: Any) -> Counter[str]:
    sim, url = await make_simulator_server(seed=5, devices=10, batches_per_device=2)
    exporter = make_exporter(sim, url)
    try:
        for _ in range(6):
            await poll(exporter)
            sim.advance(900)
    finally:
        await exporter.client.close()
    routes: Counter[str] = Counter()
    for (route, _), count in sim.stats.counts.items():
        routes[route] += count
    return routes


async def test_health_costs_no_upstream_request(make_simulator_server, monkeypatch):
    with_health = await _requests_by_route(make_simulator_server)
    # The same run with the device list's health ignored, as before it was read.
    monkeypatch.setattr(records, "_health", lambda summary, problems: NO_HEALTH)
    without = await _requests_by_route(make_simulator_server)
    assert with_health["devices"] > 0
    assert with_health == without


async def test_devices_without_a_summary_stay_unknown(make_simulator_server):
    sim, url = await make_simulator_server(faults="bad_compliance=1")
    exporter = make_exporter(sim, url)
    try:
        await poll(exporter)
        found = samples(exporter)
        forms = {sim.fleet.compliance(d).form for d in sim.fleet.device_ids()}
        assert "no_summary" in forms
        assert by_label(found, COMPLIANCE, "compliance") == {
            COMPLIANT: 0, NON_COMPLIANT: 0, UNKNOWN: len(sim.fleet.device_ids())
        }
        assert all(value == 1 for value in select(found, "applivery_exporter_target_up").values())
    finally:
        await exporter.client.close()


def test_the_landing_page_shows_compliance_and_os_version() -> None:
    from exporter.fleetview import DeviceView

    view = DeviceView(
        device="d1", name="pc", labels={}, info={}, watermark=0.0, up=True,
        last_success=None, last_error=None, expired=False, check_in=None, state="ACTIVE",
        class_counts={}, oldest_pending=None, batches=(),
        health=DeviceHealth(NON_COMPLIANT, None, "10.0.19045.6809"),
    )
    row = landing_row(view, 0.0)
    assert "<td>pc</td><td>non_compliant</td><td>10.0.19045.6809</td><td>ACTIVE</td>" in row


async def test_the_landing_page_sums_up_compliance_above_the_device_table(aiohttp_client) -> None:
    from server_rig import fleet, hooks

    from exporter.server import make_app

    state = fleet(5)
    verdicts = (COMPLIANT, NON_COMPLIANT, NON_COMPLIANT, COMPLIANT)  # the fifth is not listed
    for d, verdict in enumerate(verdicts):
        health = DeviceHealth(verdict, None, f"10.0.2610{d % 2}.7623")
        state.device_listed(f"65f0c0ffee{d:014x}", state="ACTIVE", check_in=None, health=health)
    client = await aiohttp_client(make_app(hooks(state)))
    page = await (await client.get("/")).text()
    summary = "<p>Compliance: 2 compliant, 2 non_compliant, 1 unknown. OS versions: 2.</p>"
    assert page.index(summary) < page.index("<table>")
    assert page.count("<td>non_compliant</td><td>10.0.26101.7623</td><td>ACTIVE</td>") == 1
    assert page.count("<td>pc-4</td><td>unknown</td><td>unknown</td><td>not_listed</td>") == 1
