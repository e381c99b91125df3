"""The exporter at fleet scale: memory per tracked action, CPU per poll round, scrape latency.

For each fleet size the simulator (DEVICES x 20 batches x 10 actions by default) runs in a
child process of its own, and the exporter in another fresh child, so each RSS figure is one
exporter's alone. The exporter is the real one (``build_exporter``: client over HTTP on
127.0.0.1, budget scheduler, state, exposition, the aiohttp server for scrapes), with its
upstream clock set before the simulated history: every batch then counts as live and every
action is tracked one by one, the worst case for memory (an exporter started on a quiet
fleet keeps finished history as summaries only).

Measured per size:

- RSS before the first round, after it (every action tracked), after the first and the
  last of a few steady rounds (nothing changed upstream: between those nothing may grow),
  and after rendering /metrics;
  bytes per tracked action = growth over the baseline / tracked actions;
- CPU seconds (process time) of the first round and of a steady round, and how much of the
  latter the garbage collector took;
- /metrics: the first full render, run in the steps the serving loop runs it in, and its
  longest step (how long a scrape may wait for the event loop meanwhile); body size; the
  latency of scrapes over HTTP (plain and gzip, median of several).

Usage: python bench/scale.py [--smoke] [--sizes 2500,5000,10000]
Prints a table and writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import rss_bytes

START = 1_770_717_600.0  # 2026-02-10T10:00:00Z
TOKEN = "bench-token"
ORG = "bench"
RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"
TARGET_BYTES_PER_ACTION = 300
SCRAPES = 5
STEADY_ROUNDS = 4


@dataclass(frozen=True, slots=True)
class Size:
    devices: int
    batches: int = 20
    actions: int = 10


# --- the simulator child -------------------------------------------------------------------------


def serve_simulator(size: Size, ports: Any) -> None:
    from aiohttp import web

    from exporter.simulator import Simulator

    sim = Simulator(seed=5, devices=size.devices, organization=ORG, token=TOKEN, speed=0,
                    start=START, max_limit=100, batches_per_device=size.batches,
                    actions_per_batch=(size.actions, size.actions), record_events=False,
                    new_batches_per_device_hour=0)

    async def main() -> None:
        runner = web.AppRunner(sim.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ports.put(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        await asyncio.Event().wait()

    asyncio.run(main())


# --- the exporter child --------------------------------------------------------------------------


def measure(size: Size, url: str, results: Any) -> None:
    results.put(asyncio.run(_measure(size, url)))


async def _measure(size: Size, url: str) -> dict[str, Any]:
    import aiohttp
    import structlog
    import yaml
    from aiohttp import web

    from exporter.cli import build_exporter
    from exporter.client import TokenSource
    from exporter.config import parse_config
    from exporter.server import Hooks, make_app

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    config = parse_config(yaml.safe_dump({
        "organization": ORG,
        "api": {"base_url": url, "requests_per_hour": 1e9, "max_concurrency": 16},
        "poll": {"interval_seconds": 60, "strategy": "budget"},
        "discovery": {"devices": {"refresh_seconds": 86400},
                      "batches": {"max_age": "3650d", "max_per_device": size.batches}},
    }))
    # Watching began before the simulated history (every batch is live, every action
    # tracked); reading happens in its present (timestamps ahead of the clock are garbage).
    now = [START - 100 * 86400]
    exporter = build_exporter(config, TokenSource(value=TOKEN), config_path=None,
                              clock=lambda: now[0])
    for device in await exporter.client.list_devices():
        exporter.state.watch(device.id)
    now[0] = START
    out: dict[str, Any] = {**asdict(size)}
    gc.collect()
    out["rss_baseline"] = rss_bytes()

    async def timed_round() -> tuple[float, float]:
        cpu, wall = time.process_time(), time.perf_counter()
        result = await exporter.scheduler.run_round()
        assert result.failed == 0, result
        return time.process_time() - cpu, time.perf_counter() - wall

    out["fill_cpu_s"], out["fill_wall_s"] = await timed_round()
    gc.collect()
    out["rss_filled"] = rss_bytes()
    out["tracked_actions"] = exporter.state.tracked_actions()
    steady = [await timed_round()]
    gc.collect()
    out["rss_steady_first"] = rss_bytes()
    collector = CollectorTime()
    gc.callbacks.append(collector)
    steady += [await timed_round() for _ in range(STEADY_ROUNDS - 1)]
    gc.callbacks.remove(collector)
    out["steady_gc_s"] = collector.seconds / (STEADY_ROUNDS - 1)
    out["steady_cpu_s"] = statistics.median(cpu for cpu, _ in steady)
    out["steady_wall_s"] = statistics.median(wall for _, wall in steady)
    out["steady_requests"] = exporter.metrics.requests_planned
    gc.collect()
    out["rss_steady"] = rss_bytes()

    # The first render in the steps the serving loop runs it in: the longest step is how
    # long a scrape may wait for the event loop meanwhile.
    collector = CollectorTime()
    gc.callbacks.append(collector)
    started = mark = time.perf_counter()
    longest = 0.0
    for _ in exporter.exposition.refresh_steps():
        now = time.perf_counter()
        longest, mark = max(longest, now - mark), now
    out["render_s"] = time.perf_counter() - started
    out["render_last_step_s"] = time.perf_counter() - mark
    out["render_longest_step_s"] = max(longest, out["render_last_step_s"])
    gc.callbacks.remove(collector)
    out["render_gc_longest_s"] = collector.longest
    started = time.perf_counter()
    for openmetrics in (False, True):
        exporter.exposition.gzip_parts(openmetrics=openmetrics)
    out["gzip_s"] = time.perf_counter() - started
    # What a scrape holds (the body's sections), without a joined copy no scrape makes.
    out["body_bytes"] = sum(map(len, exporter.exposition.parts(openmetrics=False)))
    gc.collect()
    out["rss_rendered"] = rss_bytes()

    hooks = Hooks(exposition=exporter.exposition, state=exporter.state,
                  ready=lambda: exporter.scheduler.ready, reload=_no_reload, version="bench",
                  organization=lambda: ORG)
    runner = web.AppRunner(make_app(hooks), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            for encoding in ("identity", "gzip"):
                latencies = []
                for _ in range(SCRAPES):
                    started = time.perf_counter()
                    async with session.get(f"http://127.0.0.1:{port}/metrics",
                                           headers={"Accept-Encoding": encoding}) as response:
                        assert response.status == 200
                        await response.read()
                    latencies.append(time.perf_counter() - started)
                out[f"scrape_{encoding}_s"] = statistics.median(latencies)
    finally:
        await runner.cleanup()
        await exporter.client.close()
    actions = max(1, out["tracked_actions"])
    out["bytes_per_action_state"] = (out["rss_steady"] - out["rss_baseline"]) / actions
    out["bytes_per_action_total"] = (out["rss_rendered"] - out["rss_baseline"]) / actions
    # Bounded caches fill during the first steady round; after it nothing may grow.
    out["steady_growth_bytes"] = out["rss_steady"] - out["rss_steady_first"]
    return out


class CollectorTime:
    """Time spent in the garbage collector, from gc.callbacks."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.longest = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            pause = time.perf_counter() - self._started
            self.seconds += pause
            self.longest = max(self.longest, pause)


async def _no_reload() -> str | None:
    return "benchmark"


# --- orchestration -------------------------------------------------------------------------------


def run_size(size: Size) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    results = context.Queue()
    simulator = context.Process(target=serve_simulator, args=(size, ports), daemon=True)
    simulator.start()
    try:
        port = ports.get(timeout=900)
        exporter = context.Process(target=measure,
                                   args=(size, f"http://127.0.0.1:{port}/v1", results))
        exporter.start()
        result = results.get(timeout=3600)
        exporter.join(timeout=30)
        return result
    finally:
        simulator.terminate()
        simulator.join(timeout=10)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'devices':>8} {'actions':>10} {'RSS MiB':>8} {'B/action':>9} {'B/act+exp':>9} "
             f"{'growth':>9} {'fill cpu':>9} {'round cpu':>9} {'of it gc':>8} {'render s':>8} "
             f"{'step ms':>7} {'body MiB':>8} {'scrape ms':>9} {'gzip ms':>8}"]
    for r in rows:
        lines.append(
            f"{r['devices']:>8,} {r['tracked_actions']:>10,} "
            f"{r['rss_rendered'] / 2**20:>8,.0f} {r['bytes_per_action_state']:>9,.0f} "
            f"{r['bytes_per_action_total']:>9,.0f} {r['steady_growth_bytes'] / 2**20:>8.1f}M "
            f"{r['fill_cpu_s']:>9.1f} {r['steady_cpu_s']:>9.2f} {r['steady_gc_s']:>8.2f} "
            f"{r['render_s']:>8.2f} {r['render_longest_step_s'] * 1000:>7.0f} "
            f"{r['body_bytes'] / 2**20:>8.1f} "
            f"{r['scrape_identity_s'] * 1000:>9.1f} {r['scrape_gzip_s'] * 1000:>8.1f}")
    return "\n".join(lines)


def linearity(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per-action cost of the largest size over the smallest: 1.0 is perfectly linear."""
    small, large = rows[0], rows[-1]
    return {
        "bytes_per_action": round(large["bytes_per_action_state"]
                                  / max(1e-9, small["bytes_per_action_state"]), 3),
        "steady_cpu_per_device": round((large["steady_cpu_s"] / large["devices"])
                                       / max(1e-9, small["steady_cpu_s"] / small["devices"]), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small fleets, seconds")
    parser.add_argument("--sizes", help="comma-separated device counts")
    args = parser.parse_args()
    if args.sizes:
        sizes = [Size(int(n)) for n in args.sizes.split(",")]
    elif args.smoke:
        sizes = [Size(50, batches=10), Size(100, batches=10), Size(200, batches=10)]
    else:
        sizes = [Size(2500), Size(5000), Size(10_000)]
    rows = []
    for size in sizes:
        rows.append(run_size(size))
        print(f"  {size.devices:,} devices done", file=sys.stderr)
    report = {"rows": rows, "linearity_largest_over_smallest": linearity(rows),
              "target_bytes_per_action": TARGET_BYTES_PER_ACTION,
              "within_target": all(r["bytes_per_action_state"] <= TARGET_BYTES_PER_ACTION
                                   for r in rows)}
    print(table(rows))
    print("per-action cost, largest / smallest size: " + ", ".join(
        f"{k} {v}" for k, v in report["linearity_largest_over_smallest"].items()))
    print(f"target <= {TARGET_BYTES_PER_ACTION} B per tracked action (state): "
          f"{'met' if report['within_target'] else 'NOT met'}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
