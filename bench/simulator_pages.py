"""What the simulator costs: build time, memory, and 100-action pages served per second.

A fleet of 10,000 devices x 20 history batches (about 10 actions each) is built in a child
process, plus a set of 100-action batches that are then left to run for two simulated hours
so their actions carry every kind of status and timestamp. A plain aiohttp client in this
process fetches pages with 8 requests in flight:

- ``actions cold``: each 100-action page once, the first time it is ever rendered;
- ``actions warm``: the same pages again and again (cached JSON fragments);
- ``history``: ``/commands?limit=100&sort=createdAt:desc`` of random devices (20 batches
  each; most devices are asked once, so this is mostly first renders of batch JSON);
- ``static``: a bare aiohttp handler answering a constant body of median page size — the
  floor any server on this machine costs. Warm and static pages alternate in rounds, so the
  ratios between them are measured under the same load.

CPU per page is the server process's own CPU time (it answers over a pipe), so the client's
work on the shared cores does not count against the simulator.

    python bench/simulator_pages.py            # full run (10k devices x 20 batches)
    python bench/simulator_pages.py --smoke    # a few seconds

Prints a table and writes bench/results/simulator_pages.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import free_port, rss_mb

TOKEN = "bench-token"
ORG = "bench"
PAGE = 100
CONCURRENCY = 8
SAMPLES = 9  # pages whose median size the static handler answers
ROUNDS = 4  # alternations of warm simulator pages and static pages
RUN_SECONDS = 2 * 3600.0  # simulated time the 100-action batches are left to resolve
RESULTS = Path(__file__).resolve().parent / "results" / "simulator_pages.json"
ENTERPRISE = f"/v1/organizations/{ORG}/mdm/windows/enterprise"

# Plausible CSP nodes for the 100-action batches (the fleet's own batches carry its catalog).
_NODES = (
    ("./Device/Vendor/MSFT/Policy/Config/Defender/AllowRealtimeMonitoring", "Replace", "1", "int"),
    ("./Device/Vendor/MSFT/Policy/Config/Update/ActiveHoursStart", "Replace", "8", "int"),
    ("./Device/Vendor/MSFT/Policy/Config/DeviceLock/DevicePasswordEnabled", "Replace", "0", "int"),
    ("./Device/Vendor/MSFT/DeviceStatus/OS/Mode", "Get", None, "int"),
    ("./DevDetail/SwV", "Get", None, "chr"),
    ("./Device/Vendor/MSFT/Reboot/RebootNow", "Exec", None, "null"),
)


@dataclass(frozen=True, slots=True)
class Size:
    devices: int
    batches: int
    big_batches: int
    warm_requests: int
    history_requests: int


FULL = Size(devices=10_000, batches=20, big_batches=400, warm_requests=4000, history_requests=2000)
SMOKE = Size(devices=300, batches=5, big_batches=40, warm_requests=300, history_requests=200)


def _commands(rng: random.Random) -> list[dict[str, Any]]:
    out = []
    for _ in range(PAGE):
        path, action, value, fmt = rng.choice(_NODES)
        config: dict[str, Any] = {"path": path, "action": action, "format": fmt}
        if value is not None:
            config["value"] = value
        out.append({"config": config})
    return out


def _answer_cpu_requests(conn: Any) -> None:
    # The parent asks for this process's CPU time around each measured loop.
    while True:
        try:
            conn.recv()
        except EOFError:
            return
        conn.send(time.process_time())


async def _serve_forever(app: Any, port: int, conn: Any, ready: Any) -> None:
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    conn.send(ready)  # only once it listens
    threading.Thread(target=_answer_cpu_requests, args=(conn,), daemon=True).start()
    await asyncio.Event().wait()


def _serve_simulator(conn: Any, port: int, size: Size) -> None:
    from exporter.simulator import Simulator

    rss_before = rss_mb()
    started = time.perf_counter()
    sim = Simulator(
        seed=1,
        devices=size.devices,
        organization=ORG,
        token=TOKEN,
        speed=0,
        max_limit=PAGE,
        batches_per_device=size.batches,
        actions_per_batch=(5, 15),
        record_events=False,
    )
    build_seconds = time.perf_counter() - started
    rss_after = rss_mb()
    devices = sim.fleet.device_ids()
    history = sum(len(sim.fleet.batch_ids(d)) for d in devices)
    rng = random.Random(7)
    big = []
    for _ in range(size.big_batches):
        device = rng.choice(devices)
        big.append((device, sim.fleet.create_batch(device, _commands(rng), "Bench batch")))
    sim.advance(RUN_SECONDS)
    info = {
        "build_seconds": build_seconds,
        "rss_mb": rss_after,
        "rss_fleet_mb": rss_after - rss_before,
        "history_batches": history,
        "devices": devices,
        "big": big,
    }
    asyncio.run(_serve_forever(sim.app(), port, conn, info))


def _serve_static(conn: Any, port: int, body: bytes) -> None:
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    asyncio.run(_serve_forever(app, port, conn, "ready"))


class Server:
    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        self.port = free_port()
        self._conn, child = multiprocessing.Pipe()
        self._process = multiprocessing.Process(
            target=target, args=(child, self.port, *args), daemon=True
        )

    def start(self, timeout: float) -> Any:
        self._process.start()
        if not self._conn.poll(timeout):
            raise RuntimeError("the server did not start")
        return self._conn.recv()

    def cpu(self) -> float:
        self._conn.send("cpu")
        return float(self._conn.recv())

    def stop(self) -> None:
        self._process.terminate()
        self._process.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _combine(rounds: list[dict[str, float]]) -> dict[str, float]:
    pages = sum(r["pages"] for r in rounds)
    wall = sum(r["pages"] / r["pages_per_second"] for r in rounds)
    return {
        "pages": pages,
        "pages_per_second": pages / wall,
        "server_cpu_us_per_page": sum(r["server_cpu_us_per_page"] * r["pages"] for r in rounds)
        / pages,
        "bytes_per_page": sum(r["bytes_per_page"] * r["pages"] for r in rounds) / pages,
    }


async def _fetch_all(
    session: aiohttp.ClientSession, urls: list[str], server: Server
) -> dict[str, float]:
    """Fetch every URL with CONCURRENCY in flight; wall time, server CPU, bytes."""
    queue = list(reversed(urls))
    received = 0

    async def worker() -> None:
        nonlocal received
        while queue:
            url = queue.pop()
            async with session.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                body = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url}: HTTP {response.status}")
                received += len(body)

    cpu_before = server.cpu()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    wall = time.perf_counter() - started
    cpu = server.cpu() - cpu_before
    return {
        "pages": len(urls),
        "pages_per_second": len(urls) / wall,
        "server_cpu_us_per_page": cpu / len(urls) * 1e6,
        "bytes_per_page": received / len(urls),
    }


async def measure(size: Size) -> dict[str, Any]:
    simulator = Server(_serve_simulator, size)
    info = simulator.start(timeout=600)
    static: Server | None = None
    try:
        rng = random.Random(11)
        page_urls = [
            f"{simulator.url}{ENTERPRISE}/devices/{d}/commands/{b}/actions?limit={PAGE}"
            for d, b in info["big"]
        ]
        history_urls = [
            f"{simulator.url}{ENTERPRISE}/devices/{rng.choice(info['devices'])}/commands"
            f"?limit={PAGE}&sort=createdAt:desc"
            for _ in range(size.history_requests)
        ]
        warm_urls = [page_urls[i % len(page_urls)] for i in range(size.warm_requests)]
        timeout = aiohttp.ClientTimeout(total=120)
        connector = aiohttp.TCPConnector(limit=CONCURRENCY)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            bodies = []
            for url in page_urls[:SAMPLES]:  # rendered here: they only join the warm set
                async with session.get(url, headers=headers) as response:
                    bodies.append(await response.read())
            sample = sorted(bodies, key=len)[len(bodies) // 2]
            rows = {"actions cold": await _fetch_all(session, page_urls[SAMPLES:], simulator)}
            rows["history"] = await _fetch_all(session, history_urls, simulator)
            static = Server(_serve_static, sample)
            static.start(timeout=60)
            static_urls = [f"{static.url}/page/{i}" for i in range(size.warm_requests)]
            # Warm and static pages alternate in rounds, so that whatever else runs on the
            # shared cores weighs on both alike and their ratio stays fair.
            warm_rounds, static_rounds = [], []
            for turn in range(ROUNDS):
                part = slice(turn * len(warm_urls) // ROUNDS, (turn + 1) * len(warm_urls) // ROUNDS)
                warm_rounds.append(await _fetch_all(session, warm_urls[part], simulator))
                static_rounds.append(await _fetch_all(session, static_urls[part], static))
            rows["actions warm"] = _combine(warm_rounds)
            rows["static"] = _combine(static_rounds)
    finally:
        simulator.stop()
        if static is not None:
            static.stop()
    floor = rows["static"]
    return {
        "size": {
            "devices": size.devices,
            "history_batches": info["history_batches"],
            "big_batches": size.big_batches,
            "concurrency": CONCURRENCY,
        },
        "build_seconds": info["build_seconds"],
        "rss_mb": info["rss_mb"],
        "rss_fleet_mb": info["rss_fleet_mb"],
        "rows": rows,
        "ratios": {
            "warm_pages_per_second_vs_static": rows["actions warm"]["pages_per_second"]
            / floor["pages_per_second"],
            "warm_cpu_per_page_vs_static": rows["actions warm"]["server_cpu_us_per_page"]
            / floor["server_cpu_us_per_page"],
            "cold_cpu_per_page_vs_warm": rows["actions cold"]["server_cpu_us_per_page"]
            / rows["actions warm"]["server_cpu_us_per_page"],
        },
    }


def print_table(result: dict[str, Any]) -> None:
    size = result["size"]
    print(
        f"fleet: {size['devices']} devices, {size['history_batches']} history batches, "
        f"{size['big_batches']} batches of {PAGE} actions; concurrency {size['concurrency']}"
    )
    print(
        f"build {result['build_seconds']:.2f} s, RSS {result['rss_mb']:.0f} MB "
        f"(fleet {result['rss_fleet_mb']:.0f} MB)"
    )
    print(f"{'pages':<14}{'count':>7}{'pages/s':>10}{'server CPU us/page':>20}{'KB/page':>9}")
    for name, row in result["rows"].items():
        print(
            f"{name:<14}{row['pages']:>7}{row['pages_per_second']:>10.0f}"
            f"{row['server_cpu_us_per_page']:>20.0f}{row['bytes_per_page'] / 1024:>9.1f}"
        )
    for name, ratio in result["ratios"].items():
        print(f"{name}: {ratio:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small fleet, a few seconds")
    args = parser.parse_args(argv)
    result = asyncio.run(measure(SMOKE if args.smoke else FULL))
    result["mode"] = "smoke" if args.smoke else "full"
    print_table(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
