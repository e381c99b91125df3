"""Freshness per request: how soon an upstream change shows in the exporter, for a budget.

The simulator runs on a manual clock that only this benchmark moves: between poll rounds,
and inside the client's token bucket, whose ``sleep`` advances simulated time (so a round
that must wait for its budget takes simulated time, as it would take real time). The
exporter is the real one (client over HTTP on 127.0.0.1, scheduler, state), once with
``poll.strategy: budget`` and once with ``round_robin`` (the naive baseline), against two
simulators of the same seed: the same fleet, the same check-ins and new batches.

Measured from the simulator's ground truth (every status every action entered, with its
time):

- delay from each change to the moment the exporter's state holds the action in that status
  or a later one (p50, p95, max), overall and per kind: ``new_batch`` (``Pending``: a batch
  an administrator created), ``checkin`` (``Awaiting`` and answers: only a device's session
  makes them), ``admin_cancel`` (``Cancel``); and ``final_counts``, per batch created in
  the run: from its last answer to the moment the state holds every action's final status
  (the delay a user feels between a device answering and the batch's final counts);
- transitions missed: changes in the measured window still not visible a horizon later, and
  the exported transition counters against the changes the exporter saw (must match);
- requests counted at the simulator: the largest number in any sliding hour against the
  budget, and requests per hour over the run.

Changes are measured in a window after a warm-up (both strategies ready) and followed for a
horizon after it. Usage: python bench/freshness.py [--smoke] [--devices N] [--budget B]
Prints a table and writes bench/results/freshness.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import structlog

from exporter.client import ApiClient, TokenSource
from exporter.config import parse_config
from exporter.records import Action, Batch
from exporter.scheduler import Scheduler
from exporter.selfmetrics import SelfMetrics
from exporter.simulator import Simulator
from exporter.simulator.catalog import ADMIN_CANCEL
from exporter.simulator.cli import sort_mode
from exporter.simulator.fleet import Event
from exporter.state import FleetState

START = 1_770_717_600.0  # 2026-02-10T10:00:00Z
HOUR = 3600.0
RESULTS = Path(__file__).resolve().parent / "results" / "freshness.json"
STRATEGIES = ("budget", "round_robin")
KINDS = ("all", "checkin", "new_batch", "admin_cancel", "final_counts")


@dataclass(frozen=True, slots=True)
class Scenario:
    devices: int
    budget: float  # requests per hour
    interval: float  # poll.interval_seconds
    warmup: float  # simulated seconds before the measured window
    window: float  # measured window
    horizon: float  # how long changes of the window are followed after it
    seed: int = 7
    batches_per_device: int = 5
    new_batches_per_device_hour: float = 0.25
    push: bool = True  # creating a batch pushes its device into a session (when it reaches)
    checkin_seconds: float | None = None  # every device's mean time between sessions
    rollout_share: float = 0.5  # of the new batches, those pushed to much of the fleet at once
    actions_per_batch: tuple[int, int] = (3, 12)
    # What upstream does with sort, per list (the simulator's sort_mode): honoured by default.
    sort_mode: str = "honour"


SMOKE = Scenario(devices=100, budget=600, interval=30, warmup=1500, window=1800, horizon=1800)
FULL = Scenario(devices=2000, budget=10_000, interval=30, warmup=1800, window=5400, horizon=3600)
# A small fleet polled fast: 10 requests/s, a session every ~40 s per device, about 4 new
# batches of 3 actions every 5 s on random devices, no push (a batch waits for its device's
# next session). Naive round-robin cannot do better than a p95 of 0.95 x 200 / 10 = 19 s.
SMALL = Scenario(devices=200, budget=36_000, interval=2, warmup=300, window=600, horizon=300,
                 seed=11, new_batches_per_device_hour=14.4, push=False, checkin_seconds=40,
                 rollout_share=0.0, actions_per_batch=(3, 3))


class ObservedState(FleetState):
    """FleetState that notes, per action, when it first held each status (the stopwatch)."""

    def __init__(self, *, now: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._now = now
        self.last: dict[tuple[str, str], str] = {}
        self.seen: defaultdict[tuple[str, str], list[tuple[float, str]]] = defaultdict(list)

    def apply_actions(self, device: str, batch: Batch, actions: Sequence[Action]) -> None:
        super().apply_actions(device, batch, actions)
        moment = self._now()
        for action in actions:
            key = (batch.id, action.cmd_id)
            if self.last.get(key) != action.status:
                self.last[key] = action.status
                self.seen[key].append((moment, action.status))


@dataclass(slots=True)
class Run:
    strategy: str
    rounds: int = 0
    requests: list[float] = field(default_factory=list)  # simulated time of each request
    wall_seconds: float = 0.0
    ready_after: float | None = None
    report: dict[str, Any] = field(default_factory=dict)


def config_text(base_url: str, scenario: Scenario, strategy: str) -> str:
    return yaml.safe_dump({
        "organization": "demo",
        "api": {"base_url": base_url, "requests_per_hour": scenario.budget, "page_size": 100,
                "max_concurrency": 8},
        "poll": {"interval_seconds": scenario.interval, "strategy": strategy, "jitter": 0},
        "discovery": {"devices": {"refresh_seconds": 900},
                      "batches": {"max_age": "7d", "max_per_device": 20}},
    })


async def run_strategy(scenario: Scenario, strategy: str) -> tuple[Run, Simulator, ObservedState]:
    sim = Simulator(seed=scenario.seed, devices=scenario.devices, speed=0, start=START,
                    max_limit=100, batches_per_device=scenario.batches_per_device,
                    new_batches_per_device_hour=scenario.new_batches_per_device_hour,
                    push=scenario.push, checkin_seconds=scenario.checkin_seconds,
                    rollout_share=scenario.rollout_share,
                    actions_per_batch=scenario.actions_per_batch, sort_mode=scenario.sort_mode)
    run = Run(strategy)
    record = sim.stats.record

    def counted(route: str, status: int) -> None:  # the simulator's own count, timestamped
        run.requests.append(sim.clock.now())
        record(route, status)

    sim.stats.record = counted  # type: ignore[method-assign]
    runner = web.AppRunner(sim.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def sleep(seconds: float) -> None:
        if seconds > 0:
            sim.advance(seconds)
        await asyncio.sleep(0)

    config = parse_config(config_text(f"http://127.0.0.1:{port}/v1", scenario, strategy))
    metrics = SelfMetrics()
    state = ObservedState(now=sim.clock.now, organization="demo",
                          latency_buckets=config.metrics.latency_buckets, metrics=metrics,
                          clock=sim.clock.now)
    client = ApiClient(base_url=config.api.base_url, organization="demo",
                       token=TokenSource(value=sim.token), metrics=metrics,
                       requests_per_hour=config.api.requests_per_hour,
                       max_concurrency=config.api.max_concurrency, page_size=100,
                       monotonic=sim.clock.now, sleep=sleep, seed=scenario.seed)
    scheduler = Scheduler(config, client, state, metrics, clock=sim.clock.now)
    end = START + scenario.warmup + scenario.window + scenario.horizon
    tick = START
    started = time.perf_counter()
    try:
        while sim.clock.now() < end:
            now = sim.clock.now()
            if now < tick:
                sim.advance(tick - now)
            await scheduler.run_round()
            run.rounds += 1
            if run.ready_after is None and scheduler.ready:
                run.ready_after = sim.clock.now() - START
            tick = max(tick + scenario.interval, sim.clock.now())
    finally:
        run.wall_seconds = time.perf_counter() - started
        await client.close()
        await runner.cleanup()
    return run, sim, state


def kind_of(status: str) -> str:
    if status == "Pending":
        return "new_batch"
    if status == ADMIN_CANCEL:
        return "admin_cancel"
    return "checkin"


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def watched_events(sim: Simulator, state: ObservedState) -> Iterator[Event]:
    """The simulator's changes on watched devices after their watermark (when watching them
    began: what came before is history, not counted)."""
    watched = set(state.watched())
    watermarks = {d: state.device_view(d, with_batches=False).watermark for d in watched}
    for event in sim.fleet.events_since(START):
        if event.device_id in watched and event.time > watermarks[event.device_id]:
            yield event


def visibility(sim: Simulator, state: ObservedState) -> list[tuple[float, str, float | None]]:
    """(change time, status, moment it became visible or None) for every change after the
    watermark of its device."""
    truth: defaultdict[tuple[str, str], list[tuple[float, str]]] = defaultdict(list)
    for event in watched_events(sim, state):
        truth[(event.batch_id, event.cmd_id)].append((event.time, event.status))
    out = []
    for key, events in truth.items():
        visible: list[float | None] = [None] * len(events)
        for moment, status in state.seen.get(key, ()):
            # The newest change into this status the upstream could have served by then;
            # the state counts every status on the path before it as well.
            reached = [i for i, (t, s) in enumerate(events) if s == status and t <= moment]
            for i in range(reached[-1] + 1 if reached else 0):
                if visible[i] is None:
                    visible[i] = moment
        out += [(t, s, v) for (t, s), v in zip(events, visible, strict=True)]
    return out


def final_counts(sim: Simulator, state: ObservedState) -> list[tuple[float, float | None]]:
    """(moment a batch's last action became final, moment the state first held every action
    in its final status, or None) for each batch created after its device's watermark.

    This is the delay a user feels: from a device's answer to the batch's final counts."""
    last: dict[str, dict[str, tuple[float, str, str]]] = defaultdict(dict)
    created: set[str] = set()
    for event in watched_events(sim, state):
        if event.status == "Pending":
            created.add(event.batch_id)
        last[event.batch_id][event.cmd_id] = (event.time, event.status, event.status_class)
    out = []
    for batch_id in created:
        actions = last[batch_id]
        if any(status_class == "pending" for _, _, status_class in actions.values()):
            continue
        final = max(moment for moment, _, _ in actions.values())
        shown: list[float] = []
        for cmd_id, (_, status, _) in actions.items():
            held = [m for m, s in state.seen.get((batch_id, cmd_id), ()) if s == status]
            if not held:
                break
            shown.append(held[0])
        out.append((final, max(shown) if len(shown) == len(actions) else None))
    return out


def max_in_window(times: Sequence[float], window: float) -> int:
    ordered = sorted(times)
    best = 0
    for i, moment in enumerate(ordered):
        j = bisect_left(ordered, moment + window)
        best = max(best, j - i)
    return best


def analyse(scenario: Scenario, run: Run, sim: Simulator, state: ObservedState) -> dict[str, Any]:
    changes = visibility(sim, state)
    lo, hi = START + scenario.warmup, START + scenario.warmup + scenario.window
    delays: dict[str, list[float]] = {kind: [] for kind in KINDS}
    missed: Counter[str] = Counter()
    for moment, status, seen in changes:
        if not lo < moment <= hi:
            continue
        kind = kind_of(status)
        if seen is None:
            missed[kind] += 1
            missed["all"] += 1
            continue
        delays[kind].append(seen - moment)
        delays["all"].append(seen - moment)
    for moment, seen in final_counts(sim, state):
        if not lo < moment <= hi:
            continue
        if seen is None:
            missed["final_counts"] += 1
        else:
            delays["final_counts"].append(seen - moment)
    seen_by_status = Counter(s for _, s, v in changes if v is not None)
    exported = Counter({s: n for s, _, n in state.transitions() if n})
    mismatch = sum(((exported - seen_by_status) + (seen_by_status - exported)).values())
    duration = scenario.warmup + scenario.window + scenario.horizon
    in_run = sum(1 for moment in run.requests if moment <= START + duration)
    window = min(HOUR, duration)
    in_window = max_in_window(run.requests, window)
    stats = {
        kind: {
            "changes": len(values) + missed[kind],
            "p50_s": percentile(values, 0.5),
            "p95_s": percentile(values, 0.95),
            "max_s": max(values) if values else None,
            "missed": missed[kind],
        }
        for kind, values in delays.items()
    }
    return {
        "strategy": run.strategy,
        "rounds": run.rounds,
        "ready_after_s": run.ready_after,
        "wall_seconds": round(run.wall_seconds, 2),
        "requests": in_run,
        "requests_by_route": {route: sim.stats.total(route)
                              for route in ("devices", "commands", "command", "actions")},
        "requests_per_hour": round(in_run * HOUR / duration, 1),
        "peak_requests_in_an_hour": round(in_window * HOUR / window, 1),
        "budget_per_hour": scenario.budget,
        # A token bucket may add its burst (5 s of budget, at least 1) to any window, however
        # short; and the simulator stamps a request when it answers it, by which time the
        # bucket of the next one may have moved simulated time on: one request may land in
        # the next window.
        "budget_exceeded": in_window > scenario.budget * window / HOUR
        + max(1.0, scenario.budget * 5 / HOUR) + 1,
        "counter_mismatch": mismatch,
        "delays": stats,
    }


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = [f"{'strategy':<12} {'kind':<13} {'changes':>8} {'p50 s':>7} {'p95 s':>7} "
            f"{'max s':>7} {'missed':>6}"]
    for strategy, result in results.items():
        for kind in KINDS:
            s = result["delays"][kind]
            rows.append(f"{strategy:<12} {kind:<13} {s['changes']:>8} {fmt(s['p50_s']):>7} "
                        f"{fmt(s['p95_s']):>7} {fmt(s['max_s']):>7} {s['missed']:>6}")
    rows.append("")
    rows.append(f"{'strategy':<12} {'req/h':>8} {'peak/h':>8} {'budget':>8} {'exceeded':>8} "
                f"{'counter≠':>8} {'ready s':>8} {'wall s':>7}  requests by route")
    for strategy, r in results.items():
        rows.append(f"{strategy:<12} {r['requests_per_hour']:>8,.0f} "
                    f"{r['peak_requests_in_an_hour']:>8,.0f} {r['budget_per_hour']:>8,.0f} "
                    f"{r['budget_exceeded']!s:>8} {r['counter_mismatch']:>8} "
                    f"{fmt(r['ready_after_s']):>8} {r['wall_seconds']:>7}  "
                    + " ".join(f"{k}={v}" for k, v in r["requests_by_route"].items() if v))
    return "\n".join(rows)


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for kind in KINDS:
        budget = results["budget"]["delays"][kind]["p95_s"]
        naive = results["round_robin"]["delays"][kind]["p95_s"]
        out[kind] = round(budget / naive, 3) if budget is not None and naive else None
    return out


async def main_async(scenario: Scenario) -> dict[str, Any]:
    results = {}
    truth = {}
    for strategy in STRATEGIES:
        run, sim, state = await run_strategy(scenario, strategy)
        results[strategy] = analyse(scenario, run, sim, state)
        end = START + scenario.warmup + scenario.window + scenario.horizon
        truth[strategy] = sum(1 for e in sim.fleet.events_since(START) if e.time <= end)
    if truth["budget"] != truth["round_robin"]:
        print(f"warning: the two fleets diverged ({truth})", file=sys.stderr)
    return {"scenario": asdict(scenario), "results": results,
            "p95_ratio_budget_to_naive": ratios(results),
            "same_fleet": truth["budget"] == truth["round_robin"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small fleet, seconds")
    parser.add_argument("--small", action="store_true",
                        help="200 devices at 10 requests/s, interval 2 s, no push (SMALL)")
    parser.add_argument("--devices", type=int)
    parser.add_argument("--budget", type=float)
    parser.add_argument("--window", type=float, help="measured window, simulated seconds")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-push", dest="push", action="store_false", default=None,
                        help="batches wait for their device's scheduled session")
    parser.add_argument("--sort-mode", type=sort_mode,
                        help="upstream's sort, e.g. devices=ignore, "
                        "devices=reject, ignore (the simulator's sort_mode)")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    scenario = SMOKE if args.smoke else SMALL if args.small else FULL
    overrides = {k: v for k, v in (("devices", args.devices), ("budget", args.budget),
                                   ("window", args.window), ("seed", args.seed),
                                   ("push", args.push), ("sort_mode", args.sort_mode))
                 if v is not None}
    if overrides:
        scenario = replace(scenario, **overrides)
    report = asyncio.run(main_async(scenario))
    print(f"{scenario.devices} devices, budget {scenario.budget:,.0f} requests/hour, "
          f"interval {scenario.interval:.0f} s, window {scenario.window / HOUR:.2f} h "
          f"after {scenario.warmup / HOUR:.2f} h warm-up, horizon {scenario.horizon / HOUR:.2f} h, "
          f"seed {scenario.seed}, push {'on' if scenario.push else 'off'}, "
          f"sort {scenario.sort_mode}")
    print(table(report["results"]))
    print("p95 delay, budget / round_robin: " + ", ".join(
        f"{k} {v}" for k, v in report["p95_ratio_budget_to_naive"].items()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
