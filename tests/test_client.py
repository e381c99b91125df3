"""The API client: token source, request budget, Retry-After, paging, retries, typed errors.

The pure parts are specified directly; the HTTP behaviour against real aiohttp servers: a few
tiny apps for page shapes the simulator does not produce, and the simulator for the rest.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from exporter.client import (
    ApiClient,
    AuthError,
    TokenBucket,
    TokenSource,
    TokenUnavailable,
    parse_retry_after,
)
from exporter.selfmetrics import SelfMetrics

TOKEN = "test-token-5f1b7d3c9a"
ORG = "demo"


class FakeClock:
    """Monotonic time that only moves when someone sleeps on it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)


def make_client(
    base_url: str,
    *,
    token: TokenSource | None = None,
    metrics: SelfMetrics | None = None,
    clock: FakeClock | None = None,
    **options: Any,
) -> ApiClient:
    clock = clock or FakeClock()
    return ApiClient(
        base_url=base_url,
        organization=options.pop("organization", ORG),
        token=token or TokenSource(value=TOKEN),
        metrics=metrics or SelfMetrics(),
        sleep=clock.sleep,
        monotonic=clock.monotonic,
        seed=7,
        **options,
    )


# --- Retry-After -------------------------------------------------------------------------------


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


# --- the request budget --------------------------------------------------------------------------


async def test_bucket_allows_its_burst_then_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(3600, burst_seconds=5, monotonic=clock.monotonic, sleep=clock.sleep)
    assert bucket.capacity == 5
    start = clock.now
    for _ in range(5):
        await bucket.acquire()
    assert clock.now == start  # the burst costs no waiting
    for _ in range(10):
        await bucket.acquire()
    assert bucket.spent == 15
    # 1 request per second after the burst: ten more take ten seconds.
    assert clock.now - start == pytest.approx(10.0)


async def test_tiny_budget_still_allows_one_request() -> None:
    clock = FakeClock()
    bucket = TokenBucket(36, monotonic=clock.monotonic, sleep=clock.sleep)
    assert bucket.capacity == 1
    await bucket.acquire()
    await bucket.acquire()
    assert clock.now - 1000.0 == pytest.approx(100.0)  # 36 per hour = one per 100 s


async def test_concurrent_callers_share_one_budget() -> None:
    clock = FakeClock()
    bucket = TokenBucket(7200, burst_seconds=1, monotonic=clock.monotonic, sleep=clock.sleep)
    await asyncio.gather(*(bucket.acquire() for _ in range(21)))
    assert bucket.spent == 21
    # 2 per second after a burst of 2: nineteen more need 9.5 s.
    assert clock.now - 1000.0 == pytest.approx(9.5)


async def test_throttle_pauses_everyone_and_halves_the_rate_then_recovers() -> None:
    clock = FakeClock()
    bucket = TokenBucket(3600, monotonic=clock.monotonic, sleep=clock.sleep)
    bucket.throttle(30)
    assert bucket.paused_for() == 30
    assert bucket.effective_rate_per_hour == 1800
    assert bucket.available() == 0
    await bucket.acquire()
    # The pause, then a token at half the rate (one per 2 s).
    assert clock.now - 1000.0 >= 30
    assert bucket.effective_rate_per_hour > 1800  # recovering already
    clock.now += 3600
    assert bucket.effective_rate_per_hour == 3600
    assert not bucket.recovering


async def test_repeated_throttles_keep_a_floor() -> None:
    clock = FakeClock()
    bucket = TokenBucket(3600, monotonic=clock.monotonic, sleep=clock.sleep)
    for _ in range(20):
        bucket.throttle(0)
    assert 0 < bucket.effective_rate_per_hour < 3600 / 8


def test_budget_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0)


# --- the token source --------------------------------------------------------------------------


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


# --- page shapes, against small apps of our own --------------------------------------------------

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
    assert len(requests) <= 3 * 2
