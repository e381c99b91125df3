"""The simulator's contract, checked through a real aiohttp server as any client would.

Expected values come from the simulator's ground truth (``sim.fleet``), from another response,
or from a twin simulator with the same seed, never from literals copied out of a response.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from exporter.records import decode_batch, parse_timestamp
from exporter.simulator import Simulator, catalog
from exporter.simulator.cli import build_parser, simulator
from exporter.simulator.dialect import Dialect
from exporter.simulator.faults import parse_spec
from exporter.simulator.validation import ValidationError, parse_create_body
from exporter.simulator.workload import ROLLOUT_REACH, ROLLOUT_SPREAD
from exporter.statuses import KNOWN_STATUSES, STATUS_CLASS, is_known, is_pending

TOKEN = "simulator-token"
START = 1_770_717_600.0  # 2026-02-10T10:00:00Z
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
DOC_ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d: \d\d: \d\d\.\d{3}Z$")
HEX24 = re.compile(r"^[0-9a-f]{24}$")
ROOT = Path(__file__).resolve().parent.parent
DAY = 86400.0

MakeServer = Callable[..., Awaitable[tuple[Simulator, str]]]


class Api:
    """A bare HTTP client of the simulated API (no retries, no decoding tolerance)."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, sim: Simulator) -> None:
        self.session = session
        self.root = base_url.removesuffix("/v1")
        self.base = f"{base_url}/organizations/{sim.organization}/mdm/windows/enterprise"
        self.sim = sim
        self.token: str | None = TOKEN

    def _headers(self) -> dict[str, str]:
        return {} if self.token is None else {"Authorization": f"Bearer {self.token}"}

    async def raw(self, path: str, **params: Any) -> tuple[int, bytes, Any]:
        url = path if path.startswith("http") else self.base + path
        async with self.session.get(url, params=params, headers=self._headers()) as response:
            return response.status, await response.read(), response.headers

    async def get(self, path: str, **params: Any) -> tuple[int, Any]:
        status, body, _ = await self.raw(path, **params)
        return status, json.loads(body)

    async def data(self, path: str, **params: Any) -> Any:
        status, document = await self.get(path, **params)
        assert status == 200, document
        assert document["status"] is True
        return document["data"]

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        url = path if path.startswith("http") else self.base + path
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {**self._headers(), "Content-Type": "application/json"}
        async with self.session.post(url, data=payload, headers=headers) as response:
            return response.status, json.loads(await response.read())

    async def all_items(self, path: str, limit: int = 100, **params: Any) -> list[Any]:
        items: list[Any] = []
        page = 1
        while True:
            data = await self.data(path, page=page, limit=limit, **params)
            items.extend(data["items"])
            if not data["hasNextPage"]:
                return items
            page += 1


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def make_api(
    make_simulator_server: MakeServer, session: aiohttp.ClientSession
) -> Callable[..., Awaitable[Api]]:
    async def make(**kwargs: Any) -> Api:
        sim, base_url = await make_simulator_server(**kwargs)
        return Api(session, base_url, sim)

    return make


@pytest.fixture
async def api(make_api: Callable[..., Awaitable[Api]]) -> Api:
    return await make_api(devices=12)


def ts(value: str) -> float:
    stamp = parse_timestamp(value)
    assert stamp is not None
    return stamp


def summary_counts(batch: dict[str, Any]) -> dict[str, int]:
    counts = {entry["status"]: entry["count"] for entry in batch["summary"]}
    assert all(count > 0 for count in counts.values()), "only statuses with actions are listed"
    return counts


def first_device(sim: Simulator, **where: Any) -> Any:
    for device_id in sim.fleet.device_ids():
        device = sim.fleet.device(device_id)
        if all(getattr(device, key) == value for key, value in where.items()):
            return device
    raise AssertionError(f"no device with {where}")


def _command(path: str, action: str = "Replace", fmt: str = "int", value: str | None = "1") -> Any:
    config = {"path": path, "action": action, "format": fmt}
    if value is not None:
        config["value"] = value
    return {"config": config}


# --- routes and documents -----------------------------------------------------------------------


async def test_devices_list_every_device_once_with_upstream_fields(api: Api) -> None:
    items = await api.all_items("/devices", limit=5)

    assert [item["id"] for item in items] == api.sim.fleet.device_ids()
    for item in items:
        assert HEX24.match(item["id"])
        assert item["organizationId"] == api.sim.fleet.organization_id
        assert item["state"] in ("ACTIVE", "PROVISIONING", "DELETE_REQUESTED")
        assert item["summary"]["model"]
        assert isinstance(item["tags"], list)
        assert item["displayName"] == item["summary"]["name"]
        assert item["summary"]["serialNumber"]
        assert ISO.match(item["enrolledDate"])
        assert ISO.match(item["lastStatusReportTime"])
        assert ts(item["lastStatusReportTime"]) <= api.sim.clock.now()
        assert "winId" in item and "mdmUser" in item


async def test_device_found_by_id_serial_and_imei(api: Api) -> None:
    fleet = api.sim.fleet
    device = first_device(api.sim)
    with_imei = next(fleet.device(d) for d in fleet.device_ids() if fleet.device(d).imei)

    by_id = await api.data(f"/devices/{device.id}")
    by_serial = await api.data(f"/devices/{device.serial}")
    by_imei = await api.data(f"/devices/{with_imei.imei}")

    assert by_id == by_serial
    assert by_id["summary"]["serialNumber"] == device.serial
    assert by_imei["id"] == with_imei.id
    assert (await api.data(f"/devices/{device.serial}/commands")) == (
        await api.data(f"/devices/{device.id}/commands")
    )


async def test_commands_newest_first_with_summary_and_details(api: Api) -> None:
    device = api.sim.fleet.device_ids()[0]
    batches = await api.all_items(f"/devices/{device}/commands", limit=2)

    created = [ts(batch["createdAt"]) for batch in batches]
    assert created == sorted(created, reverse=True)
    assert {batch["id"] for batch in batches} == set(api.sim.fleet.batch_ids(device))
    for batch in batches:
        assert batch["winDeviceId"] == device
        assert ISO.match(batch["createdAt"]) and ISO.match(batch["updatedAt"])
        assert ts(batch["createdAt"]) <= ts(batch["updatedAt"])
        assert await api.data(f"/devices/{device}/commands/{batch['id']}") == batch
        decoded = decode_batch(batch)
        assert decoded is not None and not decoded.problems


async def test_actions_have_the_reference_page_shape(api: Api) -> None:
    seen: Counter[str] = Counter()
    for device in api.sim.fleet.device_ids():
        for batch in api.sim.fleet.batch_ids(device):
            for action in await api.all_items(f"/devices/{device}/commands/{batch}/actions"):
                keys = set(action)
                assert {"cmdId", "status", "config"} <= keys
                assert keys <= {"cmdId", "status", "config", "data", "statusCode", "sentAt",
                                "receivedAt", "canceledAt"}
                assert action["cmdId"].startswith("cmd-")
                assert action["config"]["action"] in ("Add", "Copy", "Delete", "Exec", "Get",
                                                      "Replace")
                cls = STATUS_CLASS[action["status"]].value
                seen[cls] += 1
                if action["status"] == "Pending":
                    assert keys == {"cmdId", "status", "config"}
                if action["status"] == "Awaiting":
                    assert "sentAt" in keys and "receivedAt" not in keys
                if cls in ("success", "error"):
                    assert {"statusCode", "sentAt", "receivedAt", "data"} <= keys
                    assert ts(action["sentAt"]) < ts(action["receivedAt"])
                if cls == "canceled":
                    assert "canceledAt" in keys
    # A fleet with history has finished and pending work, successes and errors.
    assert seen["success"] > seen["error"] > 0
    assert seen["pending"] > 0


async def test_new_batches_appear_over_time(api: Api) -> None:
    fleet = api.sim.fleet
    before = {d: set(fleet.batch_ids(d)) for d in fleet.device_ids()}

    api.sim.advance(2 * 86400)

    new = [(d, b) for d in fleet.device_ids() for b in fleet.batch_ids(d) if b not in before[d]]
    assert new
    for device, batch in new:
        document = await api.data(f"/devices/{device}/commands/{batch}")
        assert ts(document["createdAt"]) > START


def test_manual_clock_moves_only_when_advanced() -> None:
    sim = Simulator(seed=1, devices=3, speed=0, start=START)
    time.sleep(0.01)
    assert sim.clock.now() == START
    sim.advance(90)
    assert sim.clock.now() == START + 90


# --- paging and sorting ---------------------------------------------------------------------------


async def test_paging_caps_limit_and_reports_the_effective_one(make_api: Any) -> None:
    api = await make_api(devices=9, max_limit=4)

    data = await api.data("/devices", limit=50)

    assert data["limit"] == 4
    assert len(data["items"]) == 4
    assert data["totalDocs"] == 9
    assert data["totalPages"] == 3
    assert data["hasNextPage"] is True and data["nextPage"] == 2
    assert data["hasPrevPage"] is False and data["prevPage"] is None
    assert data["pagingCounter"] == 1


async def test_paging_beyond_the_end_and_below_one(api: Api) -> None:
    beyond = await api.data("/devices", page=99, limit=5)
    assert beyond["items"] == []
    assert beyond["page"] == 99
    assert beyond["hasNextPage"] is False and beyond["nextPage"] is None
    assert beyond["totalDocs"] == len(api.sim.fleet.device_ids())

    first = await api.data("/devices", limit=5)
    for page in (0, -3):
        assert await api.data("/devices", page=page, limit=5) == first
    assert first["page"] == 1


async def test_paging_default_limit_and_last_page(api: Api) -> None:
    default = await api.data("/devices")
    assert default["limit"] == len(default["items"]) == 10

    last = await api.data("/devices", page=3, limit=5)
    assert len(last["items"]) == len(api.sim.fleet.device_ids()) - 10
    assert last["pagingCounter"] == 11
    assert last["hasPrevPage"] is True and last["prevPage"] == 2
    assert last["hasNextPage"] is False


async def test_a_non_numeric_page_or_limit_is_400(api: Api) -> None:
    for params in ({"page": "two"}, {"limit": "many"}):
        status, document = await api.get("/devices", **params)
        assert status == 400 and next(iter(params)) in document["error"]["message"]


async def test_sort_ascending_descending_and_invalid(api: Api) -> None:
    device = api.sim.fleet.device_ids()[1]
    path = f"/devices/{device}/commands"

    asc = await api.all_items(path, sort="createdAt:asc")
    desc = await api.all_items(path, sort="createdAt:desc")
    by_name = await api.all_items("/devices", sort="displayName:desc")

    assert [b["id"] for b in asc] == [b["id"] for b in reversed(desc)]
    names = [d["displayName"] for d in by_name]
    assert names == sorted(names, reverse=True)
    for bad in ("createdAt:up", "created At", "createdAt:asc:desc"):
        status, document = await api.get(path, sort=bad)
        assert status == 400, bad
        assert document["status"] is False and "sort" in document["error"]["message"]


async def test_actions_sort_by_received_at(api: Api) -> None:
    fleet = api.sim.fleet
    device, answered = next(
        (d, b) for d in fleet.device_ids() for b in fleet.batch_ids(d)
        if fleet.grouped_counts(d, b).get("Acknowledged", 0) >= 3
    )

    items = await api.all_items(f"/devices/{device}/commands/{answered}/actions",
                                sort="receivedAt:desc")

    received = [ts(item["receivedAt"]) for item in items if "receivedAt" in item]
    assert len(received) >= 3
    assert received == sorted(received, reverse=True)


async def test_tags_filter_in_every_spelling(api: Api) -> None:
    fleet = api.sim.fleet
    first = fleet.device(fleet.device_ids()[0])
    tag = first.tags[0]
    other = next(
        t for d in fleet.device_ids() for t in fleet.device(d).tags if t not in first.tags
    )
    expected = [d for d in fleet.device_ids() if {tag, other} & set(fleet.device(d).tags)]

    repeated = await api.data("/devices", limit=100, tags=[tag, other])
    comma = await api.data("/devices", limit=100, tags=f"{tag},{other}")
    brackets = await api.data("/devices", limit=100, **{"tags[]": [tag, other]})

    assert [d["id"] for d in repeated["items"]] == expected
    assert repeated == comma == brackets
    assert repeated["totalDocs"] == len(expected) < len(fleet.device_ids())


async def test_segment_filter(api: Api) -> None:
    fleet = api.sim.fleet
    segment = fleet.device(fleet.device_ids()[0]).segment
    expected = [d for d in fleet.device_ids() if fleet.device(d).segment == segment]

    data = await api.data("/devices", limit=100, segmentId=segment)
    status, _ = await api.get("/devices", segmentId="north")

    assert [d["id"] for d in data["items"]] == expected
    assert status == 400


# --- auth, ids and errors -----------------------------------------------------------------------


async def test_auth_codes(api: Api) -> None:
    api.token = None
    status, missing = await api.get("/devices")
    api.token = "wrong"
    status_wrong, wrong = await api.get("/devices")

    assert (status, missing) == (
        401, {"status": False, "error": {"code": 4002, "message": "No auth token"}}
    )
    assert (status_wrong, wrong) == (
        401, {"status": False, "error": {"code": 4004, "message": "Invalid Token"}}
    )
    assert api.sim.stats.counts[("devices", 401)] == 2


async def test_auth_is_checked_before_the_path(api: Api) -> None:
    api.token = "wrong"
    status, document = await api.get("/devices/bad-serial/commands/xyz")
    assert (status, document["error"]["code"]) == (401, 4004)


async def test_token_can_be_revoked_at_run_time(api: Api) -> None:
    api.sim.token = "rotated"
    status_old, document = await api.get("/devices")
    api.token = "rotated"
    status_new, _ = await api.get("/devices")

    assert (status_old, document["error"]["code"]) == (401, 4004)
    assert status_new == 200


async def test_unknown_entities_answer_404_3001(api: Api) -> None:
    fleet = api.sim.fleet
    device, other = fleet.device_ids()[:2]
    foreign_batch = fleet.batch_ids(other)[0]
    not_found = {"status": False, "error": {"code": 3001, "message": "Entity not found"}}
    other_org = api.base.replace(f"/organizations/{api.sim.organization}/", "/organizations/acme/")

    for path in (
        f"{other_org}/devices",
        "/devices/aaaaaaaaaaaaaaaaaaaaaaaa",
        "/devices/NOSUCHSERIAL/commands",
        f"/devices/{device}/commands/aaaaaaaaaaaaaaaaaaaaaaaa",
        f"/devices/{device}/commands/{foreign_batch}",
        f"/devices/{device}/commands/{foreign_batch}/actions",
    ):
        assert await api.get(path) == (404, not_found), path


async def test_organization_id_works_like_the_slug(api: Api) -> None:
    by_id = api.base.replace(f"/organizations/{api.sim.organization}/",
                             f"/organizations/{api.sim.fleet.organization_id}/")
    assert await api.data(f"{by_id}/devices") == await api.data("/devices")


async def test_malformed_ids_answer_400(api: Api) -> None:
    device = api.sim.fleet.device_ids()[0]
    bad_org = api.base.replace(f"/organizations/{api.sim.organization}/", "/organizations/a_b/")

    for path, name in (
        (f"{bad_org}/devices", "organizationId"),
        ("/devices/bad-serial/commands", "winDeviceId"),
        (f"/devices/{device}/commands/xyz", "winCommandId"),
        (f"/devices/{device}/commands/{'g' * 24}/actions", "winCommandId"),
    ):
        status, document = await api.get(path)
        assert status == 400, path
        assert document["status"] is False and name in document["error"]["message"]


# --- creating batches ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "commands"),
        ({"commands": []}, "commands"),
        ({"commands": [{"config": {"path": "./a", "action": "Patch", "format": "int"}}]},
         "action"),
        ({"commands": [{"config": {"path": "./a", "action": "Add"}}]}, "format"),
        ({"commands": [{"config": {"action": "Add", "format": "int"}}]}, "path"),
        ({"commands": [_command("./" + "a" * 600)]}, "path"),
        ({"commands": [{"config": {**_command("./a")["config"], "extra": 1}}]}, "extra"),
        ({"commands": [_command("./a")], "priority": 1}, "priority"),
        ({"commands": [{"config": {"path": "./a", "action": "Add", "format": "yaml"}}]},
         "format"),
    ],
)
async def test_create_rejects_what_upstream_rejects(api: Api, body: Any, field: str) -> None:
    device = api.sim.fleet.device_ids()[0]
    before = api.sim.fleet.batch_ids(device)

    status, document = await api.post(f"/devices/{device}/commands", body)

    assert status == 400
    assert field in document["error"]["message"]
    assert api.sim.fleet.batch_ids(device) == before
    assert api.sim.stats.counts[("create", 400)] == 1


async def test_create_rejects_a_body_that_is_not_json(api: Api) -> None:
    device = api.sim.fleet.device_ids()[0]
    status, document = await api.post(f"/devices/{device}/commands", b"{not json")
    assert status == 400 and document["status"] is False


async def test_create_answers_the_new_pending_batch(api: Api) -> None:
    device = api.sim.fleet.device(api.sim.fleet.device_ids()[2])
    commands = [_command("./Vendor/MSFT/Policy/Config/Camera/AllowCamera", value="0"),
                _command("./DevDetail/SwV", action="Get", fmt="chr", value=None)]

    status, document = await api.post(f"/devices/{device.serial}/commands", {"commands": commands})

    assert status == 200
    batch = document["data"]
    assert HEX24.match(batch["id"])
    assert batch["winDeviceId"] == device.id
    assert batch["summary"] == [{"status": "Pending", "count": 2}]
    assert ts(batch["createdAt"]) == pytest.approx(api.sim.clock.now(), abs=0.001)
    newest = (await api.data(f"/devices/{device.id}/commands", limit=1))["items"][0]
    assert newest == batch
    actions = await api.all_items(f"/devices/{device.id}/commands/{batch['id']}/actions")
    assert [a["config"] for a in actions] == [
        {k: v for k, v in c["config"].items() if k != "format"} for c in commands
    ]
    assert [a["status"] for a in actions] == ["Pending", "Pending"]
    assert api.sim.stats.counts[("create", 200)] == 1


async def test_text_that_needs_escaping_comes_back_as_sent(api: Api) -> None:
    device = api.sim.fleet.device_ids()[1]
    config = {"path": './Vendor/"quoted"\\back/ñ', "action": "Replace",
              "value": "line one\nline two \u00e9", "format": "chr"}

    status, document = await api.post(
        f"/devices/{device}/commands", {"commands": [{"config": config}], "name": 'Caf\u00e9 "x"'}
    )
    batch = document["data"]
    listed = (await api.data(f"/devices/{device}/commands", limit=1))["items"][0]
    (action,) = await api.all_items(f"/devices/{device}/commands/{batch['id']}/actions")

    assert status == 200
    assert batch["name"] == listed["name"] == 'Caf\u00e9 "x"'
    assert action["config"] == {k: v for k, v in config.items() if k != "format"}


async def test_a_new_batch_is_sent_at_a_check_in_and_answered_seconds_later(api: Api) -> None:
    fleet = api.sim.fleet
    device = first_device(api.sim, offline_since=None)
    batch = fleet.create_batch(device.id, [_command(f"./Vendor/n{i}") for i in range(5)])

    for _ in range(500):
        if not any(is_pending(s) for s in fleet.grouped_counts(device.id, batch)):
            break
        api.sim.advance(600)
    report = ts((await api.data(f"/devices/{device.id}"))["lastStatusReportTime"])
    actions = await api.all_items(f"/devices/{device.id}/commands/{batch}/actions")

    sent = {ts(a["sentAt"]) for a in actions if "sentAt" in a}
    assert sent, "the device took the batch at a check-in"
    assert max(sent) <= report
    for action in actions:
        if "receivedAt" in action:
            assert ts(action["receivedAt"]) - ts(action["sentAt"]) > 0


def _session_delays(push: bool) -> list[float]:
    """Seconds from each batch created on an often-connected device to its next session."""
    sim = Simulator(seed=3, devices=60, speed=0, start=START, push=push,
                    new_batches_per_device_hour=0)
    fleet = sim.fleet
    devices = [d for d in fleet.devices if d.online and d.mean_interval <= 3600]
    delays = []
    for device in devices:
        sim.advance(1)
        created = sim.clock.now()
        fleet.create_batch(device.id, [_command("./Vendor/p")])
        sim.advance(600)
        sent = [e.time for e in fleet.events_since(created)
                if e.device_id == device.id and e.status == "Awaiting"]
        delays.append(min(sent, default=math.inf) - created)
    return delays


def test_creating_a_batch_pushes_the_device_into_a_session() -> None:
    pushed, unpushed = _session_delays(push=True), _session_delays(push=False)
    assert len(pushed) >= 30
    quick = sum(delay <= 120 for delay in pushed) / len(pushed)
    assert quick >= 0.8, f"{quick:.0%} of pushes answered within 2 minutes"
    # Without push only the device's own schedule brings the session (5 to 60 minutes).
    assert sum(delay <= 120 for delay in unpushed) / len(unpushed) < 0.3


async def test_created_and_deleted_through_python(api: Api) -> None:
    fleet = api.sim.fleet
    device = fleet.device_ids()[3]
    batch = fleet.create_batch(device, [_command("./Vendor/a")], name="Lock screen")

    listed = await api.data(f"/devices/{device}/commands", limit=1)
    fleet.delete_batch(device, batch)
    after = await api.all_items(f"/devices/{device}/commands")
    status, _ = await api.get(f"/devices/{device}/commands/{batch}")

    assert listed["items"][0]["name"] == "Lock screen"
    assert batch not in {b["id"] for b in after}
    assert status == 404


# --- ground truth -------------------------------------------------------------------------------


async def _check_summaries(api: Api) -> int:
    fleet = api.sim.fleet
    checked = 0
    for device in fleet.device_ids():
        for batch in await api.all_items(f"/devices/{device}/commands"):
            actions = await api.all_items(f"/devices/{device}/commands/{batch['id']}/actions")
            grouped = dict(Counter(a["status"] for a in actions))
            assert summary_counts(batch) == grouped
            assert fleet.grouped_counts(device, batch["id"]) == grouped
            stamps = [ts(a[k]) for a in actions for k in ("sentAt", "receivedAt", "canceledAt")
                      if k in a]
            assert ts(batch["updatedAt"]) == max([ts(batch["createdAt"]), *stamps])
            checked += 1
    return checked


async def test_summary_equals_grouped_action_counts_as_time_passes(make_api: Any) -> None:
    api = await make_api(devices=10, new_batches_per_device_hour=2.0)
    checked = await _check_summaries(api)
    for hours in (0.25, 3, 30):
        api.sim.advance(hours * 3600)
        checked += await _check_summaries(api)
    assert checked > 150


async def test_events_match_the_timestamps_actions_carry(make_api: Any) -> None:
    api = await make_api(devices=6)
    since = api.sim.clock.now()
    api.sim.advance(6 * 3600)
    fleet = api.sim.fleet
    events = fleet.events_since(0)
    by_action: dict[tuple[str, str, str], list[Any]] = {}
    for event in events:
        by_action.setdefault((event.device_id, event.batch_id, event.cmd_id), []).append(event)

    assert [e.time for e in events] == sorted(e.time for e in events)
    for device in fleet.device_ids():
        for batch in await api.all_items(f"/devices/{device}/commands"):
            for action in await api.all_items(
                f"/devices/{device}/commands/{batch['id']}/actions"
            ):
                path = by_action[(device, batch["id"], action["cmdId"])]
                assert path[0].status == "Pending"
                assert path[0].time == ts(batch["createdAt"])
                assert path[-1].status == action["status"]
                assert path[-1].status_class == STATUS_CLASS[action["status"]].value
                for event in path[1:]:
                    key = {"Awaiting": "sentAt"}.get(event.status)
                    if key is None:
                        key = "canceledAt" if event.status_class == "canceled" else "receivedAt"
                    assert event.time == ts(action[key])
    recent = fleet.events_since(since)
    assert recent and all(e.time > since for e in recent)


async def test_acks_are_the_latencies_of_answers_received(make_api: Any) -> None:
    api = await make_api(devices=6)
    since = api.sim.clock.now()
    api.sim.advance(6 * 3600)
    fleet = api.sim.fleet
    expected: Counter[tuple[float, str]] = Counter()
    for device in fleet.device_ids():
        for batch in fleet.batch_ids(device):
            for action in await api.all_items(f"/devices/{device}/commands/{batch}/actions"):
                if "receivedAt" in action and ts(action["receivedAt"]) > since:
                    latency = ts(action["receivedAt"]) - ts(action["sentAt"])
                    expected[(round(latency, 3), STATUS_CLASS[action["status"]].value)] += 1

    acks = Counter((round(latency, 3), cls) for latency, cls in fleet.acks_since(since))

    assert acks == expected and sum(acks.values()) > 0


async def test_nothing_is_visible_before_its_timestamp(make_api: Any) -> None:
    api = await make_api(devices=10, new_batches_per_device_hour=4.0)
    sim = api.sim
    for _ in range(6):
        sim.advance(1234.5)
        now = sim.clock.now()
        assert sim.fleet.events_since(now) == []
        for device in await api.all_items("/devices"):
            assert ts(device["lastStatusReportTime"]) <= now
            for batch in await api.all_items(f"/devices/{device['id']}/commands"):
                assert ts(batch["updatedAt"]) <= now
                for action in await api.all_items(
                    f"/devices/{device['id']}/commands/{batch['id']}/actions"
                ):
                    for key in ("sentAt", "receivedAt", "canceledAt"):
                        if key in action:
                            assert ts(action[key]) <= now


def test_the_pace_of_observation_does_not_change_history() -> None:
    hurried = Simulator(seed=5, devices=15, speed=0, start=START)
    patient = Simulator(seed=5, devices=15, speed=0, start=START)

    hurried.advance(4 * 3600)
    for _ in range(240):
        patient.advance(60)

    assert hurried.fleet.events_since(0) == patient.fleet.events_since(0)


async def test_same_seed_same_bytes(make_api: Any) -> None:
    async def responses(api: Api) -> list[bytes]:
        api.sim.advance(5000)
        device = api.sim.fleet.device_ids()[0]
        out = []
        for path in ("/devices", f"/devices/{device}/commands"):
            out.append((await api.raw(path, limit=100))[1])
        for batch in api.sim.fleet.batch_ids(device):
            out.append((await api.raw(f"/devices/{device}/commands/{batch}/actions"))[1])
        return out

    first = await responses(await make_api(seed=11))
    second = await responses(await make_api(seed=11))
    other = await responses(await make_api(seed=12))

    assert first == second
    assert first[0] != other[0]


async def test_the_clock_runs_on_its_own_at_speed(make_api: Any) -> None:
    api = await make_api(devices=20, speed=3600.0, start=None)
    sim = api.sim
    before = sim.clock.now()

    await asyncio.sleep(0.6)  # ~36 simulated minutes, applied by the background ticker

    assert sim.clock.now() - before >= 0.6 * 3600
    assert sim.fleet.now > before
    assert sim.fleet.events_since(before)


def test_every_error_status_shows_up_in_a_large_fleet() -> None:
    sim = Simulator(seed=2, devices=400, batches_per_device=10, speed=0, start=START,
                    record_events=False)
    seen = {action.status for device in sim.fleet.devices for batch in device.batches
            for action in batch.actions}
    errors = {s for s in KNOWN_STATUSES if STATUS_CLASS[s].value == "error"}
    assert len(errors & seen) >= 0.8 * len(errors)
    assert {"Acknowledged", "Pending", "Cancel", "OperationCanceled"} <= seen


# --- fleet views: rollouts, settings, check-ins ------------------------------------------------

# device id -> (device document, [(batch document, its actions)])
Fleet = dict[str, tuple[dict[str, Any], list[tuple[dict[str, Any], list[dict[str, Any]]]]]]


async def _read_fleet(api: Api) -> Fleet:
    """Every device, its batches and their actions, as a client reads them."""
    fleet: Fleet = {}
    for device in await api.all_items("/devices"):
        batches = []
        for batch in await api.all_items(f"/devices/{device['id']}/commands"):
            path = f"/devices/{device['id']}/commands/{batch['id']}/actions"
            batches.append((batch, await api.all_items(path)))
        fleet[device["id"]] = (device, batches)
    return fleet


def _rollouts(fleet: Fleet) -> list[list[tuple[float, str]]]:
    """(createdAt, device) of the batches of each rollout: one name and the same commands
    on a quarter of the devices or more, created within ROLLOUT_SPREAD."""
    alike: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for device, (_, batches) in fleet.items():
        for batch, actions in batches:
            key = json.dumps([batch["name"], [action["config"] for action in actions]])
            alike[key].append((ts(batch["createdAt"]), device))
    found = []
    for entries in alike.values():
        entries.sort()
        first = 0
        while first < len(entries):
            group = [e for e in entries[first:] if e[0] - entries[first][0] <= ROLLOUT_SPREAD]
            if len(group) >= len(fleet) / 4:
                found.append(group)
                first += len(group)
            else:
                first += 1
    return found


async def test_a_rollout_pushes_one_policy_to_many_devices_under_one_name(make_api: Any) -> None:
    api = await make_api(devices=20, new_batches_per_device_hour=2.0)
    start = api.sim.clock.now()
    api.sim.advance(6 * 3600)

    fleet = await _read_fleet(api)
    rollouts = _rollouts(fleet)

    created = [group[0][0] for group in rollouts]
    assert any(moment < start for moment in created), "the history holds rollouts"
    assert any(moment > start for moment in created), "rollouts keep coming"
    low, high = ROLLOUT_REACH
    for group in rollouts:
        devices = [device for _, device in group]
        assert len(set(devices)) == len(devices), "one batch per device"
        assert low - 0.05 <= len(devices) / len(fleet) <= high + 0.05
    in_rollouts = sum(len(group) for group in rollouts)
    singles = sum(len(batches) for _, batches in fleet.values()) - in_rollouts
    assert singles > in_rollouts / 3, "single-device batches too"


async def test_one_setting_fails_on_one_model_every_time_and_only_there(make_api: Any) -> None:
    api = await make_api(devices=40, new_batches_per_device_hour=1.0)
    api.sim.advance(12 * 3600)
    failure = catalog.MODEL_FAILURE

    answers: dict[str, Counter[tuple[str, int | None]]] = defaultdict(Counter)
    for device, batches in (await _read_fleet(api)).values():
        for _, actions in batches:
            for action in actions:
                if action["config"]["path"] == failure.path and "receivedAt" in action:
                    answer = (action["status"], action.get("statusCode"))
                    answers[device["summary"]["model"]][answer] += 1

    failing = answers.pop(failure.model)
    assert STATUS_CLASS[failure.status].value == "error"
    assert set(failing) == {(failure.status, catalog.status_code(failure.status))}
    assert failing.total() >= 3
    # Elsewhere the setting succeeds, but for the errors any setting meets now and then
    # (and more often on the few devices whose policy stack is broken).
    succeeded = {
        model: sum(n for (status, _), n in counts.items()
                   if STATUS_CLASS[status].value == "success")
        for model, counts in answers.items()
    }
    assert len(answers) >= 5
    assert all(succeeded[model] for model, counts in answers.items() if counts.total() >= 3)
    assert sum(succeeded.values()) >= 0.75 * sum(c.total() for c in answers.values())


async def test_silent_and_delete_requested_devices_do_not_check_in(make_api: Any) -> None:
    api = await make_api(devices=20, new_batches_per_device_hour=1.0)
    sim = api.sim
    start = sim.clock.now()
    before = {device["id"]: device for device in await api.all_items("/devices")}
    states = Counter(device["state"] for device in before.values())
    deleting = {d for d, device in before.items() if device["state"] == "DELETE_REQUESTED"}
    provisioning = {d for d, device in before.items() if device["state"] == "PROVISIONING"}
    days_ago = {d for d, device in before.items()
                if ts(device["lastStatusReportTime"]) < start - DAY}

    sim.advance(12 * 3600)
    fleet = await _read_fleet(api)

    assert deleting and provisioning and states["ACTIVE"] > len(before) / 2
    assert deleting < days_ago, "silent for more than a day: deleted and others"
    # Which devices stopped checking in is the simulator's secret; what shows is that they
    # do not, and that what was sent to them since waits.
    silent = {device.id for device in sim.fleet.devices if not device.online}
    assert deleting < silent and any(sim.fleet.device(d).offline_since > start for d in silent)
    waiting = 0
    for device_id, (device, batches) in fleet.items():
        report = ts(device["lastStatusReportTime"])
        if device_id not in silent:
            continue
        assert report <= sim.fleet.device(device_id).offline_since
        for batch, actions in batches:
            if ts(batch["createdAt"]) > report:
                assert {a["status"] for a in actions} <= {"Pending", "Cancel"}
                waiting += 1
    assert waiting > 0
    moved = {d for d, (device, _) in fleet.items()
             if device["lastStatusReportTime"] != before[d]["lastStatusReportTime"]}
    assert len(moved) > len(fleet) / 2
    assert not moved & (silent - {d for d in silent if sim.fleet.device(d).offline_since > start})
    # Setting up ends at a session an hour or so after enrolling.
    assert {fleet[d][0]["state"] for d in provisioning} == {"ACTIVE"}


async def test_paths_name_their_instances_as_windows_does(make_api: Any) -> None:
    api = await make_api(devices=20, new_batches_per_device_hour=2.0)
    api.sim.advance(12 * 3600)
    msi = re.compile(r"^\./Device/Vendor/MSFT/EnterpriseDesktopAppManagement/MSI/"
                     r"(\{[0-9A-F]{8}(?:-[0-9A-F]{4}){3}-[0-9A-F]{12}\})/DownloadInstall$")
    wifi = re.compile(r"^\./Vendor/MSFT/WiFi/Profile/[\w-]+/WlanXml$")
    sid = re.compile(r"/S-1-12-1(?:-\d+){4}/")

    installs: dict[str, set[str]] = defaultdict(set)
    paths: set[str] = set()
    per_user = 0
    for device, batches in (await _read_fleet(api)).values():
        for _, actions in batches:
            for action in actions:
                config = action["config"]
                path = config["path"]
                paths.add(path)
                match = msi.match(path)
                if match:
                    installs[match[1]].add(config["action"])
                    if config["action"] == "Exec":
                        assert f'<MsiInstallJob id="{match[1]}">' in config["value"]
                if path.startswith("./User/") and (sid.search(path) or "@" in path):
                    user = device["mdmUser"]
                    assert user is not None
                    assert sid.search(path) or f"/{user['email']}/" in path
                    per_user += 1

    assert len(installs) >= 3, "app installs under distinct product codes"
    assert all({"Add", "Exec"} <= verbs for verbs in installs.values())
    assert any(wifi.match(path) for path in paths)
    assert any(path.startswith("./Device/Vendor/MSFT/VPNv2/") for path in paths)
    assert per_user > 0


async def test_the_same_seed_draws_the_same_fleet(make_api: Any) -> None:
    async def read(seed: int) -> Fleet:
        api = await make_api(seed=seed, devices=20, new_batches_per_device_hour=1.0)
        api.sim.advance(4 * 3600)
        return await _read_fleet(api)

    def views(fleet: Fleet) -> Any:
        devices = sorted((d["summary"]["model"], d["state"], d["lastStatusReportTime"])
                         for d, _ in fleet.values())
        return devices, sorted(len(group) for group in _rollouts(fleet))

    first, second, other = await read(21), await read(21), await read(22)

    assert first == second
    assert views(first) != views(other)


def test_every_catalog_command_is_one_upstream_accepts() -> None:
    policies = catalog.POLICIES + catalog.user_policies("S-1-12-1-1-2-3-4", "ana@example.com")
    configs = [config for policy in policies for config in policy.configs]
    body = {"commands": [
        {"config": {"path": path, "action": action, "format": fmt,
                    **({} if value is None else {"value": value})}}
        for path, action, value, fmt in configs
    ]}

    assert parse_create_body(body) == (configs, None)
    assert catalog.MODEL_FAILURE.path in {path for path, _, _, _ in catalog.COMMANDS}


# --- faults -------------------------------------------------------------------------------------


async def _path_with_actions(api: Api, minimum: int = 2) -> str:
    fleet = api.sim.fleet
    for device in fleet.device_ids():
        for batch in fleet.batch_ids(device):
            if sum(fleet.grouped_counts(device, batch).values()) >= minimum:
                return f"/devices/{device}/commands/{batch}/actions"
    raise AssertionError("no batch large enough")


async def test_latency_delays_the_answer(api: Api) -> None:
    api.sim.faults.set("latency:0.3")
    began = time.monotonic()
    status, _ = await api.get("/devices")
    assert status == 200
    assert time.monotonic() - began >= 0.3


@pytest.mark.parametrize(
    ("spec", "status", "retry_after"),
    [
        ("error500", 500, None),
        ("error503", 503, None),
        ("error503:7", 503, "7"),
        ("throttle", 429, "1"),
        ("throttle:0.25", 429, "0.25"),
        ("throttle_bare", 429, None),
    ],
)
async def test_errors_and_throttles(
    api: Api, spec: str, status: int, retry_after: str | None
) -> None:
    device = api.sim.fleet.device_ids()[0]
    api.sim.faults.set(spec)

    got, body, headers = await api.raw(f"/devices/{device}/commands")

    assert got == status
    assert headers.get("Retry-After") == retry_after
    assert api.sim.stats.counts[("commands", status)] == 1
    if status == 500:
        assert json.loads(body)["status"] is False


async def test_throttle_with_an_http_date(api: Api) -> None:
    api.sim.faults.set("throttle_date:30")
    status, _, headers = await api.raw("/devices")
    assert status == 429
    moment = parsedate_to_datetime(headers["Retry-After"]).timestamp()
    assert time.time() + 25 <= moment <= time.time() + 35


async def test_reset_closes_the_connection_without_an_answer(api: Api) -> None:
    api.sim.faults.set("reset")
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.raw("/devices")
    assert api.sim.stats.counts[("devices", 0)] >= 1
    assert api.sim.stats.total("devices") == api.sim.stats.counts[("devices", 0)]


async def test_broken_bodies(api: Api) -> None:
    path = await _path_with_actions(api)
    _, good, _ = await api.raw(path)

    api.sim.faults.set("invalid_json")
    status_invalid, invalid, _ = await api.raw(path)
    api.sim.faults.set("truncated_json")
    status_truncated, truncated, _ = await api.raw(path)

    assert status_invalid == status_truncated == 200
    for body in (invalid, truncated):
        with pytest.raises(ValueError):
            json.loads(body)
    assert 0 < len(truncated) < len(good) and good.startswith(truncated)


async def test_huge_and_slow_bodies_stay_valid(api: Api) -> None:
    path = await _path_with_actions(api)
    _, good, _ = await api.raw(path)

    api.sim.faults.set("huge_body:0.5")
    _, huge, _ = await api.raw(path)
    api.sim.faults.set(f"slow_body:{len(good) * 4}")
    began = time.monotonic()
    _, slow, _ = await api.raw(path)
    elapsed = time.monotonic() - began

    assert len(huge) >= 500_000 and json.loads(huge) == json.loads(good)
    assert slow == good
    assert elapsed >= 0.2  # four chunks of a quarter second's worth, a pause after each


async def test_doc_timestamps_are_stable_and_mean_the_same_moments(api: Api) -> None:
    path = await _path_with_actions(api)
    device_path = path.split("/commands/")[0]
    plain = await api.data(path)
    plain_device = await api.data(device_path)

    api.sim.faults.set("doc_timestamps")
    spaced = await api.data(path)
    again = await api.data(path)
    spaced_device = await api.data(device_path)

    assert spaced == again
    for before, after in zip(plain["items"], spaced["items"], strict=True):
        for key in ("sentAt", "receivedAt", "canceledAt"):
            if key in before:
                assert DOC_ISO.match(after[key])
                assert ts(after[key]) == ts(before[key])
    assert DOC_ISO.match(spaced_device["enrolledDate"])
    assert ts(spaced_device["enrolledDate"]) == ts(plain_device["enrolledDate"])


async def test_unknown_status_renames_final_statuses_consistently(make_api: Any) -> None:
    api = await make_api(devices=10, faults="unknown_status=0.3")
    fleet = api.sim.fleet
    unknown = 0
    for device in fleet.device_ids():
        for batch in await api.all_items(f"/devices/{device}/commands"):
            actions = await api.all_items(f"/devices/{device}/commands/{batch['id']}/actions")
            again = await api.all_items(f"/devices/{device}/commands/{batch['id']}/actions")
            grouped = dict(Counter(a["status"] for a in actions))
            assert actions == again
            assert summary_counts(batch) == grouped == fleet.grouped_counts(device, batch["id"])
            unknown += sum(1 for a in actions if not is_known(a["status"]))
            assert all(
                is_known(a["status"]) for a in actions if "receivedAt" not in a
                and "canceledAt" not in a
            )
    assert unknown > 0
    events = fleet.events_since(0)
    assert any(e.status_class == "unknown" and not is_known(e.status) for e in events)


async def test_missing_fields_drop_optional_fields_only(make_api: Any) -> None:
    api = await make_api(devices=10, faults="missing_fields=0.5")
    fleet = api.sim.fleet
    dropped: Counter[str] = Counter()
    for device in fleet.device_ids():
        batches = await api.all_items(f"/devices/{device}/commands")
        assert batches == await api.all_items(f"/devices/{device}/commands")
        dropped["summary"] += sum(1 for b in batches if "summary" not in b)
        for batch in batches:
            actions = await api.all_items(f"/devices/{device}/commands/{batch['id']}/actions")
            assert all("cmdId" in a and "status" in a for a in actions)
            for action in actions:
                if "receivedAt" in action and "canceledAt" not in action:
                    for key in ("statusCode", "sentAt", "data"):
                        dropped[key] += key not in action
                dropped["config"] += "config" not in action
    assert all(dropped[key] > 0 for key in ("summary", "statusCode", "sentAt", "config", "data"))


async def test_shifting_pages_repeat_items_across_pages(api: Api) -> None:
    api.sim.faults.set("shifting_pages")
    first = await api.data("/devices", page=1, limit=4)
    second = await api.data("/devices", page=2, limit=4)

    ids_first = [d["id"] for d in first["items"]]
    ids_second = [d["id"] for d in second["items"]]
    assert set(ids_first) & set(ids_second)
    assert second["totalDocs"] == first["totalDocs"]


async def test_shifting_pages_insert_a_new_batch_at_the_head(api: Api) -> None:
    device = api.sim.fleet.device_ids()[0]
    path = f"/devices/{device}/commands"
    first = await api.data(path, page=1, limit=2)

    api.sim.faults.set("shifting_pages")
    second = await api.data(path, page=2, limit=2)

    assert second["totalDocs"] == first["totalDocs"] + 1
    assert second["items"][0]["id"] == first["items"][-1]["id"]


async def test_faults_fire_with_their_probability_and_leave_the_fleet_alone(api: Api) -> None:
    path = await _path_with_actions(api)
    _, before, _ = await api.raw(path)
    api.sim.faults.set("error500=0.5,throttle=0.2:0,latency=0.3:0")

    statuses = Counter([(await api.raw(path))[0] for _ in range(40)])
    api.sim.faults.clear()
    _, after, _ = await api.raw(path)

    assert set(statuses) == {200, 429, 500}
    assert 8 <= statuses[500] <= 32
    assert before == after


def test_fault_spec_parsing() -> None:
    faults = parse_spec(" throttle=0.5:2, latency , error503:1,huge_body:0.1")

    assert [(f.kind, f.probability, f.argument) for f in faults] == [
        ("throttle", 0.5, 2.0), ("latency", 1.0, 0.2), ("error503", 1.0, 1.0),
        ("huge_body", 1.0, 0.1),
    ]
    assert parse_spec("") == ()
    for bad in ("teapot", "error500:3", "latency=2", "latency=x", "reset,reset", "throttle:"):
        with pytest.raises(ValueError):
            parse_spec(bad)


def test_a_rejected_spec_keeps_the_faults_in_force() -> None:
    sim = Simulator(seed=1, devices=1, speed=0, start=START, faults="error500")
    with pytest.raises(ValueError):
        sim.faults.set("error500,nonsense")
    assert sim.faults.spec == "error500"


def test_create_body_validation_names_the_field() -> None:
    configs, name = parse_create_body({"commands": [_command("./a")], "name": "n"})
    assert configs == [("./a", "Replace", "1", "int")] and name == "n"
    with pytest.raises(ValidationError, match=r"commands\[1\]\.config\.action"):
        parse_create_body({"commands": [_command("./a"), _command("./b", action="Move")]})


# --- dialect: how sort and the tags array are read ----------------------------------------------


def _created(batches: list[Any]) -> list[float]:
    return [ts(batch["createdAt"]) for batch in batches]


async def _history_pages(api: Api, device: str, limit: int, **params: Any) -> list[Any]:
    """Every page of a device's history, as (page) data documents."""
    pages = []
    page = 1
    while True:
        data = await api.data(f"/devices/{device}/commands", page=page, limit=limit, **params)
        pages.append(data)
        if not data["hasNextPage"]:
            return pages
        page += 1


async def test_defaults_honour_sort_and_read_every_tags_spelling(api: Api) -> None:
    sim = api.sim
    device = sim.fleet.device_ids()[0]

    history = await api.all_items(f"/devices/{device}/commands", limit=2)
    checked_in = await api.all_items("/devices", limit=5, sort="lastStatusReportTime:desc")

    assert sim.dialect == Dialect.of()
    assert sim.dialect.settings() == {
        "sort_mode": {"devices": "honour", "commands": "honour", "actions": "honour"},
        "sort_fields": None, "tags_format": "any", "unknown_filter": "ignore",
    }
    assert str(sim.dialect) == ""
    assert _created(history) == sorted(_created(history), reverse=True)
    reports = [ts(item["lastStatusReportTime"]) for item in checked_in]
    assert reports == sorted(reports, reverse=True)
    assert not sim.stats.dialect


async def test_sort_ignored_serves_a_history_oldest_first_on_every_page(make_api: Any) -> None:
    api = await make_api(devices=3, batches_per_device=25, sort_mode="ignore")
    fleet = api.sim.fleet
    device = fleet.device_ids()[0]
    stored = fleet.batch_ids(device)
    assert len(stored) == 25

    pages = await _history_pages(api, device, 10, sort="createdAt:desc")
    unsorted = await _history_pages(api, device, 10)

    assert [len(p["items"]) for p in pages] == [10, 10, 5]
    assert [(p["page"], p["totalDocs"], p["hasNextPage"]) for p in pages] == [
        (1, 25, True), (2, 25, True), (3, 25, False)
    ]
    served = [batch for p in pages for batch in p["items"]]
    assert [batch["id"] for batch in served] == stored
    assert _created(served) == sorted(_created(served))
    assert pages == unsorted, "without sort too: the stored order"
    assert api.sim.stats.dialect == {("commands", "sort_ignored"): 3}

    # Issue 16's trap: a new batch lands at the tail, not on the first page asked for.
    new = fleet.create_random_batch(device)
    first = await api.data(f"/devices/{device}/commands", limit=20, sort="createdAt:desc")
    last = (await _history_pages(api, device, 10, sort="createdAt:desc"))[-1]
    assert new not in [batch["id"] for batch in first["items"]]
    assert first["totalDocs"] == 26
    assert last["items"][-1]["id"] == new


async def test_sort_ignored_on_the_device_list_serves_the_fleet_order(make_api: Any) -> None:
    api = await make_api(devices=12, sort_mode="ignore")
    fleet = api.sim.fleet
    by_checkin = sorted(fleet.devices, key=lambda d: d.last_report or 0.0, reverse=True)
    assert [d.id for d in by_checkin] != fleet.device_ids()

    items = await api.all_items("/devices", limit=5, sort="lastStatusReportTime:desc")
    first = await api.data("/devices", limit=5, sort="lastStatusReportTime:desc")

    assert [item["id"] for item in items] == fleet.device_ids()
    assert (first["totalDocs"], first["totalPages"], first["hasNextPage"]) == (12, 3, True)
    assert api.sim.stats.dialect[("devices", "sort_ignored")] == 4


async def test_sort_ignored_on_actions_serves_batch_order(make_api: Any) -> None:
    api = await make_api(devices=4, sort_mode="ignore")
    fleet = api.sim.fleet
    device = fleet.device_ids()[0]
    batch = next(
        b for b in fleet.device(device).batches
        if sorted((a.cmd_id for a in b.actions), reverse=True) != [a.cmd_id for a in b.actions]
    )
    batch_id = batch.id

    items = await api.all_items(f"/devices/{device}/commands/{batch_id}/actions", limit=2,
                                sort="cmdId:desc")

    assert [item["cmdId"] for item in items] == [action.cmd_id for action in batch.actions]


async def test_sort_rejected_answers_400_with_code_5000_on_every_list(make_api: Any) -> None:
    api = await make_api(devices=4, sort_mode="reject")
    fleet = api.sim.fleet
    device = fleet.device_ids()[0]
    batch = fleet.batch_ids(device)[0]
    paths = {"devices": "/devices", "commands": f"/devices/{device}/commands",
             "actions": f"/devices/{device}/commands/{batch}/actions"}

    for route, path in paths.items():
        status, document = await api.get(path, sort="createdAt:desc")
        assert status == 400, route
        assert document == {"status": False, "error": {
            "code": 5000, "message": 'Invalid sort field "createdAt"'}}
        assert (await api.get(path))[0] == 200, "no sort, nothing to refuse"
        status, malformed = await api.get(path, sort="createdAt:up")
        assert status == 400 and malformed["error"]["code"] == 2001, "the pattern comes first"
        assert api.sim.stats.counts[(route, 400)] == 2
        assert api.sim.stats.dialect[(route, "sort_rejected")] == 1


async def test_sort_mode_per_list_and_per_field(make_api: Any) -> None:
    api = await make_api(devices=6, sort_mode={"devices": "reject"},
                         sort_fields=["lastStatusReportTime"])
    device = api.sim.fleet.device_ids()[0]

    refused, _ = await api.get("/devices", sort="lastStatusReportTime:desc")
    by_name = await api.all_items("/devices", sort="displayName:desc")
    history = await api.all_items(f"/devices/{device}/commands", limit=2, sort="createdAt:asc")

    assert refused == 400
    names = [item["displayName"] for item in by_name]
    assert names == sorted(names, reverse=True)
    assert _created(history) == sorted(_created(history))

    api.sim.set_dialect(sort_mode="devices=honour,commands=ignore", sort_fields=None)
    checked_in = await api.all_items("/devices", sort="lastStatusReportTime:desc")
    stored = await api.all_items(f"/devices/{device}/commands", limit=2, sort="createdAt:desc")
    reports = [ts(item["lastStatusReportTime"]) for item in checked_in]
    assert reports == sorted(reports, reverse=True)
    assert [batch["id"] for batch in stored] == api.sim.fleet.batch_ids(device)


def test_dialect_settings_are_checked_and_a_bad_change_keeps_the_old_one() -> None:
    sim = Simulator(seed=1, devices=1, speed=0, start=START, sort_mode="commands=ignore")
    assert sim.dialect.sort_mode == {"devices": "honour", "commands": "ignore",
                                     "actions": "honour"}
    for bad in ({"sort_mode": "sometimes"}, {"sort_mode": "history=ignore"},
                {"sort_mode": {"devices": "no"}}, {"sort_fields": []},
                {"tags_format": "csv"}, {"unknown_filter": "empty"}, {"colour": "blue"}):
        with pytest.raises(ValueError):
            sim.set_dialect(**bad)
        assert sim.dialect.sort_mode["commands"] == "ignore"
    with pytest.raises(ValueError, match="tags_format"):
        Simulator(seed=1, devices=1, speed=0, start=START, tags_format="json")


def _holding(sim: Simulator, *tags: str) -> list[str]:
    """Ids of the devices carrying any of ``tags``, in the fleet's order (ground truth)."""
    return [d.id for d in sim.fleet.devices if set(tags) & set(d.tags)]


def _two_tags(sim: Simulator) -> tuple[str, str]:
    """Two tags that each select part of the fleet, the second adding devices to the first."""
    count = len(sim.fleet.devices)
    tags = sorted({t for d in sim.fleet.devices for t in d.tags})
    return next(
        (a, b) for a in tags for b in tags
        if 0 < len(_holding(sim, a)) < len(_holding(sim, a, b)) < count
    )


# What each tags format makes of each spelling of [tag, other] (``single``: [tag] alone, as
# the exporter sends one tag): ``both``/``first`` the devices with those tags, ``all`` the
# whole list, ``none`` an empty one, ``unread`` what unknown_filter says.
TAG_SPELLINGS = ("repeated", "brackets", "comma", "single")
TAG_READS: dict[str, tuple[str, ...]] = {
    "any": ("both", "both", "both", "first"),
    "repeated": ("both", "unread", "none", "first"),  # "a,b" is one tag nobody carries
    "brackets": ("unread", "both", "unread", "unread"),
    "comma": ("unread", "unread", "both", "first"),
    "ignore": ("all", "all", "all", "all"),
}


@pytest.mark.parametrize("unknown_filter", ["ignore", "nothing"])
@pytest.mark.parametrize("tags_format", list(TAG_READS))
async def test_tags_formats_read_only_their_spelling(
    make_api: Any, tags_format: str, unknown_filter: str
) -> None:
    api = await make_api(devices=10, tags_format=tags_format, unknown_filter=unknown_filter)
    fleet = api.sim.fleet
    everyone = fleet.device_ids()
    tag, other = _two_tags(api.sim)
    expected = {
        "both": _holding(api.sim, tag, other),
        "first": _holding(api.sim, tag),
        "all": everyone,
        "none": [],
        "unread": everyone if unknown_filter == "ignore" else [],
    }
    queries: dict[str, dict[str, Any]] = {
        "repeated": {"tags": [tag, other]},
        "brackets": {"tags[]": [tag, other]},
        "comma": {"tags": f"{tag},{other}"},
        "single": {"tags": tag},
    }

    for spelling, read in zip(TAG_SPELLINGS, TAG_READS[tags_format], strict=True):
        whole = await api.data("/devices", limit=100, **queries[spelling])
        first = await api.data("/devices", limit=4, **queries[spelling])
        assert [item["id"] for item in whole["items"]] == expected[read], (spelling, read)
        assert first["totalDocs"] == len(expected[read])
        assert first["hasNextPage"] is (len(expected[read]) > 4)

    counted = api.sim.stats.dialect  # two requests per spelling
    assert counted[("devices", "tags_unread")] == 2 * TAG_READS[tags_format].count("unread")
    assert counted[("devices", "tags_ignored")] == 2 * TAG_READS[tags_format].count("all")
    assert (await api.data("/devices", limit=100))["totalDocs"] == len(everyone)


async def test_tags_in_two_spellings_at_once(make_api: Any) -> None:
    api = await make_api(devices=10, tags_format="repeated")
    tag, other = _two_tags(api.sim)
    query = {"tags": tag, "tags[]": other}

    read_part = await api.data("/devices", limit=100, **query)
    api.sim.set_dialect(unknown_filter="nothing")
    nothing = await api.data("/devices", limit=100, **query)

    assert [d["id"] for d in read_part["items"]] == _holding(api.sim, tag)
    assert nothing["items"] == [] and nothing["totalDocs"] == 0


# --- control endpoint ---------------------------------------------------------------------------


async def test_control_endpoint_is_off_by_default(api: Api) -> None:
    for method, path in (("POST", "faults"), ("GET", "stats"), ("POST", "advance"),
                         ("POST", "token"), ("POST", "burst")):
        async with api.session.request(method, f"{api.root}/_simulator/{path}") as response:
            assert response.status == 404


async def test_control_endpoint_when_enabled(make_api: Any) -> None:
    api = await make_api(devices=6, control=True)
    sim = api.sim
    control = f"{api.root}/_simulator"
    device = first_device(sim, offline_since=None)
    before = sim.clock.now()

    assert (await api.post(f"{control}/faults", {"spec": "throttle_bare"}))[0] == 200
    assert (await api.raw("/devices"))[0] == 429
    assert (await api.post(f"{control}/faults", {"spec": "bogus"}))[0] == 400
    assert (await api.post(f"{control}/faults", {"spec": ""}))[0] == 200
    status, advanced = await api.post(f"{control}/advance", {"seconds": 60})
    assert status == 200 and advanced["data"]["now"] == pytest.approx(before + 60)
    _, stats = await api.get(f"{control}/stats")
    assert {"route": "devices", "status": 429, "count": 1} in stats["data"]["counts"]
    assert (await api.post(f"{control}/token", {"token": "new"}))[0] == 200
    assert sim.token == "new"
    api.token = "new"

    status, burst = await api.post(
        f"{control}/burst", {"device": device.serial, "batches": 4, "error_ratio": 1.0}
    )
    created = [b["id"] for b in burst["data"]["batches"]]
    assert status == 200 and len(created) == 4
    assert {b["device"] for b in burst["data"]["batches"]} == {device.id}
    for _ in range(500):
        if not any(is_pending(s) for b in created
                   for s in sim.fleet.grouped_counts(device.id, b)):
            break
        sim.advance(600)
    classes = Counter(STATUS_CLASS[s].value for b in created
                      for s in Counter(sim.fleet.grouped_counts(device.id, b)).elements())
    assert classes and set(classes) == {"error"}


async def test_control_endpoint_switches_the_dialect_mid_run(make_api: Any) -> None:
    api = await make_api(devices=6, control=True)
    control = f"{api.root}/_simulator"
    device = api.sim.fleet.device_ids()[0]
    path = f"/devices/{device}/commands"
    newest_first = await api.all_items(path, limit=2, sort="createdAt:desc")

    status, changed = await api.post(f"{control}/dialect", {"sort_mode": {"commands": "ignore"}})
    stored = await api.all_items(path, limit=2, sort="createdAt:desc")
    assert status == 200
    assert changed["data"]["sort_mode"] == {"devices": "honour", "commands": "ignore",
                                            "actions": "honour"}
    assert [b["id"] for b in stored] == [b["id"] for b in reversed(newest_first)]

    status, changed = await api.post(f"{control}/dialect", {
        "sort_mode": "reject", "sort_fields": ["lastStatusReportTime"],
        "tags_format": "brackets", "unknown_filter": "nothing",
    })
    assert status == 200 and changed["data"] == api.sim.dialect.settings()
    refused, document = await api.get("/devices", sort="lastStatusReportTime:desc")
    assert (refused, document["error"]["code"]) == (400, 5000)
    assert (await api.data("/devices", tags="kiosk"))["items"] == []
    assert (await api.get(path, sort="createdAt:desc"))[0] == 200

    for bad in ({"sort_mode": "maybe"}, {"sort_mode": {"history": "ignore"}},
                {"sort_fields": 3}, {"tags_format": None}, {"colour": "red"}):
        status, document = await api.post(f"{control}/dialect", bad)
        assert status == 400 and document["status"] is False, bad
    status, unchanged = await api.post(f"{control}/dialect", {})
    assert status == 200 and unchanged["data"]["tags_format"] == "brackets"

    _, stats = await api.get(f"{control}/stats")
    assert stats["data"]["dialect"] == api.sim.dialect.settings()
    assert {"route": "devices", "what": "sort_rejected", "count": 1} in stats["data"][
        "dialect_counts"]
    assert {"route": "devices", "what": "tags_unread", "count": 1} in stats["data"][
        "dialect_counts"]
    assert {"route": "commands", "what": "sort_ignored", "count": -(-len(stored) // 2)} in stats[
        "data"]["dialect_counts"]
    assert {"route": "devices", "status": 400, "count": 1} in stats["data"]["counts"]


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_serves_and_exits_cleanly_on_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "exporter.simulator", "--port", "0", "--devices", "3",
         "--seed", "4", "--token", "t0k"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert process.stdout is not None
        banner = [process.stdout.readline() for _ in range(3)]
        url = re.search(r"http://127\.0\.0\.1:\d+/v1", banner[0])
        assert url, banner
        assert "demo" in banner[1] and "t0k" in banner[2]
        request = subprocess.run(
            [sys.executable, "-c",
             "import sys, urllib.request as u;"
             "r = u.urlopen(u.Request(sys.argv[1], headers={'Authorization': 'Bearer t0k'}));"
             "print(r.status)",
             f"{url.group(0)}/organizations/demo/mdm/windows/enterprise/devices"],
            capture_output=True, text=True, timeout=20,
        )
        assert request.stdout.strip() == "200", request.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=10)
    assert code == 0


def test_cli_rejects_a_bad_fault_spec() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "exporter.simulator", "--faults", "teapot"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=20,
    )
    assert result.returncode == 2
    assert "teapot" in result.stderr


def test_cli_dialect_flags_reach_the_simulator() -> None:
    args = build_parser().parse_args([
        "--devices", "1", "--sort-mode", "devices=reject,commands=ignore",
        "--sort-fields", "lastStatusReportTime,createdAt", "--tags-format", "comma",
        "--unknown-filter", "nothing",
    ])
    defaults = simulator(build_parser().parse_args(["--devices", "1"]))

    assert simulator(args).dialect.settings() == {
        "sort_mode": {"devices": "reject", "commands": "ignore", "actions": "honour"},
        "sort_fields": ["createdAt", "lastStatusReportTime"],
        "tags_format": "comma", "unknown_filter": "nothing",
    }
    assert defaults.dialect == Dialect.of()


@pytest.mark.parametrize("flags", [
    ["--sort-mode", "sometimes"], ["--sort-mode", "history=ignore"], ["--sort-fields", ","],
    ["--tags-format", "csv"], ["--unknown-filter", "all"],
])
def test_cli_rejects_a_bad_dialect_flag(flags: list[str], capsys: Any) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(flags)
    assert exited.value.code == 2
    assert flags[0] in capsys.readouterr().err
