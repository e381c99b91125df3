"""Command line, wiring and the process lifecycle (signals, reload, --demo).

The only module that knows every other one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import structlog
from aiohttp import web

from exporter import __version__, logs
from exporter.client import ApiClient, ApiError, TokenSource
from exporter.config import Config, ConfigError, load_config, parse_config
from exporter.connections import start_server
from exporter.exposition import Exposition
from exporter.reloading import reload_configs, token_source
from exporter.scheduler import Scheduler
from exporter.selfmetrics import SelfMetrics
from exporter.server import Hooks, PublishedBody, make_app
from exporter.snapshot import Persistence
from exporter.state import FleetState, ledger_retention
from exporter.store import DirectoryLock, StoreLocked, StoreUnusable, hold, open_directory
from exporter.targets import Shard
from exporter.webconfig import WebSecurity

log = structlog.get_logger("exporter")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
REFRESH_SECONDS = 1.0  # how stale self-metrics may be on /metrics at most
DEFAULT_STORAGE_PATH = "data/"  # as Alertmanager's --storage.path
DEFAULT_LISTEN = ":10190"


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="applivery-mdm-exporter",
        description="Prometheus exporter for Applivery MDM Windows command batches.",
    )
    parser.add_argument("--config.file", dest="config_file", default="config.yaml")
    parser.add_argument("--config.check", dest="config_check", action="store_true",
                        help="validate the config and exit 0 (valid) or 2 (invalid)")
    parser.add_argument("--config.check-api", dest="config_check_api", action="store_true",
                        help="with --config.check: also make one authenticated API call")
    parser.add_argument("--web.listen-address", dest="listen", action="append", default=None,
                        help=f"HOST:PORT to serve on, repeatable (default {DEFAULT_LISTEN})")
    parser.add_argument("--web.telemetry-path", dest="telemetry_path", default="/metrics",
                        help="the path the metrics are served at")
    parser.add_argument("--web.config.file", dest="web_config", default=None)
    parser.add_argument("--web.enable-lifecycle", dest="enable_lifecycle", action="store_true",
                        help="allow POST /-/reload (SIGHUP reloads regardless)")
    parser.add_argument("--log.level", dest="log_level", default="info", choices=logs.LEVELS)
    parser.add_argument("--log.format", dest="log_format", default="console", choices=logs.FORMATS)
    parser.add_argument("--shard", dest="shard", default=None, help="INDEX/TOTAL, e.g. 0/3")
    parser.add_argument("--storage.path", dest="storage_path", default=None,
                        help=f"directory of the durable state (default {DEFAULT_STORAGE_PATH}; "
                        "'' keeps state in memory only; --demo uses a temporary one)")
    parser.add_argument("--demo", action="store_true",
                        help="run the built-in simulator and the exporter against it")
    parser.add_argument("--version", action="version", version=__version__)
    return parser


def parse_listen(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"--web.listen-address must be HOST:PORT or :PORT, got {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def listen_addresses(listen: str | Sequence[str] | None) -> list[tuple[str, int]]:
    """Every --web.listen-address given (a single one as a str), parsed; the default if none."""
    given = [listen] if isinstance(listen, str) else list(listen or [DEFAULT_LISTEN])
    return [parse_listen(address) for address in given]


def parse_telemetry_path(path: str) -> str:
    if not path.startswith("/") or path.startswith("/-/") or path == "/":
        raise UsageError(f"--web.telemetry-path must be a path under / other than / and /-/, "
                         f"got {path!r}")
    return path


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(slots=True)
class Exporter:
    """Everything one running exporter is made of."""

    config: Config
    metrics: SelfMetrics
    state: FleetState
    exposition: Exposition
    client: ApiClient
    scheduler: Scheduler
    config_path: str | None
    persistence: Persistence | None = None


def build_exporter(
    config: Config,
    token: TokenSource,
    *,
    config_path: str | None,
    shard: Shard | None = None,
    clock: Callable[[], float] = time.time,
    storage: DirectoryLock | None = None,
) -> Exporter:
    """``storage``: the --storage.path directory's lock (None: state in memory only)."""
    metrics = SelfMetrics()
    state = FleetState(
        organization=config.organization,
        latency_buckets=config.metrics.latency_buckets,
        metrics=metrics,
        clock=clock,
        wall_clock=time.time,
        ledger_retention_seconds=ledger_retention(config.discovery.batches.max_age_seconds),
    )
    share = 1 / shard.total if shard else 1.0
    api = config.api
    client = ApiClient(
        base_url=api.base_url,
        organization=config.organization,
        token=token,
        metrics=metrics,
        timeout_seconds=api.timeout_seconds,
        max_concurrency=api.max_concurrency,
        requests_per_hour=api.requests_per_hour * share,
        page_size=api.page_size,
        max_pages=api.max_pages,
        max_body_bytes=api.max_body_bytes,
    )
    metrics.budget_requests_per_hour = api.requests_per_hour * share
    scheduler = Scheduler(config, client, state, metrics, shard=shard, clock=clock)
    exposition = Exposition(
        state, metrics, version=__version__, max_series=config.metrics.max_series
    )
    persistence = None
    if storage is not None:
        directory, organization = storage.path.parent, config.organization
        persistence = Persistence(
            lambda: open_directory(directory, organization, storage),
            state, metrics, marks=lambda: scheduler.tracking, lock=storage,
            verdicts=client.verdicts,
        )
    return Exporter(
        config, metrics, state, exposition, client, scheduler, config_path, persistence
    )


def storage_lock(path: str) -> DirectoryLock | None:
    """The lock of the --storage.path directory, held; None for memory only. Another
    process holding it is fatal (StoreLocked); a directory that cannot be made or locked
    now is a storage failure, tried again while the exporter runs."""
    if not path:
        return None
    lock = DirectoryLock(Path(path))
    try:
        hold(Path(path), lock)
    except StoreLocked:
        raise
    except StoreUnusable:
        pass  # a storage failure like any other: counted, and tried again while running
    return lock


async def _in_steps(steps: Generator[None, None, bool]) -> bool:
    """Run a stepwise job, letting the event loop serve requests between its steps."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return bool(done.value)
        await asyncio.sleep(0)


class Renders:
    """Between the render loop and those who change what it renders.

    ``ask()`` wakes the loop; ``rendered()`` waits until a render that began after the ask
    has finished, so a reload's outcome is on the very next scrape without anybody but the
    loop rendering (a render may be paused between two of its steps).
    """

    def __init__(self) -> None:
        self.wanted = asyncio.Event()
        self.started = 0
        self.finished = 0
        self._done = asyncio.Condition()

    def ask(self) -> int:
        self.wanted.set()
        return self.started + 1

    async def rendered(self, ticket: int, timeout: float = 5.0) -> None:
        async with self._done:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._done.wait_for(lambda: self.finished >= ticket), timeout
                )

    async def finish(self) -> None:
        async with self._done:
            self.finished = self.started
            self._done.notify_all()


async def _refresh_loop(exporter: Exporter, renders: Renders, body: PublishedBody) -> None:
    """Re-render after each round, and at least every REFRESH_SECONDS for self-metrics.

    Durable before visible: what a render shows is committed to the store before the body
    is published, so a process killed at any moment never loses what a scraper saw."""
    loop = asyncio.get_running_loop()
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(renders.wanted.wait(), timeout=REFRESH_SECONDS)
        renders.wanted.clear()
        renders.started += 1
        whole = exporter.scheduler.ready  # before the render: it then shows that round
        rendered = await _in_steps(exporter.exposition.refresh_steps())
        # Taken in the step the render ended in: everything it showed, and maybe more.
        changes = exporter.persistence.collect() if exporter.persistence else None
        if rendered:
            # Compress ahead of the next scrape, off the loop (zlib releases the GIL).
            for openmetrics in (True, False):
                await loop.run_in_executor(
                    None, partial(exporter.exposition.gzip_parts, openmetrics=openmetrics)
                )
        if changes is not None and exporter.persistence is not None:
            # Failing storage does not stop serving: counted, alerted on, written later.
            await exporter.persistence.commit(changes)
        body.publish(whole=whole)
        await renders.finish()


async def _restore(exporter: Exporter) -> int:
    """The last known fleet from the store, before upstream answers anything."""
    persistence = exporter.persistence
    if persistence is None or not persistence.open():
        return 0
    devices = persistence.load()
    exporter.scheduler.adopt_restored()
    if devices:
        log.info("state_restored", devices=devices,
                 actions=exporter.state.tracked_actions())
    return devices


async def serve(
    exporter: Exporter,
    listen: str | Sequence[str],
    *,
    ssl_context: object | None = None,
    security: WebSecurity | None = None,
    started: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
    signals: bool = True,
    lifecycle: bool = False,
    telemetry_path: str = "/metrics",
) -> int:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT when ``signals``); 1 if the poll or
    render loop died, 0 otherwise. Benchmarks and tests embed it with ``signals=False``.
    ``listen``: one address or several, each bound (port 0: a free port, logged);
    ``started`` gets the first one's URL. ``lifecycle`` enables ``POST /-/reload``."""
    addresses = listen_addresses(listen)
    if security is not None and ssl_context is None:
        ssl_context = security.ssl_context
    stop = stop or asyncio.Event()
    renders = Renders()
    loop = asyncio.get_running_loop()

    pending: set[asyncio.Task[str | None]] = set()

    async def reload_now() -> str | None:
        problem = await reload_configs(exporter, security)
        # Only the render loop renders (a render may be paused between two of its steps);
        # it picks the reload up at once.
        await renders.rendered(renders.ask())
        return problem

    def on_reload_signal() -> None:
        # Keep a reference: the loop holds tasks only weakly.
        task = loop.create_task(reload_now())
        pending.add(task)
        task.add_done_callback(pending.discard)

    handlers = {signal.SIGTERM: stop.set, signal.SIGINT: stop.set, signal.SIGHUP: on_reload_signal}
    for sig, handler in handlers.items() if signals else ():
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, handler)

    restored = await _restore(exporter)
    exporter.exposition.refresh()
    body = PublishedBody(exporter.exposition)
    if exporter.persistence is not None:
        await exporter.persistence.flush()
    body.publish(whole=restored > 0)
    hooks = Hooks(
        exposition=exporter.exposition,
        body=body,
        state=exporter.state,
        # Ready once the served body shows a whole fleet: a restored one at once, otherwise
        # the first complete round (published after its commit, not when it ends).
        ready=lambda: body.whole,
        reload=reload_now,
        version=__version__,
        organization=lambda: exporter.config.organization,
        metrics=exporter.metrics,
        telemetry_path=telemetry_path,
    )
    serving = await start_server(
        make_app(hooks, security, lifecycle=lifecycle), addresses, ssl_context
    )
    # The ports actually bound: the ones asked for, or the kernel's picks for port 0.
    bound = [(host, port) for (host, _), port in zip(addresses, serving.ports, strict=True)]
    for host, port in bound:
        log.info("listening", address=_join_host_port(host, port), version=__version__,
                 tls=ssl_context is not None, telemetry_path=telemetry_path)
    if started is not None:
        started(_url(*bound[0], tls=ssl_context is not None))
    tasks = [
        asyncio.create_task(exporter.scheduler.run(on_round=lambda _: renders.ask())),
        asyncio.create_task(_refresh_loop(exporter, renders, body)),
        asyncio.create_task(serving.connections.run()),
    ]
    stopped = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([*tasks, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        log.info("stopping")
        for task in (*tasks, stopped):
            task.cancel()
        await asyncio.wait(tasks, timeout=5)
        if exporter.persistence is not None:
            # What the last render showed is committed already; this takes the rest.
            await exporter.persistence.flush()
            await exporter.persistence.close()
        await exporter.client.close()
        await serving.stop()
        for sig in handlers if signals else ():
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    # Both loops run until cancelled: one that ended on its own died, and a process that
    # no longer polls or renders must not look healthy.
    died = [task for task in tasks if task in done]
    for task in died:
        log.error("background_task_died", task=task.get_coro().__qualname__,
                  reason=repr(task.exception()) if not task.cancelled() else "cancelled")
    return EXIT_FAILURE if died else EXIT_OK


def _url(host: str, port: int, *, tls: bool) -> str:
    local = "127.0.0.1" if host == "0.0.0.0" else host
    return f"{'https' if tls else 'http'}://{_join_host_port(local, port)}"


def _print_config_error(exc: ConfigError) -> None:
    for problem in exc.problems:
        print(problem, file=sys.stderr)


async def _check_api(config: Config, token: TokenSource) -> int:
    metrics = SelfMetrics()
    async with ApiClient(
        base_url=config.api.base_url,
        organization=config.organization,
        token=token,
        metrics=metrics,
        timeout_seconds=config.api.timeout_seconds,
        max_attempts=1,
    ) as client:
        try:
            if config.devices:
                await client.list_batches(config.devices[0].id, max_items=1)
            else:
                await client.list_devices()
        except ApiError as exc:
            print(f"api: {exc}", file=sys.stderr)
            return EXIT_USAGE
    print("api: authenticated call succeeded")
    return EXIT_OK


def _load_security(path: str | None, problems: list[str]) -> WebSecurity | None:
    try:
        return WebSecurity.load(path) if path else None
    except ConfigError as exc:
        problems += exc.problems
        return None


def run(args: argparse.Namespace) -> int:
    problems: list[str] = []
    security = _load_security(args.web_config, problems)
    if args.demo and not problems:
        return _run_demo(args, security)
    try:
        if not args.demo:
            config = load_config(args.config_file)
            token = token_source(config)
    except ConfigError as exc:
        problems[:0] = exc.problems
    if problems:
        _print_config_error(ConfigError(problems))
        return EXIT_USAGE
    if args.config_check:
        if args.config_check_api:
            return asyncio.run(_check_api(config, token))
        print(f"{args.config_file}: config is valid")
        if args.web_config:
            print(f"{args.web_config}: web config is valid")
        return EXIT_OK
    shard = Shard.parse(args.shard) if args.shard else None
    try:
        storage = storage_lock(_storage_path(args))
    except StoreLocked as exc:
        print(f"applivery-mdm-exporter: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    exporter = build_exporter(
        config, token, config_path=args.config_file, shard=shard, storage=storage
    )
    return asyncio.run(
        serve(exporter, args.listen, security=security, lifecycle=args.enable_lifecycle,
              telemetry_path=args.telemetry_path)
    )


def _storage_path(args: argparse.Namespace) -> str:
    return DEFAULT_STORAGE_PATH if args.storage_path is None else args.storage_path


def _run_demo(args: argparse.Namespace, security: WebSecurity | None) -> int:
    """--demo keeps its state in a temporary directory of its own, unless told where."""
    with contextlib.ExitStack() as stack:
        path = args.storage_path
        if path is None:
            path = stack.enter_context(tempfile.TemporaryDirectory(prefix="applivery-demo-"))
        try:
            storage = storage_lock(path)
        except StoreLocked as exc:
            print(f"applivery-mdm-exporter: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        return asyncio.run(
            run_demo(args.listen, security, lifecycle=args.enable_lifecycle, storage=storage,
                     telemetry_path=args.telemetry_path)
        )


DEMO_CONFIG = """
organization: demo
api:
  base_url: {base_url}
  requests_per_hour: 36000
  page_size: 50
poll:
  interval_seconds: 5
devices:
  - id: {first_device}
    name: reception-pc
    labels: {{site: madrid}}
discovery:
  devices: {{refresh_seconds: 60}}
  batches: {{max_age: 7d, max_per_device: 10}}
"""


async def run_demo(
    listen: str | Sequence[str],
    security: WebSecurity | None = None,
    *,
    lifecycle: bool = False,
    storage: DirectoryLock | None = None,
    telemetry_path: str = "/metrics",
) -> int:
    """The simulator in accelerated time and the exporter against it, in one process."""
    from exporter.simulator import Simulator  # only the demo needs it

    # Busier than the default fleet, so that rollouts, settings and check-ins all move
    # within the first minute (seed 8 has devices of the model one setting fails on).
    sim = Simulator(seed=8, devices=20, organization="demo", speed=30.0,
                    new_batches_per_device_hour=3.0, faults="latency=0.3:0.05,error500=0.02")
    sim_runner = web.AppRunner(sim.app(), access_log=None)
    await sim_runner.setup()
    sim_site = web.TCPSite(sim_runner, "127.0.0.1", 0)
    await sim_site.start()
    port = sim_runner.addresses[0][1]
    base_url = f"http://127.0.0.1:{port}/v1"
    config = parse_config(
        DEMO_CONFIG.format(base_url=base_url, first_device=sim.fleet.device_ids()[0]),
        source="<demo>",
    )
    # The exporter reads watermarks on the simulator's time line (it runs 30x faster).
    exporter = build_exporter(
        config, TokenSource(value=sim.token), config_path=None, clock=sim.clock.now,
        storage=storage,
    )

    def started(url: str) -> None:
        print(
            f"Demo: simulated Applivery API at {base_url} (20 devices, 30x time).\n"
            f"  metrics:      {url}{telemetry_path}\n"
            f"  landing page: {url}/\n"
            "Within a minute: rollouts (applivery_windows_rollout_devices), failing settings\n"
            "(applivery_windows_setting_results_total), silent devices\n"
            "(applivery_windows_device_last_check_in_timestamp_seconds).\n"
            "Ctrl-C to stop.",
            flush=True,
        )

    try:
        return await serve(
            exporter, listen, security=security, started=started, lifecycle=lifecycle,
            telemetry_path=telemetry_path,
        )
    finally:
        await sim_runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.shard:
            Shard.parse(args.shard)
        listen_addresses(args.listen)
        parse_telemetry_path(args.telemetry_path)
    except (UsageError, ValueError) as exc:
        print(f"applivery-mdm-exporter: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(args.log_level, args.log_format)
    try:
        return run(args)
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as exc:
        log.error("fatal", reason=str(exc))
        return EXIT_FAILURE


__all__ = ["build_exporter", "main", "parse_config", "serve"]
