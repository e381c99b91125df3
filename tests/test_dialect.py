"""exporter/dialect.py: what upstream does with sort, tags and segmentId, and how each read
checks it. The verdicts on pure clocks; the reads against the simulator's dialects
(exporter/simulator/dialect.py), its fleet as the truth.
"""

from __future__ import annotations

from typing import Any

import pytest
from clientrig import Simulated, newest, simulated
from structlog.testing import capture_logs
from test_exporter_e2e import NEW_COMMAND

from exporter.client import NotFoundError, SortRejected, UpstreamError
from exporter.dialect import (
    HONOURED,
    IGNORED,
    REJECTED,
    REPROBE_SECONDS,
    UNCHECKED,
    DeviceQuery,
    Verdicts,
)

# --- verdicts ---------------------------------------------------------------------------------

QUERY = ("commands", "sort")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_parameter_appears_once_sent_and_changes_are_logged_once() -> None:
    verdicts = Verdicts(Clock())
    assert verdicts.snapshot() == {}
    assert verdicts.ask(QUERY)
    assert verdicts.snapshot() == {QUERY: UNCHECKED}
    with capture_logs() as logs:
        for _ in range(3):
            verdicts.note(QUERY, IGNORED, seen="ascending")
        verdicts.note(QUERY, REJECTED, reason="HTTP 400")
    assert [(e["verdict"], e["previous"], e["log_level"]) for e in logs] == [
        (IGNORED, UNCHECKED, "warning"), (REJECTED, IGNORED, "warning")]
    assert logs[0]["endpoint"] == "commands" and logs[0]["parameter"] == "sort"


def test_a_refused_parameter_is_probed_again_by_one_caller_per_interval() -> None:
    clock = Clock()
    verdicts = Verdicts(clock)
    verdicts.note(QUERY, REJECTED)
    assert not verdicts.ask(QUERY)
    assert verdicts.ask(QUERY, avoid=())  # a caller that sends it regardless
    clock.now = REPROBE_SECONDS
    assert verdicts.ask(QUERY)  # this one probes ...
    assert not verdicts.ask(QUERY)  # ... the others wait
    clock.now = 2 * REPROBE_SECONDS
    assert verdicts.ask(QUERY)  # the probe told nothing: another, an interval later


def test_a_read_that_cannot_tell_leaves_the_probe_to_one_that_can() -> None:
    clock = Clock()
    verdicts = Verdicts(clock)
    verdicts.note(QUERY, REJECTED)
    clock.now = REPROBE_SECONDS
    for _ in range(3):  # e.g. each round's check-in look, cut short by ``stop``
        assert not verdicts.ask(QUERY, probe=False)
    assert verdicts.ask(QUERY)  # the whole read that follows still probes


def test_a_fresh_contrary_verdict_is_not_overturned_by_a_read_that_looks_right() -> None:
    clock = Clock()
    verdicts = Verdicts(clock)
    verdicts.note(QUERY, IGNORED)
    clock.now = REPROBE_SECONDS / 2
    verdicts.note(QUERY, HONOURED)  # a short page in order by chance
    assert verdicts[QUERY] == IGNORED
    clock.now = REPROBE_SECONDS
    verdicts.note(QUERY, HONOURED)  # no contrary evidence for an interval: it mended
    assert verdicts[QUERY] == HONOURED
    verdicts.note(QUERY, IGNORED)  # the contrary always counts at once
    assert verdicts[QUERY] == IGNORED


# --- the device list's parameters ---------------------------------------------------------------


def test_a_device_query_sends_tags_as_repeated_parameters_and_the_segment_as_asked() -> None:
    query = DeviceQuery(("a", "b"), 7, "lastStatusReportTime:desc")
    assert query.params(tags=True) == [
        ("tags", "a"), ("tags", "b"), ("segmentId", "7"), ("sort", "lastStatusReportTime:desc")]
    assert query.params(tags=False, sort=False) == [("segmentId", "7")]
    assert DeviceQuery().params(tags=True) == []


def test_a_device_query_names_the_checked_parameters_it_sends() -> None:
    assert DeviceQuery(("a",), sort="x:desc").sent(tags=True) == (
        ("devices", "sort"), ("devices", "tags"))
    assert DeviceQuery(("a",)).sent(tags=False) == ()


# --- history whatever upstream does with sort (issue 16) -----------------------------------------

HISTORY = ("commands", "sort")
VERDICT_OF_MODE = {"honour": "honoured", "ignore": "ignored", "reject": "rejected"}


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
