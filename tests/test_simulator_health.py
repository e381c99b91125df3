"""Device health in the simulator: compliance moved by the fleet's own answers, and Windows
builds (exporter/simulator/health.py).

Expected values come from the simulator's ground truth (``fleet.compliance``,
``fleet.compliance_flips_since``, ``device.os``), never from literals copied out of a
response.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from exporter.records import parse_timestamp
from exporter.simulator import Simulator, catalog
from exporter.simulator.cli import build_parser, simulator
from exporter.simulator.fleet import Fleet
from exporter.simulator.health import (
    BAD_FLAG,
    BAD_FORMS,
    NO_FLAG,
    NO_SUMMARY,
    NOT_OBJECT,
    NULL,
    OBJECT,
    Catalog,
    win_policy,
)
from exporter.simulator.model import ACTIVE, PROVISIONING, Device

START = 1_770_717_600.0  # 2026-02-10T10:00:00Z
HOUR = 3600.0
DAY = 86400.0
TOKEN = "simulator-token"
VERSION = re.compile(r"^10\.0\.(\d{5})\.(\d+)$")
BUILD_NAMES = {
    "17763": "Windows 10 1809", "19044": "Windows 10 21H2", "19045": "Windows 10 22H2",
    "22000": "Windows 11 21H2", "22621": "Windows 11 22H2", "22631": "Windows 11 23H2",
    "26100": "Windows 11 24H2",
}
SETTERS = [config for config in catalog.COMMANDS if config[1] != "Get"][:3]

MakeServer = Callable[..., Awaitable[tuple[Simulator, str]]]


def manual(**options: Any) -> Simulator:
    return Simulator(**{"seed": 3, "devices": 30, "speed": 0, "start": START, **options})


def steady_device(fleet: Fleet, *, idle: bool = False) -> Device:
    """An ACTIVE device that keeps checking in, compliant now (``idle``: no work left)."""
    for device in fleet.devices:
        if (device.state == ACTIVE and device.online and device.mean_interval <= HOUR
                and fleet.compliance(device.id).compliant and not (idle and device.open)):
            return device
    raise AssertionError("no steady compliant device")


def advance_until(sim: Simulator, done: Callable[[], bool], limit: float = 12 * HOUR) -> None:
    waited = 0.0
    while not done():
        assert waited < limit, "the fleet never got there"
        sim.advance(60.0)
        waited += 60.0


async def device_items(sim: Simulator, base_url: str) -> list[dict[str, Any]]:
    path = f"{base_url}/organizations/{sim.organization}/mdm/windows/enterprise/devices"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    items: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session:
        page = 1
        while True:
            async with session.get(path, params={"page": page, "limit": 50},
                                   headers=headers) as response:
                data = (await response.json())["data"]
            items += data["items"]
            if not data["hasNextPage"]:
                return items
            page += 1


def served_form(item: dict[str, Any]) -> str:
    """Which form a device document's compliance takes, read as a client would."""
    if "summary" not in item:
        return NO_SUMMARY
    value = item["summary"]["compliance"]
    if value is None:
        return NULL
    if not isinstance(value, dict):
        return NOT_OBJECT
    if "compliant" not in value:
        return NO_FLAG
    return OBJECT if isinstance(value["compliant"], bool) else BAD_FLAG


# --- compliance over time ---------------------------------------------------------------------


def test_a_failed_policy_takes_a_device_out_of_compliance_and_a_later_success_brings_it_back(
) -> None:
    sim = manual(checkin_seconds=600.0, new_batches_per_device_hour=0.0)
    fleet = sim.fleet
    device = steady_device(fleet)
    before = fleet.compliance(device.id)

    fleet.create_batch(device.id, SETTERS, error_ratio=1.0)
    advance_until(sim, lambda: fleet.compliance(device.id).compliant is False)
    fell = [f for f in fleet.compliance_flips_since(START) if f.device_id == device.id]
    assert fell[-1].compliant is False and fell[-1].cause == "failed_action"
    assert fleet.compliance(device.id).last_check == fell[-1].time > before.last_check

    fixing = fleet.create_batch(device.id, SETTERS, error_ratio=0.0)
    advance_until(sim, lambda: fleet.compliance(device.id).compliant is True)
    back = [f for f in fleet.compliance_flips_since(fell[-1].time) if f.device_id == device.id]
    assert back[-1].compliant is True
    assert back[-1].cause in ("successful_action", "recheck")
    if back[-1].cause == "successful_action":
        answers = [a.received for a in fleet.batch(device, fixing).actions]
        assert back[-1].time in answers


def test_a_failed_get_is_no_failed_policy() -> None:
    sim = manual(checkin_seconds=600.0, new_batches_per_device_hour=0.0)
    fleet = sim.fleet
    device = steady_device(fleet)
    getter = next(config for config in catalog.COMMANDS if config[1] == "Get")
    batch = fleet.create_batch(device.id, [getter], error_ratio=1.0)
    advance_until(sim, lambda: all(a.final for a in fleet.batch(device, batch).actions))

    assert not [f for f in fleet.compliance_flips_since(START) if f.device_id == device.id
                and f.cause == "failed_action"]


def test_a_non_compliant_device_passes_a_recheck_at_a_later_session_without_new_work() -> None:
    sim = manual(devices=60, checkin_seconds=600.0, new_batches_per_device_hour=0.0)
    fleet = sim.fleet
    device = steady_device(fleet, idle=True)
    batch = fleet.create_batch(device.id, SETTERS, error_ratio=1.0)
    advance_until(sim, lambda: fleet.compliance(device.id).compliant is False)
    assert all(a.final for a in fleet.batch(device, batch).actions)
    fell = fleet.compliance(device.id).last_check
    assert fell is not None

    advance_until(sim, lambda: fleet.compliance(device.id).compliant is True, limit=3 * DAY)
    flip = [f for f in fleet.compliance_flips_since(START) if f.device_id == device.id][-1]
    assert flip.cause == "recheck" and flip.time > fell
    assert fleet.compliance(device.id).last_check >= flip.time


def test_last_check_moves_at_every_session() -> None:
    sim = manual(checkin_seconds=600.0, new_batches_per_device_hour=0.0)
    device = steady_device(sim.fleet, idle=True)
    seen = set()
    for _ in range(6):
        report = device.last_report
        advance_until(sim, lambda report=report: device.last_report != report)
        seen.add(sim.fleet.compliance(device.id).last_check)
        assert sim.fleet.compliance(device.id).last_check >= device.last_report
    assert len(seen) == 6


def test_a_fleet_starts_mostly_compliant_and_moves_both_ways() -> None:
    sim = manual(devices=400)
    fleet = sim.fleet
    shares = Counter(fleet.compliance(d).compliant for d in fleet.device_ids())
    assert shares[True] > 0.7 * 400 and shares[False] > 0
    sim.advance(3 * HOUR)
    causes = Counter(flip.cause for flip in fleet.compliance_flips_since(START))
    assert causes["failed_action"] > 0
    assert causes["successful_action"] + causes["recheck"] > 0


def test_a_device_in_setup_has_null_compliance_until_its_first_check_as_active() -> None:
    sim = manual(devices=200)
    fleet = sim.fleet
    setup = [d for d in fleet.devices if d.state == PROVISIONING]
    assert setup
    assert all(fleet.compliance(d.id) == (None, None, NULL) for d in setup)
    advance_until(sim, lambda: all(d.state == ACTIVE for d in setup), limit=3 * HOUR)
    sim.advance(HOUR)
    firsts = {f.device_id: f for f in fleet.compliance_flips_since(START)
              if f.cause == "first_check"}
    assert set(firsts) == {d.id for d in setup}
    assert all(fleet.compliance(d.id).form == OBJECT for d in setup)


def test_flips_are_the_same_for_a_seed_and_leave_the_fleet_as_it_was() -> None:
    one, two, other = manual(devices=80), manual(devices=80), manual(devices=80, os_versions=50)
    for sim in (one, two, other):
        sim.advance(2 * HOUR)
    assert one.fleet.compliance_flips_since(0.0) == two.fleet.compliance_flips_since(0.0)
    assert [d.os for d in one.fleet.devices] == [d.os for d in two.fleet.devices]
    # Health draws from its own stream: what actions do is the same whatever builds are drawn.
    assert one.fleet.events_since(0.0) == other.fleet.events_since(0.0)
    reports = [[d.last_report for d in sim.fleet.devices] for sim in (one, other)]
    assert reports[0] == reports[1]


# --- what is served ---------------------------------------------------------------------------


async def test_served_compliance_and_build_match_the_ground_truth(
    make_simulator_server: MakeServer,
) -> None:
    sim, base_url = await make_simulator_server(devices=40)
    for _ in range(3):
        for item in await device_items(sim, base_url):
            truth = sim.fleet.compliance(item["id"])
            compliance = item["summary"]["compliance"]
            if truth.form == NULL:
                assert compliance is None
            else:
                assert compliance["compliant"] is truth.compliant
                assert parse_timestamp(compliance["lastCheck"]) == truth.last_check
            version, name = sim.fleet.device(item["id"]).os
            assert (item["summary"]["osVersion"], item["summary"]["osVersionName"]) == (
                version, name)
            assert set(item["winPolicy"]) == {"id", "name"}
        sim.advance(HOUR)
    assert sim.fleet.compliance_flips_since(START)


async def test_bad_compliance_serves_devices_without_a_readable_compliance(
    make_simulator_server: MakeServer,
) -> None:
    sim, base_url = await make_simulator_server(devices=60, faults="bad_compliance=0.5")
    forms: Counter[str] = Counter()
    for item in await device_items(sim, base_url):
        truth = sim.fleet.compliance(item["id"])
        assert served_form(item) == truth.form
        forms[truth.form] += 1
        if truth.form == NO_SUMMARY:
            assert truth == (None, None, NO_SUMMARY)
        elif truth.form == NO_FLAG:
            assert parse_timestamp(item["summary"]["compliance"]["lastCheck"]) == truth.last_check
            assert truth.compliant is None
    assert set(BAD_FORMS) <= set(forms) and forms[OBJECT] > 0


async def test_missing_fields_dropping_the_summary_is_told_by_the_ground_truth(
    make_simulator_server: MakeServer,
) -> None:
    sim, base_url = await make_simulator_server(devices=60, faults="missing_fields")
    items = await device_items(sim, base_url)
    without = [item["id"] for item in items if "summary" not in item]
    assert without
    assert all(sim.fleet.compliance(d).form == NO_SUMMARY for d in without)
    assert all(served_form(item) == sim.fleet.compliance(item["id"]).form for item in items)


def test_every_role_has_its_policy_and_one_organization_one_id_per_policy() -> None:
    fleet = manual(devices=60).fleet
    policies = [win_policy(fleet.organization_id, device.tags) for device in fleet.devices]
    assert None not in policies
    pairs = {(policy["id"], policy["name"]) for policy in policies if policy is not None}
    assert len(pairs) == len({name for _, name in pairs}) == len({i for i, _ in pairs}) == 4


# --- builds -----------------------------------------------------------------------------------


def test_builds_are_a_realistic_spread_of_windows_10_and_11() -> None:
    fleet = manual(devices=1000).fleet
    versions = Counter(device.os for device in fleet.devices)
    for (version, name), _ in versions.items():
        match = VERSION.match(version)
        assert match is not None and BUILD_NAMES[match.group(1)] == name
    names = {name for _, name in versions}
    assert any(n.startswith("Windows 10") for n in names)
    assert any(n.startswith("Windows 11") for n in names)
    top = sum(count for _, count in versions.most_common(4))
    assert top > 0.5 * 1000  # most devices on a few current builds
    assert len(versions) >= 25  # and a long tail
    assert min(versions.values()) <= 3


def test_builds_move_forward_within_their_build_at_sessions() -> None:
    sim = manual(devices=60, checkin_seconds=4 * HOUR, new_batches_per_device_hour=0.0)
    before = {d.id: d.os[0] for d in sim.fleet.devices}
    sim.advance(20 * DAY)
    moved = 0
    for device in sim.fleet.devices:
        old = VERSION.match(before[device.id])
        new = VERSION.match(device.os[0])
        assert old is not None and new is not None
        assert old.group(1) == new.group(1)
        assert int(new.group(2)) >= int(old.group(2))
        moved += new.group(2) != old.group(2)
    assert moved > 0


@pytest.mark.parametrize("count", [1, 150])
def test_os_versions_makes_that_many_distinct_versions(count: int) -> None:
    sim = manual(devices=200, os_versions=count)
    versions = Counter(device.os[0] for device in sim.fleet.devices)
    assert len(versions) == count
    sim.advance(2 * DAY)
    assert len({device.os[0] for device in sim.fleet.devices}) == count  # builds stay put
    if count > 1:
        assert versions.most_common(1)[0][1] > 1 and min(versions.values()) == 1


async def test_os_versions_from_the_command_line_over_http(
    make_simulator_server: MakeServer,
) -> None:
    args = build_parser().parse_args(["--os-versions", "150", "--devices", "160"])
    assert len({device.os for device in simulator(args).fleet.devices}) == 150
    sim, base_url = await make_simulator_server(devices=160, os_versions=150)
    items = await device_items(sim, base_url)
    assert len({item["summary"]["osVersion"] for item in items}) == 150


def test_distinct_catalog_extends_the_realistic_one() -> None:
    realistic = Catalog.realistic()
    wide = Catalog.distinct(len(realistic.versions) + 30)
    assert wide.versions[: len(realistic.versions)] == realistic.versions
    assert len(set(wide.versions)) == len(wide.versions)
    assert all(VERSION.match(version) for version, _ in wide.versions)
    with pytest.raises(ValueError):
        manual(os_versions=0)
