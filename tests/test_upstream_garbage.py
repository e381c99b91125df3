"""Upstream garbage: whatever the API sends, the exporter keeps serving /metrics, counts the
problem, and loses nothing it already had.

The upstream here is an aiohttp app of this module serving hand-made bodies on the real
routes, so every byte is under the test's control; the exporter talks to it over HTTP and is
scraped over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from aiohttp import web
from samples import Samples
from samples import scrape as fetch_samples

from exporter.cli import Exporter, build_exporter
from exporter.client import TokenSource
from exporter.config import parse_config
from exporter.exposition import MAX_LABEL_VALUE, TRUNCATED, truncation_mark
from exporter.server import Hooks, make_app

TOKEN = "garbage-test-token"
ORG = "acme"
BASE = f"/v1/organizations/{ORG}/mdm/windows/enterprise"
HISTORY_DEVICE = "65f0c0ffee65f0c0ffee0001"  # batches discovered from its command history
EXPLICIT_DEVICE = "65f0c0ffee65f0c0ffee0002"  # one configured command
BATCH_H = "65f0c0ffee65f0c0ffee1001"
BATCH_E = "65f0c0ffee65f0c0ffee1002"
NOW = 1_770_717_600.0
ISO_SENT = "2026-02-10T09:00:00.000Z"
ISO_RECEIVED = "2026-02-10T09:00:05.000Z"
ISO_CREATED = "2026-02-10T08:59:00.000Z"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- a hand-made upstream -----------------------------------------------------------------------


def envelope(data: Any) -> bytes:
    return json.dumps({"status": True, "data": data}).encode()


def page(items: list[Any], **meta: Any) -> dict[str, Any]:
    document = {"items": items, "totalDocs": len(items), "limit": 100, "page": 1,
                "totalPages": 1, "hasNextPage": False}
    document.update(meta)
    return document


def good_actions(prefix: str) -> list[dict[str, Any]]:
    return [
        {"cmdId": f"{prefix}-1", "status": "Pending"},
        {"cmdId": f"{prefix}-2", "status": "Awaiting", "sentAt": ISO_SENT},
        {"cmdId": f"{prefix}-3", "status": "Acknowledged", "statusCode": 200,
         "sentAt": ISO_SENT, "receivedAt": ISO_RECEIVED},
    ]


def batch_document(batch: str, device: str, actions: list[dict[str, Any]]) -> dict[str, Any]:
    counts = Counter(a["status"] for a in actions if isinstance(a.get("status"), str)
                     and a["status"] and a["status"] != "Unknown")
    return {
        "id": batch, "name": f"batch {batch[-4:]}", "winDeviceId": device,
        "summary": [{"status": s, "count": n} for s, n in sorted(counts.items())],
        "createdAt": ISO_CREATED, "updatedAt": ISO_RECEIVED,
    }


@dataclass
class Upstream:
    """Good documents on every route, unless the test put garbage on one."""

    actions: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {BATCH_H: good_actions("h"), BATCH_E: good_actions("e")}
    )
    batches: dict[str, dict[str, Any]] | None = None  # overrides the derived documents
    devices: list[dict[str, Any]] = field(
        default_factory=lambda: [{"id": HISTORY_DEVICE}, {"id": EXPLICIT_DEVICE}]
    )
    garbage: dict[str, Handler] = field(default_factory=dict)
    served: Counter[str] = field(default_factory=Counter)  # garbage answers per endpoint

    def batch(self, batch: str) -> dict[str, Any]:
        if self.batches is not None and batch in self.batches:
            return self.batches[batch]
        device = HISTORY_DEVICE if batch == BATCH_H else EXPLICIT_DEVICE
        return batch_document(batch, device, self.actions[batch])

    def app(self) -> web.Application:
        app = web.Application()
        route = app.router.add_get
        route(f"{BASE}/devices", self._endpoint("devices", self._devices))
        route(f"{BASE}/devices/{{device}}/commands", self._endpoint("commands", self._history))
        route(f"{BASE}/devices/{{device}}/commands/{{batch}}", self._endpoint("command", self._one))
        route(f"{BASE}/devices/{{device}}/commands/{{batch}}/actions",
              self._endpoint("actions", self._actions))
        return app

    def _endpoint(self, endpoint: str, good: Handler) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            if request.headers.get("Authorization") != f"Bearer {TOKEN}":
                return web.json_response({"status": False, "error": {"code": 4004}}, status=401)
            bad = self.garbage.get(endpoint)
            if bad is None:
                return await good(request)
            self.served[endpoint] += 1
            return await bad(request)

        return handle

    async def _devices(self, _: web.Request) -> web.Response:
        return web.Response(body=envelope(page(self.devices)), content_type="application/json")

    async def _history(self, request: web.Request) -> web.Response:
        items = [self.batch(BATCH_H)] if request.match_info["device"] == HISTORY_DEVICE else []
        return web.Response(body=envelope(page(items)), content_type="application/json")

    async def _one(self, request: web.Request) -> web.Response:
        return web.Response(body=envelope(self.batch(request.match_info["batch"])),
                            content_type="application/json")

    async def _actions(self, request: web.Request) -> web.Response:
        items = self.actions[request.match_info["batch"]]
        return web.Response(body=envelope(page(items)), content_type="application/json")


def body(raw: bytes, content_type: str = "application/json") -> Handler:
    async def handle(_: web.Request) -> web.Response:
        return web.Response(body=raw, headers={"Content-Type": content_type})

    return handle


# --- the exporter against it --------------------------------------------------------------------


@dataclass
class Rig:
    upstream: Upstream
    exporter: Exporter
    metrics_url: str
    session: Any

    async def poll(self) -> None:
        await self.exporter.scheduler.run_round()
        self.exporter.exposition.refresh()

    async def scrape(self) -> Samples:
        return await fetch_samples(self.session, self.metrics_url)

    async def raw_scrape(self) -> bytes:
        async with self.session.get(self.metrics_url) as response:
            assert response.status == 200
            return await response.read()


def exporter_config(url: str, *, discover: bool = False, **api: Any) -> str:
    discovery: dict[str, Any] = {"batches": {"max_age": "3650d", "max_per_device": 20}}
    if discover:
        discovery["devices"] = {}
    return yaml.safe_dump({
        "organization": ORG,
        "api": {"base_url": url, "requests_per_hour": 1_000_000, **api},
        "devices": [{"id": HISTORY_DEVICE},
                    {"id": EXPLICIT_DEVICE, "commands": [BATCH_E]}],
        "discovery": discovery,
    })


@pytest.fixture
async def make_rig(aiohttp_server, aiohttp_client) -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    exporters: list[Exporter] = []

    async def make(upstream: Upstream | None = None, *, discover: bool = False, **api: Any) -> Rig:
        upstream = upstream or Upstream()
        server = await aiohttp_server(upstream.app())
        config = parse_config(
            exporter_config(str(server.make_url("/v1")), discover=discover, **api)
        )
        exporter = build_exporter(config, TokenSource(value=TOKEN), config_path=None,
                                  clock=lambda: NOW)
        exporter.client.max_attempts = 2  # one retry: enough to see it counted, and quick
        exporters.append(exporter)
        hooks = Hooks(exposition=exporter.exposition, state=exporter.state,
                      ready=lambda: exporter.scheduler.ready, reload=_no_reload,
                      version="test", organization=lambda: ORG)
        client = await aiohttp_client(make_app(hooks))
        return Rig(upstream, exporter, str(client.make_url("/metrics")), client.session)

    yield make
    for exporter in exporters:
        await exporter.client.close()


async def _no_reload() -> str | None:
    return "no reload in this test"


def select(found: Samples, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    wanted = set(labels.items())
    return {k: v for (n, k), v in found.items() if n == name and wanted <= k}


def command_gauges(found: Samples) -> dict[tuple[str, str, str], float]:
    return {
        (dict(k)["device"], dict(k)["command"], dict(k)["status"]): v
        for k, v in select(found, "applivery_windows_command_actions").items()
    }


def requests(found: Samples, endpoint: str, code: str) -> float:
    return sum(select(found, "applivery_exporter_api_requests_total",
                      api_endpoint=endpoint, code=code).values())


def problems(found: Samples) -> Counter[str]:
    return Counter({dict(k)["kind"]: int(v)
                    for k, v in select(found, "applivery_exporter_parse_problems_total").items()})


def up(found: Samples, device: str) -> float:
    return select(found, "applivery_exporter_target_up", device=device)[
        frozenset({("organization", ORG), ("device", device)})
    ]


def promtool_check(body: bytes) -> None:
    if shutil.which("promtool") is None:
        return
    result = subprocess.run(["promtool", "check", "metrics"], input=body,
                            capture_output=True, check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


# --- bodies that are not JSON envelopes ---------------------------------------------------------

GOOD_HALF = envelope(page(good_actions("x")))[:40]
NOT_ENVELOPES = {
    "html": (b"<html><body>502 Bad Gateway</body></html>", "text/html"),
    "empty": (b"", "application/json"),
    "truncated": (GOOD_HALF, "application/json"),
    "undefined": (b'{"status":true,"data":undefined}', "application/json"),
    "not utf-8": (b'{"status":true,"data":"\xff\xfe\xfd"}', "application/json"),
    "array": (b"[1,2,3]", "application/json"),
    "string": (b'"ok"', "application/json"),
    "error envelope": (b'{"status":false,"error":{"code":5000}}', "application/json"),
    "no data": (b'{"status":true}', "application/json"),
    "data null": (b'{"status":true,"data":null}', "application/json"),
    "items not a list": (b'{"status":true,"data":{"items":{"a":1}}}', "application/json"),
    "nesting bomb": (b"[" * 100_000 + b"]" * 100_000, "application/json"),
}


@pytest.mark.parametrize("endpoint", ["commands", "command", "actions"])
@pytest.mark.parametrize("kind", list(NOT_ENVELOPES))
async def test_a_body_that_is_not_an_envelope_is_counted_and_loses_nothing(
    make_rig, endpoint: str, kind: str
) -> None:
    rig = await make_rig()
    await rig.poll()
    before = await rig.scrape()
    assert len(command_gauges(before)) == 6
    rig.upstream.garbage[endpoint] = body(*NOT_ENVELOPES[kind])
    await rig.poll()
    after = await rig.scrape()
    served = rig.upstream.served[endpoint]
    assert served >= 1
    assert requests(after, endpoint, "invalid_body") - requests(before, endpoint, "invalid_body") \
        == served
    assert command_gauges(after) == command_gauges(before)  # last good values stay
    hit = EXPLICIT_DEVICE if endpoint == "command" else HISTORY_DEVICE
    assert up(after, hit) == 0
    # Recovery needs nothing but good bodies again.
    del rig.upstream.garbage[endpoint]
    await rig.poll()
    recovered = await rig.scrape()
    assert up(recovered, hit) == 1
    assert command_gauges(recovered) == command_gauges(before)


# --- wrong types in every field -----------------------------------------------------------------

WRONG = {
    "string": [12345, 1.5, ["a"], {"a": 1}, True],
    "timestamp": ["not a date", "2026-13-45T99:99:99Z", ["x"], {"t": 1}, True],
    "status": [42, ["Pending"], {"s": 1}, True, ""],
    "code": ["abc", ["200"], {"c": 1}, 1.5],
    "cmdId": [None, "", ["c"], {"c": 1}, True, 1.5],
}
ACTION_FIELDS = {"cmdId": "cmdId", "status": "status", "statusCode": "code",
                 "sentAt": "timestamp", "receivedAt": "timestamp", "canceledAt": "timestamp"}


def mistyped_actions() -> tuple[list[dict[str, Any]], int, int]:
    """Acknowledged actions with one field mistyped each:
    (items, decodable ones with a bad field, ones without a usable cmdId)."""
    items, dropped = [], 0
    for field_name, kind in ACTION_FIELDS.items():
        for index, value in enumerate(WRONG[kind]):
            action = {"cmdId": f"bad-{field_name}-{index}", "status": "Acknowledged",
                      "statusCode": 200, "sentAt": ISO_SENT, "receivedAt": ISO_RECEIVED}
            action[field_name] = value
            dropped += field_name == "cmdId"
            items.append(action)
    return items, len(items) - dropped, dropped


async def test_wrong_types_in_every_action_field_count_once_and_the_batch_still_counts(
    make_rig,
) -> None:
    upstream = Upstream()
    bad, mistyped, dropped = mistyped_actions()
    upstream.actions[BATCH_H] = good_actions("h") + bad
    rig = await make_rig(upstream)
    await rig.poll()
    first = await rig.scrape()
    assert up(first, HISTORY_DEVICE) == 1
    exported = sum(v for (d, c, _), v in command_gauges(first).items() if c == BATCH_H)
    assert exported == len(upstream.actions[BATCH_H]) - dropped
    # One problem per mistyped action, plus one per item that could not be decoded at all.
    assert sum(problems(first).values()) == mistyped + dropped
    await rig.poll()
    second = await rig.scrape()
    assert sum(problems(second).values()) == mistyped + dropped  # a re-poll counts nothing
    assert requests(second, "actions", "invalid_body") == 0
    promtool_check(await rig.raw_scrape())


BATCH_FIELDS = {"name": "string", "winDeviceId": "string", "createdAt": "timestamp",
                "updatedAt": "timestamp"}


@pytest.mark.parametrize(("field_name", "value"), [
    *[(f, v) for f, kind in BATCH_FIELDS.items() for v in WRONG[kind]],
    *[("summary", v) for v in ["x", 12, True, [1, 2], [{"status": 5, "count": "n"}]]],
])
async def test_wrong_types_in_a_batch_field_are_a_problem_not_a_failure(
    make_rig, field_name: str, value: Any
) -> None:
    upstream = Upstream()
    documents = {b: upstream.batch(b) for b in (BATCH_H, BATCH_E)}
    for document in documents.values():
        document[field_name] = value
    upstream.batches = documents
    rig = await make_rig(upstream)
    await rig.poll()
    await rig.poll()
    found = await rig.scrape()
    assert up(found, HISTORY_DEVICE) == 1 and up(found, EXPLICIT_DEVICE) == 1
    assert len(command_gauges(found)) == 6  # the actions are the truth
    assert sum(problems(found).values()) == 2  # once per batch, not once per poll
    promtool_check(await rig.raw_scrape())


async def test_problems_of_discovered_device_documents_are_counted_once_per_device(
    make_rig,
) -> None:
    upstream = Upstream()
    upstream.devices = [
        {"id": HISTORY_DEVICE, "displayName": 12, "tags": "x", "lastStatusReportTime": "soon"},
        {"id": EXPLICIT_DEVICE, "displayName": "kiosk", "lastStatusReportTime": ISO_SENT},
        {"id": "65f0c0ffee65f0c0ffee0003", "tags": {"a": 1}},  # discovered, watched too
    ]
    rig = await make_rig(upstream, discover=True)
    for _ in range(3):
        await rig.poll()
    found = await rig.scrape()
    # Once per device and kind however often the list is read: two mistyped fields of one
    # device are one schema problem.
    assert +problems(found) == Counter({"schema": 2, "timestamp": 1})
    assert up(found, HISTORY_DEVICE) == 1


@pytest.mark.parametrize("value", [None, "", 12, ["x"], {"a": 1}, True])
async def test_a_batch_without_a_usable_id(make_rig, value: Any) -> None:
    upstream = Upstream()
    documents = {b: upstream.batch(b) for b in (BATCH_H, BATCH_E)}
    for document in documents.values():
        document["id"] = value
    upstream.batches = documents
    rig = await make_rig(upstream)
    await rig.poll()
    found = await rig.scrape()
    # In a list it is skipped and counted; alone it makes the response undecodable.
    assert problems(found)["schema"] >= 1
    assert requests(found, "command", "invalid_body") >= 1
    assert up(found, HISTORY_DEVICE) == 1 and up(found, EXPLICIT_DEVICE) == 0
    assert {c for _, c, _ in command_gauges(found)} == set()


@pytest.mark.parametrize("meta", [
    {"totalDocs": "many"}, {"hasNextPage": "yes"}, {"limit": -1}, {"page": {"n": 1}},
    {"totalDocs": 10**30}, {"limit": 0, "hasNextPage": None}, {"totalDocs": None},
])
async def test_wrong_types_in_page_fields(make_rig, meta: dict[str, Any]) -> None:
    upstream = Upstream()
    items = good_actions("h")
    upstream.garbage["actions"] = body(envelope(page(items, **meta)))
    rig = await make_rig(upstream)
    await asyncio.wait_for(rig.poll(), timeout=30)
    found = await rig.scrape()
    assert {s for d, c, s in command_gauges(found) if c == BATCH_H} == {
        "Pending", "Awaiting", "Acknowledged"
    }


# --- huge and endless bodies ------------------------------------------------------------------


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_a_body_over_the_cap_is_refused_and_not_retried(make_rig, declared: bool) -> None:
    rig = await make_rig(max_body_bytes=64 * 1024)
    await rig.poll()
    before = await rig.scrape()
    padding = b" " * (2 * 1024 * 1024)
    huge = envelope(page(good_actions("h")))[:-1] + padding + b"}"

    async def serve_huge(request: web.Request) -> web.StreamResponse:
        if declared:
            return web.Response(body=huge, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(huge), 256 * 1024):
            await response.write(huge[start:start + 256 * 1024])
        await response.write_eof()
        return response

    rig.upstream.garbage["actions"] = serve_huge
    await rig.poll()
    after = await rig.scrape()
    # Once per batch: the same resource would be as big again, so it is not retried.
    assert rig.upstream.served["actions"] == 2
    assert requests(after, "actions", "invalid_body") == 2
    assert up(after, HISTORY_DEVICE) == 0
    assert command_gauges(after) == command_gauges(before)


async def test_an_endless_slow_body_hits_the_total_timeout_while_metrics_answer(
    make_rig,
) -> None:
    rig = await make_rig(timeout_seconds=1)
    await rig.poll()
    before = await rig.scrape()

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b'{"status":true,"data":{"items":[')
        while True:  # never ends: only the client's total timeout stops it
            await asyncio.sleep(0.05)
            await response.write(b" ")

    rig.upstream.garbage["actions"] = trickle
    round_task = asyncio.create_task(rig.poll())
    await asyncio.sleep(0.3)
    during = await rig.scrape()  # the exporter serves while the poll is stuck upstream
    assert not round_task.done()
    assert command_gauges(during) == command_gauges(before)
    await asyncio.wait_for(round_task, timeout=30)
    after = await rig.scrape()
    attempts = 2 * rig.exporter.client.max_attempts  # two batches, each retried
    assert requests(after, "actions", "timeout") == rig.upstream.served["actions"] == attempts
    assert up(after, HISTORY_DEVICE) == 0
    assert command_gauges(after) == command_gauges(before)


# --- hostile label values -----------------------------------------------------------------------

HOSTILE = 'q"uote \\ back\nnew line {brace} } # hash \u00e9\u4e2d'


async def test_hostile_and_enormous_label_values_are_escaped_and_truncated(make_rig) -> None:
    upstream = Upstream()
    enormous = "M" * (3 * 1024 * 1024)
    upstream.actions[BATCH_H] = [
        {"cmdId": "h-1", "status": HOSTILE + "status"},
        {"cmdId": "h-2", "status": enormous},
        {"cmdId": "h-3", "status": "Acknowledged", "sentAt": ISO_SENT, "receivedAt": ISO_RECEIVED},
    ]
    documents = {b: upstream.batch(b) for b in (BATCH_H, BATCH_E)}
    documents[BATCH_H]["name"] = HOSTILE + enormous
    documents[BATCH_H]["updatedAt"] = "2026-02-10T10:30:00.000Z"  # not history: read actions
    documents[BATCH_E]["name"] = HOSTILE
    upstream.batches = documents
    rig = await make_rig(upstream)
    await rig.poll()
    await rig.poll()
    raw = await rig.raw_scrape()
    assert len(raw) < 200_000  # megabytes upstream, kilobytes on /metrics
    found = await rig.scrape()  # parses
    statuses = {s for _, c, s in command_gauges(found) if c == BATCH_H}
    assert HOSTILE + "status" in statuses
    assert "M" * MAX_LABEL_VALUE + truncation_mark(enormous) in statuses
    names = {dict(k)["command"]: dict(k)["name"]
             for k in select(found, "applivery_windows_command_info")}
    assert names[BATCH_E] == HOSTILE
    assert names[BATCH_H] == (HOSTILE + enormous)[:MAX_LABEL_VALUE] + truncation_mark(
        HOSTILE + enormous
    )
    assert truncation_mark(enormous).startswith(TRUNCATED)
    assert problems(found)["unknown_status"] == 2 + 1  # two actions, once; the summary once
    promtool_check(raw)


# --- numbers of any length ------------------------------------------------------------------------

HUGE = "9" * 5000  # past Python's int-from-text limit (4,300 digits)
BATCH_X = "65f0c0ffee65f0c0ffee1003"


def raw_number(document: Any, placeholder: str) -> bytes:
    """``document`` as JSON with the string ``placeholder`` written as the bare number HUGE."""
    return json.dumps(document).replace(f'"{placeholder}"', HUGE).encode()


async def ready(rig: Rig) -> int:
    async with rig.session.get(rig.metrics_url.replace("/metrics", "/-/ready")) as response:
        return response.status


@pytest.mark.parametrize("written", ["text", "number"])
async def test_a_5000_digit_total_on_the_device_list_polls_the_devices_all_the_same(
    make_rig, written: str
) -> None:
    upstream = Upstream()
    listing = envelope(page(upstream.devices, totalDocs=HUGE))
    if written == "number":
        listing = raw_number(json.loads(listing), HUGE)
    upstream.garbage["devices"] = body(listing)
    rig = await make_rig(upstream, discover=True)
    await rig.poll()
    found = await rig.scrape()
    assert up(found, HISTORY_DEVICE) == 1 and up(found, EXPLICIT_DEVICE) == 1
    assert rig.upstream.served["devices"] >= 1
    assert problems(found)["schema"] >= 1  # the total that could not be read
    assert await ready(rig) == 200


@pytest.mark.parametrize("written", ["text", "number"])
async def test_a_5000_digit_error_code_on_a_500_is_that_read_failing(
    make_rig, written: str
) -> None:
    error = {"status": False, "error": {"code": HUGE, "message": "boom"}}
    raw = raw_number(error, HUGE) if written == "number" else json.dumps(error).encode()

    async def failing(_: web.Request) -> web.Response:
        return web.Response(status=500, body=raw, content_type="application/json")

    upstream = Upstream()
    upstream.garbage["devices"] = failing  # the look-up of the configured devices
    rig = await make_rig(upstream)
    await rig.poll()
    found = await rig.scrape()
    assert rig.upstream.served["devices"] >= 1
    assert requests(found, "devices", "500") == rig.upstream.served["devices"]
    assert up(found, HISTORY_DEVICE) == 1 and up(found, EXPLICIT_DEVICE) == 1
    assert await ready(rig) == 200
    # On a device's own read, the same answer fails that device alone.
    rig.upstream.garbage["commands"] = failing
    await rig.poll()
    found = await rig.scrape()
    assert up(found, HISTORY_DEVICE) == 0 and up(found, EXPLICIT_DEVICE) == 1


@pytest.mark.parametrize("written", ["text", "number"])
async def test_a_5000_digit_summary_count_is_a_problem_of_its_batch_alone(
    make_rig, written: str
) -> None:
    upstream = Upstream()
    upstream.actions[BATCH_X] = good_actions("x")
    bad = batch_document(BATCH_X, HISTORY_DEVICE, upstream.actions[BATCH_X])
    bad["summary"] = [{"status": "Pending", "count": HUGE}]
    history = envelope(page([bad, upstream.batch(BATCH_H)]))
    if written == "number":
        history = raw_number(json.loads(history), HUGE)
    upstream.garbage["commands"] = body(history)
    rig = await make_rig(upstream)
    await rig.poll()
    found = await rig.scrape()
    assert up(found, HISTORY_DEVICE) == 1
    exported = {(c, s): v for (d, c, s), v in command_gauges(found).items() if d == HISTORY_DEVICE}
    assert {s: v for (c, s), v in exported.items() if c == BATCH_H} == {
        "Pending": 1, "Awaiting": 1, "Acknowledged": 1
    }
    assert problems(found)["schema"] >= 1
