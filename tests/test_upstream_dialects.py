"""The exporter against a simulated upstream that reads ``sort`` and ``tags`` otherwise.

Upstream documents a ``sort`` on its lists and a ``tags`` array on the device list, but not
which sort fields it accepts nor how an array is written in a query. The simulator's
dialects (exporter/simulator/dialect.py) ignore or refuse the sort, or read only another
spelling of the array; whatever they do, the exporter must show the newest batches, watch
exactly the tagged devices, and count every transition once. Expected values come from the
simulator's ground truth.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from structlog.testing import capture_logs
from test_exporter_e2e import (
    NEW_COMMAND,
    assert_exports_the_fleet,
    command_gauges,
    make_exporter,
    poll,
    samples,
    select,
)

from exporter.simulator import Simulator


async def serve(aiohttp_server: Any, **options: Any) -> tuple[Simulator, str]:
    sim = Simulator(**{"seed": 11, "devices": 6, "speed": 0, **options})
    server = await aiohttp_server(sim.app())
    return sim, str(server.make_url("/v1"))


@pytest.mark.parametrize(
    ("mode", "per_read"),
    [("honour", 2), ("ignore", 3), ("reject", 2)],
)
async def test_a_new_batch_past_max_per_device_shows_within_a_round(
    aiohttp_server: Any, mode: str, per_read: int
) -> None:
    # 25 older batches a device, 20 watched, pages of 10: the new batch is the 26th.
    sim, url = await serve(aiohttp_server, devices=3, batches_per_device=25,
                           sort_mode={"commands": mode})
    exporter = make_exporter(
        sim, url, api={"base_url": url, "requests_per_hour": 1_000_000, "page_size": 10},
        discovery={"devices": {"refresh_seconds": 3600},
                   "batches": {"max_age": "3650d", "max_per_device": 20}},
        poll={"interval_seconds": 60, "strategy": "round_robin"},
    )
    device = sim.fleet.device_ids()[0]
    try:
        await poll(exporter)
        sim.advance(60)
        created = sim.fleet.create_batch(device, NEW_COMMAND)
        before = sim.stats.total("commands")
        await poll(exporter)
        assert (device, created) in command_gauges(samples(exporter))
        # Every device's history read once this round, at the cost of its case.
        assert sim.stats.total("commands") - before == 3 * per_read
        verdict = {"honour": "honoured", "ignore": "ignored", "reject": "rejected"}[mode]
        assert exporter.client.query_verdicts[("commands", "sort")] == verdict
    finally:
        await exporter.client.close()


async def test_a_history_served_in_another_order_each_round_counts_each_change_once(
    aiohttp_server: Any,
) -> None:
    # Pages of 7 and a dozen batches a device. Once the sort proved ignored the history is
    # read without it, and the upstream's default order changes round by round: oldest
    # first (the dialect ignoring sort), newest first (the others), with answers arriving
    # in between.
    sim, url = await serve(aiohttp_server, max_limit=7, batches_per_device=12)
    watermark = sim.clock.now()
    exporter = make_exporter(sim, url)
    modes = ["honour", "ignore", "reject", "ignore", "honour", "reject"]
    try:
        await poll(exporter)
        for step in range(12):
            sim.set_dialect(sort_mode=modes[step % len(modes)])
            sim.advance(900)
            await poll(exporter, rounds=2 if step % 4 == 0 else 1)  # re-polls change nothing
        await poll(exporter)
        assert_exports_the_fleet(exporter, sim, watermark)
        assert sim.stats.dialect[("commands", "sort_ignored")]
        assert exporter.client.query_verdicts[("commands", "sort")] == "ignored"
    finally:
        await exporter.client.close()


@pytest.mark.parametrize(
    ("tags_format", "unknown_filter", "verdict"),
    [
        ("any", "ignore", "honoured"),
        ("brackets", "ignore", "ignored"),
        ("brackets", "nothing", "rejected"),
        ("ignore", "ignore", "ignored"),
    ],
)
async def test_discovery_watches_exactly_the_tagged_devices(
    aiohttp_server: Any, tags_format: str, unknown_filter: str, verdict: str
) -> None:
    sim, url = await serve(aiohttp_server, devices=10, tags_format=tags_format,
                           unknown_filter=unknown_filter)
    models = [sim.fleet.device(d) for d in sim.fleet.device_ids()]
    tag = Counter(t for m in models for t in m.tags).most_common()[-1][0]
    tagged = {m.id for m in models if tag in m.tags}
    assert 0 < len(tagged) < len(models)
    exporter = make_exporter(
        sim, url, discovery={"devices": {"tags": [tag], "refresh_seconds": 1},
                             "batches": {"max_age": "3650d", "max_per_device": 1000}},
    )
    try:
        with capture_logs() as logs:
            for _ in range(3):
                await poll(exporter)
                sim.advance(60)
                assert set(exporter.scheduler.targets) == tagged
        found = samples(exporter)
        shown = {dict(k)["device"] for k in select(found, "applivery_windows_device_info")}
        assert shown == tagged
        assert {d for d, _ in command_gauges(found)} <= tagged
        assert exporter.client.query_verdicts[("devices", "tags")] == verdict
        said = [e for e in logs if e["event"] == "api_query_verdict"
                and e["parameter"] == "tags"]
        assert [e["verdict"] for e in said] == [verdict]
    finally:
        await exporter.client.close()

