"""Real Prometheus and Alertmanager processes for tests.

Each one runs from the Debian binaries with its configuration and storage in a temporary
directory, listens on 127.0.0.1 at a free port, and is killed when its context manager exits.
Everything is async: the scrape targets and webhook receivers of a test usually run on the
test's own event loop, which a blocking HTTP call would freeze.

    async with running_alertmanager(sink_url) as am, running_prometheus(
        [ScrapeTarget(f"127.0.0.1:{port}")], rule_files=[...], alertmanager=am.address
    ) as prom:
        await eventually(lambda: prom.query("up == 1"))
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from aiohttp import web

PROMETHEUS_BIN = os.environ.get("PROMETHEUS_BIN", "/usr/bin/prometheus")
ALERTMANAGER_BIN = os.environ.get("ALERTMANAGER_BIN", "/usr/bin/prometheus-alertmanager")
PROMTOOL_BIN = os.environ.get("PROMTOOL_BIN", "/usr/bin/promtool")
AMTOOL_BIN = os.environ.get("AMTOOL_BIN", "/usr/bin/amtool")

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
LOG_TAIL = 3000

T = TypeVar("T")


# --- availability -------------------------------------------------------------------------


def executable(path: str) -> str | None:
    """The path when it names an executable, else what ``which`` finds for its base name."""
    if os.path.isfile(path) and os.access(path, os.X_OK):
        return path
    return shutil.which(os.path.basename(path))


def require_binaries(*paths: str) -> list[str]:
    """Resolved paths of the binaries; a missing one skips the test, or fails it under CI."""
    found = [executable(p) for p in paths]
    missing = [p for p, f in zip(paths, found, strict=True) if f is None]
    if missing:
        reason = f"needs {', '.join(missing)} (Debian packages prometheus, prometheus-alertmanager)"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but a binary is missing: {reason}")
        pytest.skip(reason)
    return [f for f in found if f is not None]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- configuration (pure) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    """One static target; ``address`` is ``host:port``."""

    address: str
    job: str = "applivery-mdm-exporter"
    metrics_path: str = "/metrics"
    labels: Mapping[str, str] = field(default_factory=dict)


def prometheus_config(
    targets: Iterable[ScrapeTarget],
    *,
    rule_files: Iterable[str | Path] = (),
    alertmanager: str | None = None,
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    relabel_configs: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """A Prometheus configuration; targets sharing a job and path share a scrape job, each
    with relabel_configs (target labels such as the Prometheus Operator sets)."""
    jobs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for target in targets:
        group: dict[str, Any] = {"targets": [target.address]}
        if target.labels:
            group["labels"] = dict(target.labels)
        jobs.setdefault((target.job, target.metrics_path), []).append(group)
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": scrape_interval,
            # A timeout longer than the interval is a configuration error.
            "scrape_timeout": scrape_interval,
            "evaluation_interval": evaluation_interval,
        },
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [
            {"job_name": job, "metrics_path": path, "static_configs": groups}
            | ({"relabel_configs": [dict(r) for r in relabel_configs]} if relabel_configs else {})
            for (job, path), groups in jobs.items()
        ],
    }
    if alertmanager is not None:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    return config


def alertmanager_config(
    webhook_url: str,
    *,
    group_wait: str = "1s",
    group_interval: str = "1s",
    repeat_interval: str = "1h",
    group_by: Sequence[str] = ("alertname",),
) -> dict[str, Any]:
    """An Alertmanager configuration sending every alert to one webhook."""
    return {
        "route": {
            "receiver": "webhook",
            "group_by": list(group_by),
            "group_wait": group_wait,
            "group_interval": group_interval,
            "repeat_interval": repeat_interval,
        },
        "receivers": [
            {"name": "webhook", "webhook_configs": [{"url": webhook_url, "send_resolved": True}]}
        ],
    }


def immediate_alerts(rules: str | Path, directory: str | Path) -> Path:
    """A copy of an alerting rules file with every ``for`` removed, written into directory,
    so a test sees in seconds what production waits minutes for."""
    source = Path(rules)
    document = yaml.safe_load(source.read_text())
    for group in document.get("groups", []):
        for rule in group.get("rules", []):
            rule.pop("for", None)
            rule.pop("keep_firing_for", None)
    target = Path(directory) / f"immediate-{source.name}"
    target.write_text(yaml.safe_dump(document, sort_keys=False))
    return target


# --- processes -----------------------------------------------------------------------------

_LIVE: set[int] = set()


@atexit.register
def _kill_leftovers() -> None:
    # Reached only when a test run is interrupted before a context manager could clean up.
    for pid in list(_LIVE):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class _Process:
    """A child process with its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("wb") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
            )
        _LIVE.add(self._proc.pid)

    @property
    def exited(self) -> bool:
        return self._proc is not None and self._proc.returncode is not None

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL:]
        except OSError:
            return ""

    async def wait_ready(self, session: aiohttp.ClientSession, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exited:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")

    async def stop(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        try:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        except ProcessLookupError:
            pass
        finally:
            _LIVE.discard(proc.pid)


# --- HTTP API clients -----------------------------------------------------------------------


class ApiError(RuntimeError):
    """An HTTP API answer with status other than success (a PromQL parse error, say)."""

    def __init__(self, status: int, error_type: str, error: str) -> None:
        super().__init__(f"{status} {error_type}: {error}")
        self.status = status
        self.error_type = error_type
        self.error = error


async def _data(resp: aiohttp.ClientResponse) -> Any:
    body = await resp.json(content_type=None)
    if resp.status != 200 or body.get("status") != "success":
        raise ApiError(resp.status, body.get("errorType", ""), body.get("error", str(body)))
    return body["data"]


@dataclass(slots=True)
class Prometheus:
    """A running Prometheus: ``url`` is its base URL, ``address`` its ``host:port``."""

    address: str
    directory: Path
    config_path: Path
    session: aiohttp.ClientSession
    process: _Process

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    async def _get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        async with self.session.get(self.url + path, params=params) as resp:
            return await _data(resp)

    async def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query: the ``result`` list (vector), or ``[type, value]`` for scalars."""
        params = {"query": expr}
        if at is not None:
            params["time"] = repr(at)
        return (await self._get("/api/v1/query", params))["result"]

    async def query_range(
        self, expr: str, start: float, end: float, step: float
    ) -> list[dict[str, Any]]:
        params = {"query": expr, "start": repr(start), "end": repr(end), "step": repr(step)}
        return (await self._get("/api/v1/query_range", params))["result"]

    async def label_values(self, label: str, selector: str) -> list[str]:
        """What Grafana's ``label_values(selector, label)`` offers."""
        return await self._get(f"/api/v1/label/{label}/values", {"match[]": selector})

    async def alerts(self) -> list[dict[str, Any]]:
        """Active (pending and firing) alerts."""
        return (await self._get("/api/v1/alerts"))["alerts"]

    async def rules(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Rule groups with their rules' health and last evaluation; kind: alert | record."""
        return (await self._get("/api/v1/rules", {"type": kind} if kind else None))["groups"]

    async def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets with ``health``, ``lastError`` and ``labels``."""
        return (await self._get("/api/v1/targets", {"state": "active"}))["activeTargets"]

    async def reload(self, config: Mapping[str, Any] | None = None) -> None:
        """Re-read the configuration (rewritten first when one is given) and rule files."""
        if config is not None:
            self.config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        async with self.session.post(self.url + "/-/reload") as resp:
            if resp.status != 200:
                raise ApiError(resp.status, "reload", await resp.text())


@dataclass(slots=True)
class Alertmanager:
    """A running Alertmanager; give ``address`` to Prometheus as its alertmanager."""

    address: str
    directory: Path
    session: aiohttp.ClientSession
    process: _Process

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    async def alerts(self) -> list[dict[str, Any]]:
        """Alerts Alertmanager currently holds (API v2)."""
        async with self.session.get(self.url + "/api/v2/alerts") as resp:
            resp.raise_for_status()
            return await resp.json()


# --- context managers ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _workspace(prefix: str) -> AsyncIterator[tuple[Path, aiohttp.ClientSession]]:
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            yield Path(tmp), session


@contextlib.asynccontextmanager
async def running_prometheus(
    targets: Iterable[ScrapeTarget] = (),
    *,
    rule_files: Iterable[str | Path] = (),
    alertmanager: str | None = None,
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    extra_args: Sequence[str] = (),
    ready_timeout: float = READY_TIMEOUT,
    relabel_configs: Sequence[Mapping[str, Any]] = (),
) -> AsyncIterator[Prometheus]:
    """A real Prometheus scraping targets and evaluating rule files, until the block ends."""
    (binary,) = require_binaries(PROMETHEUS_BIN)
    async with _workspace("promstack-prometheus-") as (directory, session):
        config = prometheus_config(
            targets,
            rule_files=rule_files,
            alertmanager=alertmanager,
            scrape_interval=scrape_interval,
            evaluation_interval=evaluation_interval,
            relabel_configs=relabel_configs,
        )
        config_path = directory / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        address = f"127.0.0.1:{free_port()}"
        process = _Process(
            "prometheus",
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address={address}",
                "--web.enable-lifecycle",
                "--log.level=warn",
                *extra_args,
            ],
            directory / "prometheus.log",
        )
        await process.start()
        try:
            await process.wait_ready(session, f"http://{address}/-/ready", ready_timeout)
            yield Prometheus(address, directory, config_path, session, process)
        finally:
            await process.stop()


@contextlib.asynccontextmanager
async def running_alertmanager(
    webhook_url: str,
    *,
    group_wait: str = "1s",
    group_interval: str = "1s",
    repeat_interval: str = "1h",
    group_by: Sequence[str] = ("alertname",),
    ready_timeout: float = READY_TIMEOUT,
) -> AsyncIterator[Alertmanager]:
    """A real Alertmanager without clustering, notifying one webhook, until the block ends."""
    (binary,) = require_binaries(ALERTMANAGER_BIN)
    async with _workspace("promstack-alertmanager-") as (directory, session):
        config = alertmanager_config(
            webhook_url,
            group_wait=group_wait,
            group_interval=group_interval,
            repeat_interval=repeat_interval,
            group_by=group_by,
        )
        config_path = directory / "alertmanager.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        address = f"127.0.0.1:{free_port()}"
        process = _Process(
            "alertmanager",
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.path={directory / 'data'}",
                f"--web.listen-address={address}",
                "--cluster.listen-address=",
                "--log.level=warn",
            ],
            directory / "alertmanager.log",
        )
        await process.start()
        try:
            await process.wait_ready(session, f"http://{address}/-/ready", ready_timeout)
            yield Alertmanager(address, directory, session, process)
        finally:
            await process.stop()


# --- webhook receiver and waiting -------------------------------------------------------------


@dataclass(slots=True)
class AlertSink:
    """An Alertmanager webhook receiver: serve ``app()`` and give Alertmanager ``path``."""

    path: str = "/alerts"
    notifications: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        application = web.Application()
        application.router.add_post(self.path, self._receive)
        return application

    async def _receive(self, request: web.Request) -> web.Response:
        self.notifications.append(await request.json())
        return web.Response(status=200)

    def alerts(self, status: str | None = None) -> list[dict[str, Any]]:
        """Every alert of every notification so far, optionally only firing or resolved."""
        return [
            alert
            for notification in self.notifications
            for alert in notification.get("alerts", [])
            if status is None or alert.get("status") == status
        ]


async def eventually(
    probe: Callable[[], Awaitable[T]],
    *,
    timeout: float = 20.0,
    interval: float = 0.2,
    what: str = "condition",
) -> T:
    """The first truthy result of probe, retried until timeout; errors count as falsy."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = await probe()
            if result:
                return result
            last = result
        except (ApiError, aiohttp.ClientError) as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not met within {timeout}s; last result: {last!r}")
        await asyncio.sleep(interval)
