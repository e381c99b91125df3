"""Fault soak: the whole exporter against a simulator that misbehaves in every way it can.

One process, one loop, real HTTP on both sides. For the soak's length the simulator draws a
fresh random mix of every transport fault kind each second (latency, 500, 503 with and without
Retry-After, 429 with seconds, with an HTTP date and bare, resets, invalid and truncated JSON,
shifting pages, slow and huge bodies, and what lagging replicas serve: transient 404s, batches
missing from the history, lists briefly short, actions read back as Pending) while its data
faults (doc-style timestamps, unknown status names, missing fields) stay on throughout, so the
ground truth the simulator reports stays the data the exporter reads. Underneath, simulated
time runs, new batches arrive and old ones are deleted. A scraper hits ``/metrics`` (text,
OpenMetrics, gzip) all along.

Then the transport faults stop, time stands still, and after two clean poll rounds every
gauge must equal the simulator's grouped counts, the transition counter the events since the
watermark, the latency histogram the acknowledgements since it.

    python bench/soak.py --smoke          # ~20 s
    python bench/soak.py --minutes 5      # the long run: RSS and scrape latency over time
    python bench/soak.py --minutes 5 --trace-memory   # and the memory the exporter's code holds

As many batches are deleted as arrive (each once the exporter has seen it end), so the fleet
keeps its size and memory can be compared across the run. RSS is the whole process's,
simulator and ground truth included; ``--trace-memory`` separates what the exporter's own
code allocated and still holds (its snapshots pause the loop: scrape latencies then mean
nothing).

Prints a table and writes bench/results/soak.json. ``tests/test_soak.py`` runs it short.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import statistics
import sys
import time
import tracemalloc
from collections import Counter
from dataclasses import asdict, dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import rss_mb
from exporter.cli import Exporter, build_exporter, serve
from exporter.client import TokenSource
from exporter.config import parse_config
from exporter.simulator import Simulator
from exporter.simulator.fleet import Action, Batch
from exporter.simulator.wire import ACTION_OPTIONAL
from exporter.statuses import PENDING_STATUSES

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"
SIM_START = 1_770_717_600.0  # 2026-02-10T10:00:00Z

# Data faults: on for the whole run (a toggled rename would be a real status change).
DATA_FAULTS = "doc_timestamps=0.2,unknown_status=0.1,missing_fields=0.15"
# kind -> (highest probability, argument range or None). Arguments are kept small so a
# round stays within seconds: the point is the mix, not waiting out one fault.
TRANSPORT: dict[str, tuple[float, tuple[float, float] | None]] = {
    "latency": (0.5, (0.0, 0.15)),
    "error500": (0.25, None),
    "error503": (0.15, (0.0, 1.0)),
    "throttle": (0.08, (0.0, 0.5)),
    "throttle_date": (0.04, (0.0, 1.0)),
    "throttle_bare": (0.08, None),
    "reset": (0.1, None),
    "invalid_json": (0.1, None),
    "truncated_json": (0.1, None),
    "shifting_pages": (0.5, None),
    "transient_404": (0.1, None),
    "short_list": (0.1, None),
    "stale_read": (0.1, None),
    "window_churn": (0.2, None),
    "slow_body": (0.05, (20_000.0, 200_000.0)),
    "huge_body": (0.03, (0.2, 2.0)),
}


@dataclass(frozen=True, slots=True)
class SoakOptions:
    seconds: float = 20.0
    devices: int = 12
    batches_per_device: int = 4
    seed: int = 3
    tick_seconds: float = 0.1  # real seconds between fleet changes
    simulated_per_tick: float = 30.0  # simulated seconds each tick moves the clock
    fault_period: float = 1.0  # real seconds between two fault mixes
    scrape_period: float = 0.05
    sample_period: float = 2.0  # real seconds per row of the RSS / latency table
    converge_timeout: float = 60.0
    trace_memory: bool = False
    # The exactly-once ledger forgets a batch no response has shown for this long (simulated
    # seconds). In production it is max_age plus a day; here it is a few hours, so that
    # deleted batches leave the ledger within a long run and its memory can level off.
    ledger_retention: float = 3 * 3600.0


@dataclass(slots=True)
class Row:
    elapsed: float
    rss_mb: float
    scrapes: int
    scrape_p50_ms: float
    scrape_p99_ms: float
    scrape_max_ms: float
    rounds: int
    api_requests: int
    tracked_actions: int
    exporter_mb: float | None = None  # with --trace-memory: allocated by exporter code


@dataclass(slots=True)
class SoakReport:
    options: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    scrapes: int = 0
    scrape_failures: list[str] = field(default_factory=list)
    scrape_max_ms: float = 0.0
    scrape_p99_ms: float = 0.0
    fault_kinds: list[str] = field(default_factory=list)
    api_codes: dict[str, int] = field(default_factory=dict)
    parse_problems: dict[str, int] = field(default_factory=dict)
    batches_created: int = 0
    batches_deleted: int = 0
    events: int = 0
    rounds: int = 0
    converged: bool = False
    converge_seconds: float = 0.0
    gauge_mismatches: list[str] = field(default_factory=list)
    transition_mismatches: dict[str, list[int]] = field(default_factory=dict)
    awaiting_range: list[int] = field(default_factory=list)
    latency_expected: int = 0
    latency_exported: int = 0
    targets_down: list[str] = field(default_factory=list)
    crashed: str | None = None

    @property
    def ok(self) -> bool:
        return (
            not self.scrape_failures
            and not self.gauge_mismatches
            and not self.transition_mismatches
            and self.latency_expected == self.latency_exported
            and not self.targets_down
            and self.crashed is None
        )


# --- ground truth -----------------------------------------------------------------------------


def _sent_hidden(sim: Simulator, action: Action) -> bool:
    """Whether missing_fields drops this action's ``sentAt`` (no Awaiting, no latency)."""
    key = action.key
    return sim.faults.stable("missing_fields", key) and (
        sim.faults.pick("missing_fields", key, ACTION_OPTIONAL) == "sentAt"
    )


@dataclass(slots=True)
class Truth:
    gauges: dict[tuple[str, str], dict[str, int]]
    transitions: Counter[str]  # every status but Awaiting, exact
    awaiting: tuple[int, int]  # Awaiting entries: (sure, sure + those without sentAt)
    acks: int  # acknowledgements the exporter can time (sentAt shown)
    events: int


def truth(sim: Simulator, watermark: float, deleted: dict[str, Batch]) -> Truth:
    """What the exporter must show; ``deleted`` holds batches deleted after it saw them end
    (their transitions stay counted, their gauges are gone)."""
    fleet = sim.fleet
    gauges = {}
    for device in fleet.device_ids():
        for batch in fleet.batch_ids(device):
            counts = {s: n for s, n in fleet.grouped_counts(device, batch).items() if n}
            if counts:
                gauges[(device, batch)] = counts
    by_batch: dict[str, dict[str, Action]] = {}
    transitions: Counter[str] = Counter()
    sure = unsure = acks = 0
    events = fleet.events_since(watermark)
    for event in events:
        actions = by_batch.get(event.batch_id)
        if actions is None:
            batch = deleted.get(event.batch_id) or fleet.batch(
                fleet.device(event.device_id), event.batch_id
            )
            actions = by_batch[event.batch_id] = {a.cmd_id: a for a in batch.actions}
        action = actions[event.cmd_id]
        hidden = _sent_hidden(sim, action)
        if event.status == "Awaiting":
            sure, unsure = (sure, unsure + 1) if hidden else (sure + 1, unsure)
            continue
        transitions[event.status] += 1
        answered = event.status not in PENDING_STATUSES and action.received == event.time
        if answered and not hidden:
            acks += 1
    return Truth(gauges, transitions, (sure, sure + unsure), acks, len(events))


# --- what the exporter serves -----------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def exported_gauges(found: Samples) -> dict[tuple[str, str], dict[str, int]]:
    out: dict[tuple[str, str], dict[str, int]] = {}
    for (name, key), value in found.items():
        if name == "applivery_windows_command_actions" and value:
            labels = dict(key)
            out.setdefault((labels["device"], labels["command"]), {})[labels["status"]] = int(
                value
            )
    return out


def exported_counter(found: Samples, name: str, label: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for (sample, key), value in found.items():
        if sample == name and value:
            out[dict(key)[label]] += int(value)
    return out


def compare(report: SoakReport, found: Samples, expected: Truth) -> None:
    gauges = exported_gauges(found)
    for key in sorted(gauges.keys() | expected.gauges.keys()):
        if gauges.get(key) != expected.gauges.get(key):
            report.gauge_mismatches.append(
                f"{key}: exported {gauges.get(key)} truth {expected.gauges.get(key)}"
            )
    transitions = exported_counter(
        found, "applivery_windows_command_action_transitions_total", "status"
    )
    awaiting = transitions.pop("Awaiting", 0)
    for status in sorted(transitions.keys() | expected.transitions.keys()):
        if transitions[status] != expected.transitions[status]:
            report.transition_mismatches[status] = [
                transitions[status], expected.transitions[status]
            ]
    low, high = expected.awaiting
    report.awaiting_range = [low, awaiting, high]
    if not low <= awaiting <= high:
        report.transition_mismatches["Awaiting"] = [awaiting, low, high]
    report.latency_expected = expected.acks
    report.latency_exported = int(
        sum(v for (n, _), v in found.items()
            if n == "applivery_windows_command_ack_latency_seconds_count")
    )
    report.targets_down = sorted(
        dict(k)["device"] for (n, k), v in found.items()
        if n == "applivery_exporter_target_up" and v != 1
    )
    report.parse_problems = dict(
        exported_counter(found, "applivery_exporter_parse_problems_total", "kind")
    )
    report.api_codes = dict(
        exported_counter(found, "applivery_exporter_api_requests_total", "code")
    )
    report.events = expected.events


# --- the run ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def exporter_config(base_url: str) -> str:
    return yaml.safe_dump({
        "organization": "demo",
        "api": {"base_url": base_url, "requests_per_hour": 3_600_000, "page_size": 20,
                "timeout_seconds": 2, "max_concurrency": 8},
        "poll": {"interval_seconds": 0.2, "stale_after_rounds": 3},
        "discovery": {"devices": {"refresh_seconds": 600},
                      "batches": {"max_age": "3650d", "max_per_device": 1000}},
    })


def _shown_counts(exporter: Exporter, device: str) -> dict[str, dict[str, int]]:
    """Per batch of ``device``, the action counts per status the exporter exports."""
    if device not in exporter.state.watched():
        return {}
    view = exporter.state.device_view(device)
    return {b.id: {status: n for status, _, n in b.counts} for b in view.batches}


def fault_mix(rng: random.Random) -> tuple[str, list[str]]:
    """A random subset of the transport faults, with random probabilities and arguments."""
    parts, kinds = [DATA_FAULTS], []
    for kind, (highest, argument) in TRANSPORT.items():
        if rng.random() < 0.5:
            continue
        part = f"{kind}={rng.uniform(0.01, highest):.3f}"
        if argument is not None:
            part += f":{rng.uniform(*argument):.3f}"
        parts.append(part)
        kinds.append(kind)
    return ",".join(parts), kinds


class Soak:
    def __init__(self, options: SoakOptions) -> None:
        self.options = options
        self.rng = random.Random(options.seed)
        self.sim = Simulator(
            seed=options.seed, devices=options.devices, speed=0, start=SIM_START,
            batches_per_device=options.batches_per_device, max_limit=25,
            faults=DATA_FAULTS, new_batches_per_device_hour=2.0,
        )
        self.report = SoakReport(options=asdict(options))
        self.latencies: list[float] = []  # seconds, of the current table row
        self.all_latencies: list[float] = []
        self.scrapes_in_row = 0
        self.watermark = SIM_START
        self.deleted: dict[str, Batch] = {}
        self.kinds: set[str] = set()

    async def run(self) -> SoakReport:
        runner = web.AppRunner(self.sim.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base_url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        config = parse_config(exporter_config(base_url))
        exporter = build_exporter(
            config, TokenSource(value=self.sim.token), config_path=None, clock=self.sim.clock.now
        )
        exporter.state.ledger_retention_seconds = self.options.ledger_retention
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        stop = asyncio.Event()
        # No signal handlers: a stray SIGTERM to the host must not end the soak quietly.
        server = asyncio.create_task(
            serve(exporter, f"127.0.0.1:{port}", stop=stop, signals=False)
        )
        try:
            async with aiohttp.ClientSession() as session:
                await self._wait_ready(session, url, server)
                self.watermark = self.sim.clock.now()  # time stood still until now
                await self._soak(session, url, exporter, server)
                await self._converge(session, url, exporter, server)
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server, timeout=10)
            if server.done() and not server.cancelled():
                if server.exception() is not None:
                    self.report.crashed = repr(server.exception())
                elif server.result() != 0:
                    self.report.crashed = "the poll or render loop died (see the log)"
            await runner.cleanup()
        return self.report

    async def _wait_ready(
        self, session: aiohttp.ClientSession, url: str, server: asyncio.Task[int]
    ) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not server.done():
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/-/ready") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise RuntimeError("the exporter never became ready")

    async def _soak(
        self, session: aiohttp.ClientSession, url: str, exporter: Exporter,
        server: asyncio.Task[int],
    ) -> None:
        options = self.options
        ends = time.monotonic() + options.seconds
        tasks = [
            asyncio.create_task(self._scrape_forever(session, url)),
            asyncio.create_task(self._drive_fleet(ends, exporter)),
            asyncio.create_task(self._drive_faults(ends)),
            asyncio.create_task(self._sample(exporter, ends)),
        ]
        try:
            drivers = asyncio.gather(*tasks[1:])
            await asyncio.wait([drivers, server], return_when=asyncio.FIRST_COMPLETED)
            if server.done():
                server.result()  # the exporter ended during the soak: report why
                raise RuntimeError("the exporter stopped during the soak")
            drivers.result()
        finally:
            self.sim.faults.set(DATA_FAULTS)  # transport faults stop; the data stays as it was
            tasks[0].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tasks[0]
        self.report.fault_kinds = sorted(self.kinds)

    async def _scrape_forever(self, session: aiohttp.ClientSession, url: str) -> None:
        variants = [
            {},
            {"Accept-Encoding": "gzip"},
            {"Accept": "application/openmetrics-text; version=1.0.0", "Accept-Encoding": "gzip"},
        ]
        number = 0
        while True:
            headers = variants[number % len(variants)]
            number += 1
            started = time.perf_counter()
            try:
                async with session.get(
                    f"{url}/metrics", headers=headers, timeout=aiohttp.ClientTimeout(total=10)
                ) as response:
                    body = await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.report.scrape_failures.append(f"{type(exc).__name__}: {exc}")
                continue
            elapsed = time.perf_counter() - started
            self.latencies.append(elapsed)
            self.all_latencies.append(elapsed)
            self.report.scrapes += 1
            self.scrapes_in_row += 1
            if status != 200 or not body:
                self.report.scrape_failures.append(f"HTTP {status}")
            elif number % 50 == 0:  # now and then: the body parses whatever the upstream did
                text = body.decode() if "Accept-Encoding" not in headers else ""
                if text:
                    parse(text)
            await asyncio.sleep(self.options.scrape_period)

    async def _drive_fleet(self, ends: float, exporter: Exporter) -> None:
        sim, rng, options = self.sim, self.rng, self.options
        # As many batches are deleted as arrive, so the fleet keeps its size and RSS can be
        # compared across the run.
        size = self._live_batches()
        while time.monotonic() < ends:
            sim.advance(options.simulated_per_tick)
            if rng.random() < 0.15:
                sim.fleet.create_random_batch(sim.fleet.random_device().id)
                self.report.batches_created += 1
            excess = self._live_batches() - size
            for _ in range(3 * excess):  # a few devices may have nothing to delete
                if excess <= 0:
                    break
                excess -= self._delete_a_settled_batch(exporter)
            await asyncio.sleep(options.tick_seconds)

    def _live_batches(self) -> int:
        return sum(len(device.batches) for device in self.sim.fleet.devices)

    def _delete_a_settled_batch(self, exporter: Exporter) -> bool:
        # Only a batch that settled before its device's last complete read began: the
        # exporter has seen its final state, so deleting it hides no transition and the
        # counters stay comparable with the truth.
        device = self.sim.fleet.random_device()
        tracking = exporter.scheduler.tracking.get(device.id)
        read_at = tracking.read_at if tracking is not None else None
        if read_at is None:
            return False
        settled = [b for b in device.batches if b.open_count == 0 and b.updated < read_at]
        # A complete read may have been stale or short (the faults serve both): only a batch
        # whose exported counts are its final ones was seen to end.
        shown = _shown_counts(exporter, device.id)
        settled = [
            b for b in settled
            if shown.get(b.id) == self.sim.fleet.grouped_counts(device.id, b.id)
        ]
        if not settled:
            return False
        batch = self.rng.choice(settled)
        self.sim.fleet.delete_batch(device.id, batch.id)
        self.deleted[batch.id] = batch
        self.report.batches_deleted += 1
        return True

    async def _drive_faults(self, ends: float) -> None:
        while time.monotonic() < ends:
            spec, kinds = fault_mix(self.rng)
            self.sim.faults.set(spec)
            self.kinds.update(kinds)
            await asyncio.sleep(self.options.fault_period)

    async def _sample(self, exporter: Exporter, ends: float) -> None:
        started = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= ends:
                break
            await asyncio.sleep(min(self.options.sample_period, ends - now))
            self._row(exporter, time.monotonic() - started)

    def _row(self, exporter: Exporter, elapsed: float) -> None:
        latencies = sorted(self.latencies) or [0.0]
        self.report.rows.append(Row(
            elapsed=round(elapsed, 1),
            rss_mb=round(rss_mb(), 1),
            scrapes=self.scrapes_in_row,
            scrape_p50_ms=round(statistics.median(latencies) * 1000, 2),
            scrape_p99_ms=round(latencies[int(0.99 * (len(latencies) - 1))] * 1000, 2),
            scrape_max_ms=round(latencies[-1] * 1000, 2),
            rounds=exporter.scheduler.rounds,
            api_requests=sum(exporter.metrics.api_requests.values()),
            tracked_actions=exporter.state.tracked_actions(),
            exporter_mb=exporter_memory_mb() if self.options.trace_memory else None,
        ))
        self.latencies = []
        self.scrapes_in_row = 0

    async def _converge(
        self, session: aiohttp.ClientSession, url: str, exporter: Exporter,
        server: asyncio.Task[int],
    ) -> None:
        """Time stands still and the transport faults are off: scrape until every value
        equals the truth (a counter that double counted never comes back down)."""
        report = self.report
        expected = truth(self.sim, self.watermark, self.deleted)
        started = time.monotonic()
        attempt = SoakReport(options=report.options)
        while not server.done():
            async with session.get(f"{url}/metrics") as response:
                found = parse(await response.text())
            attempt = SoakReport(options=report.options)
            compare(attempt, found, expected)
            if attempt.ok or time.monotonic() - started > self.options.converge_timeout:
                break
            await asyncio.sleep(0.25)
        report.converged = attempt.ok
        for name in ("gauge_mismatches", "transition_mismatches", "awaiting_range",
                     "latency_expected", "latency_exported", "targets_down", "parse_problems",
                     "api_codes", "events"):
            setattr(report, name, getattr(attempt, name))
        report.converge_seconds = round(time.monotonic() - started, 2)
        report.rounds = exporter.scheduler.rounds
        latencies = sorted(self.all_latencies) or [0.0]
        report.scrape_max_ms = round(latencies[-1] * 1000, 2)
        report.scrape_p99_ms = round(latencies[int(0.99 * (len(latencies) - 1))] * 1000, 2)


async def run_soak(options: SoakOptions) -> SoakReport:
    if options.trace_memory:
        tracemalloc.start()
    try:
        return await Soak(options).run()
    finally:
        tracemalloc.stop()


_EXPORTER = str(Path(__file__).resolve().parents[1] / "exporter")


def exporter_memory_mb() -> float:
    """Memory still held that the exporter's own code allocated (the simulator's excluded):
    RSS of this one process counts the simulator and the soak's ground truth as well."""
    snapshot = tracemalloc.take_snapshot().filter_traces([
        tracemalloc.Filter(True, f"{_EXPORTER}/*"),
        tracemalloc.Filter(False, f"{_EXPORTER}/simulator/*"),
    ])
    return round(sum(stat.size for stat in snapshot.statistics("filename")) / 2**20, 2)


# --- the script -------------------------------------------------------------------------------


def print_table(report: SoakReport) -> None:
    traced = bool(report.rows) and report.rows[0].exporter_mb is not None
    head = ("t s", "RSS MB", "scrapes", "p50 ms", "p99 ms", "max ms", "rounds", "API req",
            "actions", *(("export MB",) if traced else ()))
    print(" ".join(f"{h:>9}" for h in head))
    for row in report.rows:
        print(" ".join(f"{v:>9}" for v in (
            row.elapsed, row.rss_mb, row.scrapes, row.scrape_p50_ms, row.scrape_p99_ms,
            row.scrape_max_ms, row.rounds, row.api_requests, row.tracked_actions,
            *((row.exporter_mb,) if traced else ()),
        )))
    rows = report.rows
    if len(rows) >= 4:
        quarter = max(1, len(rows) // 4)
        measures = [("RSS", attrgetter("rss_mb"))]
        if traced:
            measures.append(("exporter's memory", attrgetter("exporter_mb")))
        for name, value in measures:
            early = statistics.median(value(r) for r in rows[:quarter])
            late = statistics.median(value(r) for r in rows[-quarter:])
            print(f"{name} first quarter {early:.1f} MB, last quarter {late:.1f} MB "
                  f"(ratio {late / early:.3f})")
    print(f"scrapes {report.scrapes}, failures {len(report.scrape_failures)}, "
          f"p99 {report.scrape_p99_ms} ms, max {report.scrape_max_ms} ms")
    print(f"fault kinds drawn: {', '.join(report.fault_kinds)}")
    print(f"API codes: {dict(sorted(report.api_codes.items()))}")
    print(f"parse problems: {report.parse_problems}")
    print(f"fleet: {report.events} events since the watermark, {report.batches_created} "
          f"batches created, {report.batches_deleted} deleted; {report.rounds} poll rounds")
    print(f"converged: {report.converged} after {report.converge_seconds} s; gauge mismatches "
          f"{len(report.gauge_mismatches)}, transition mismatches {report.transition_mismatches},"
          f" Awaiting (low, exported, high) {report.awaiting_range}, latency "
          f"{report.latency_exported}/{report.latency_expected}")
    print("OK" if report.ok else "FAILED")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="about 20 seconds")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--devices", type=int, default=None)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--trace-memory", action="store_true",
                        help="also trace what the exporter's code allocates (slower)")
    args = parser.parse_args()
    if args.smoke:
        options = SoakOptions(seconds=12, devices=args.devices or 8, sample_period=2.0,
                              seed=args.seed)
    else:
        options = SoakOptions(
            seconds=args.minutes * 60, devices=args.devices or 40, sample_period=15.0,
            simulated_per_tick=10.0, trace_memory=args.trace_memory, seed=args.seed,
        )
    # Structured logs of every retry would drown the table.
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    report = asyncio.run(run_soak(options))
    print_table(report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"smoke": args.smoke, "ok": report.ok, **asdict(report)},
                                  indent=2) + "\n")
    print(f"wrote {RESULTS}")
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
