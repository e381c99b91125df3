"""The scheduler: discovery, batch ageing, the request budget, priorities, throttling, and the
round_robin baseline.

The exporter's parts are real (client over HTTP, state, exposition) against the simulator
served by a real aiohttp server on a manual clock. The client's token bucket runs on the
simulator's clock and its ``sleep`` moves that clock, so waiting for the budget takes
simulated time as it would take real time. Requests are counted at the simulator.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from exporter.client import ApiClient, TokenSource
from exporter.config import parse_config
from exporter.devicelists import FULL_LIST_SHARE
from exporter.exposition import Exposition
from exporter.planner import SWEEP_SHARE, Reason, answer_wait, cost, due
from exporter.scheduler import RoundResult, Scheduler
from exporter.selfmetrics import SelfMetrics
from exporter.simulator import Simulator
from exporter.state import FleetState

HOUR = 3600.0


@dataclass
class Rig:
    sim: Simulator
    state: FleetState
    client: ApiClient
    scheduler: Scheduler
    metrics: SelfMetrics
    url: str
    request_times: list[float] = field(default_factory=list)

    async def round(self) -> RoundResult:
        return await self.scheduler.run_round()

    def requests(self, route: str | None = None) -> int:
        return self.sim.stats.total(route)

    def gauges(self) -> dict[tuple[str, str], dict[str, int]]:
        """(device, batch) -> {status: count} as the state exports them."""
        out = {}
        for device in self.state.watched():
            for batch in self.state.device_view(device).batches:
                out[(device, batch.id)] = {s: n for s, _, n in batch.counts}
        return out

    def truth(self, devices: list[str] | None = None) -> dict[tuple[str, str], dict[str, int]]:
        out = {}
        for device in devices if devices is not None else self.sim.fleet.device_ids():
            for batch in self.sim.fleet.batch_ids(device):
                counts = {s: n for s, n in self.sim.fleet.grouped_counts(device, batch).items()}
                if counts:
                    out[(device, batch)] = counts
        return out


def config_text(base_url: str, **sections: Any) -> str:
    document: dict[str, Any] = {
        "organization": "demo",
        "api": {"base_url": base_url, "requests_per_hour": 1_000_000, "page_size": 100},
        "poll": {"interval_seconds": 60, "jitter": 0},
        "discovery": {
            "devices": {"refresh_seconds": 900},
            "batches": {"max_age": "3650d", "max_per_device": 1000},
        },
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(document.get(name), dict):
            document[name] = {**document[name], **value}
        else:
            document[name] = value
    return yaml.safe_dump(document)


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(make_simulator_server: Any) -> AsyncIterator[MakeRig]:
    rigs: list[Rig] = []

    async def make(sim_options: dict[str, Any] | None = None, **sections: Any) -> Rig:
        sim, url = await make_simulator_server(**(sim_options or {}))
        config = parse_config(config_text(url, **sections))

        async def sleep(seconds: float) -> None:
            if seconds > 0:
                sim.advance(seconds)
            await asyncio.sleep(0)

        metrics = SelfMetrics()
        state = FleetState(organization="demo", latency_buckets=config.metrics.latency_buckets,
                           metrics=metrics, clock=sim.clock.now)
        client = ApiClient(base_url=config.api.base_url, organization="demo",
                           token=TokenSource(value=sim.token), metrics=metrics,
                           requests_per_hour=config.api.requests_per_hour,
                           page_size=config.api.page_size, monotonic=sim.clock.now,
                           sleep=sleep, seed=3)
        scheduler = Scheduler(config, client, state, metrics, clock=sim.clock.now)
        rig = Rig(sim, state, client, scheduler, metrics, url)
        record = sim.stats.record

        def counted(route: str, status: int) -> None:
            rig.request_times.append(sim.clock.now())
            record(route, status)

        sim.stats.record = counted  # type: ignore[method-assign]
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        await rig.client.close()


async def rounds_until(rig: Rig, seconds: float, interval: float = 60.0) -> list[RoundResult]:
    """Rounds every ``interval`` simulated seconds (or back to back when one runs longer)."""
    end = rig.sim.clock.now() + seconds
    tick = rig.sim.clock.now()
    results = []
    while rig.sim.clock.now() < end:
        if rig.sim.clock.now() < tick:
            rig.sim.advance(tick - rig.sim.clock.now())
        results.append(await rig.round())
        tick = max(tick + interval, rig.sim.clock.now())
    return results


def retag(sim: Simulator, device: str, tags: tuple[str, ...]) -> None:
    """An administrator changes a device's tags upstream."""
    entity = sim.fleet.device(device)
    entity.profile = replace(entity.profile, tags=tags)
    entity.json = None  # the simulator caches each device's document


# --- discovery ---------------------------------------------------------------------------------


async def test_discovered_devices_follow_the_upstream_set(make_rig: MakeRig) -> None:
    rig = await make_rig(discovery={"devices": {"tags": ["watched"], "refresh_seconds": 300}})
    first, second, third = rig.sim.fleet.device_ids()[:3]
    retag(rig.sim, first, ("watched",))
    retag(rig.sim, second, ("watched",))
    await rig.round()
    assert set(rig.scheduler.targets) == {first, second}
    assert {d for d, _ in rig.gauges()} == {first, second}

    retag(rig.sim, second, ("elsewhere",))
    retag(rig.sim, third, ("watched",))
    rig.sim.advance(120)
    await rig.round()
    assert set(rig.scheduler.targets) == {first, second}, "refreshed before refresh_seconds"

    rig.sim.advance(300)
    await rig.round()
    assert set(rig.scheduler.targets) == {first, third}
    assert second not in rig.state.watched()
    assert {d for d, _ in rig.gauges()} == {first, third}
    assert rig.gauges() == rig.truth([first, third])


async def test_explicit_and_discovered_devices_merge_without_duplicates(
    make_rig: MakeRig,
) -> None:
    rig = await make_rig()
    await rig.round()
    by_id, by_serial = rig.sim.fleet.device_ids()[2:4]
    serial = rig.sim.fleet.device(by_serial).serial
    config = parse_config(config_text(
        rig.url,
        devices=[{"id": by_id, "name": "front-desk"}, {"id": serial, "name": "till"}],
    ))
    rig.scheduler.reload(config)
    await rig.round()
    targets = rig.scheduler.targets
    # Every device once: the one named by its serial is watched under the serial only.
    assert len(targets) == len(rig.sim.fleet.device_ids())
    assert by_serial not in targets and by_serial not in rig.state.watched()
    assert targets[by_id].name == "front-desk"  # the explicit entry wins
    assert rig.state.device_view(serial).name == "till"
    assert rig.gauges()[(serial, rig.sim.fleet.batch_ids(by_serial)[0])]


async def test_batches_beyond_max_age_or_max_per_device_leave(make_rig: MakeRig) -> None:
    rig = await make_rig(
        {"batches_per_device": 6, "new_batches_per_device_hour": 0},
        discovery={"batches": {"max_age": "6h", "max_per_device": 3}},
    )
    await rig.round()
    now = rig.sim.clock.now()
    for device in rig.sim.fleet.device_ids():
        kept = [b for d, b in rig.gauges() if d == device]
        created = {
            b: rig.sim.fleet.batch(rig.sim.fleet.device(device), b).created
            for b in rig.sim.fleet.batch_ids(device)
        }
        expected = [b for b in sorted(created, key=created.get, reverse=True)
                    if created[b] >= now - 6 * HOUR][:3]
        assert sorted(kept) == sorted(expected)
    assert rig.gauges(), "some batches should be recent enough"

    rig.sim.advance(7 * HOUR)
    await rig.round()
    assert rig.gauges() == {}, "every batch aged out"


# --- the budget --------------------------------------------------------------------------------


async def test_requests_counted_at_the_simulator_stay_within_the_budget(
    make_rig: MakeRig,
) -> None:
    budget = 240.0
    rig = await make_rig({"devices": 30}, api={"requests_per_hour": budget},
                         poll={"interval_seconds": 30})
    await rounds_until(rig, 2 * HOUR, interval=30)
    times = sorted(rig.request_times)
    burst = max(1.0, budget * 5 / HOUR)
    # The simulator stamps a request when it answers it; meanwhile the bucket of the next
    # one may have moved simulated time on, so one request may land in the next window.
    in_flight = 1
    for i, start in enumerate(times):
        in_hour = sum(1 for t in times[i:] if t < start + HOUR)
        assert in_hour <= budget + burst + in_flight
    # ...and the budget is used, not wasted: the fleet has more work than it allows.
    assert len(times) >= 1.8 * budget


async def test_a_steady_fleet_costs_one_request_per_device_and_no_action_pages(
    make_rig: MakeRig,
) -> None:
    rig = await make_rig({"devices": 12, "new_batches_per_device_hour": 0})
    await rig.round()
    rig.sim.advance(5 * 86400)  # every online device answers everything it was sent
    await rig.round()
    rig.sim.advance(HOUR)
    await rig.round()
    before, actions_before = rig.requests(), rig.requests("actions")
    for _ in range(3):
        rig.sim.advance(HOUR)
        result = await rig.round()
        assert result.polled == 12
    per_round = (rig.requests() - before) / 3
    assert per_round <= 12 + 1  # one history read per device, one device-list page
    assert rig.requests("actions") == actions_before
    assert rig.gauges() == rig.truth()


async def test_devices_that_checked_in_are_polled_before_quiet_ones(make_rig: MakeRig) -> None:
    rig = await make_rig({"devices": 40, "new_batches_per_device_hour": 0},
                         api={"requests_per_hour": 720}, poll={"interval_seconds": 60})
    for _ in range(30):  # until every device was read once
        await rounds_until(rig, 60)
        if rig.scheduler.ready:
            break
    assert rig.scheduler.ready
    await rounds_until(rig, 600)
    reports = {d: rig.sim.fleet.device(d).last_report for d in rig.sim.fleet.device_ids()}
    read_before = {d: t.read_at for d, t in rig.scheduler.tracking.items()}
    rig.sim.advance(600)  # the exporter stalls for ten minutes; devices keep checking in
    checked_in = {d for d in reports if rig.sim.fleet.device(d).last_report != reports[d]}
    assert checked_in, "some devices should have checked in"
    now = rig.sim.clock.now()
    wait = answer_wait(rig.state.latency().values())  # as the round will judge it
    due_before = {d: due(replace(t), now, answer_seconds=wait)
                  for d, t in rig.scheduler.tracking.items()}
    # Devices known to have changed take at most 1 - SWEEP_SHARE of a round, counted in the
    # requests the plan expects (a page per batch that was pending, too); the round sees
    # every check-in in the device list it reads first.
    wanted = 0
    for device, known in rig.scheduler.tracking.items():
        seen = replace(known, checkin=rig.sim.fleet.device(device).last_report)
        if Reason.NEW < due(seen, now, answer_seconds=wait).reason < Reason.SWEEP:
            wanted += cost(seen, None)

    result = await rig.round()
    polled = {d for d, t in rig.scheduler.tracking.items() if t.read_at != read_before[d]}
    assert result.polled < 40, "the budget must force a choice"
    assert wanted <= result.planned * (1 - SWEEP_SHARE), "the test wants room for all of them"
    assert checked_in <= polled
    # The rest of the round went to the sweep, longest unread first. (Devices that checked in
    # after their last read go first, also those the exporter had not yet seen check in when
    # the due times were taken.)
    moved = {d for d in reports if rig.sim.fleet.device(d).last_report > read_before[d]}
    swept, waiting = polled - moved, set(reports) - polled - moved
    assert swept and waiting
    assert max(due_before[d].at for d in swept) <= min(due_before[d].at for d in waiting)
    truth = rig.truth(sorted(checked_in))
    assert {k: v for k, v in rig.gauges().items() if k[0] in checked_in} == truth


async def test_throttling_slows_the_plan(make_rig: MakeRig) -> None:
    rig = await make_rig({"devices": 40}, api={"requests_per_hour": 720},
                         poll={"interval_seconds": 30})
    steady = await rounds_until(rig, 1200, interval=30)
    planned_before = max(r.planned for r in steady[-10:])
    rig.sim.faults.set("throttle=0.5:0")
    throttled = await rounds_until(rig, 300, interval=30)
    assert rig.sim.stats.counts[("commands", 429)] + rig.sim.stats.counts[("devices", 429)] > 0
    rig.sim.faults.clear()
    start = rig.sim.clock.now()
    after = await rounds_until(rig, 120, interval=30)
    assert max(r.planned for r in after) < planned_before
    assert rig.metrics.budget_requests_per_hour < 720
    spent = sum(1 for t in rig.request_times if start <= t < start + 120)
    assert spent < 720 * 120 / HOUR
    assert throttled


async def test_credit_is_earned_on_the_buckets_clock_while_upstreams_stands_still(
    make_rig: MakeRig,
) -> None:
    """Upstream's time line (check-ins, batch ages) and the bucket's clock (the rate) are not
    one clock: the demo's upstream runs 30x faster, a simulated one may stand still. While
    upstream's clock does not move, the budget still earns requests, and new batches are read.
    """
    rig = await make_rig({"devices": 12, "new_batches_per_device_hour": 0},
                         api={"requests_per_hour": 600}, poll={"interval_seconds": 60})
    bucket_now = [0.0]

    async def sleep(seconds: float) -> None:
        bucket_now[0] += max(0.0, seconds)
        await asyncio.sleep(0)

    config, sim = rig.scheduler.config, rig.sim
    metrics = SelfMetrics()
    state = FleetState(organization="demo", latency_buckets=config.metrics.latency_buckets,
                       metrics=metrics, clock=sim.clock.now)
    client = ApiClient(base_url=config.api.base_url, organization="demo",
                       token=TokenSource(value=sim.token), metrics=metrics,
                       requests_per_hour=config.api.requests_per_hour,
                       page_size=config.api.page_size, monotonic=lambda: bucket_now[0],
                       sleep=sleep, seed=3)
    scheduler = Scheduler(config, client, state, metrics, clock=sim.clock.now)
    try:

        async def rounds(count: int) -> None:
            for _ in range(count):
                bucket_now[0] += config.poll.interval_seconds  # upstream's time stands still
                await scheduler.run_round()

        await rounds(12)
        assert scheduler.ready
        for device in sim.fleet.device_ids():
            sim.fleet.create_random_batch(device)
        before, started = client.budget.spent, bucket_now[0]
        await rounds(12)
        exported = {
            (d, b.id): {s: n for s, _, n in b.counts}
            for d in state.watched() for b in state.device_view(d).batches
        }
        assert exported == rig.truth()
        # ...within the budget of the bucket's time, not more because upstream's stood still.
        earned = config.api.requests_per_hour * (bucket_now[0] - started) / HOUR
        assert 12 <= client.budget.spent - before <= earned + config.api.requests_per_hour / 720
    finally:
        await client.close()


# --- the round_robin baseline ------------------------------------------------------------------


async def test_round_robin_reads_every_device_and_pending_actions_every_round(
    make_rig: MakeRig,
) -> None:
    rig = await make_rig({"devices": 12, "new_batches_per_device_hour": 0},
                         poll={"strategy": "round_robin"})
    await rig.round()
    pending = sum(
        1 for d, b in rig.truth()
        if rig.sim.fleet.grouped_counts(d, b).keys() & {"Pending", "Awaiting"}
    )
    assert pending, "the fleet should start with some pending batches"
    before, actions_before = rig.requests(), rig.requests("actions")
    result = await rig.round()  # nothing changed upstream
    assert result.polled == 12
    assert rig.requests("actions") - actions_before == pending  # re-read although unchanged
    assert rig.requests() - before == 12 + pending


async def test_round_robin_under_a_tight_budget_takes_longer_than_its_interval(
    make_rig: MakeRig,
) -> None:
    rig = await make_rig({"devices": 30}, api={"requests_per_hour": 360},
                         poll={"strategy": "round_robin", "interval_seconds": 60})
    start = rig.sim.clock.now()
    await rig.round()
    await rig.round()
    # Two rounds of 30+ requests each at 0.1 request per second.
    assert rig.sim.clock.now() - start > 2 * 30 / 0.1 * 0.9
    assert rig.scheduler.ready


@pytest.mark.parametrize("tags_format", ["any", "ignore"])
async def test_the_whole_device_list_keeps_to_its_share_of_the_budget(
    make_rig: MakeRig, tags_format: str
) -> None:
    # Upstream ignores the sort by check-in, so the full list brings them; with the tags
    # filter ignored too, it is the whole organization's (200 devices, 10 pages) for the 10
    # watched. Read for check-ins and by discovery (every minute) alike, it keeps to
    # FULL_LIST_SHARE of the budget: either read paces the next.
    rig = await make_rig({"devices": 200, "sort_mode": {"devices": "ignore"},
                          "tags_format": tags_format},
                         api={"requests_per_hour": 3_600, "page_size": 20},
                         poll={"interval_seconds": 2},
                         discovery={"devices": {"tags": ["watched"], "refresh_seconds": 60}})
    for device in rig.sim.fleet.device_ids()[:10]:
        retag(rig.sim, device, ("watched",))
    await rig.round()
    listed = rig.requests("devices")
    await rounds_until(rig, 600, interval=2)
    assert rig.metrics.checkin_source == "full_list"
    pages = 10 if tags_format == "ignore" else 1
    share = (rig.requests("devices") - listed) / 600 * HOUR / 3_600
    assert share <= FULL_LIST_SHARE + pages / 600, share
    assert rig.scheduler.targets.keys() == set(rig.sim.fleet.device_ids()[:10])


async def test_requests_planned_are_exported_next_to_the_budget(make_rig: MakeRig) -> None:
    rig = await make_rig({"devices": 10}, api={"requests_per_hour": 600})
    result = await rig.round()
    assert 0 < result.planned <= 600 * 60 / HOUR
    body = Exposition(rig.state, rig.metrics, version="test").body(openmetrics=False).decode()
    assert f"applivery_exporter_api_requests_planned {result.planned}\n" in body


@pytest.mark.parametrize(
    ("mode", "source"),
    [("honour", "sorted_list"), ("ignore", "full_list"), ("reject", "full_list")],
)
async def test_check_ins_are_learned_whatever_upstream_does_with_their_sort(
    make_rig: MakeRig, mode: str, source: str
) -> None:
    # Devices check in every ~40 s: the plan learns who did from the list sorted by check-in
    # or, where upstream ignores or refuses that sort, from the whole list, and reads them.
    rig = await make_rig({"devices": 30, "checkin_seconds": 40.0, "push": False,
                          "new_batches_per_device_hour": 30.0, "rollout_share": 0.0,
                          "sort_mode": {"devices": mode}},
                         api={"requests_per_hour": 36_000, "page_size": 10},
                         poll={"interval_seconds": 2})
    with capture_logs() as logs:
        await rounds_until(rig, 300, interval=2)
    assert rig.metrics.checkin_source == source
    switches = [e for e in logs if e["event"] == "checkin_source"]
    assert len(switches) == (0 if mode == "honour" else 1)  # said once, not every round
    # Every device that checked in more than a few rounds ago has been read since.
    now = rig.sim.clock.now()
    for device in rig.sim.fleet.device_ids():
        report = rig.sim.fleet.device(device).last_report
        read_at = rig.scheduler.tracking[device].read_at
        if report is not None and report < now - 10:
            assert read_at is not None and read_at >= report, device
    # The budget kept: five minutes of 10 requests/s, the bucket's burst and one in flight.
    assert len(rig.request_times) <= 300 * 10 + 50 + 1
