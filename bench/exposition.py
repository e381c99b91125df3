"""Cost of serving /metrics from cached bytes, next to prometheus_client rendering per scrape.

A fleet of DEVICES x BATCHES x STATUSES action gauges (default 1,000 x 10 x 6 = 60,000 series)
goes through the real FleetState. Measured in one run:

- serve: ``Exposition.parts()`` (what the /metrics handler writes) vs
  ``prometheus_client.generate_latest`` over the same samples in a prometheus_client
  registry, and both behind a real aiohttp server on 127.0.0.1 (the exporter's own handler);
- full render (a new Exposition), incremental refresh after one device changed, refresh after
  a poll round (every device's last-success line moved), and the gzip after that refresh
  (``gzip_parts``: the sections that changed, the CRC from the first of them);
- rendering during poll rounds: the render loop's work per tick (one a second, like
  ``cli._refresh_loop``: ``refresh_steps()`` to the end, then gzip of both formats) in CPU
  seconds, so CPU seconds per tick = share of a core. Three kinds of tick: ``self`` (three
  API requests, the fleet unchanged), ``read`` (three requests and one device read: its
  last-success line moves, what a budget round does about every second) and ``changed``
  (the same, and the read found a new batch: the device's action gauges move). Each tree
  runs in a child process of its own; with ``--before PATH`` (a checkout of another commit,
  e.g. from ``git worktree add``) the two trees alternate, and the table shows both and
  their ratio.

Usage: python bench/exposition.py [--smoke] [--devices N] [--before PATH] [--ticks N]
Prints a table and writes bench/results/exposition.json.
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
from collections.abc import Callable
from pathlib import Path

from aiohttp import ClientSession, web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# A rounds measurement's child imports the exporter of the checkout it is given
# (TREE_VARIABLE, below: sys.path must be set before the imports).
sys.path.insert(0, os.environ.get("EXPOSITION_BENCH_TREE") or str(Path(__file__).parent.parent))

from exporter.exposition import GZIP_LEVEL, Exposition
from exporter.records import Action, Batch
from exporter.selfmetrics import SelfMetrics
from exporter.server import HOOKS, Hooks
from exporter.server import metrics as serve_metrics
from exporter.state import FleetState

ROOT = Path(__file__).resolve().parent.parent
TREE_VARIABLE = "EXPOSITION_BENCH_TREE"
START = 1_760_000_000.0
BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400, 259200)
STATUSES = ("Pending", "Awaiting", "Acknowledged", "NotSupported", "CommandNotFound", "Cancel")
BATCHES = 10
ACTIONS_PER_STATUS = 2


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def device_id(d: int) -> str:
    return f"65f0c0ffee{d:014x}"


def batch_actions(d: int, b: int, shift: int = 0) -> list[Action]:
    out = []
    for s, status in enumerate(STATUSES):
        for a in range(ACTIONS_PER_STATUS):
            final = s >= 2
            out.append(
                Action(
                    cmd_id=f"{d}-{b}-{s}-{a}",
                    status=STATUSES[(s + shift) % len(STATUSES)],
                    sent_at=START + 30 + a if s else None,
                    received_at=START + 60 + 7 * s * a if final else None,
                    canceled_at=START + 90 if status == "Cancel" else None,
                )
            )
    return out


def build_state(devices: int, clock: Clock) -> FleetState:
    state = FleetState(
        organization="acme", latency_buckets=BUCKETS, metrics=SelfMetrics(), clock=clock
    )
    for d in range(devices):
        state.watch(device_id(d), name=f"pc-{d:04d}", labels={"site": f"site-{d % 7}"})
    clock.now = START + 120
    for d in range(devices):
        for b in range(BATCHES):
            batch = Batch(id=f"{d:012x}{b:012x}", name=f"Policy {b}", created_at=START + 10)
            state.apply_actions(device_id(d), batch, batch_actions(d, b))
        state.poll_succeeded(device_id(d))
    return state


def client_registry(state: FleetState) -> CollectorRegistry:
    """The same samples in prometheus_client metric objects."""
    registry = CollectorRegistry(auto_describe=False)
    actions = Gauge(
        "applivery_windows_command_actions",
        "Actions per status.",
        ["organization", "device", "command", "status", "status_class"],
        registry=registry,
    )
    transitions = Counter(
        "applivery_windows_command_action_transitions",
        "Transitions.",
        ["organization", "status", "status_class"],
        registry=registry,
    )
    latency = Histogram(
        "applivery_windows_command_ack_latency_seconds",
        "Latency.",
        ["organization", "status_class"],
        buckets=BUCKETS,
        registry=registry,
    )
    oldest = Gauge(
        "applivery_windows_command_oldest_pending_sent_timestamp_seconds",
        "Oldest pending.",
        ["organization", "device"],
        registry=registry,
    )
    info = Gauge(
        "applivery_windows_device_info",
        "Device info.",
        ["organization", "device", "name", "site"],
        registry=registry,
    )
    command_info = Gauge(
        "applivery_windows_command_info",
        "Batch name.",
        ["organization", "device", "command", "name"],
        registry=registry,
    )
    up = Gauge(
        "applivery_exporter_target_up", "Up.", ["organization", "device"], registry=registry
    )
    last = Gauge(
        "applivery_exporter_last_success_timestamp_seconds",
        "Last.",
        ["organization", "device"],
        registry=registry,
    )
    org = state.organization
    for status, status_class, count in state.transitions():
        transitions.labels(org, status, status_class).inc(count)
    for status_class in state.latency():
        latency.labels(org, status_class).observe(42.0)
    for device in state.watched():
        view = state.device_view(device)
        for batch in view.batches:
            for status, status_class, count in batch.counts:
                actions.labels(org, device, batch.id, status, status_class).set(count)
            command_info.labels(org, device, batch.id, batch.name or "").set(1)
        if view.oldest_pending is not None:
            oldest.labels(org, device).set(view.oldest_pending)
        info.labels(org, device, view.name or "", view.labels["site"]).set(1)
        up.labels(org, device).set(1)
        last.labels(org, device).set(view.last_success or 0)
    return registry


def median_seconds(fn: Callable[[], object], repeat: int, number: int = 1) -> float:
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - started) / number)
    return statistics.median(runs)


async def http_medians(
    exposition: Exposition, state: FleetState, registry: CollectorRegistry, repeat: int
) -> dict:
    async def rendered(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry))

    async def no_reload() -> None:
        return None

    app = web.Application()
    app[HOOKS] = Hooks(exposition=exposition, state=state, ready=lambda: True,
                       reload=no_reload, version="bench", organization=lambda: "bench")
    app.router.add_get("/cached", serve_metrics)
    app.router.add_get("/rendered", rendered)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    out = {}
    try:
        async with ClientSession() as session:
            for path in ("cached", "rendered"):
                runs = []
                for _ in range(repeat):
                    started = time.perf_counter()
                    async with session.get(f"http://127.0.0.1:{port}/{path}") as response:
                        await response.read()
                    runs.append(time.perf_counter() - started)
                out[path] = statistics.median(runs)
    finally:
        await runner.cleanup()
    return out


def run(devices: int, repeat: int) -> dict:
    clock = Clock()
    started = time.perf_counter()
    state = build_state(devices, clock)
    build_seconds = time.perf_counter() - started
    registry = CollectorRegistry()  # no process metrics: both sides render the same samples
    exposition = Exposition(state, state.metrics, version="bench", registry=registry)
    body = exposition.body(openmetrics=False)
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    theirs = client_registry(state)

    serve = median_seconds(lambda: exposition.parts(openmetrics=False), repeat, number=1000)
    generate = median_seconds(lambda: generate_latest(theirs), max(3, repeat // 4))
    full = median_seconds(
        lambda: Exposition(state, state.metrics, version="bench", registry=registry),
        max(3, repeat // 4),
    )

    gzips: list[float] = []

    def timed_refresh(change: Callable[[int], None], times: int) -> float:
        """Median of refresh() alone, each after ``change(i)`` (not timed); the gzip that
        follows each refresh goes to ``gzips``."""
        runs = []
        for i in range(times):
            change(i)
            started = time.perf_counter()
            assert exposition.refresh()
            refreshed = time.perf_counter()
            exposition.gzip_parts(openmetrics=False)
            runs.append(refreshed - started)
            gzips.append(time.perf_counter() - refreshed)
        return statistics.median(runs)

    def one_device_changed(i: int) -> None:
        d = (i * 7919) % devices
        batch = Batch(id=f"{d:012x}{0:012x}", name="Policy 0", created_at=START + 10)
        state.apply_actions(
            device_id(d), batch, batch_actions(d, 0, shift=1 + i % (len(STATUSES) - 1))
        )

    def poll_round(_: int) -> None:
        clock.now += 60
        for d in range(devices):
            state.poll_succeeded(device_id(d))

    incremental = timed_refresh(one_device_changed, repeat)
    gzips.clear()
    round_refresh = timed_refresh(poll_round, max(3, repeat // 4))
    gzip_seconds = statistics.median(gzips)
    body = exposition.body(openmetrics=False)
    http = asyncio.run(http_medians(exposition, state, theirs, repeat))
    return {
        "devices": devices,
        "series": series,
        "body_bytes": len(body),
        "gzip_bytes": len(exposition.gzip_body(openmetrics=False)),
        "gzip_level": GZIP_LEVEL,
        "state_build_s": build_seconds,
        "serve_body_s": serve,
        "generate_latest_s": generate,
        "serve_ratio": generate / serve,
        "http_cached_s": http["cached"],
        "http_generate_latest_s": http["rendered"],
        "http_ratio": http["rendered"] / http["cached"],
        "full_render_s": full,
        "refresh_one_device_s": incremental,
        "refresh_after_round_s": round_refresh,
        "full_over_incremental": full / incremental,
        "gzip_s": gzip_seconds,
    }


# --- rendering during poll rounds ---------------------------------------------------------

TICK_KINDS = ("self", "read", "changed")
REQUESTS_PER_TICK = 3  # about 10,000 requests an hour


def render_tick(exposition: Exposition) -> tuple[float, float]:
    """CPU seconds of what the render loop does after a change: the refresh (in the steps
    the loop runs it in), then the gzip of both formats that it computes ahead of scrapes
    (``gzip_parts`` where the tree has it, else ``gzip_body``)."""
    started = time.process_time()
    for _ in exposition.refresh_steps():
        pass
    refreshed = time.process_time()
    compress = getattr(exposition, "gzip_parts", exposition.gzip_body)
    for openmetrics in (True, False):
        compress(openmetrics=openmetrics)
    return refreshed - started, time.process_time() - refreshed


def rounds(devices: int, ticks: int) -> dict:
    """Per kind of tick: median CPU seconds of the refresh and of the gzip."""
    clock = Clock()
    state = build_state(devices, clock)
    metrics = state.metrics
    registry = CollectorRegistry()
    started = time.process_time()
    exposition = Exposition(state, metrics, version="bench", registry=registry)
    out: dict = {"devices": devices, "ticks": ticks,
                 "first_render_cpu_s": time.process_time() - started}
    started = time.process_time()
    for openmetrics in (True, False):
        exposition.gzip_body(openmetrics=openmetrics)
    out["first_gzip_cpu_s"] = time.process_time() - started
    out["body_bytes"] = len(exposition.body(openmetrics=False))
    out["gzip_bytes"] = len(exposition.gzip_body(openmetrics=False))
    for kind in TICK_KINDS:
        refreshes, gzips = [], []
        for i in range(ticks):
            clock.now += 1
            for r in range(REQUESTS_PER_TICK):
                metrics.observe_request("actions", "200", 0.05 + 0.01 * r)
            d = (i * 7919 + 13) % devices
            if kind == "changed":  # a batch new to the device: its action gauges move
                b = BATCHES + i
                batch = Batch(id=f"{d:012x}{b:012x}", name=f"Policy {b}", created_at=clock.now)
                state.apply_actions(device_id(d), batch, batch_actions(d, b))
            if kind != "self":
                state.poll_succeeded(device_id(d))
            refresh_s, gzip_s = render_tick(exposition)
            refreshes.append(refresh_s)
            gzips.append(gzip_s)
        out[kind] = {
            "refresh_cpu_s": statistics.median(refreshes),
            "gzip_cpu_s": statistics.median(gzips),
            "cpu_per_second": statistics.median(
                r + g for r, g in zip(refreshes, gzips, strict=True)
            ),
        }
    return out


def rounds_in_child(tree: Path, devices: int, ticks: int) -> dict:
    """:func:`rounds` with the exporter of ``tree``, in a fresh process."""
    result = subprocess.run(
        [sys.executable, __file__, "--rounds-only", "--devices", str(devices),
         "--ticks", str(ticks)],
        capture_output=True, text=True, check=True,
        env={**os.environ, TREE_VARIABLE: str(tree)},
    )
    return json.loads(result.stdout)


def compare_rounds(devices: int, ticks: int, before: Path | None, repeat: int) -> dict:
    """The current tree (and ``before``), alternating, ``repeat`` times each: per figure,
    the median of the runs."""
    trees = {"after": ROOT, **({"before": before} if before is not None else {})}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(repeat):
        for name, tree in trees.items():
            runs[name].append(rounds_in_child(tree, devices, ticks))

    def median_of(results: list[dict]) -> dict:
        out = {key: statistics.median(r[key] for r in results)
               for key in results[0] if not isinstance(results[0][key], dict)}
        for kind in TICK_KINDS:
            out[kind] = {key: statistics.median(r[kind][key] for r in results)
                         for key in results[0][kind]}
        return out

    out: dict = {name: median_of(results) for name, results in runs.items()}
    out["repeat"] = repeat
    if before is not None:
        out["before_tree"] = str(before)
        out["after_over_before"] = {
            kind: out["after"][kind]["cpu_per_second"] / out["before"][kind]["cpu_per_second"]
            for kind in TICK_KINDS
        } | {
            "first_render": out["after"]["first_render_cpu_s"]
            / out["before"]["first_render_cpu_s"],
            "first_gzip": out["after"]["first_gzip_cpu_s"] / out["before"]["first_gzip_cpu_s"],
        }
    return out


def rounds_table(result: dict) -> str:
    ms = 1000.0
    names = [name for name in ("before", "after") if name in result]
    head = f"{'rendering during rounds (CPU per tick)':<40}" + "".join(
        f"{name:>14}" for name in names
    ) + (f"{'after/before':>14}" if len(names) == 2 else "")
    rows = [head]

    def row(label: str, values: list[float]) -> None:
        cells = "".join(f"{v * ms:>11.2f} ms" for v in values)
        if len(values) == 2 and values[0]:
            cells += f"{values[1] / values[0]:>14.4f}"
        rows.append(f"{label:<40}{cells}")

    for kind in TICK_KINDS:
        row(f"{kind}: refresh", [result[n][kind]["refresh_cpu_s"] for n in names])
        row(f"{kind}: gzip (both formats)", [result[n][kind]["gzip_cpu_s"] for n in names])
        row(f"{kind}: CPU per second", [result[n][kind]["cpu_per_second"] for n in names])
    row("first render", [result[n]["first_render_cpu_s"] for n in names])
    row("first gzip (both formats)", [result[n]["first_gzip_cpu_s"] for n in names])
    rows.append(f"{'gzip bytes (text)':<40}" + "".join(
        f"{result[n]['gzip_bytes']:>14,.0f}" for n in names))
    return "\n".join(rows)


def table(result: dict) -> str:
    ms = 1000.0
    rows = [
        ("series", f"{result['series']:,}"),
        ("body", f"{result['body_bytes'] / 1e6:.1f} MB (gzip {result['gzip_bytes'] / 1e6:.2f} MB)"),
        ("serve: Exposition.parts()", f"{result['serve_body_s'] * 1e6:.2f} us"),
        ("serve: generate_latest()", f"{result['generate_latest_s'] * ms:.1f} ms"),
        ("  ratio", f"{result['serve_ratio']:,.0f}x"),
        ("HTTP GET cached bytes", f"{result['http_cached_s'] * ms:.2f} ms"),
        ("HTTP GET generate_latest", f"{result['http_generate_latest_s'] * ms:.1f} ms"),
        ("  ratio", f"{result['http_ratio']:,.1f}x"),
        ("full render (new Exposition)", f"{result['full_render_s'] * ms:.1f} ms"),
        ("refresh after one device changed", f"{result['refresh_one_device_s'] * ms:.2f} ms"),
        ("  full / incremental", f"{result['full_over_incremental']:.0f}x"),
        ("refresh after a poll round", f"{result['refresh_after_round_s'] * ms:.1f} ms"),
        (f"gzip after a poll round (level {result['gzip_level']})",
         f"{result['gzip_s'] * ms:.1f} ms"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:>20}" for name, value in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small fleet, few repeats")
    parser.add_argument("--devices", type=int, default=None)
    parser.add_argument("--before", type=Path, default=None,
                        help="another checkout to measure rendering during rounds against")
    parser.add_argument("--ticks", type=int, default=None, help="ticks per kind (rounds)")
    parser.add_argument("--rounds-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    devices = args.devices or (50 if args.smoke else 1000)
    ticks = args.ticks or (5 if args.smoke else 15)
    if args.rounds_only:
        print(json.dumps(rounds(devices, ticks)))
        return
    repeat = 5 if args.smoke else 21
    result = run(devices, repeat)
    print(table(result))
    result["rounds"] = compare_rounds(devices, ticks, args.before, 1 if args.smoke else 2)
    print()
    print(rounds_table(result["rounds"]))
    out = Path(__file__).resolve().parent / "results" / "exposition.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"smoke": args.smoke, **result}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
