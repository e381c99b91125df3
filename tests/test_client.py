"""The API client: token source, request budget, Retry-After, paging, retries, typed errors.

The pure parts are specified directly; the HTTP behaviour against real aiohttp servers: a few
tiny apps for page shapes the simulator does not produce, and the simulator for the rest.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from fakeclock import FakeClock
from structlog.testing import capture_logs
from test_exporter_e2e import NEW_COMMAND

from exporter.client import (
    BACKOFF_BASE,
    RETRY_AFTER_CAP,
    ApiClient,
    ApiError,
    AuthError,
    NotFoundError,
    SortRejected,
    TokenSource,
    TokenUnavailable,
    UpstreamError,
    parse_retry_after,
)
from exporter.paging import MAX_READS
from exporter.records import SCHEMA, UNKNOWN_STATUS, Action, Device
from exporter.selfmetrics import SelfMetrics
from exporter.simulator import Simulator
from exporter.statuses import STATUS_CLASS

TOKEN = "test-token-5f1b7d3c9a"
ORG = "demo"


def make_client(
    base_url: str,
    *,
    token: TokenSource | None = None,
    metrics: SelfMetrics | None = None,
    clock: FakeClock | None = None,
    **options: Any,
) -> ApiClient:
    clock = clock or FakeClock()
    settings: dict[str, Any] = {
        "organization": ORG,
        "sleep": clock.sleep,
        "monotonic": clock.monotonic,
        "seed": 7,
        **options,
    }
    return ApiClient(
        base_url=base_url,
        token=token or TokenSource(value=TOKEN),
        metrics=metrics or SelfMetrics(),
        **settings,
    )


# --- Retry-After ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("5", 5.0), (" 7 ", 7.0), ("0", 0.0), ("1.5", 1.5), ("-3", 0.0)],
)
def test_retry_after_in_seconds(header: str, seconds: float) -> None:
    assert parse_retry_after(header, now=0.0) == seconds


def test_retry_after_as_http_date_is_measured_from_now() -> None:
    now = datetime(2026, 2, 10, 10, 5, 0, tzinfo=UTC).timestamp()
    later = datetime(2026, 2, 10, 10, 5, 42, tzinfo=UTC)
    assert parse_retry_after(format_datetime(later, usegmt=True), now=now) == 42.0
    assert parse_retry_after("Tue, 10 Feb 2026 10:05:42 GMT", now=now) == 42.0


def test_retry_after_date_in_the_past_means_now() -> None:
    now = datetime(2026, 2, 10, 10, 5, 0, tzinfo=UTC).timestamp()
    assert parse_retry_after("Tue, 10 Feb 2026 10:00:00 GMT", now=now) == 0.0


@pytest.mark.parametrize("header", [None, "", "soon", "nan", "inf", "Tue, 99 Foo 2026"])
def test_unreadable_retry_after_is_none(header: str | None) -> None:
    assert parse_retry_after(header, now=0.0) is None


# --- the token source -------------------------------------------------------------------------


def test_token_from_value_is_stripped() -> None:
    assert TokenSource(value=f"  {TOKEN}\n").get() == TOKEN


def test_token_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\n")
    source = TokenSource(path=str(path))
    assert source.get() == TOKEN
    # An atomic swap, as secret mounts rotate.
    fresh = tmp_path / "token.new"
    fresh.write_text("rotated-token\n")
    os.replace(fresh, path)
    assert source.get() == "rotated-token"


def test_token_file_rewritten_in_place_is_reread(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first")
    source = TokenSource(path=str(path))
    assert source.get() == "first"
    path.write_text("second-token")
    assert source.get() == "second-token"


@pytest.mark.parametrize("content", [None, "", "  \n"])
def test_missing_or_empty_token_file_is_unavailable(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TokenUnavailable) as caught:
        TokenSource(path=str(path)).get()
    assert isinstance(caught.value, AuthError)


def test_vanished_token_file_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    source = TokenSource(path=str(path))
    source.get()
    path.unlink()
    with pytest.raises(TokenUnavailable):
        source.get()


def test_token_source_repr_hides_the_value(tmp_path: Path) -> None:
    assert TOKEN not in repr(TokenSource(value=TOKEN))
    path = tmp_path / "token"
    path.write_text(TOKEN)
    source = TokenSource(path=str(path))
    source.get()
    assert TOKEN not in repr(source)


def test_token_source_needs_a_path_or_a_value() -> None:
    with pytest.raises(ValueError):
        TokenSource()


# --- page shapes, against small apps of our own -----------------------------------------------

ROOT = f"/v1/organizations/{ORG}/mdm/windows/enterprise"
ACTIONS = ROOT + "/devices/{device}/commands/{batch}/actions"


def action_items(count: int) -> list[dict[str, Any]]:
    return [{"cmdId": f"c{n:03d}", "status": "Pending"} for n in range(count)]


def paged_app(
    items: list[dict[str, Any]],
    *,
    cap: int,
    shape: Callable[[list[dict[str, Any]], int, int], Any],
    requests: list[tuple[int, int]],
) -> web.Application:
    """Actions served page by page; ``cap`` bounds the page size whatever is asked."""

    async def handler(request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
        page = int(request.query["page"])
        limit = int(request.query["limit"])
        requests.append((page, limit))
        served = min(limit, cap)
        chunk = items[(page - 1) * served : page * served]
        return web.json_response({"status": True, "data": shape(chunk, page, served)})

    app = web.Application()
    app.router.add_get(ACTIONS, handler)
    return app


@pytest.mark.parametrize(
    ("shape", "cap"),
    [
        # totalDocs alone, a silent cap: the client must learn the page size from the page.
        (lambda chunk, page, served: {"items": chunk, "totalDocs": 23}, 5),
        # totalDocs and limit, the limit below the one asked.
        (lambda chunk, page, served: {"items": chunk, "totalDocs": 23, "limit": served}, 4),
        # hasNextPage only.
        (lambda chunk, page, served: {"items": chunk, "hasNextPage": page * served < 23}, 6),
        # a bare array: a short page ends the list.
        (lambda chunk, page, served: chunk, 100),
    ],
    ids=["total-docs", "total-and-limit", "has-next-page", "bare-array"],
)
async def test_paging_reads_every_item_once_whatever_the_page_shape(
    aiohttp_server: Any, shape: Callable[..., Any], cap: int
) -> None:
    items = action_items(23)
    requests: list[tuple[int, int]] = []
    server = await aiohttp_server(paged_app(items, cap=cap, shape=shape, requests=requests))
    async with make_client(str(server.make_url("/v1")), page_size=10) as client:
        actions = await client.list_actions("d1", "b1")
    assert [a.cmd_id for a in actions] == [item["cmdId"] for item in items]
    assert [page for page, _ in requests] == list(range(1, len(requests) + 1))
    assert len(requests) <= -(-23 // min(cap, 10)) + 1


async def test_page_cap_bounds_the_requests(aiohttp_server: Any) -> None:
    requests: list[tuple[int, int]] = []
    app = paged_app(
        action_items(50),
        cap=5,
        shape=lambda chunk, page, served: {"items": chunk, "hasNextPage": True},
        requests=requests,
    )
    server = await aiohttp_server(app)
    async with make_client(str(server.make_url("/v1")), page_size=5, max_pages=3) as client:
        actions = await client.list_actions("d1", "b1")
    assert len(requests) == 3
    assert len(actions) == 15


async def test_endless_duplicates_return_the_union_without_looping(aiohttp_server: Any) -> None:
    # Every page repeats the first one: the reads never agree, the client gives up in bounds.
    requests: list[tuple[int, int]] = []
    items = action_items(3)

    def shape(chunk: list[dict[str, Any]], page: int, served: int) -> Any:
        return {"items": items, "totalDocs": 6, "limit": 3}

    server = await aiohttp_server(paged_app(items, cap=3, shape=shape, requests=requests))
    async with make_client(str(server.make_url("/v1")), page_size=3) as client:
        actions = await client.list_actions("d1", "b1")
    assert sorted(a.cmd_id for a in actions) == ["c000", "c001", "c002"]
    # A few reads of the announced pages, and of one past the end when items are missing.
    assert len(requests) <= MAX_READS * 3


# --- against the simulator --------------------------------------------------------------------


class Simulated:
    """A simulator behind a real aiohttp server, and a way to build clients for it."""

    def __init__(self, sim: Simulator, base_url: str) -> None:
        self.sim = sim
        self.base_url = base_url
        self.metrics = SelfMetrics()
        self.clock = FakeClock()

    def client(self, **options: Any) -> ApiClient:
        options.setdefault("metrics", self.metrics)
        options.setdefault("clock", self.clock)
        return make_client(self.base_url, **options)

    def served(self, route: str, status: int) -> int:
        return self.sim.stats.counts[(route, status)]

    def batch_with_actions(self, at_least: int = 1) -> tuple[str, str]:
        for device in self.sim.fleet.device_ids():
            for batch in self.sim.fleet.batch_ids(device):
                if sum(self.sim.fleet.grouped_counts(device, batch).values()) >= at_least:
                    return device, batch
        raise AssertionError(f"no batch with {at_least} actions")


async def simulated(make_simulator_server: Any, **options: Any) -> Simulated:
    """The shared simulator fixture (tests/conftest.py), with this module's token."""
    sim, base_url = await make_simulator_server(
        **{"seed": 3, "devices": 6, "organization": ORG, "token": TOKEN, **options}
    )
    return Simulated(sim, base_url)


@pytest.fixture
async def sim(make_simulator_server: Any) -> Simulated:
    return await simulated(make_simulator_server)


def counts(actions: list[Action]) -> dict[str, int]:
    return dict(Counter(action.status for action in actions))


async def test_lists_every_device(sim: Simulated) -> None:
    async with sim.client(page_size=4) as client:
        devices = await client.list_devices()
    assert [d.id for d in devices] == sim.sim.fleet.device_ids()
    model = sim.sim.fleet.device(devices[0].id)
    assert devices[0].name == model.name
    assert devices[0].serial == model.serial


async def test_lists_devices_by_tag_and_segment(sim: Simulated) -> None:
    models = [sim.sim.fleet.device(d) for d in sim.sim.fleet.device_ids()]
    tag = next(tag for model in models for tag in model.tags)
    segment = models[0].segment
    async with sim.client() as client:
        tagged = await client.list_devices(tags=[tag])
        in_segment = await client.list_devices(segment=segment)
    assert {d.id for d in tagged} == {m.id for m in models if tag in m.tags}
    assert {d.id for d in in_segment} == {m.id for m in models if m.segment == segment}


async def test_lists_recent_checkins_newest_first_and_stops_at_older_ones(
    sim: Simulated,
) -> None:
    models = [sim.sim.fleet.device(d) for d in sim.sim.fleet.device_ids()]
    reports = sorted((m.last_report for m in models if m.last_report), reverse=True)
    horizon = reports[len(reports) // 2]

    def older(device: Device) -> bool:
        return device.last_status_report is None or device.last_status_report < horizon

    async with sim.client(page_size=2) as client:
        recent = await client.list_devices(sort="lastStatusReportTime:desc", stop=older)
    expected = sorted(
        (m for m in models if m.last_report and m.last_report >= horizon),
        key=lambda m: m.last_report,
        reverse=True,
    )
    assert [d.id for d in recent] == [m.id for m in expected]
    assert 0 < len(recent) < len(models)


async def test_batch_history_is_newest_first_with_summaries(sim: Simulated) -> None:
    device = sim.sim.fleet.device_ids()[0]
    async with sim.client(page_size=2) as client:
        batches = await client.list_batches(device, max_items=100)
    assert {b.id for b in batches} == set(sim.sim.fleet.batch_ids(device))
    created = [b.created_at for b in batches]
    assert created == sorted(created, reverse=True)
    for batch in batches:
        assert dict(batch.summary or ()) == sim.sim.fleet.grouped_counts(device, batch.id)
        assert batch.device_id == device


async def test_batch_history_stops_at_max_items_and_since(sim: Simulated) -> None:
    device = sim.sim.fleet.device_ids()[0]
    async with sim.client(page_size=2) as client:
        everything = await client.list_batches(device, max_items=100)
        first_two = await client.list_batches(device, max_items=2)
        cutoff = everything[2].created_at
        assert cutoff is not None
        recent = await client.list_batches(device, max_items=100, since=cutoff)
    assert first_two == everything[:2]
    assert recent == [b for b in everything if b.created_at is not None and b.created_at >= cutoff]
    assert len(recent) < len(everything)


async def test_history_by_serial_number(sim: Simulated) -> None:
    device = sim.sim.fleet.device_ids()[1]
    serial = sim.sim.fleet.device(device).serial
    async with sim.client() as client:
        batches = await client.list_batches(serial, max_items=100)
    assert {b.id for b in batches} == set(sim.sim.fleet.batch_ids(device))


async def test_batch_details_match_the_fleet(sim: Simulated) -> None:
    device, batch_id = sim.batch_with_actions()
    async with sim.client() as client:
        batch = await client.get_batch(device, batch_id)
    assert batch.id == batch_id
    assert dict(batch.summary or ()) == sim.sim.fleet.grouped_counts(device, batch_id)


async def test_actions_match_the_fleet(sim: Simulated) -> None:
    device, batch_id = sim.batch_with_actions(3)
    async with sim.client() as client:
        actions = await client.list_actions(device, batch_id)
    assert counts(actions) == sim.sim.fleet.grouped_counts(device, batch_id)
    assert len({a.cmd_id for a in actions}) == len(actions)
    for action in actions:
        assert not action.problems
        if action.received_at is not None and action.sent_at is not None:
            assert action.received_at >= action.sent_at


async def test_pages_to_the_end_when_upstream_caps_the_limit(make_simulator_server: Any) -> None:
    sim = await simulated(make_simulator_server, max_limit=4, actions_per_batch=(17, 17))
    device, batch_id = sim.batch_with_actions(17)
    async with sim.client(page_size=100) as client:
        actions = await client.list_actions(device, batch_id)
    assert counts(actions) == sim.sim.fleet.grouped_counts(device, batch_id)
    assert len({a.cmd_id for a in actions}) == 17
    assert sim.served("actions", 200) == 5  # 4+4+4+4+1, no extra read


@pytest.mark.parametrize("probability", [1.0, 0.5])
async def test_shifting_pages_lose_and_duplicate_nothing(
    make_simulator_server: Any, probability: float
) -> None:
    sim = await simulated(make_simulator_server, max_limit=3, actions_per_batch=(14, 14))
    device, batch_id = sim.batch_with_actions(14)
    expected = sim.sim.fleet.grouped_counts(device, batch_id)
    sim.sim.faults.set(f"shifting_pages={probability}")
    async with sim.client(page_size=3) as client:
        for _ in range(3):
            actions = await client.list_actions(device, batch_id)
            assert len({a.cmd_id for a in actions}) == len(actions) == 14
            assert counts(actions) == expected


async def test_metrics_count_every_attempt_per_endpoint_and_code(sim: Simulated) -> None:
    device, batch_id = sim.batch_with_actions()
    async with sim.client(page_size=2) as client:
        await client.list_devices()
        await client.list_batches(device, max_items=100)
        await client.get_batch(device, batch_id)
        await client.list_actions(device, batch_id)
        with pytest.raises(NotFoundError):
            await client.get_batch(device, "0" * 24)
    observed = sim.metrics.api_requests
    for endpoint in ("devices", "commands", "command", "actions"):
        assert observed[(endpoint, "200")] == sim.served(endpoint, 200) > 0
        assert sim.metrics.api_durations[endpoint].count == sim.sim.stats.total(endpoint)
    assert observed[("command", "404")] == sim.served("command", 404) == 1
    assert sum(observed.values()) == sim.sim.stats.total()


# --- faults -----------------------------------------------------------------------------------


def clear_after(sim: Simulated, sleeps: int) -> None:
    """The fault ends as the client begins its ``sleeps``-th wait."""

    def hook() -> None:
        if len(sim.clock.sleeps) >= sleeps:
            sim.sim.faults.clear()

    sim.clock.on_sleep = hook


async def test_server_errors_are_retried_with_backoff(sim: Simulated) -> None:
    device, batch_id = sim.batch_with_actions()
    sim.sim.faults.set("error500")
    clear_after(sim, 2)
    async with sim.client() as client:
        batch = await client.get_batch(device, batch_id)
        assert client.budget.throttles == 0
    assert batch.id == batch_id
    assert sim.served("command", 500) == 2
    assert sim.served("command", 200) == 1
    assert sim.metrics.api_requests[("command", "500")] == 2
    # Full jitter below a doubling ceiling.
    assert len(sim.clock.sleeps) == 2
    assert 0 <= sim.clock.sleeps[0] <= BACKOFF_BASE
    assert 0 <= sim.clock.sleeps[1] <= 2 * BACKOFF_BASE


@pytest.mark.parametrize(("fault", "status"), [("error500", 500), ("error503", 503)])
async def test_server_errors_fail_after_max_attempts(
    sim: Simulated, fault: str, status: int
) -> None:
    device, batch_id = sim.batch_with_actions()
    sim.sim.faults.set(fault)
    async with sim.client(max_attempts=3) as client:
        with pytest.raises(UpstreamError) as caught:
            await client.get_batch(device, batch_id)
        # A 503 without Retry-After is an outage, not a throttle.
        assert client.budget.throttles == 0
    assert caught.value.status == status
    assert caught.value.endpoint == "command"
    assert sim.served("command", status) == 3
    assert sim.metrics.api_requests[("command", str(status))] == 3
    assert len(sim.clock.sleeps) == 2


@pytest.mark.parametrize(
    ("spec", "pause", "slack"),
    [
        ("throttle:7", 7, 0),
        ("throttle_date:9", 9, 1),  # HTTP dates have whole seconds
        ("error503:5", 5, 0),
        ("throttle:4000", RETRY_AFTER_CAP, 0),
    ],
)
async def test_retry_after_pauses_the_client_and_shrinks_its_rate(
    sim: Simulated, spec: str, pause: float, slack: float
) -> None:
    device, batch_id = sim.batch_with_actions()
    sim.sim.faults.set(spec)
    clear_after(sim, 1)
    async with sim.client() as client:
        batch = await client.get_batch(device, batch_id)
        assert client.budget.throttles == 1
        assert client.budget.effective_rate_per_hour < 9000
    assert batch.id == batch_id
    assert sim.clock.sleeps[0] == pytest.approx(pause, abs=slack + 1e-6)
    assert sim.metrics.budget_requests_per_hour < 9000
    assert sim.sim.stats.total("command") == 2


async def test_throttle_without_retry_after_backs_off(sim: Simulated) -> None:
    device, batch_id = sim.batch_with_actions()
    sim.sim.faults.set("throttle_bare")
    clear_after(sim, 1)
    async with sim.client() as client:
        await client.get_batch(device, batch_id)
        assert client.budget.throttles == 1
    assert sim.served("command", 429) == 1
    assert sim.metrics.api_requests[("command", "429")] == 1
    assert sim.clock.sleeps


async def test_a_pause_holds_back_every_caller(sim: Simulated) -> None:
    device, batch_id = sim.batch_with_actions()
    sim.sim.faults.set("throttle:20")
    answered_during_pause: list[int] = []

    def hook() -> None:
        if len(sim.clock.sleeps) == 1:
            answered_during_pause.append(
                sim.sim.stats.total()
                - sim.served("command", 429)
                - sim.served("devices", 429)
                - sim.served("actions", 429)
            )
            sim.sim.faults.clear()

    sim.clock.on_sleep = hook
    async with sim.client() as client:
        await asyncio.gather(
            client.get_batch(device, batch_id),
            client.list_devices(),
            client.list_actions(device, batch_id),
        )
        assert client.budget.throttles == 3
        # One overload, one halving, however many requests were in flight.
        assert 4500 <= client.budget.effective_rate_per_hour < 9000
    assert sim.served("command", 429) == sim.served("devices", 429) == 1
    assert sim.served("actions", 429) == 1
    assert sim.clock.sleeps[0] == 20  # one shared pause ...
    assert all(pause < 20 for pause in sim.clock.sleeps[1:])
    assert answered_during_pause == [0]  # ... that every caller waited out


async def test_connection_reset_is_retried(sim: Simulated) -> None:
    device, batch_id = sim.batch_with_actions()
    sim.sim.faults.set("reset")
    clear_after(sim, 1)
    async with sim.client() as client:
        await client.get_batch(device, batch_id)
    assert sim.metrics.api_requests[("command", "connection")] == 1
    assert sim.metrics.api_requests[("command", "200")] == 1


@pytest.mark.parametrize("fault", ["invalid_json", "truncated_json"])
async def test_undecodable_bodies_are_invalid_after_retries(sim: Simulated, fault: str) -> None:
    device, batch_id = sim.batch_with_actions()
    sim.sim.faults.set(fault)
    async with sim.client(max_attempts=3) as client:
        with pytest.raises(UpstreamError) as caught:
            await client.list_actions(device, batch_id)
    assert "invalid body" in caught.value.reason
    assert sim.served("actions", 200) == 3
    assert sim.metrics.api_requests[("actions", "invalid_body")] == 3
    assert sim.metrics.api_requests[("actions", "200")] == 0


async def test_latency_is_measured(sim: Simulated) -> None:
    device, batch_id = sim.batch_with_actions()
    sim.sim.faults.set("latency:0.05")
    async with sim.client(monotonic=time.monotonic) as client:
        await client.get_batch(device, batch_id)
    histogram = sim.metrics.api_durations["command"]
    assert histogram.count == 1
    assert histogram.sum >= 0.05


async def test_slow_body_ends_at_the_request_timeout(sim: Simulated) -> None:
    device, batch_id = sim.batch_with_actions()
    sim.sim.faults.set("slow_body:100")
    async with sim.client(timeout_seconds=0.2, max_attempts=2) as client:
        with pytest.raises(UpstreamError) as caught:
            await client.get_batch(device, batch_id)
    assert "timeout" in caught.value.reason
    assert sim.metrics.api_requests[("command", "timeout")] == 2


async def test_huge_body_is_refused_past_the_cap(sim: Simulated) -> None:
    device, batch_id = sim.batch_with_actions()
    sim.sim.faults.set("huge_body:1")
    async with sim.client(max_body_bytes=256 * 1024) as client:
        with pytest.raises(UpstreamError) as caught:
            await client.get_batch(device, batch_id)
    assert caught.value.reason == "body too large"
    assert sim.served("command", 200) == 1  # the same answer would come again: no retry
    assert sim.metrics.api_requests[("command", "invalid_body")] == 1
    async with sim.client(max_body_bytes=2 * 2**20) as client:
        assert (await client.get_batch(device, batch_id)).id == batch_id


async def test_doc_style_timestamps_decode_to_the_same_moments(sim: Simulated) -> None:
    device, batch_id = sim.batch_with_actions(3)
    async with sim.client() as client:
        plain = await client.list_actions(device, batch_id)
        sim.sim.faults.set("doc_timestamps")
        documented = await client.list_actions(device, batch_id)
        url = f"{sim.base_url}/organizations/{ORG}/mdm/windows/enterprise/devices/{device}"
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"{url}/commands/{batch_id}/actions", headers={"Authorization": f"Bearer {TOKEN}"}
            ) as response,
        ):
            raw = await response.read()
    assert re.search(rb'"sentAt":"\d{4}-\d\d-\d\dT\d\d: \d\d: ', raw)  # the fault is on
    assert any(a.sent_at is not None for a in plain)
    assert documented == plain


async def test_unknown_statuses_are_kept_and_named(sim: Simulated) -> None:
    sim.sim.faults.set("unknown_status")
    async with sim.client() as client:
        for device in sim.sim.fleet.device_ids():
            for batch in await client.list_batches(device, max_items=100):
                actions = await client.list_actions(device, batch.id)
                assert counts(actions) == sim.sim.fleet.grouped_counts(device, batch.id)
                assert dict(batch.summary or ()) == sim.sim.fleet.grouped_counts(device, batch.id)
                unknown = [a for a in actions if a.status not in STATUS_CLASS]
                for action in unknown:
                    assert action.problems == {UNKNOWN_STATUS}
                if unknown:
                    assert UNKNOWN_STATUS in batch.problems
                    return
    raise AssertionError("the fault renamed no status")


async def test_missing_fields_drop_no_record(sim: Simulated) -> None:
    sim.sim.faults.set("missing_fields")
    without_summary = without_code = 0
    async with sim.client() as client:
        devices = await client.list_devices()
        assert len(devices) == len(sim.sim.fleet.device_ids())
        for device in sim.sim.fleet.device_ids():
            batches = await client.list_batches(device, max_items=100)
            assert {b.id for b in batches} == set(sim.sim.fleet.batch_ids(device))
            without_summary += sum(b.summary is None for b in batches)
            for batch in batches:
                actions = await client.list_actions(device, batch.id)
                assert counts(actions) == sim.sim.fleet.grouped_counts(device, batch.id)
                without_code += sum(
                    a.status_code is None and a.received_at is not None for a in actions
                )
    assert without_summary and without_code  # the fault did drop fields


# --- typed errors, the token ------------------------------------------------------------------


async def test_invalid_token_is_an_auth_error_and_not_retried(sim: Simulated) -> None:
    device, batch_id = sim.batch_with_actions()
    sim.sim.token = "another-token"
    async with sim.client() as client:
        with pytest.raises(AuthError) as caught:
            await client.get_batch(device, batch_id)
    assert caught.value.code == 4004
    assert sim.served("command", 401) == 1
    assert sim.metrics.api_requests[("command", "401")] == 1
    assert sim.clock.sleeps == []


class BlankToken:
    """A token source that yields nothing, so the header goes out without a token."""

    def get(self) -> str:
        return ""

    def invalidate(self) -> None:
        pass


async def test_missing_token_is_an_auth_error_and_not_retried(sim: Simulated) -> None:
    device, batch_id = sim.batch_with_actions()
    async with sim.client(token=BlankToken()) as client:
        with pytest.raises(AuthError) as caught:
            await client.list_actions(device, batch_id)
    assert caught.value.code == 4002
    assert sim.served("actions", 401) == 1


@pytest.mark.parametrize("unknown", ["device", "batch"])
async def test_unknown_entity_is_not_found_and_not_retried(sim: Simulated, unknown: str) -> None:
    device, batch_id = sim.batch_with_actions()
    if unknown == "device":
        device = "NOSUCHSERIAL42"
    else:
        batch_id = "0" * 24
    async with sim.client() as client:
        with pytest.raises(NotFoundError) as caught:
            await client.list_actions(device, batch_id)
    assert caught.value.code == 3001
    assert sim.served("actions", 404) == 1
    assert sim.clock.sleeps == []


async def test_malformed_id_is_a_final_upstream_error(sim: Simulated) -> None:
    device = sim.sim.fleet.device_ids()[0]
    async with sim.client() as client:
        with pytest.raises(UpstreamError) as caught:
            await client.get_batch(device, "not-a-command-id")
    assert caught.value.status == 400
    assert sim.served("command", 400) == 1
    assert sim.clock.sleeps == []


async def test_rotated_token_file_takes_effect_without_restart(
    sim: Simulated, tmp_path: Path
) -> None:
    device, batch_id = sim.batch_with_actions()
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    async with sim.client(token=TokenSource(path=str(path))) as client:
        await client.get_batch(device, batch_id)
        sim.sim.token = "rotated-token"
        with pytest.raises(AuthError):
            await client.get_batch(device, batch_id)
        fresh = tmp_path / "token.new"
        fresh.write_text("rotated-token\n")
        os.replace(fresh, path)
        assert (await client.get_batch(device, batch_id)).id == batch_id
    assert sim.served("command", 200) == 2


async def test_a_401_is_retried_once_when_the_token_file_changed_meanwhile(
    sim: Simulated, tmp_path: Path
) -> None:
    device, batch_id = sim.batch_with_actions()
    path = tmp_path / "token"
    path.write_text("old-token-123\n")
    async with sim.client(token=TokenSource(path=str(path))) as client:
        sim.sim.token = "new-token-456"
        with pytest.raises(AuthError):  # the file still holds the old token: final
            await client.get_batch(device, batch_id)
        assert sim.served("command", 401) == 1
        # Rotated in place within the file's timestamp granularity: the client cannot see
        # it before sending, only after the 401.
        stat = path.stat()
        with open(path, "r+") as handle:
            handle.write("new-token-456\n")
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert (await client.get_batch(device, batch_id)).id == batch_id
    assert sim.served("command", 401) == 2  # one per call, no storm
    assert sim.served("command", 200) == 1


async def test_vanished_token_file_fails_before_any_request(sim: Simulated, tmp_path: Path) -> None:
    device, batch_id = sim.batch_with_actions()
    async with sim.client(token=TokenSource(path=str(tmp_path / "absent"))) as client:
        with pytest.raises(TokenUnavailable) as caught:
            await client.get_batch(device, batch_id)
    assert caught.value.endpoint == "command"
    assert sim.sim.stats.total() == 0


async def test_the_token_never_reaches_logs_errors_or_metrics(sim: Simulated) -> None:
    device, batch_id = sim.batch_with_actions()
    output = io.StringIO()
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.PrintLoggerFactory(file=output),
        cache_logger_on_first_use=False,
    )
    errors: list[ApiError] = []
    try:
        async with sim.client(max_attempts=2) as client:
            for spec in ("error500", "throttle:1", "reset", "invalid_json", "huge_body:1"):
                sim.sim.faults.set(spec)
                try:
                    await client.get_batch(device, batch_id)
                except ApiError as exc:
                    errors.append(exc)
            sim.sim.faults.clear()
            sim.sim.token = "another-token"
            with pytest.raises(AuthError) as caught:
                await client.list_actions(device, batch_id)
            errors.append(caught.value)
            described = repr(client) + repr(client.budget)
    finally:
        structlog.reset_defaults()
    logged = output.getvalue()
    assert "api_retry" in logged and "api_throttled" in logged  # the capture works
    assert TOKEN not in logged
    assert len(errors) >= 4
    for error in errors:
        assert TOKEN not in str(error) and TOKEN not in repr(error)
        assert all(TOKEN not in str(arg) for arg in error.args)
    assert TOKEN not in described
    assert all(TOKEN not in part for key in sim.metrics.api_requests for part in key)


# --- the request budget, measured at the simulator --------------------------------------------


async def test_budget_is_never_exceeded_in_a_burst(sim: Simulated) -> None:
    device = sim.sim.fleet.device_ids()[0]
    batch_ids = sim.sim.fleet.batch_ids(device)
    start = sim.clock.now
    rate = 360 / 3600  # one request every ten seconds; the bucket holds one
    seen: list[tuple[float, int]] = []
    sim.clock.on_sleep = lambda: seen.append((sim.clock.now, sim.sim.stats.total()))
    calls = batch_ids * 3
    async with sim.client(requests_per_hour=360, max_concurrency=4) as client:
        await asyncio.gather(*(client.get_batch(device, b) for b in calls))
        assert client.budget.spent == len(calls)
    served = sim.sim.stats.total()
    assert served == len(calls)
    assert seen, "the budget never made anyone wait"
    for now, count in seen:
        assert count <= 1 + rate * (now - start) + 1e-9
    assert sim.clock.now - start >= (served - 1) / rate - 1e-6


# --- the session and concurrency, against small apps ------------------------------------------

COMMAND = ROOT + "/devices/{device}/commands/{batch}"


async def test_concurrency_is_bounded(aiohttp_server: Any) -> None:
    in_flight = 0
    peak = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return web.json_response({"status": True, "data": {"id": request.match_info["batch"]}})

    app = web.Application()
    app.router.add_get(COMMAND, handler)
    server = await aiohttp_server(app)
    async with make_client(str(server.make_url("/v1")), max_concurrency=3) as client:
        batches = await asyncio.gather(*(client.get_batch("d1", f"{n:024x}") for n in range(12)))
    assert [b.id for b in batches] == [f"{n:024x}" for n in range(12)]
    assert peak == 3


async def test_error_envelope_on_a_success_status_is_an_invalid_body(aiohttp_server: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"status": False, "error": {"code": 9, "message": "odd"}})

    app = web.Application()
    app.router.add_get(COMMAND, handler)
    server = await aiohttp_server(app)
    metrics = SelfMetrics()
    async with make_client(str(server.make_url("/v1")), metrics=metrics, max_attempts=2) as client:
        with pytest.raises(UpstreamError):
            await client.get_batch("d1", "b1")
    assert metrics.api_requests[("command", "invalid_body")] == 2


async def test_streamed_body_without_length_is_capped(aiohttp_server: Any) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b'{"status":true,"data":{"id":"b1","name":"')
        for _ in range(64):
            await response.write(b"x" * 16384)
        await response.write(b'"}}')
        return response

    app = web.Application()
    app.router.add_get(COMMAND, handler)
    server = await aiohttp_server(app)
    base = str(server.make_url("/v1"))
    async with make_client(base, max_body_bytes=256 * 1024) as client:
        with pytest.raises(UpstreamError) as caught:
            await client.get_batch("d1", "b1")
    assert caught.value.reason == "body too large"
    async with make_client(base, max_body_bytes=2 * 2**20) as client:
        assert (await client.get_batch("d1", "b1")).id == "b1"


async def test_a_given_session_is_used_and_left_open(sim: Simulated) -> None:
    device, batch_id = sim.batch_with_actions()
    async with aiohttp.ClientSession() as session:
        async with sim.client(session=session) as client:
            await client.get_batch(device, batch_id)
        assert not session.closed


async def test_items_inserted_at_the_head_while_paging_are_neither_lost_nor_doubled(
    aiohttp_server: Any,
) -> None:
    # How a live listing shifts: new items arrive first, everything moves down, the total grows.
    items = action_items(11)
    inserted = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal inserted
        page = int(request.query["page"])
        limit = int(request.query["limit"])
        if page > 1 and inserted < 4:
            inserted += 1
            items.insert(0, {"cmdId": f"new{inserted}", "status": "Pending"})
        chunk = items[(page - 1) * limit : page * limit]
        meta = {"totalDocs": len(items), "limit": limit, "hasNextPage": page * limit < len(items)}
        return web.json_response({"status": True, "data": {"items": chunk, **meta}})

    app = web.Application()
    app.router.add_get(ACTIONS, handler)
    server = await aiohttp_server(app)
    async with make_client(str(server.make_url("/v1")), page_size=3) as client:
        actions = await client.list_actions("d1", "b1")
    ids = [a.cmd_id for a in actions]
    assert len(ids) == len(set(ids))
    assert {f"c{n:03d}" for n in range(11)} <= set(ids)


# --- re-polls of unchanged pages ----------------------------------------------------------------


def changing_app(pages: list[dict[str, Any]]) -> web.Application:
    """Serves ``pages[0]`` as the one page of actions; tests swap it between polls."""

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"status": True, "data": pages[0]})

    app = web.Application()
    app.router.add_get(ACTIONS, handler)
    return app


async def test_repolls_reuse_the_decoding_only_while_the_body_is_the_same(
    aiohttp_server: Any,
) -> None:
    undecodable = {"status": "Pending"}  # no cmdId
    first = {"items": [*action_items(3), undecodable], "totalDocs": 4}
    pages = [first]
    server = await aiohttp_server(changing_app(pages))
    metrics = SelfMetrics()
    async with make_client(str(server.make_url("/v1")), metrics=metrics) as client:
        before = await client.list_actions("d1", "b1")
        again = await client.list_actions("d1", "b1")
        assert again == before
        # The same response again is not news: its problem is counted once.
        assert metrics.parse_problems[SCHEMA] == 1
        pages[0] = {
            "items": [{"cmdId": "c000", "status": "Acknowledged"}, undecodable],
            "totalDocs": 2,
        }
        changed = await client.list_actions("d1", "b1")
    assert [(a.cmd_id, a.status) for a in changed] == [("c000", "Acknowledged")]
    assert metrics.parse_problems[SCHEMA] == 2
    assert metrics.api_requests[("actions", "200")] == 3


async def test_without_the_memo_every_response_is_decoded(aiohttp_server: Any) -> None:
    pages = [{"items": [*action_items(2), {"status": "Pending"}], "totalDocs": 3}]
    server = await aiohttp_server(changing_app(pages))
    metrics = SelfMetrics()
    base = str(server.make_url("/v1"))
    async with make_client(base, metrics=metrics, memo_records=0) as client:
        first = await client.list_actions("d1", "b1")
        second = await client.list_actions("d1", "b1")
    assert first == second
    assert first[0] is not second[0]
    assert metrics.parse_problems[SCHEMA] == 2


async def test_the_memo_holds_a_bounded_number_of_records(aiohttp_server: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"status": True, "data": {"items": action_items(3)}})

    app = web.Application()
    app.router.add_get(ACTIONS, handler)
    server = await aiohttp_server(app)
    async with make_client(str(server.make_url("/v1")), memo_records=6) as client:
        first = {b: await client.list_actions("d1", b) for b in ("b1", "b2")}
        assert (await client.list_actions("d1", "b1"))[0] is first["b1"][0]  # remembered
        await client.list_actions("d1", "b3")  # 9 records: the least recent page (b2) goes
        assert (await client.list_actions("d1", "b1"))[0] is first["b1"][0]
        assert (await client.list_actions("d1", "b2"))[0] is not first["b2"][0]


async def test_repolled_simulator_pages_follow_the_fleet(sim: Simulated) -> None:
    device = sim.sim.fleet.device_ids()[0]
    async with sim.client() as client:
        first = {b.id: b for b in await client.list_batches(device, max_items=100)}
        batch_id = sim.sim.fleet.create_batch(
            device,
            [
                {
                    "config": {
                        "path": "./Vendor/MSFT/Policy/Config/A/B",
                        "action": "Get",
                        "format": "int",
                    }
                }
            ],
        )
        second = {b.id: b for b in await client.list_batches(device, max_items=100)}
    assert batch_id not in first
    assert set(second) == set(first) | {batch_id}


# --- history whatever upstream does with sort (issue 16) -----------------------------------------

HISTORY = ("commands", "sort")
VERDICT_OF_MODE = {"honour": "honoured", "ignore": "ignored", "reject": "rejected"}


def newest(sim: Simulated, device: str, count: int) -> list[str]:
    """The ``count`` most recently created batches of ``device``, from the fleet itself."""
    batches = sim.sim.fleet.device(device).batches
    return [b.id for b in sorted(batches, key=lambda b: b.created, reverse=True)][:count]


def history_requests(sim: Simulated) -> int:
    return sim.sim.stats.total("commands")


@pytest.mark.parametrize(
    ("mode", "page_size", "first_read", "later_read"),
    [
        ("honour", 10, 2, 2),  # newest first: two pages hold the 20 newest
        ("ignore", 10, 3, 3),  # oldest first: every page (the tail starts on page 2)
        ("reject", 10, 3, 2),  # a 400, then unsorted (upstream's default, newest first)
        ("honour", 100, 1, 1),
        ("ignore", 100, 1, 1),  # one page holds the whole history: sorted here
        ("reject", 100, 2, 1),
    ],
)
async def test_a_new_batch_beyond_max_per_device_is_read_whatever_the_sort(
    make_simulator_server: Any, mode: str, page_size: int, first_read: int, later_read: int
) -> None:
    sim = await simulated(make_simulator_server, devices=1, batches_per_device=25,
                          sort_mode={"commands": mode})
    device = sim.sim.fleet.device_ids()[0]
    assert len(sim.sim.fleet.batch_ids(device)) >= 25
    async with sim.client(page_size=page_size) as client:
        before = await client.list_batches(device, max_items=20)
        assert history_requests(sim) == first_read
        assert [b.id for b in before] == newest(sim, device, 20)
        created = sim.sim.fleet.create_batch(device, NEW_COMMAND)
        for read in (1, 2):
            after = await client.list_batches(device, max_items=20)
            assert history_requests(sim) == first_read + read * later_read
            assert after[0].id == created
            assert [b.id for b in after] == newest(sim, device, 20)
        assert client.query_verdicts[HISTORY] == VERDICT_OF_MODE[mode]
    assert sim.served("commands", 400) == (mode == "reject")  # refused once, then not sent


async def test_a_long_history_oldest_first_is_read_from_its_last_pages(
    make_simulator_server: Any,
) -> None:
    sim = await simulated(make_simulator_server, devices=1, batches_per_device=95,
                          sort_mode="ignore")
    device = sim.sim.fleet.device_ids()[0]
    total = len(sim.sim.fleet.batch_ids(device))
    async with sim.client(page_size=10) as client:
        recent = await client.list_batches(device, max_items=20)
        assert [b.id for b in recent] == newest(sim, device, 20)
        # Page 1 shows the order; the 20 newest lie on the last three pages at most.
        assert history_requests(sim) == 1 + (total // 10 + 1) - ((total - 20) // 10 + 1) + 1
        assert history_requests(sim) < -(-total // 10)  # fewer than reading every page
        cutoff = recent[4].created_at
        assert cutoff is not None
        since = await client.list_batches(device, max_items=20, since=cutoff)
    assert [b.id for b in since] == newest(sim, device, 5)


async def test_the_sort_verdict_is_logged_once_and_probed_again_hourly(sim: Simulated) -> None:
    device = sim.sim.fleet.device_ids()[0]
    sim.sim.set_dialect(sort_mode="ignore")
    with capture_logs() as logs:
        async with sim.client(page_size=2) as client:
            await client.list_batches(device, max_items=3)
            sent = sim.sim.stats.dialect[("commands", "sort_ignored")]
            for _ in range(2):
                await client.list_batches(device, max_items=3)
            assert client.query_verdicts[HISTORY] == "ignored"
            assert sim.sim.stats.dialect[("commands", "sort_ignored")] == sent  # not sent again
            sim.sim.set_dialect(sort_mode="honour")
            sim.clock.now += 1800
            await client.list_batches(device, max_items=3)
            assert client.query_verdicts[HISTORY] == "ignored"  # not asked again yet
            sim.clock.now += 1800
            batches = await client.list_batches(device, max_items=3)
            assert client.query_verdicts[HISTORY] == "honoured"
            await client.list_batches(device, max_items=3)
    assert [b.id for b in batches] == newest(sim, device, 3)
    verdicts = [(e["verdict"], e["log_level"]) for e in logs if e["event"] == "api_query_verdict"]
    assert verdicts == [("ignored", "warning"), ("honoured", "info")]


async def test_a_probe_whose_read_tells_nothing_goes_to_the_next_read(sim: Simulated) -> None:
    # The sort is ignored, then upstream mends. The hourly probe falls on a read that fails:
    # it tells nothing of the sort, so the next read probes, not one an hour later.
    device = sim.sim.fleet.device_ids()[0]
    sim.sim.set_dialect(sort_mode="ignore")
    async with sim.client(page_size=2, max_attempts=1) as client:
        await client.list_batches(device, max_items=3)
        assert client.query_verdicts[HISTORY] == "ignored"
        sim.sim.set_dialect(sort_mode="honour")
        sim.clock.now += 3600
        sim.sim.faults.set("error500")
        with pytest.raises(UpstreamError):
            await client.list_batches(device, max_items=3)
        sim.sim.faults.clear()
        assert [b.id for b in await client.list_batches(device, max_items=3)] == newest(
            sim, device, 3)
        assert client.query_verdicts[HISTORY] == "honoured"


async def test_a_rejected_sort_is_probed_again_hourly(sim: Simulated) -> None:
    device = sim.sim.fleet.device_ids()[0]
    sim.sim.set_dialect(sort_mode={"commands": "reject"})
    async with sim.client(page_size=100) as client:
        for _ in range(3):
            assert [b.id for b in await client.list_batches(device, max_items=3)] == newest(
                sim, device, 3)
        assert sim.served("commands", 400) == 1
        sim.clock.now += 3600
        await client.list_batches(device, max_items=3)
        assert sim.served("commands", 400) == 2  # one probe, refused again
        assert client.query_verdicts[HISTORY] == "rejected"
        sim.sim.set_dialect(sort_mode="honour")
        sim.clock.now += 3600
        await client.list_batches(device, max_items=3)
        assert client.query_verdicts[HISTORY] == "honoured"
    # Every request went through the budget, the refused ones too.
    assert client.budget.spent == sim.sim.stats.total()


async def test_an_error_that_is_not_the_sorts_keeps_the_verdict(sim: Simulated) -> None:
    async with sim.client() as client:
        with pytest.raises(UpstreamError) as caught:
            await client.list_batches("bad-id!", max_items=3)  # 400 for the path, sorted or not
        assert caught.value.status == 400
        assert client.query_verdicts[HISTORY] == "unchecked"
        with pytest.raises(NotFoundError):
            await client.list_batches("NOSUCHSERIAL42", max_items=3)
    assert sim.served("commands", 404) == 1  # not retried without the sort


# --- pages that shift mid-read -------------------------------------------------------------------

HISTORY_PATH = ROOT + "/devices/{device}/commands"


def history_doc(n: int) -> dict[str, Any]:
    moment = datetime.fromtimestamp(1_770_000_000 + 60 * n, UTC).isoformat()
    return {"id": f"{n:024x}", "name": f"batch {n}", "createdAt": moment}


def shifting_history_app(
    docs: list[dict[str, Any]], *, newest_first: bool, arrive: list[int],
    requests: list[tuple[int, int]],
) -> web.Application:
    """A history served page by page; before the read of a page > 1, the batches numbered in
    ``arrive`` are created (one per request), as upstream would between two requests."""

    async def handler(request: web.Request) -> web.Response:
        page, limit = int(request.query["page"]), int(request.query["limit"])
        requests.append((page, limit))
        if page > 1 and arrive:
            docs.append(history_doc(arrive.pop(0)))
        ordered = docs[::-1] if newest_first else docs
        chunk = ordered[(page - 1) * limit : page * limit]
        meta = {"totalDocs": len(docs), "limit": limit, "hasNextPage": page * limit < len(docs)}
        return web.json_response({"status": True, "data": {"items": chunk, **meta}})

    app = web.Application()
    app.router.add_get(HISTORY_PATH, handler)
    return app


@pytest.mark.parametrize("newest_first", [True, False], ids=["newest-first", "oldest-first"])
async def test_a_history_that_shifts_mid_read_is_read_again_once(
    aiohttp_server: Any, newest_first: bool
) -> None:
    docs = [history_doc(n) for n in range(25)]
    requests: list[tuple[int, int]] = []
    app = shifting_history_app(docs, newest_first=newest_first, arrive=[25], requests=requests)
    server = await aiohttp_server(app)
    with capture_logs() as logs:
        async with make_client(str(server.make_url("/v1")), page_size=10) as client:
            batches = await client.list_batches("d1", max_items=20)
    ids = [b.id for b in batches]
    assert ids == [f"{n:024x}" for n in range(25, 5, -1)]  # the newest 20, the new one first
    shifted = [e for e in logs if e["event"] == "api_pages_shifted"]
    assert len(shifted) == 1
    assert not [e for e in logs if e["event"] == "api_pages_unstable"]
    # Newest first: pages 1-3 (the new batch lands at the head: page 2 repeats an item and
    # totalDocs moves), then pages 1-2 again. Oldest first: pages 1-3 (it lands at the
    # tail, totalDocs moves), then the same again.
    pages = [page for page, _ in requests]
    assert pages == ([1, 2, 3, 1, 2] if newest_first else [1, 2, 3, 1, 2, 3])


async def test_actions_that_shift_under_every_read_come_once_each(
    make_simulator_server: Any,
) -> None:
    # Every page after the first slides back: no read agrees with itself; the reads together
    # hold every action, none twice.
    sim = await simulated(make_simulator_server, max_limit=4, actions_per_batch=(30, 30))
    device, batch_id = sim.batch_with_actions(30)
    sim.sim.faults.set("shifting_pages=1.0")
    async with sim.client(page_size=4) as client:
        for _ in range(5):
            actions = await client.list_actions(device, batch_id)
            assert len({a.cmd_id for a in actions}) == len(actions)
            assert counts(actions) == sim.sim.fleet.grouped_counts(device, batch_id)


async def test_a_history_that_gains_batches_while_paged_newest_first(
    make_simulator_server: Any,
) -> None:
    # The simulator creates a real batch before each page > 1 of a newest-first history.
    sim = await simulated(make_simulator_server, devices=1, batches_per_device=12)
    device = sim.sim.fleet.device_ids()[0]
    before = set(sim.sim.fleet.batch_ids(device))
    sim.sim.faults.set("shifting_pages=1.0")
    with capture_logs() as logs:
        async with sim.client(page_size=5) as client:
            batches = await client.list_batches(device, max_items=100)
    ids = [b.id for b in batches]
    assert len(ids) == len(set(ids))
    sim.sim.faults.clear()
    truth = newest(sim, device, 100)
    # A batch arrives before every page but the first: each read misses those that
    # arrived during it, the next one finds them. Nothing there before is ever lost.
    assert before <= set(ids) <= set(truth)
    assert ids == [i for i in truth if i in set(ids)]
    reads = 1 + len([e for e in logs if e["event"] == "api_pages_shifted"])
    assert reads == MAX_READS
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["api_pages_unstable"]


# --- tags that check themselves (issue 17) ---------------------------------------------

TAGS = ("devices", "tags")


def tags_in_fleet(sim: Simulated, count: int) -> tuple[str, ...]:
    """``count`` tags that some devices carry and others do not."""
    models = [sim.sim.fleet.device(d) for d in sim.sim.fleet.device_ids()]
    seen: list[str] = []
    for model in models:
        for tag in model.tags:
            carriers = sum(tag in m.tags for m in models)
            if tag not in seen and 0 < carriers < len(models):
                seen.append(tag)
    assert len(seen) >= count
    chosen = tuple(seen[:count])
    assert sum(any(t in m.tags for t in chosen) for m in models) < len(models)
    return chosen


def carrying(sim: Simulated, tags: tuple[str, ...]) -> set[str]:
    return {d for d in sim.sim.fleet.device_ids() if set(tags) & set(sim.sim.fleet.device(d).tags)}


@pytest.mark.parametrize(
    ("tags_format", "unknown_filter", "count", "verdict", "first_read"),
    [
        # first_read None: the pages of the tagged devices; 3: the whole list of 12 by 5.
        ("any", "ignore", 2, "honoured", None),
        ("repeated", "ignore", 2, "honoured", None),
        ("comma", "ignore", 1, "honoured", None),
        ("comma", "ignore", 2, "ignored", 3),  # a repeated tags is not read: the whole list
        ("comma", "nothing", 2, "rejected", 1 + 3),  # matches nothing: one unfiltered read
        ("brackets", "ignore", 1, "ignored", 3),
        ("brackets", "nothing", 1, "rejected", 1 + 3),
        ("ignore", "ignore", 2, "ignored", 3),
    ],
)
async def test_exactly_the_tagged_devices_come_back_whatever_the_tags_format(
    make_simulator_server: Any, tags_format: str, unknown_filter: str, count: int,
    verdict: str, first_read: int | None,
) -> None:
    sim = await simulated(make_simulator_server, devices=12, tags_format=tags_format,
                          unknown_filter=unknown_filter)
    tags = tags_in_fleet(sim, count)
    expected = carrying(sim, tags)
    whole = -(-12 // 5)
    if first_read is None:
        first_read = -(-len(expected) // 5)
    with capture_logs() as logs:
        async with sim.client(page_size=5) as client:
            for read in range(3):
                devices = await client.list_devices(tags=tags)
                assert {d.id for d in devices} == expected
                assert len(devices) == len(expected)
                if read == 0:
                    assert sim.served("devices", 200) == first_read
            assert client.query_verdicts[TAGS] == verdict
    # Later reads: the filter as sent (one page when honoured), or the whole list.
    later = -(-len(expected) // 5) if verdict == "honoured" else whole
    assert sim.served("devices", 200) == first_read + 2 * later
    events = [e for e in logs if e["event"] == "api_query_verdict"]
    assert [e["verdict"] for e in events] == [verdict]
    assert events[0]["log_level"] == ("info" if verdict == "honoured" else "warning")


async def test_a_tags_filter_read_as_nothing_is_probed_again_hourly(
    make_simulator_server: Any,
) -> None:
    sim = await simulated(make_simulator_server, devices=12, tags_format="brackets",
                          unknown_filter="nothing")
    tags = tags_in_fleet(sim, 1)
    async with sim.client(page_size=5) as client:
        await client.list_devices(tags=tags)
        assert client.query_verdicts[TAGS] == "rejected"
        unread = sim.sim.stats.dialect[("devices", "tags_unread")]
        await client.list_devices(tags=tags)
        assert sim.sim.stats.dialect[("devices", "tags_unread")] == unread  # not sent
        sim.sim.set_dialect(tags_format="any")
        sim.clock.now += 3600
        devices = await client.list_devices(tags=tags)
        assert client.query_verdicts[TAGS] == "honoured"
    assert {d.id for d in devices} == carrying(sim, tags)


async def test_an_empty_tagged_list_is_checked_once_when_no_device_carries_the_tag(
    sim: Simulated,
) -> None:
    async with sim.client(page_size=100) as client:
        for _ in range(3):
            assert await client.list_devices(tags=["nobody-has-this"]) == []
        # One filtered read each time, one unfiltered check the first time only.
        assert sim.served("devices", 200) == 3 + 1
        assert client.query_verdicts[TAGS] == "unchecked"


async def test_recent_checkins_keep_only_tagged_devices_when_tags_are_ignored(
    make_simulator_server: Any,
) -> None:
    sim = await simulated(make_simulator_server, devices=12, tags_format="ignore")
    tags = tags_in_fleet(sim, 1)
    async with sim.client(page_size=5) as client:
        recent = await client.list_devices(
            tags=tags, sort="lastStatusReportTime:desc", stop=lambda d: False
        )
    assert {d.id for d in recent} == carrying(sim, tags)
    assert recent.sort_verdict == "honoured"


async def test_a_segment_is_sent_but_cannot_be_checked(sim: Simulated) -> None:
    segment = sim.sim.fleet.device(sim.sim.fleet.device_ids()[0]).segment
    async with sim.client() as client:
        assert client.query_verdicts == {}
        await client.list_devices(segment=segment)
        assert client.query_verdicts == {("devices", "segmentId"): "unchecked"}


# --- the device list's sort, for the check-in look ---------------------------------------

DEVICE_SORT = ("devices", "sort")
CHECKINS = "lastStatusReportTime:desc"


@pytest.mark.parametrize(("mode", "verdict"), [("honour", "honoured"), ("ignore", "ignored")])
async def test_a_sorted_device_list_says_whether_it_came_in_order(
    make_simulator_server: Any, mode: str, verdict: str
) -> None:
    sim = await simulated(make_simulator_server, devices=12, sort_mode={"devices": mode})
    async with sim.client(page_size=5) as client:
        devices = await client.list_devices(sort=CHECKINS)
        assert devices.sort_verdict == verdict
        assert client.query_verdicts[DEVICE_SORT] == verdict
        unsorted = await client.list_devices()
        assert unsorted.sort_verdict == "unchecked"
    assert {d.id for d in devices} == set(sim.sim.fleet.device_ids())


async def test_a_refused_device_sort_raises_and_costs_nothing_until_probed(
    make_simulator_server: Any,
) -> None:
    sim = await simulated(make_simulator_server, devices=12, sort_mode={"devices": "reject"})
    async with sim.client(page_size=5) as client:
        with pytest.raises(SortRejected) as caught:
            await client.list_devices(sort=CHECKINS, stop=lambda d: True)
        assert isinstance(caught.value, UpstreamError) and caught.value.status == 400
        assert client.query_verdicts[DEVICE_SORT] == "rejected"
        # The refused read and one small unsorted page that put it on the sort.
        assert (sim.served("devices", 400), sim.served("devices", 200)) == (1, 1)
        with pytest.raises(SortRejected):
            await client.list_devices(sort=CHECKINS)
        assert sim.sim.stats.total("devices") == 2  # remembered: no request
        assert len(await client.list_devices()) == 12  # the unsorted list still reads
        sim.sim.set_dialect(sort_mode="honour")
        sim.clock.now += 3600
        assert (await client.list_devices(sort=CHECKINS)).sort_verdict == "honoured"
