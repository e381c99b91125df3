"""What one read holds is bounded, whatever upstream serves.

- Items beyond the ``limit`` asked for are cut before they are decoded and counted as
  ``schema`` problems.
- A read fails past ``paging.MAX_ITEMS_PER_READ`` items served (``ReadTooLarge``, not
  retried): its device is marked failed with one warning line.
- Against an upstream that serves 100,000 actions per page with ``hasNextPage`` for ever, a
  client in a process of its own (tests/fatpages.py) stays below 400 MiB and ends in seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from clientrig import ORG, ROOT, make_client
from structlog.testing import capture_logs

from exporter.apierrors import ReadTooLarge
from exporter.config import parse_config
from exporter.paging import MAX_ITEMS_PER_READ
from exporter.records import Batch
from exporter.scheduler import Scheduler
from exporter.selfmetrics import SelfMetrics
from exporter.state import FleetState

REPO = Path(__file__).resolve().parent.parent
DEVICE, BATCH = "65f0c0ffee65f0c0ffee0001", "65f0c0ffee65f0c0ffee1001"
ACTIONS_PATH = f"{ROOT}/devices/{DEVICE}/commands/{BATCH}/actions"
DEVICES_PATH = f"{ROOT}/devices"
PEAK_MIB = 400


def actions(count: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"cmdId": f"{n:024x}", "status": "Pending"} for n in range(start, start + count)]


def devices(count: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": f"{n:024x}", "state": "ACTIVE"} for n in range(start, start + count)]


def body(items: list[dict[str, Any]], *, more: bool) -> bytes:
    return json.dumps({"status": True, "data": {"items": items, "hasNextPage": more}}).encode()


class Upstream:
    """Serves ``count`` items on every page of both lists, new ones on each page (a read
    keeps items by key: the same ones again would cost nothing); ``endless`` pages never
    end, else there is one. ``bodies`` fixes a list's body instead."""

    def __init__(self, count: int, *, endless: bool) -> None:
        self.count, self.endless = count, endless
        self.bodies: dict[str, bytes] = {}
        self.requests: list[tuple[str, int]] = []

    def body(self, endpoint: str, number: int) -> bytes:
        fixed = self.bodies.get(endpoint)
        if fixed is not None:
            return fixed
        make = actions if endpoint == "actions" else devices
        return body(make(self.count, (number - 1) * self.count), more=self.endless)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(ACTIONS_PATH, self._handler("actions"))
        app.router.add_get(DEVICES_PATH, self._handler("devices"))
        return app

    def _handler(self, endpoint: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            self.requests.append((endpoint, int(request.query["limit"])))
            served = self.body(endpoint, int(request.query["page"]))
            return web.Response(body=served, content_type="application/json")

        return handle


Serve = Callable[[Upstream], Awaitable[str]]


@pytest.fixture
def serve(aiohttp_server: Any) -> Serve:
    """Serves an upstream; its base URL (``.../v1``)."""

    async def start(upstream: Upstream) -> str:
        return str((await aiohttp_server(upstream.app())).make_url("/v1"))

    return start


async def read(client: Any, endpoint: str) -> list[Any]:
    if endpoint == "actions":
        return await client.list_actions(DEVICE, BATCH)
    return list(await client.list_devices())


# --- items beyond the limit ---------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["actions", "devices"])
async def test_items_beyond_the_limit_asked_are_cut_and_counted_as_schema_problems(
    serve: Serve, endpoint: str
) -> None:
    upstream = Upstream(250, endless=False)
    metrics = SelfMetrics()
    async with make_client(await serve(upstream), metrics=metrics, page_size=100) as client:
        items = await read(client, endpoint)
    assert len(items) == 100
    assert upstream.requests == [(endpoint, 100)]
    assert metrics.parse_problems["schema"] == 150


# --- the item cap -------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["actions", "devices"])
async def test_a_read_fails_once_it_was_served_more_than_the_cap(
    serve: Serve, endpoint: str
) -> None:
    # An honest upstream whose pages never end: the cap, not max_pages, ends the read.
    page_size = 10_000
    upstream = Upstream(page_size, endless=True)
    async with make_client(await serve(upstream), page_size=page_size) as client:
        with pytest.raises(ReadTooLarge) as caught:
            await read(client, endpoint)
    assert len(upstream.requests) == MAX_ITEMS_PER_READ // page_size + 1  # not retried
    assert str(MAX_ITEMS_PER_READ) in caught.value.reason


async def test_a_device_whose_read_is_too_large_is_failed_with_one_warning(
    serve: Serve,
) -> None:
    upstream = Upstream(60_000, endless=True)
    upstream.bodies["devices"] = body([{"id": DEVICE}], more=False)  # its look-up is honest
    config = parse_config(
        f"organization: {ORG}\ndevices:\n  - id: {DEVICE}\n    commands: [{BATCH}]\n"
    )
    metrics = SelfMetrics()
    state = FleetState(organization=ORG, latency_buckets=(1.0,), metrics=metrics)
    async with make_client(await serve(upstream), metrics=metrics) as client:
        client.get_batch = _one_batch  # type: ignore[method-assign]
        scheduler = Scheduler(config, client, state, metrics)
        with capture_logs() as logs:
            result = await scheduler.run_round()
    assert (result.polled, result.failed) == (1, 1)
    loud = [(e["event"], e["log_level"]) for e in logs if e["log_level"] in ("warning", "error")]
    assert loud == [("device_poll_failed", "warning")]
    assert metrics.parse_problems["schema"] == 2 * (60_000 - 100)


async def _one_batch(device: str, batch: str) -> Batch:
    # The configured batch, pending: its actions are read.
    return Batch(id=batch, device_id=device, summary=(("Pending", 1),))


# --- peak memory, measured ----------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["actions", "devices"])
async def test_oversized_endless_pages_keep_a_client_below_400_mib(
    serve: Serve, endpoint: str
) -> None:
    upstream = Upstream(100_000, endless=True)
    url = await serve(upstream)
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(REPO / "tests" / "fatpages.py"), url,
        endpoint, stdout=asyncio.subprocess.PIPE, env=environment, cwd=str(REPO),
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    report = json.loads(output.decode().splitlines()[-1])
    assert report["outcome"] == "ReadTooLarge", report
    assert report["peak_mib"] < PEAK_MIB, report
    assert report["seconds"] < 30, report
    assert len(upstream.requests) == 2  # 100,000 served twice: past the cap, not retried
    assert report["schema_problems"] == 2 * (100_000 - 100)
