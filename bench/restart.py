"""A restart, with and without the store: how long until every device's state is current.

The simulator runs on a manual clock this benchmark moves; the exporter is the real one
(client over HTTP on 127.0.0.1, budget scheduler, state, and with the store its SQLite file
in a temporary directory), its budget waits taking simulated time. Each case runs twice
from the same seed:

1. the first process polls until ready and a few rounds more, commits, and stops;
2. the fleet moves on for DOWN_SECONDS (sessions answer, batches are created);
3. a second process starts, restoring from the store or not, while the fleet rests (its
   clock runs on, the fleet's does not, so "current" is reachable and exact): rounds run
   until every batch's exported counts equal the simulator's.

Measured in the second process: simulated seconds until current, requests, rounds, and
whether every change since the first process began watching was counted exactly once. A
third run never stops (it polls through the downtime): its time to current is the lag any
exporter has at this budget, the floor a restart is measured against.

Usage: python bench/restart.py [--smoke]   (full: 2,000 devices x 20 batches, 10,000 req/h)
Prints a table and writes bench/results/restart.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog
import yaml
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporter.client import ApiClient, TokenSource
from exporter.config import parse_config
from exporter.scheduler import Scheduler
from exporter.selfmetrics import SelfMetrics
from exporter.simulator import Simulator
from exporter.snapshot import Persistence
from exporter.state import FleetState
from exporter.store import DirectoryLock, open_directory

START = 1_770_717_600.0
DOWN_SECONDS = 120.0  # a rolling update's worth of downtime
STEADY_ROUNDS = 3
RESULTS = Path(__file__).resolve().parent / "results" / "restart.json"


@dataclass(frozen=True, slots=True)
class Case:
    devices: int
    budget: float
    batches: int
    interval: float = 30.0
    seed: int = 7


SMOKE = Case(devices=60, budget=1_200, batches=5)
FULL = Case(devices=2000, budget=10_000, batches=20)


class Clock:
    """The exporter's time: the fleet's while both run; while the fleet rests, it runs on
    alone (budget waits and round intervals still take time)."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.extra = 0.0
        self.resting = False

    def now(self) -> float:
        return self.sim.clock.now() + self.extra

    def advance(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if self.resting:
            self.extra += seconds
        else:
            self.sim.advance(seconds)

    async def sleep(self, seconds: float) -> None:
        self.advance(seconds)
        await asyncio.sleep(0)


@dataclass(slots=True)
class Process:
    state: FleetState
    client: ApiClient
    scheduler: Scheduler
    persistence: Persistence | None


def start(case: Case, url: str, token: str, clock: Clock, store: Path | None) -> Process:
    config = parse_config(yaml.safe_dump({
        "organization": "demo",
        "api": {"base_url": url, "requests_per_hour": case.budget, "page_size": 100},
        "poll": {"interval_seconds": case.interval, "jitter": 0},
        "discovery": {"devices": {"refresh_seconds": 900},
                      # The whole history: "current" compares every batch upstream has.
                      "batches": {"max_age": "3650d", "max_per_device": 1000}},
    }))
    metrics = SelfMetrics()
    state = FleetState(organization="demo", latency_buckets=config.metrics.latency_buckets,
                       metrics=metrics, clock=clock.now, wall_clock=clock.now)
    client = ApiClient(base_url=url, organization="demo", token=TokenSource(value=token),
                       metrics=metrics, requests_per_hour=case.budget, page_size=100,
                       monotonic=clock.now, sleep=clock.sleep, seed=case.seed)
    scheduler = Scheduler(config, client, state, metrics, clock=clock.now)
    persistence = None
    if store is not None:
        lock = DirectoryLock(store)
        persistence = Persistence(lambda: open_directory(store, "demo", lock), state, metrics,
                                  marks=lambda: scheduler.tracking, lock=lock,
                                  verdicts=client.verdicts)
        assert persistence.open()
        persistence.load()
        scheduler.adopt_restored()
    return Process(state, client, scheduler, persistence)


async def stop(process: Process) -> None:
    if process.persistence is not None:
        assert await process.persistence.flush()
        await process.persistence.close()
    await process.client.close()


def current(process: Process, sim: Simulator) -> bool:
    """Every batch's exported counts are the simulator's."""
    watched = set(process.state.watched())
    for device in sim.fleet.device_ids():
        if device not in watched:
            return False
        exported = {b.id: {s: n for s, _, n in b.counts}
                    for b in process.state.device_view(device).batches}
        for batch in sim.fleet.batch_ids(device):
            truth = {s: n for s, n in sim.fleet.grouped_counts(device, batch).items() if n}
            if exported.get(batch, {}) != truth:
                return False
    return True


async def rounds(process: Process, clock: Clock, interval: float, until: Any) -> int:
    count, tick = 0, clock.now()
    while not until():
        if clock.now() < tick:
            clock.advance(tick - clock.now())
        await process.scheduler.run_round()
        count += 1
        tick = max(tick + interval, clock.now())
        if process.persistence is not None:
            await process.persistence.flush()
    return count


NEVER_STOPPED, WITH_STORE, WITHOUT_STORE = "never stopped", "restart, store", "restart, no store"


async def run(case: Case, variant: str) -> dict[str, Any]:
    sim = Simulator(seed=case.seed, devices=case.devices, speed=0, start=START, max_limit=100,
                    batches_per_device=case.batches, new_batches_per_device_hour=0.5)
    runner = web.AppRunner(sim.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"  # type: ignore[union-attr]
    requests = [0]
    record = sim.stats.record

    def counted(route: str, status: int) -> None:
        requests[0] += 1
        record(route, status)

    sim.stats.record = counted  # type: ignore[method-assign]
    clock = Clock(sim)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as directory:
            store = Path(directory) if variant != WITHOUT_STORE else None
            first = start(case, url, sim.token, clock, store)
            ready = [0]

            def settled() -> bool:
                ready[0] += first.scheduler.ready
                return ready[0] > STEADY_ROUNDS

            await rounds(first, clock, case.interval, settled)
            watermarks = {d: first.state.device_view(d).watermark for d in first.state.watched()}
            if variant == NEVER_STOPPED:
                end = clock.now() + DOWN_SECONDS
                await rounds(first, clock, case.interval, lambda: clock.now() >= end)
                second = first
            else:
                await stop(first)
                sim.advance(DOWN_SECONDS)  # the fleet moves while no exporter runs
            clock.resting = True
            restarted_at, before = clock.now(), requests[0]
            if variant != NEVER_STOPPED:
                second = start(case, url, sim.token, clock, store)
            served = current(second, sim)
            count = await rounds(second, clock, case.interval, lambda: current(second, sim))
            took = clock.now() - restarted_at
            exported = Counter({s: n for s, _, n in second.state.transitions() if n})
            # What happened on each device after it was first watched (its watermark).
            truth = Counter(
                e.status for e in sim.fleet.events_since(START)
                if e.device_id in watermarks and e.time > watermarks[e.device_id]
            )
            await stop(second)
    finally:
        await runner.cleanup()
    return {
        "variant": variant,
        "current_after_seconds": took,
        "requests": requests[0] - before,
        "rounds": count,
        "current_when_served": served,
        "counted_exactly_once": exported == truth if variant != WITHOUT_STORE else None,
        "wall_seconds": time.perf_counter() - started,
    }


async def main_async(case: Case) -> dict[str, Any]:
    rows = [await run(case, v) for v in (NEVER_STOPPED, WITH_STORE, WITHOUT_STORE)]
    seconds = {row["variant"]: max(row["current_after_seconds"], 1e-9) for row in rows}
    return {"case": asdict(case), "rows": rows,
            "ratio_with_to_without": seconds[WITH_STORE] / seconds[WITHOUT_STORE],
            "ratio_with_to_never_stopped": seconds[WITH_STORE] / seconds[NEVER_STOPPED]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a small fleet, for CI")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    case = SMOKE if args.smoke else FULL
    report = asyncio.run(main_async(case))
    print(f"{case.devices} devices x {case.batches} batches, {case.budget:,.0f} requests/h, "
          f"down {DOWN_SECONDS:.0f} s; after the restart, while the fleet rests:")
    print(f"{'':>18} {'current after':>14} {'requests':>9} {'rounds':>7} "
          f"{'exact counts':>13} {'wall s':>7}")
    for row in report["rows"]:
        exact = {None: "-", True: "yes", False: "NO"}[row["counted_exactly_once"]]
        print(f"{row['variant']:>18} {row['current_after_seconds']:>12.0f} s "
              f"{row['requests']:>9} {row['rounds']:>7} {exact:>13} {row['wall_seconds']:>7.1f}")
    print(f"time to current, restart with the store / without: "
          f"{report['ratio_with_to_without']:.3f}; / never stopped: "
          f"{report['ratio_with_to_never_stopped']:.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["counted_exactly_once"] is not False for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
