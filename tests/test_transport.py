"""exporter/transport.py: Retry-After, retries, throttling, the budget, typed errors and the
session (paged lists are in test_transport_pages.py).

The pure parts are specified directly; the HTTP behaviour through the client against real
aiohttp servers: the simulator, and a few tiny apps for what it does not produce.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import time
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from clientrig import (
    ACTIONS,
    ORG,
    ROOT,
    TOKEN,
    Simulated,
    action_items,
    counts,
    make_client,
)

from exporter.client import (
    ApiError,
    AuthError,
    NotFoundError,
    TokenSource,
    TokenUnavailable,
    UpstreamError,
)
from exporter.records import UNKNOWN_STATUS
from exporter.selfmetrics import SelfMetrics
from exporter.statuses import STATUS_CLASS
from exporter.transport import BACKOFF_BASE, RETRY_AFTER_CAP, parse_retry_after

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
