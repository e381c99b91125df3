"""exporter/transport.py, paged lists: every page shape read once, pages that shift mid-read,
and re-polls that bring the same bytes (exporter/memo.py), against small apps of our own and
the simulator."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from clientrig import (
    ACTIONS,
    ROOT,
    Simulated,
    action_items,
    counts,
    make_client,
    newest,
    paged_app,
    simulated,
)
from structlog.testing import capture_logs

from exporter.paging import MAX_READS
from exporter.records import SCHEMA
from exporter.selfmetrics import SelfMetrics

# --- page shapes, against small apps of our own -----------------------------------------------

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
