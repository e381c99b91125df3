"""The landing page never makes a scrape wait: it is rendered in steps with the loop free
between them, one render at a time shared by the requests that want it, reused for a few
seconds, its device table capped with failing devices first; and it encodes whatever
upstream named things with replacement, as /metrics does."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import pytest
from server_rig import fleet, hooks

from exporter import landing
from exporter.fleetview import DeviceView
from exporter.landing import Bounds
from exporter.server import make_app
from exporter.state import FleetState


class Views:
    """Counts the full device views taken (what a render costs), each made slow on request:
    a blocking sleep stands for the CPU a render of a large fleet burns."""

    def __init__(self, state: FleetState, seconds: float = 0.0) -> None:
        self.full = 0
        self.begun = asyncio.Event()
        self._view: Callable[..., DeviceView] = state.device_view
        self._seconds = seconds

    def __call__(self, device: str, *, with_batches: bool = True) -> DeviceView:
        if with_batches:
            self.full += 1
            self.begun.set()
            time.sleep(self._seconds)
        return self._view(device, with_batches=with_batches)


def counted(state: FleetState, monkeypatch: pytest.MonkeyPatch, seconds: float = 0.0) -> Views:
    views = Views(state, seconds)
    monkeypatch.setattr(state, "device_view", views)
    return views


async def test_a_scrape_during_a_slow_render_is_answered_before_the_render_ends(
    aiohttp_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1 ms of blocking work a device, 10 devices a step: 0.5 s in all, in steps of 10 ms.
    state = fleet(500)
    app = make_app(hooks(state), landing_bounds=Bounds(step_devices=10))
    views = counted(state, monkeypatch, seconds=0.001)
    client = await aiohttp_client(app)
    page = asyncio.create_task(client.get("/"))
    await asyncio.wait_for(views.begun.wait(), timeout=30)
    scrape = await asyncio.wait_for(client.get("/metrics"), timeout=30)
    assert scrape.status == 200
    assert b"applivery_exporter_target_up" in await scrape.read()
    # The scrape came in after the render began and went out before it ended.
    assert not page.done() and views.full < 500
    response = await asyncio.wait_for(page, timeout=60)
    assert response.status == 200 and views.full == 500


async def test_concurrent_requests_share_one_render_and_reuse_it(
    aiohttp_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = fleet(30)
    app = make_app(hooks(state))
    views = counted(state, monkeypatch, seconds=0.001)
    client = await aiohttp_client(app)
    responses = await asyncio.gather(*(client.get("/") for _ in range(12)))
    pages = {await r.read() for r in responses}
    assert [r.status for r in responses] == [200] * 12 and len(pages) == 1
    assert views.full == 30  # one render, not twelve
    await (await client.get("/")).read()
    assert views.full == 30  # still fresh: reused


async def test_a_page_older_than_its_age_is_rendered_again(
    aiohttp_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = fleet(3)
    app = make_app(hooks(state), landing_bounds=Bounds(max_age_seconds=0))
    views = counted(state, monkeypatch)
    client = await aiohttp_client(app)
    for _ in range(2):
        assert (await client.get("/")).status == 200
    assert views.full == 6


async def test_the_device_table_is_capped_failing_devices_first(aiohttp_client) -> None:
    state = fleet(12)  # every other device failed its last poll
    bounds = Bounds(max_device_rows=5, step_devices=2, step_looks=3)
    client = await aiohttp_client(make_app(hooks(state), landing_bounds=bounds))
    page = await (await client.get("/")).text()
    table = page.split('<section id="devices">')[1].split("</section>")[0]
    assert table.count("<tr><td>") == 5
    assert table.count("<td>down: upstream 503</td>") == 5
    assert "And 7 more devices, not shown" in table


async def test_a_small_fleet_is_shown_whole(aiohttp_client) -> None:
    client = await aiohttp_client(make_app(hooks(fleet(6))))
    page = await (await client.get("/")).text()
    assert page.count("<tr><td>65f0c0ffee") == 6 and "more devices" not in page


async def test_a_lone_surrogate_in_a_batch_name_is_replaced_not_a_500(aiohttp_client) -> None:
    state = fleet(2, batch_names=("Store \ud800 policy", "\udfff"))
    client = await aiohttp_client(make_app(hooks(state)))
    response = await client.get("/")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    page = (await response.read()).decode("utf-8")  # strict: valid UTF-8 throughout
    assert "<td>Store ? policy</td>" in page and "<td>?</td>" in page
    scrape = await client.get("/metrics")
    assert scrape.status == 200 and "Store ? policy" in await scrape.text()


# --- finding a device ------------------------------------------------------------------------


def device_table(page: str) -> str:
    return page.split('<section id="devices">')[1].split("</section>")[0]


async def test_a_search_finds_a_device_the_capped_table_leaves_out(aiohttp_client) -> None:
    state = fleet(12)  # the table keeps 5, the failing ones: even-numbered devices are up
    bounds = Bounds(max_device_rows=5, step_devices=2, step_looks=3)
    client = await aiohttp_client(make_app(hooks(state), landing_bounds=bounds))
    whole = device_table(await (await client.get("/")).text())
    assert "<td>pc-10</td>" not in whole  # up, so behind the five failing devices
    for search in ("pc-10", "PC-10", "ffee0000000000000a"):  # name, any case, part of the id
        table = device_table(await (await client.get("/", params={"device": search})).text())
        assert table.count("<tr><td>") == 1 and "<td>pc-10</td>" in table, search
        assert "1 of 12 watched devices match" in table
    many = device_table(await (await client.get("/", params={"device": "pc-1"})).text())
    assert many.count("<tr><td>") == 3  # pc-1, pc-10, pc-11
    broad = device_table(await (await client.get("/", params={"device": "pc"})).text())
    assert "12 of 12 watched devices match" in broad and broad.count("<tr><td>") == 5
    assert "The table keeps the first 5, failing devices first." in broad
    none = device_table(await (await client.get("/", params={"device": "kiosk"})).text())
    assert none.count("<tr><td>") == 0 and "No watched device has" in none


async def test_a_search_is_shown_escaped_and_cut(aiohttp_client) -> None:
    client = await aiohttp_client(make_app(hooks(fleet(3))))
    page = await (await client.get("/", params={"device": '"><script>x</script>'})).text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert 'value="&quot;&gt;&lt;script&gt;' in page  # back in the form, still escaped
    long = "p" * 5000
    response = await client.get("/", params={"device": long})
    assert response.status == 200
    assert f'value="{"p" * 100}"' in await response.text()


async def test_a_flood_of_distinct_searches_renders_one_at_a_time_and_never_holds_a_scrape(
    aiohttp_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = fleet(60)
    app = make_app(hooks(state), landing_bounds=Bounds(step_devices=5))
    counted(state, monkeypatch, seconds=0.002)  # ~120 ms a render, in steps of 10 ms
    running, most = 0, 0
    render = landing.render

    async def watched_render(*args: object) -> bytes:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            return await render(*args)  # type: ignore[arg-type]
        finally:
            running -= 1

    monkeypatch.setattr(landing, "render", watched_render)
    client = await aiohttp_client(app)
    searches = [
        asyncio.create_task(client.get("/", params={"device": f"pc-{n}"})) for n in range(40)
    ]
    await asyncio.sleep(0.05)
    began = time.monotonic()
    scrape = await asyncio.wait_for(client.get("/metrics"), timeout=30)
    waited = time.monotonic() - began
    responses = await asyncio.wait_for(asyncio.gather(*searches), timeout=120)
    assert scrape.status == 200
    statuses = Counter(r.status for r in responses)
    assert most == 1  # one render at a time, whatever the number of searches
    assert statuses[503] > 0 and statuses[200] >= 16, statuses
    assert all(r.headers["Retry-After"] == "1" for r in responses if r.status == 503)
    assert waited < 1.0  # well under the ~2 s the accepted renders take one after another
    # The whole fleet's page is never refused, even behind the searches.
    assert (await client.get("/")).status == 200
