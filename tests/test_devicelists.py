"""The device lists: which read is due when (membership, the sorted list, the full list
paced by what it cost, the configured devices' look-up), and the marks behind it.

The client is a stand-in that counts the pages it serves, each page one request from a
budget whose clock is the test's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from exporter.client import Listing, SortRejected, UpstreamError
from exporter.config import Config, parse_config
from exporter.devicehealth import NON_COMPLIANT, DeviceHealth
from exporter.devicelists import CHECKIN_OVERLAP_SECONDS, FULL_LIST_SHARE, DeviceLists, Listed
from exporter.records import TIMESTAMP, Device
from exporter.selfmetrics import FULL_LIST, SORTED_LIST, SelfMetrics

START = 1_770_717_600.0
RATE = 3600.0  # requests per hour
INTERVAL = 2.0


@dataclass
class Budget:
    clock: list[float]
    spent: int = 0
    effective_rate_per_hour: float = RATE

    def now(self) -> float:
        return self.clock[0]


@dataclass
class Client:
    """Serves ``devices``; ``sort`` is what upstream does with a sort: honour, ignore,
    reject; ``pages`` is what a whole list costs."""

    budget: Budget
    devices: list[Device] = field(default_factory=list)
    sort: str = "honour"
    pages: int = 1
    fails: bool = False
    reads: list[dict[str, Any]] = field(default_factory=list)
    worth_sorting: bool = True  # until a sorted read came out of order (no re-probe here)

    def worth_sorting_devices(self) -> bool:
        return self.worth_sorting

    async def list_devices(
        self,
        *,
        tags: Sequence[str] = (),
        segment: int | None = None,
        sort: str | None = None,
        stop: Callable[[Device], bool] | None = None,
    ) -> Listing[Device]:
        if sort is not None and self.sort == "reject":
            raise SortRejected("devices", "sort refused")
        self.reads.append({"tags": tuple(tags), "sort": sort})
        self.budget.spent += 1 if stop is not None else self.pages
        if self.fails:
            raise UpstreamError("devices", "HTTP 500")
        items = list(self.devices)
        if sort is not None and self.sort == "honour":
            items.sort(key=lambda d: d.last_status_report or -math.inf, reverse=True)
        if stop is not None:
            cut = next((i for i, d in enumerate(items) if stop(d)), len(items))
            items = items[:cut]
        listing = Listing(items)
        if sort is not None:
            listing.sort_verdict = "honoured" if self.sort == "honour" else "ignored"
            self.worth_sorting = self.sort == "honour"
        return listing


@dataclass
class Rig:
    lists: DeviceLists
    client: Client
    metrics: SelfMetrics
    clock: list[float]

    def advance(self, seconds: float) -> None:
        self.clock[0] += seconds


def config(**devices: Any) -> Config:
    document = {
        "organization": "acme",
        "api": {"base_url": "http://127.0.0.1:1/v1", "requests_per_hour": RATE},
        "poll": {"interval_seconds": INTERVAL},
        "discovery": {"devices": {"refresh_seconds": 60, **devices}},
    }
    return parse_config(yaml.safe_dump(document))


def checked_in(*ago: float) -> list[Device]:
    return [Device(f"d{n}", last_status_report=START - a) for n, a in enumerate(ago)]


def make_rig(devices: list[Device], *, settings: Config | None = None, **client: Any) -> Rig:
    clock = [START]
    api = Client(Budget(clock), devices, **client)
    metrics = SelfMetrics()
    lists = DeviceLists(settings or config(), api, metrics,  # type: ignore[arg-type]
                        clock=lambda: clock[0], future_limit=lambda: clock[0] + 300)
    return Rig(lists, api, metrics, clock)


def ids(listed: Listed) -> list[str]:
    return [d.id for d in listed.devices]


async def test_membership_is_read_again_every_refresh_seconds() -> None:
    rig = make_rig(checked_in(10, 20))
    assert not rig.lists.ready
    first = await rig.lists.refresh()
    assert first is not None and first.full and first.refresh and first.unfiltered
    assert ids(first) == ["d0", "d1"] and rig.lists.ready
    rig.advance(59)
    assert await rig.lists.refresh() is None
    rig.advance(1)
    assert await rig.lists.refresh() is not None
    assert len(rig.client.reads) == 2


async def test_the_sorted_list_is_read_down_to_the_newest_check_in_less_the_overlap() -> None:
    rig = make_rig(checked_in(10, 10 + CHECKIN_OVERLAP_SECONDS, 11 + CHECKIN_OVERLAP_SECONDS))
    await rig.lists.refresh()
    rig.advance(INTERVAL)
    (look,) = await rig.lists.checkins()
    assert not look.full and ids(look) == ["d0", "d1"]
    assert rig.client.reads[-1]["sort"] == "lastStatusReportTime:desc"
    assert rig.metrics.checkin_source == SORTED_LIST
    # A newer check-in moves the mark: the next look stops earlier.
    rig.client.devices.append(Device("d9", last_status_report=START + 100))
    (look,) = await rig.lists.checkins()
    (look,) = await rig.lists.checkins()
    assert ids(look) == ["d9", "d0"]


async def test_a_sort_upstream_ignores_brings_the_full_list_after_what_its_look_showed() -> None:
    rig = make_rig(checked_in(10, 500, 20), sort="ignore")
    await rig.lists.refresh()
    rig.advance(60)
    with capture_logs() as logs:
        cut, full = await rig.lists.checkins()
    # Out of order, the look was cut at an arbitrary place: what it showed still counts.
    assert ids(cut) == ["d0"] and not cut.full
    assert ids(full) == ["d0", "d1", "d2"] and full.full and not full.refresh
    assert rig.metrics.checkin_source == FULL_LIST
    assert [e["event"] for e in logs] == ["checkin_source"]


@pytest.mark.parametrize("sort", ["ignore", "reject"])
async def test_the_full_list_for_check_ins_is_paced_by_what_its_last_read_cost(
    sort: str,
) -> None:
    pages = 10
    every = pages * 3600 / (FULL_LIST_SHARE * RATE)  # 50 s at a tenth of a page per second
    rig = make_rig(checked_in(10), sort=sort, pages=pages)
    await rig.lists.refresh()  # membership's read counts as the last full list
    full_reads = 1
    for _ in range(int(3 * every / INTERVAL)):
        rig.advance(INTERVAL)
        for listed in await rig.lists.checkins():
            full_reads += listed.full
    assert full_reads == 1 + 3
    assert rig.client.budget.spent <= pages * full_reads + len(rig.client.reads)


async def test_a_full_list_read_for_check_ins_is_membership_s_refresh_too() -> None:
    rig = make_rig(checked_in(10), sort="ignore")
    await rig.lists.refresh()
    rig.advance(10)
    assert [listed.full for listed in await rig.lists.checkins()] == [False, True]
    rig.advance(55)  # 65 s after the first read, 55 s after the second
    assert await rig.lists.refresh() is None


async def test_a_failed_sorted_list_reads_nothing_else_this_round() -> None:
    rig = make_rig(checked_in(10))
    await rig.lists.refresh()
    rig.client.fails = True
    with capture_logs() as logs:
        assert await rig.lists.checkins() == []
    assert len(rig.client.reads) == 2
    assert [(e["event"], e["log_level"]) for e in logs] == [("checkins_unavailable", "warning")]


async def test_a_failed_refresh_is_said_as_an_error_and_tried_again_next_round() -> None:
    rig = make_rig(checked_in(10), fails=True)
    with capture_logs() as logs:
        assert await rig.lists.refresh() is None
    assert [(e["event"], e["log_level"]) for e in logs] == [("discovery_failed", "error")]
    assert not rig.lists.ready
    assert await rig.lists.checkins() == []  # no mark yet: nothing to look down to
    rig.client.fails = False
    assert await rig.lists.refresh() is not None


async def test_a_new_filter_reads_membership_afresh_and_forgets_the_mark() -> None:
    rig = make_rig(checked_in(10))
    await rig.lists.refresh()
    rig.lists.reconfigure(config(tags=["kiosk"]))
    assert not rig.lists.ready
    assert await rig.lists.checkins() == []
    listed = await rig.lists.refresh()
    assert listed is not None and not listed.unfiltered
    assert rig.client.reads[-1]["tags"] == ("kiosk",)


async def test_configured_devices_are_looked_up_outside_a_filtered_discovery_only() -> None:
    rig = make_rig(checked_in(10, 20))
    assert await rig.lists.look_up({"d1"}) is None  # discovery reads the whole list
    assert rig.client.reads == []

    rig = make_rig(checked_in(10, 20), settings=config(tags=["kiosk"]))
    assert await rig.lists.look_up(set()) is None
    found = await rig.lists.look_up({"d1"})
    assert found is not None and [d.id for d in found] == ["d0", "d1"]
    assert rig.client.reads == [{"tags": (), "sort": None}]
    rig.advance(30)
    assert await rig.lists.look_up({"d1"}) is None  # at membership's pace
    rig.lists.reconfigure(config(tags=["kiosk"]))  # configured devices may have changed
    assert await rig.lists.look_up({"d1"}) is not None


async def test_check_ins_from_the_future_neither_show_nor_move_the_mark() -> None:
    rig = make_rig([Device("far", last_status_report=START + 86400), *checked_in(10, 200)])
    listed = await rig.lists.refresh()
    assert listed is not None and listed.devices[0].last_status_report is None
    (look,) = await rig.lists.checkins()
    # Down to START - 10 less the overlap: "far" came first, its time is dropped again.
    assert ids(look) == ["far", "d0"] and look.devices[0].last_status_report is None


async def test_a_compliance_check_from_the_future_is_missing_its_verdict_kept() -> None:
    ahead = DeviceHealth(NON_COMPLIANT, START + 86400, "10.0.26100.7623")
    rig = make_rig([Device("far", health=ahead), *checked_in(10)])
    listed = await rig.lists.refresh()
    assert listed is not None
    far = listed.devices[0]
    assert far.health == DeviceHealth(NON_COMPLIANT, None, "10.0.26100.7623")
    assert far.problems == {TIMESTAMP}
    assert listed.devices[1].problems == frozenset()
