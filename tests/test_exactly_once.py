"""Counts you can page on: each upstream misbehaviour that once double counted, or killed a
poll round in silence, replayed over HTTP against the exporter.

The upstream is an aiohttp app of this module whose documents the test rewrites between
rounds, so every read is the test's story: transient 404s, a batch leaving and re-entering
the history window, a list that is briefly short, a lagging replica, odd digits and endless
unknown status names. The exporter is scraped over HTTP; expectations are written from the
story (how many actions entered which status after the watermark), never read back from
the exporter.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml
from aiohttp import web
from samples import Samples
from samples import scrape as fetch_samples

from exporter.cli import Exporter, build_exporter
from exporter.client import TokenSource
from exporter.config import parse_config
from exporter.scheduler import Scheduler, Shard
from exporter.server import Hooks, make_app
from exporter.state import MAX_UNKNOWN_STATUSES

TOKEN = "ledger-test-token"
ORG = "acme"
BASE = f"/v1/organizations/{ORG}/mdm/windows/enterprise"
DEVICE = "65f0c0ffee65f0c0ffee0001"
START = 1_770_717_600.0  # the exporter's watermark



def iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z")


def batch_id(n: int) -> str:
    return f"65f0c0ffee65f0c0ffee{0x1000 + n:04x}"


def device_id(n: int) -> str:
    return f"65f0c0ffee65f0c0ffee{0x2000 + n:04x}"


def actions(count: int, status: str, *, prefix: str = "a", at: float = START + 60) -> list[Any]:
    """``count`` actions in ``status``, their timestamps after the watermark."""
    out = []
    for i in range(count):
        doc: dict[str, Any] = {"cmdId": f"{prefix}-{i}", "status": status}
        if status != "Pending":
            doc["sentAt"] = iso(at)
        if status not in ("Pending", "Awaiting"):
            doc["receivedAt"] = iso(at + 5)
        out.append(doc)
    return out


def envelope(data: Any) -> web.Response:
    return web.Response(body=json.dumps({"status": True, "data": data}),
                        content_type="application/json")


def not_found() -> web.Response:
    return web.json_response({"status": False, "error": {"code": 3001}}, status=404)


@dataclass
class Upstream:
    """Per device, its batches (newest first) and their actions, rewritten by the test."""

    batches: dict[str, list[str]] = field(default_factory=dict)  # device -> listed history
    actions: dict[str, list[Any]] = field(default_factory=dict)  # batch -> action documents
    created: dict[str, float] = field(default_factory=dict)
    devices: list[dict[str, Any]] = field(default_factory=list)  # the device list
    missing_once: Counter[str] = field(default_factory=Counter)  # batch -> 404s to answer
    missing: set[str] = field(default_factory=set)  # batches answering 404 until removed
    requests: Counter[str] = field(default_factory=Counter)

    def add(self, device: str, batch: str, docs: list[Any], created: float = START + 30) -> None:
        self.batches.setdefault(device, []).insert(0, batch)
        self.actions[batch] = docs
        self.created[batch] = created

    def document(self, device: str, batch: str) -> dict[str, Any]:
        counts = Counter(d["status"] for d in self.actions[batch] if isinstance(d, dict))
        created = self.created[batch]
        return {
            "id": batch, "name": f"policy {batch[-4:]}", "winDeviceId": device,
            "summary": [{"status": s, "count": n} for s, n in sorted(counts.items())],
            "createdAt": iso(created), "updatedAt": iso(created + 100),
        }

    def app(self) -> web.Application:
        app = web.Application()
        route = app.router.add_get
        route(f"{BASE}/devices", self._devices)
        route(f"{BASE}/devices/{{device}}/commands", self._history)
        route(f"{BASE}/devices/{{device}}/commands/{{batch}}", self._one)
        route(f"{BASE}/devices/{{device}}/commands/{{batch}}/actions", self._actions)
        return app

    async def _devices(self, request: web.Request) -> web.Response:
        self.requests["devices"] += 1
        wanted = set(request.query.getall("tags", []))
        items = [d for d in self.devices if not wanted or wanted & set(d.get("tags", []))]
        return envelope({"items": items, "totalDocs": len(items), "hasNextPage": False})

    async def _history(self, request: web.Request) -> web.Response:
        device = request.match_info["device"]
        self.requests["commands"] += 1
        limit = int(request.query.get("limit", "100"))
        listed = [b for b in self.batches.get(device, []) if b not in self.missing][:limit]
        items = [self.document(device, b) for b in listed]
        return envelope({"items": items, "totalDocs": len(items), "hasNextPage": False})

    async def _one(self, request: web.Request) -> web.Response:
        device, batch = request.match_info["device"], request.match_info["batch"]
        self.requests["command"] += 1
        if batch in self.missing or batch not in self.actions:
            return not_found()
        return envelope(self.document(device, batch))

    async def _actions(self, request: web.Request) -> web.Response:
        batch = request.match_info["batch"]
        self.requests["actions"] += 1
        if self.missing_once[batch] > 0:
            self.missing_once[batch] -= 1
            return not_found()
        if batch in self.missing:
            return not_found()
        items = self.actions[batch]
        return envelope({"items": items, "totalDocs": len(items), "hasNextPage": False})


@dataclass
class Rig:
    upstream: Upstream
    exporter: Exporter
    url: str
    session: Any
    clock: list[float]

    async def poll(self, rounds: int = 1, *, advance: float = 60.0) -> None:
        for _ in range(rounds):
            self.clock[0] += advance
            await self.exporter.scheduler.run_round()
        self.exporter.exposition.refresh()

    async def scrape(self) -> Samples:
        return await fetch_samples(self.session, self.url + "/metrics")

    async def transitions(self) -> dict[str, float]:
        found = await self.scrape()
        return {dict(k)["status"]: v for (n, k), v in found.items()
                if n == "applivery_windows_command_action_transitions_total" and v}

    async def latencies(self) -> float:
        found = await self.scrape()
        return sum(v for (n, _), v in found.items()
                   if n == "applivery_windows_command_ack_latency_seconds_count")

    async def gauges(self) -> dict[tuple[str, str], float]:
        found = await self.scrape()
        return {(dict(k)["command"], dict(k)["status"]): v for (n, k), v in found.items()
                if n == "applivery_windows_command_actions"}


def config_text(url: str, devices: list[dict[str, Any]] | None = None, **extra: Any) -> str:
    document: dict[str, Any] = {
        "organization": ORG,
        "api": {"base_url": url, "requests_per_hour": 1_000_000},
        "poll": {"interval_seconds": 60},
        "devices": devices if devices is not None else [{"id": DEVICE}],
        "discovery": {"batches": {"max_age": "3650d", "max_per_device": 3}},
    }
    for key, value in extra.items():
        document.setdefault(key, {}).update(value)
    return yaml.safe_dump(document)


@pytest.fixture
async def make_rig(aiohttp_server, aiohttp_client) -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    exporters: list[Exporter] = []

    async def make(upstream: Upstream, *, shard: Shard | None = None, **config: Any) -> Rig:
        server = await aiohttp_server(upstream.app())
        clock = [START]
        parsed = parse_config(config_text(str(server.make_url("/v1")), **config))
        exporter = build_exporter(parsed, TokenSource(value=TOKEN), config_path=None,
                                  clock=lambda: clock[0], shard=shard)
        exporter.client.max_attempts = 1  # each read is exactly what the upstream answered
        exporters.append(exporter)
        hooks = Hooks(exposition=exporter.exposition, state=exporter.state,
                      ready=lambda: exporter.scheduler.ready, reload=_no_reload,
                      version="test", organization=lambda: ORG)
        client = await aiohttp_client(make_app(hooks))
        return Rig(upstream, exporter, str(client.make_url("")).rstrip("/"), client.session,
                   clock)

    yield make
    for exporter in exporters:
        await exporter.client.close()


async def _no_reload() -> str | None:
    return "no reload in this test"


async def run_until_rounds(scheduler: Scheduler, rounds: int, *, within: float) -> None:
    """Run the scheduler's own loop until ``rounds`` rounds completed, or ``within`` seconds."""
    task = asyncio.create_task(scheduler.run())
    try:
        for _ in range(int(within / 0.02)):
            if scheduler.rounds >= rounds:
                break
            await asyncio.sleep(0.02)
    finally:
        task.cancel()


# --- the ledger ---------------------------------------------------------------------------------


async def test_a_batch_that_answers_404_once_is_not_counted_again(make_rig) -> None:
    upstream = Upstream()
    upstream.add(DEVICE, batch_id(1), actions(40, "Pending"))
    rig = await make_rig(upstream)
    await rig.poll()
    half = actions(20, "Acknowledged") + actions(40, "Pending")[20:]
    upstream.actions[batch_id(1)] = half
    await rig.poll()
    assert await rig.transitions() == {"Pending": 40, "Awaiting": 20, "Acknowledged": 20}
    upstream.missing_once[batch_id(1)] = 1
    await rig.poll()
    assert await rig.gauges() == {}  # the batch left /metrics
    await rig.poll()  # back, its answers unchanged
    assert (await rig.gauges())[(batch_id(1), "Acknowledged")] == 20
    assert await rig.transitions() == {"Pending": 40, "Awaiting": 20, "Acknowledged": 20}
    upstream.actions[batch_id(1)] = actions(40, "Acknowledged")
    await rig.poll()
    assert await rig.transitions() == {"Pending": 40, "Awaiting": 40, "Acknowledged": 40}
    assert await rig.latencies() == 40


async def test_a_batch_that_leaves_the_history_window_and_returns_is_not_counted_again(
    make_rig,
) -> None:
    upstream = Upstream()
    upstream.add(DEVICE, batch_id(1), actions(5, "Pending"))
    rig = await make_rig(upstream)
    await rig.poll()
    upstream.actions[batch_id(1)] = actions(5, "Acknowledged")
    await rig.poll()
    for n in (2, 3, 4):  # three newer batches push it out of max_per_device = 3
        upstream.add(DEVICE, batch_id(n), actions(1, "Acknowledged", prefix=f"b{n}"))
    await rig.poll()
    assert {c for c, _ in await rig.gauges()} == {batch_id(2), batch_id(3), batch_id(4)}
    for n in (2, 3, 4):  # deleted upstream: the old batch is back in the window
        upstream.batches[DEVICE].remove(batch_id(n))
    await rig.poll()
    assert {c for c, _ in await rig.gauges()} == {batch_id(1)}
    assert await rig.transitions() == {"Pending": 8, "Awaiting": 8, "Acknowledged": 8}


async def test_a_list_briefly_short_does_not_count_the_rest_again(make_rig) -> None:
    upstream = Upstream()
    upstream.add(DEVICE, batch_id(1), actions(100, "Pending"))
    rig = await make_rig(upstream)
    await rig.poll()
    answered = actions(100, "Acknowledged")
    upstream.actions[batch_id(1)] = answered
    await rig.poll()
    upstream.actions[batch_id(1)] = answered[:1]
    await rig.poll()
    assert (await rig.gauges())[(batch_id(1), "Acknowledged")] == 1  # the latest list
    upstream.actions[batch_id(1)] = answered
    await rig.poll()
    assert (await rig.gauges())[(batch_id(1), "Acknowledged")] == 100
    assert await rig.transitions() == {"Pending": 100, "Awaiting": 100, "Acknowledged": 100}


async def test_a_stale_read_counts_nothing_and_neither_does_the_truth_after_it(make_rig) -> None:
    upstream = Upstream()
    upstream.add(DEVICE, batch_id(1), actions(4, "Pending"))
    rig = await make_rig(upstream)
    await rig.poll()
    truth = actions(2, "Awaiting") + actions(2, "CommandNotFound", prefix="e")
    truth = [{**d, "cmdId": f"a-{i}"} for i, d in enumerate(truth)]
    upstream.actions[batch_id(1)] = truth
    await rig.poll()
    expected = {"Pending": 4, "Awaiting": 4, "CommandNotFound": 2}
    assert await rig.transitions() == expected
    upstream.actions[batch_id(1)] = actions(4, "Pending")  # a lagging replica
    await rig.poll()
    assert await rig.transitions() == expected
    upstream.actions[batch_id(1)] = truth
    await rig.poll()
    assert await rig.transitions() == expected
    assert await rig.latencies() == 2


async def test_a_configured_batch_that_answered_404_is_asked_again_and_comes_back(
    make_rig,
) -> None:
    upstream = Upstream()
    upstream.add(DEVICE, batch_id(1), actions(3, "Acknowledged"))
    upstream.missing.add(batch_id(1))
    rig = await make_rig(upstream, devices=[{"id": DEVICE, "commands": [batch_id(1)]}])
    await rig.poll()
    assert await rig.gauges() == {}
    asked = upstream.requests["command"]
    await rig.poll(5)
    assert upstream.requests["command"] == asked  # not asked every round
    upstream.missing.clear()
    await rig.poll(5)  # ten intervals after the 404
    assert (await rig.gauges())[(batch_id(1), "Acknowledged")] == 3


# --- no poll fails in silence --------------------------------------------------------------------


async def test_a_non_ascii_digit_is_a_schema_problem_not_a_dead_round(make_rig) -> None:
    upstream = Upstream()
    docs = actions(3, "Acknowledged")
    docs[0]["statusCode"] = "²"
    upstream.add(DEVICE, batch_id(1), docs)
    rig = await make_rig(upstream)
    await rig.poll()
    found = await rig.scrape()
    assert found[("applivery_exporter_parse_problems_total", frozenset({("kind", "schema")}))] == 1
    assert found[("applivery_exporter_target_up",
                  frozenset({("device", DEVICE), ("organization", ORG)}))] == 1
    assert (await rig.gauges())[(batch_id(1), "Acknowledged")] == 3
    assert found[("applivery_exporter_poll_failures_total", frozenset({("kind", "round")}))] == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("receivedAt", 1e400), ("receivedAt", "9999-12-31T00:00:00Z"), ("sentAt", "NaN")],
)
async def test_timestamps_that_are_not_moments_are_problems_treated_as_missing(
    make_rig, field: str, value: Any
) -> None:
    upstream = Upstream()
    docs = actions(2, "Acknowledged")
    docs[0][field] = value
    upstream.add(DEVICE, batch_id(1), docs)
    rig = await make_rig(upstream)
    await rig.poll()
    found = await rig.scrape()
    assert found[("applivery_exporter_parse_problems_total",
                  frozenset({("kind", "timestamp")}))] == 1
    sums = [v for (n, _), v in found.items()
            if n == "applivery_windows_command_ack_latency_seconds_sum"]
    assert all(v < 3600 for v in sums)  # never +Inf, never a millennium
    assert await rig.latencies() == 1  # the other action's


async def test_check_in_times_from_the_far_future_or_nan_do_not_pin_the_mark(make_rig) -> None:
    upstream = Upstream()
    upstream.devices = [
        {"id": DEVICE, "lastStatusReportTime": "9999-12-31T00:00:00Z"},
        {"id": device_id(9), "lastStatusReportTime": float("nan")},
    ]
    rig = await make_rig(upstream, devices=[], discovery={"devices": {}})
    await rig.poll()
    scheduler = rig.exporter.scheduler
    assert all(t.checkin is None for t in scheduler.tracking.values())
    found = await rig.scrape()
    assert found[("applivery_exporter_parse_problems_total",
                  frozenset({("kind", "timestamp")}))] == 2


async def test_a_device_poll_that_raises_is_that_devices_failure(make_rig, monkeypatch) -> None:
    upstream = Upstream()
    other = device_id(9)
    upstream.add(DEVICE, batch_id(1), actions(2, "Acknowledged"))
    upstream.add(other, batch_id(2), actions(2, "Acknowledged", prefix="o"))
    rig = await make_rig(upstream, devices=[{"id": DEVICE}, {"id": other}])
    state = rig.exporter.state
    apply = state.apply_actions

    def broken(device: str, *args: Any) -> None:
        if device == DEVICE:
            raise KeyError("a bug")
        apply(device, *args)

    monkeypatch.setattr(state, "apply_actions", broken)
    await rig.poll()
    found = await rig.scrape()
    up = {dict(k)["device"]: v for (n, k), v in found.items()
          if n == "applivery_exporter_target_up"}
    assert up == {DEVICE: 0, other: 1}
    assert found[("applivery_exporter_poll_failures_total", frozenset({("kind", "device")}))] == 1
    assert "internal error (KeyError)" in state.device_view(DEVICE).last_error
    async with rig.session.get(rig.url + "/") as response:
        assert "internal error (KeyError)" in await response.text()


async def test_a_round_that_raises_is_counted_and_polling_goes_on(make_rig, monkeypatch) -> None:
    upstream = Upstream()
    upstream.add(DEVICE, batch_id(1), actions(2, "Acknowledged"))
    rig = await make_rig(upstream, poll={"interval_seconds": 0.05, "jitter": 0})
    scheduler = rig.exporter.scheduler
    crashes = [1]
    real = scheduler.run_round

    async def flaky() -> Any:
        if crashes[0]:
            crashes[0] -= 1
            raise RuntimeError("a bug")
        return await real()

    monkeypatch.setattr(scheduler, "run_round", flaky)
    await run_until_rounds(scheduler, 2, within=4.0)
    rig.exporter.exposition.refresh()
    found = await rig.scrape()
    assert found[("applivery_exporter_poll_failures_total", frozenset({("kind", "round")}))] == 1
    assert found[("applivery_exporter_poll_rounds_total", frozenset())] >= 3
    assert scheduler.rounds >= 2


async def test_a_reload_during_a_round_wakes_the_next_one(make_rig, monkeypatch) -> None:
    upstream = Upstream()
    upstream.add(DEVICE, batch_id(1), actions(2, "Acknowledged"))
    rig = await make_rig(upstream, poll={"interval_seconds": 3600, "jitter": 0})
    scheduler = rig.exporter.scheduler
    real = scheduler.run_round

    async def reloaded_meanwhile() -> Any:
        if scheduler.rounds == 0:
            scheduler.reload(scheduler.config)
        return await real()

    monkeypatch.setattr(scheduler, "run_round", reloaded_meanwhile)
    await run_until_rounds(scheduler, 2, within=2.0)
    assert scheduler.rounds >= 2  # not an hour later


# --- bounds and shards ------------------------------------------------------------------------


async def test_unknown_status_names_are_bounded(make_rig) -> None:
    upstream = Upstream()
    docs = [{"cmdId": f"u-{i}", "status": f"Invented{i}", "sentAt": iso(START + 60),
             "receivedAt": iso(START + 65)} for i in range(3000)]
    upstream.add(DEVICE, batch_id(1), docs)
    rig = await make_rig(upstream)
    await rig.poll()
    found = await rig.scrape()
    statuses = {dict(k)["status"] for (n, k), _ in found.items()
                if n == "applivery_windows_command_action_transitions_total"}
    gauges = {s for _, s in await rig.gauges()}
    assert len(statuses - {"other"}) <= 65 + MAX_UNKNOWN_STATUSES
    assert len(gauges) == MAX_UNKNOWN_STATUSES + 1
    transitions = await rig.transitions()
    assert transitions["other"] == 3000 - MAX_UNKNOWN_STATUSES
    assert sum(v for s, v in transitions.items() if s.startswith("Invented")) == 100
    assert found[("applivery_exporter_parse_problems_total",
                  frozenset({("kind", "unknown_status")}))] == 3000 + 1  # and the summary


async def test_shards_watch_a_device_configured_by_serial_and_discovered_exactly_once(
    make_rig,
) -> None:
    upstream = Upstream()
    fleet = [device_id(i) for i in range(12)]
    upstream.devices = [
        {"id": d, "summary": {"serialNumber": f"SER{i}"}, "tags": ["kiosk"]}
        for i, d in enumerate(fleet)
    ]
    for i, device in enumerate(fleet):
        upstream.add(device, batch_id(i + 1), actions(2, "Acknowledged", prefix=f"d{i}"))
    configured = [{"id": f"SER{i}", "name": f"by-serial-{i}"} for i in range(6)]
    for i in range(6):  # the API takes the serial in the path too
        upstream.batches[f"SER{i}"] = upstream.batches[fleet[i]]
    watched: list[str] = []
    exported = 0.0
    for index in range(2):
        rig = await make_rig(upstream, shard=Shard(index, 2), devices=configured,
                             discovery={"devices": {"tags": ["kiosk"]}})
        await rig.poll(2)
        watched += rig.exporter.state.watched()
        exported += sum((await rig.gauges()).values())
    canonical = [w if w in fleet else fleet[int(w.removeprefix("SER"))] for w in watched]
    assert sorted(canonical) == sorted(fleet)  # every device once, none lost
    assert exported == 24

