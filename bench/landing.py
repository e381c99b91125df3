"""The landing page's cost, and what a flood of ``GET /`` does to scrapes.

A fleet of DEVICES x 20 batches (three actions each) goes through the real FleetState and
Exposition, behind the real ``server.make_app`` on 127.0.0.1, in a child process per tree
(with ``--before PATH``, a checkout of another commit, e.g. from ``git worktree add``, the
same in that tree). This process is the client:

- render: ``GET /`` on a fresh server, alone (a cold render; median of three servers);
- flood: twelve loops of ``GET /`` for ``--seconds``, and meanwhile one scrape loop of
  ``GET /metrics`` as Prometheus sends it (gzip, the body read but not inflated): the
  scrapes' p50, p95 and max latency, and how many pages the twelve loops got.

Usage: python bench/landing.py [--smoke] [--devices N ...] [--before PATH] [--seconds S]
Prints a table and writes bench/results/landing.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
TREE_VARIABLE = "LANDING_BENCH_TREE"
START = 1_760_000_000.0
BATCHES = 20
PAGE_LOOPS = 12
STATUSES = ("Pending", "Acknowledged", "NotSupported")


# --- the server child ---------------------------------------------------------------------


def build_hooks(devices: int) -> Any:
    """A fleet in the exporter of the tree on sys.path, as the routes take it."""
    from exporter.exposition import Exposition
    from exporter.records import Action, Batch
    from exporter.selfmetrics import SelfMetrics
    from exporter.server import Hooks
    from exporter.state import FleetState

    now = [START]
    metrics = SelfMetrics()
    state = FleetState(organization="acme", latency_buckets=(1.0, 60.0), metrics=metrics,
                       clock=lambda: now[0])
    for d in range(devices):
        state.watch(f"65f0c0ffee{d:014x}", name=f"pc-{d:05d}")
    now[0] = START + 120
    for d in range(devices):
        device = f"65f0c0ffee{d:014x}"
        for b in range(BATCHES):
            batch = Batch(id=f"{d:012x}{b:012x}", name=f"Policy {b}", created_at=START + 10)
            actions = [Action(f"{d}-{b}-{s}", status, sent_at=START + 30 if s else None,
                              received_at=START + 60 if s else None)
                       for s, status in enumerate(STATUSES)]
            state.apply_actions(device, batch, actions)
        if d % 10:
            state.poll_succeeded(device)
        else:
            state.poll_failed(device, "upstream 503")
    exposition = Exposition(state, metrics, version="bench")
    exposition.refresh()
    exposition.gzip_parts(openmetrics=False)  # as the render loop would have

    async def no_reload() -> str | None:
        return None

    return Hooks(exposition=exposition, state=state, ready=lambda: True, reload=no_reload,
                 version="bench", organization=lambda: "acme", metrics=metrics)


async def serve(devices: int) -> None:
    """Serve the fleet; print each new server's port on stdout; a line on stdin asks for a
    new server (a cold page), end of input stops."""
    from aiohttp import web

    from exporter.server import make_app

    hooks = build_hooks(devices)
    loop = asyncio.get_running_loop()
    runner: web.AppRunner | None = None
    while True:
        if runner is not None:
            await runner.cleanup()
        runner = web.AppRunner(make_app(hooks), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(port, flush=True)
        if not await loop.run_in_executor(None, sys.stdin.readline):
            break
    await runner.cleanup()


# --- the client ---------------------------------------------------------------------------


class Server:
    """A server child of one tree; ``fresh()`` asks it for a new server (an empty cache)."""

    def __init__(self, tree: Path, devices: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(devices)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, TREE_VARIABLE: str(tree)},
        )
        self.port = self._port()

    def _port(self) -> int:
        assert self.proc.stdout is not None
        return int(self.proc.stdout.readline())

    def fresh(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        self.port = self._port()

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


async def timed_get(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> float:
    began = time.perf_counter()
    async with session.get(url, **kwargs) as response:
        await response.read()
        assert response.status == 200, response.status
    return time.perf_counter() - began


async def cold_render(server: Server) -> float:
    async with aiohttp.ClientSession() as session:
        return await timed_get(session, f"http://127.0.0.1:{server.port}/")


async def flood(port: int, seconds: float) -> dict[str, float]:
    base = f"http://127.0.0.1:{port}"
    until = time.perf_counter() + seconds
    pages = 0

    async def page_loop(session: aiohttp.ClientSession) -> None:
        nonlocal pages
        while time.perf_counter() < until:
            await timed_get(session, f"{base}/")
            pages += 1

    async def scrape_loop(session: aiohttp.ClientSession) -> list[float]:
        latencies = []
        await asyncio.sleep(0.2)  # the page loops are under way
        while time.perf_counter() < until:
            latencies.append(await timed_get(session, f"{base}/metrics",
                                             headers={"Accept-Encoding": "gzip"}))
        return latencies

    async with aiohttp.ClientSession(auto_decompress=False) as session:
        *_, latencies = await asyncio.gather(
            *(page_loop(session) for _ in range(PAGE_LOOPS)), scrape_loop(session)
        )
    cuts = (statistics.quantiles(latencies, n=20, method="inclusive")
            if len(latencies) > 1 else latencies * 19)
    return {"scrapes": len(latencies), "p50_s": statistics.median(latencies),
            "p95_s": cuts[18], "max_s": max(latencies), "pages": pages}


def measure(tree: Path, devices: int, seconds: float) -> dict[str, Any]:
    server = Server(tree, devices)
    try:
        renders = []
        for _ in range(3):
            server.fresh()
            renders.append(asyncio.run(cold_render(server)))
        server.fresh()
        return {"render_s": statistics.median(renders), **asyncio.run(flood(server.port, seconds))}
    finally:
        server.stop()


def run(sizes: list[int], before: Path | None, seconds: float) -> list[dict[str, Any]]:
    trees = {"after": ROOT, **({"before": before} if before is not None else {})}
    rows = []
    for devices in sizes:
        row: dict[str, Any] = {"devices": devices}
        for name, tree in trees.items():
            row[name] = measure(tree, devices, seconds)
        if before is not None:
            row["after_over_before"] = {
                key: row["after"][key] / row["before"][key]
                for key in ("render_s", "p50_s", "p95_s", "max_s")
            }
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    ms = 1000.0
    lines = [f"{'devices':>7} {'tree':<7} {'render ms':>10} {'/metrics p50':>13} "
             f"{'p95':>8} {'max':>8} {'scrapes':>8} {'pages':>6}"]
    for row in rows:
        for name in ("before", "after"):
            if name in row:
                r = row[name]
                lines.append(
                    f"{row['devices']:>7} {name:<7} {r['render_s'] * ms:>10.0f} "
                    f"{r['p50_s'] * ms:>13.0f} {r['p95_s'] * ms:>8.0f} {r['max_s'] * ms:>8.0f} "
                    f"{r['scrapes']:>8} {r['pages']:>6}"
                )
        if "after_over_before" in row:
            ratio = row["after_over_before"]
            lines.append(
                f"{row['devices']:>7} {'ratio':<7} {ratio['render_s']:>10.2f} "
                f"{ratio['p50_s']:>13.3f} {ratio['p95_s']:>8.3f} {ratio['max_s']:>8.3f}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small fleets, a short flood")
    parser.add_argument("--devices", type=int, nargs="*", default=None)
    parser.add_argument("--before", type=Path, default=None,
                        help="another checkout to measure against")
    parser.add_argument("--seconds", type=float, default=None, help="flood duration")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        sys.path.insert(0, os.environ.get(TREE_VARIABLE) or str(ROOT))
        asyncio.run(serve(args.serve))
        return
    sizes = args.devices or ([100, 300] if args.smoke else [2000, 5000])
    seconds = args.seconds or (2.0 if args.smoke else 15.0)
    rows = run(sizes, args.before, seconds)
    print(table(rows))
    out = ROOT / "bench" / "results" / "landing.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"smoke": args.smoke, "seconds": seconds, "rows": rows,
                               "before_tree": str(args.before) if args.before else None},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
