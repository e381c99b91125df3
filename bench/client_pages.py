"""CPU cost of the API client per 100-action page, next to a bare aiohttp + json.loads loop.

The simulator runs in a child process so the CPU times measured here are the client's alone.
Both loops fetch the same pages over the same kind of session; each is run several times,
interleaved, and the best run of each is compared (the machine is shared, noise only adds).

    python bench/client_pages.py            # full run
    python bench/client_pages.py --smoke    # a few seconds

Prints a table and writes bench/results/client_pages.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import free_port
from exporter.client import ApiClient, TokenSource
from exporter.selfmetrics import SelfMetrics

TOKEN = "bench-token"
ORG = "bench"
PAGE = 100
RESULTS = Path(__file__).resolve().parent / "results" / "client_pages.json"


# --- the simulator in a child process ---------------------------------------------------------


def _serve(conn: Any, port: int, devices: int, batches: int) -> None:
    from aiohttp import web

    from exporter.simulator import Simulator

    sim = Simulator(
        seed=1,
        devices=devices,
        organization=ORG,
        token=TOKEN,
        speed=0,
        max_limit=PAGE,
        batches_per_device=batches,
        actions_per_batch=(PAGE, PAGE),
        record_events=False,
    )
    # First reads: the history, mostly finished actions with every timestamp. Re-polls: only
    # pages with pending actions are read again, so those get batches of their own that
    # stay pending (the clock stands still).
    history = [(d, b) for d in sim.fleet.device_ids() for b in sim.fleet.batch_ids(d)]
    commands = [{"config": {"path": f"./Vendor/MSFT/Bench/N{i}", "action": "Get", "format": "chr"}}
                for i in range(PAGE)]
    pending = [(d, sim.fleet.create_batch(d, commands)) for d, _ in history]
    pairs = {"decode": history, "repoll": pending}

    def answer_cpu_requests() -> None:
        # The parent asks for this process's CPU time around each measured loop.
        while True:
            try:
                conn.recv()
            except EOFError:
                return
            conn.send(time.process_time())

    async def main() -> None:
        runner = web.AppRunner(sim.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        conn.send(pairs)
        threading.Thread(target=answer_cpu_requests, daemon=True).start()
        await asyncio.Event().wait()

    asyncio.run(main())


class SimulatorProcess:
    def __init__(self, devices: int, batches: int) -> None:
        self.port = free_port()
        self._conn, child = multiprocessing.Pipe()
        self._process = multiprocessing.Process(
            target=_serve, args=(child, self.port, devices, batches), daemon=True
        )

    def __enter__(self) -> SimulatorProcess:
        self._process.start()
        if not self._conn.poll(120):
            raise RuntimeError("the simulator did not start")
        self.pairs: dict[str, list[tuple[str, str]]] = self._conn.recv()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._process.terminate()
        self._process.join(10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def cpu(self) -> float:
        self._conn.send("cpu")
        return float(self._conn.recv())


# --- the loops -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pass:
    """CPU and wall time of one measured pass over every page."""

    cpu: float
    wall: float
    items: int


def _actions_url(base_url: str, device: str, batch: str) -> str:
    return (
        f"{base_url}/organizations/{ORG}/mdm/windows/enterprise"
        f"/devices/{device}/commands/{batch}/actions"
    )


async def _timed(
    pairs: list[tuple[str, str]],
    concurrency: int,
    fetch: Callable[[str, str], Awaitable[int]],
) -> Pass:
    # An unmeasured pass first (connections, the simulator's caches, the client's memo when
    # it has one), then the measured one over the same pages.
    await _run(pairs, concurrency, fetch)
    cpu, wall = time.process_time(), time.perf_counter()
    items = await _run(pairs, concurrency, fetch)
    return Pass(time.process_time() - cpu, time.perf_counter() - wall, items)


async def bare_loop(base_url: str, pairs: list[tuple[str, str]], concurrency: int) -> Pass:
    """The floor: fetch each page and json.loads it, nothing else."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    params = {"page": "1", "limit": str(PAGE)}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def fetch(device: str, batch: str) -> int:
            url = _actions_url(base_url, device, batch)
            async with session.get(url, params=params, headers=headers) as response:
                body = await response.read()
            return len(json.loads(body)["data"]["items"])

        return await _timed(pairs, concurrency, fetch)


def client_loop(memo: bool) -> Callable[[str, list[tuple[str, str]], int], Awaitable[Pass]]:
    async def loop(base_url: str, pairs: list[tuple[str, str]], concurrency: int) -> Pass:
        async with ApiClient(
            base_url=base_url,
            organization=ORG,
            token=TokenSource(value=TOKEN),
            metrics=SelfMetrics(),
            max_concurrency=concurrency,
            requests_per_hour=1e9,  # measure the client, not its budget
            page_size=PAGE,
            memo_records=len(pairs) * PAGE if memo else 0,
        ) as client:

            async def fetch(device: str, batch: str) -> int:
                return len(await client.list_actions(device, batch))

            return await _timed(pairs, concurrency, fetch)

    return loop


async def _run(
    pairs: list[tuple[str, str]],
    concurrency: int,
    fetch: Callable[[str, str], Awaitable[int]],
) -> int:
    queue = list(reversed(pairs))
    total = 0

    async def worker() -> None:
        nonlocal total
        while queue:
            device, batch = queue.pop()
            count = await fetch(device, batch)
            total += count  # not `total += await ...`: that reads total before the wait

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total


def measure(
    loop: Callable[[str, list[tuple[str, str]], int], Awaitable[Pass]],
    sim: SimulatorProcess,
    pairs: list[tuple[str, str]],
    concurrency: int,
) -> dict[str, float]:
    sim_cpu = sim.cpu()
    result = asyncio.run(loop(sim.base_url, pairs, concurrency))
    # The simulator served two passes.
    sim_cpu = (sim.cpu() - sim_cpu) / 2
    pages = len(pairs)
    if result.items != pages * PAGE:
        raise RuntimeError(f"expected {pages * PAGE} actions, got {result.items}")
    return {
        "cpu_us_per_page": result.cpu / pages * 1e6,
        "pages_per_second": pages / result.wall,
        "sim_cpu_us_per_page": sim_cpu / pages * 1e6,
    }


MODES = {
    # Every page decoded (a first read, or a page that changed since the last poll).
    "decode": client_loop(memo=False),
    # Re-polling pending pages that did not change: the client reuses its earlier decoding.
    "repoll": client_loop(memo=True),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds, small fleet")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved runs per loop")
    args = parser.parse_args(argv)
    devices, batches, rounds = (10, 4, 2) if args.smoke else (100, 10, 5)
    rounds = args.rounds or rounds

    with SimulatorProcess(devices, batches) as sim:
        rows = []
        for concurrency in (1, 8):
            for mode, client in MODES.items():
                pairs = sim.pairs[mode]
                loops = {"bare": bare_loop, mode: client}
                best: dict[str, dict[str, float]] = {}
                for _ in range(rounds):
                    for name, loop in loops.items():
                        result = measure(loop, sim, pairs, concurrency)
                        kept = best.get(name)
                        if kept is None or result["cpu_us_per_page"] < kept["cpu_us_per_page"]:
                            best[name] = result
                bare, measured = best["bare"], best[mode]
                rows.append(
                    {
                        "mode": mode,
                        "concurrency": concurrency,
                        "pages": len(pairs),
                        "bare_cpu_us_per_page": bare["cpu_us_per_page"],
                        "client_cpu_us_per_page": measured["cpu_us_per_page"],
                        "ratio": measured["cpu_us_per_page"] / bare["cpu_us_per_page"],
                        "bare_pages_per_second": bare["pages_per_second"],
                        "client_pages_per_second": measured["pages_per_second"],
                        "simulator_cpu_us_per_page": bare["sim_cpu_us_per_page"],
                        "simulator_pages_per_cpu_second": 1e6 / bare["sim_cpu_us_per_page"],
                    }
                )

    header = (
        f"{'mode':<7} {'conc':>4} {'pages':>6} {'bare µs/page':>13} {'client µs/page':>15} "
        f"{'ratio':>6} {'bare p/s':>9} {'client p/s':>11} {'sim p/cpu-s':>12}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['mode']:<7} {row['concurrency']:>4} {row['pages']:>6} "
            f"{row['bare_cpu_us_per_page']:>13.0f} {row['client_cpu_us_per_page']:>15.0f} "
            f"{row['ratio']:>6.2f} {row['bare_pages_per_second']:>9.0f} "
            f"{row['client_pages_per_second']:>11.0f} "
            f"{row['simulator_pages_per_cpu_second']:>12.0f}"
        )
    target = 1.5
    worst = {mode: max(r["ratio"] for r in rows if r["mode"] == mode) for mode in MODES}
    print(
        f"target: client ≤ {target}× bare per page; worst ratio "
        + ", ".join(f"{mode} {ratio:.2f}" for mode, ratio in worst.items())
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "client_pages",
                "smoke": args.smoke,
                "rounds": rounds,
                "actions_per_page": PAGE,
                "target_ratio": target,
                "worst_ratio": worst,
                "rows": rows,
                "cpu_count": os.cpu_count(),
                "python": sys.version.split()[0],
                "aiohttp": aiohttp.__version__,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
