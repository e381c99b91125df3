"""The HTTP side: /metrics, health, readiness, reload and the landing page.

Nothing here calls the upstream API: a scrape serves the bytes the exposition rendered
last, so its cost does not depend on the fleet or on how the upstream behaves.
"""

from __future__ import annotations

import asyncio
import html
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

from aiohttp import web

from exporter.exposition import (
    CONTENT_TYPE_OPENMETRICS,
    CONTENT_TYPE_TEXT,
    Exposition,
    wants_openmetrics,
)
from exporter.rollouts import STATES, Rollout
from exporter.selfmetrics import SORTED_LIST, SelfMetrics
from exporter.state import FleetState
from exporter.webconfig import WebSecurity, install

ReloadFn = Callable[[], Awaitable[str | None]]  # None on success, else the reason


class PublishedBody:
    """The /metrics body as of the last ``publish()``, in both formats, plain and gzip.

    The render loop publishes a render only once the store holds what it shows (durable
    before visible); until then scrapes get the body before it."""

    def __init__(self, exposition: Exposition) -> None:
        self._exposition = exposition
        self._bodies: dict[tuple[bool, bool], tuple[bytes, ...]] = {}

    def publish(self) -> None:
        """Take the exposition's current body (its gzip is usually compressed already)."""
        exposition = self._exposition
        self._bodies = {
            (openmetrics, gzipped): (
                exposition.gzip_parts(openmetrics=openmetrics)
                if gzipped
                else exposition.parts(openmetrics=openmetrics)
            )
            for openmetrics in (True, False)
            for gzipped in (True, False)
        }

    def parts(self, *, openmetrics: bool) -> tuple[bytes, ...]:
        return self._bodies[(openmetrics, False)]

    def gzip_parts(self, *, openmetrics: bool) -> tuple[bytes, ...]:
        return self._bodies[(openmetrics, True)]


@dataclass(frozen=True, slots=True)
class Hooks:
    """What the routes need from the rest of the process."""

    exposition: Exposition
    state: FleetState
    ready: Callable[[], bool]
    reload: ReloadFn
    version: str
    organization: Callable[[], str]
    metrics: SelfMetrics | None = None  # for the landing page's upstream notes
    # What /metrics serves; without it, the exposition's latest render.
    body: PublishedBody | None = None


HOOKS = web.AppKey("hooks", Hooks)
LIFECYCLE = web.AppKey("lifecycle", bool)


def _accepts_gzip(request: web.Request) -> bool:
    return "gzip" in request.headers.get("Accept-Encoding", "").lower()


WRITE_BYTES = 1 << 16  # small sections (headers, deflated pieces) go out together


def _writes(parts: Sequence[bytes]) -> Iterator[bytes]:
    """``parts`` in writes of at least WRITE_BYTES: small ones joined, large ones as they are."""
    pending: list[bytes] = []
    size = 0
    for part in parts:
        pending.append(part)
        size += len(part)
        if size >= WRITE_BYTES:
            yield pending[0] if len(pending) == 1 else b"".join(pending)
            pending, size = [], 0
    if pending:
        yield b"".join(pending)


async def metrics(request: web.Request) -> web.StreamResponse:
    hooks = request.app[HOOKS]
    exposition = hooks.body or hooks.exposition
    openmetrics = wants_openmetrics(request.headers.get("Accept"))
    content_type = CONTENT_TYPE_OPENMETRICS if openmetrics else CONTENT_TYPE_TEXT
    headers = {"Content-Type": content_type, "Vary": "Accept, Accept-Encoding"}
    if _accepts_gzip(request):
        headers["Content-Encoding"] = "gzip"
        # Compressing what changed may take tens of ms; zlib releases the GIL, so a thread
        # keeps the loop free. Usually the refresh loop has already filled this cache.
        parts = await asyncio.get_running_loop().run_in_executor(
            None, partial(exposition.gzip_parts, openmetrics=openmetrics)
        )
    else:
        parts = exposition.parts(openmetrics=openmetrics)
    # The body's sections are written one after the other (small ones together): no copy
    # of the whole body per scrape, nor per change.
    response = web.StreamResponse(headers=headers)
    response.content_length = sum(map(len, parts))
    await response.prepare(request)
    if request.method != "HEAD":
        for chunk in _writes(parts):
            await response.write(chunk)
    await response.write_eof()
    return response


async def healthy(_: web.Request) -> web.Response:
    return web.Response(text="Healthy.\n")


async def ready(request: web.Request) -> web.Response:
    if request.app[HOOKS].ready():
        return web.Response(text="Ready.\n")
    return web.Response(status=503, text="Not ready: the first poll round is not complete.\n")


async def reload(request: web.Request) -> web.Response:
    if not request.app[LIFECYCLE]:
        # As Prometheus does: the HTTP lifecycle API is off unless asked for; SIGHUP works.
        return web.Response(status=403, text="Lifecycle API is not enabled.\n")
    problem = await request.app[HOOKS].reload()
    if problem is None:
        return web.Response(text="Reloaded.\n")
    return web.Response(status=500, text=f"Reload failed, old config kept:\n{problem}\n")


def _ago(moment: float | None, now: float | None = None) -> str:
    """``moment`` as an age: seconds, then minutes, hours and days as they grow."""
    if moment is None:
        return "never"
    seconds = max(0.0, (time.time() if now is None else now) - moment)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


CLASSES = ("pending", "success", "canceled", "error", "unknown")


def _device_rows(state: FleetState) -> str:
    rows = []
    upstream_now = state.now()  # check-ins are on upstream's clock
    for device in sorted(state.watched()):
        view = state.device_view(device)
        result = "up" if view.up else f"down: {view.last_error or 'not polled yet'}"
        counts = "".join(f"<td>{view.class_counts.get(c, 0)}</td>" for c in CLASSES)
        rows.append(
            f"<tr><td>{html.escape(device)}</td><td>{html.escape(view.name or '')}</td>"
            f"<td>{_ago(view.last_success)}</td><td>{html.escape(result)}</td>{counts}"
            f"<td>{_ago(view.check_in, upstream_now)}</td><td>{html.escape(view.state)}</td>"
            "</tr>"
        )
    return "\n".join(rows)


def _upstream_notes(metrics: SelfMetrics | None) -> str:
    """Where check-ins come from and what upstream does with the query parameters the
    exporter relies on (docs/upstream-api.md: neither is documented)."""
    if metrics is None:
        return ""
    verdicts = ", ".join(
        f"{endpoint} {parameter}: {verdict}"
        for (endpoint, parameter), verdict in sorted(metrics.query_verdicts.items())
    )
    source = (
        "the device list sorted by check-in"
        if metrics.checkin_source == SORTED_LIST
        else "the whole device list (upstream does not honour the sort)"
    )
    return (f"<p>Check-ins from {html.escape(source)}. Query parameters: "
            f"{html.escape(verdicts or 'none checked yet')}.</p>")


def _rollout_rows(rollouts: Sequence[Rollout]) -> str:
    # Most failed devices first: the rollouts that need a look.
    ordered = sorted(rollouts, key=lambda r: (-r.devices[0], -sum(r.devices), r.name))
    return "\n".join(
        f"<tr><td>{html.escape(r.name)}</td>"
        + "".join(f"<td>{count}</td>" for count in r.devices)
        + f"<td>{sum(r.devices)}</td></tr>"
        for r in ordered
    )


async def landing(request: web.Request) -> web.Response:
    hooks = request.app[HOOKS]
    head = "".join(f"<th>{c}</th>" for c in CLASSES)
    rollout_head = "".join(f"<th>{s}</th>" for s in STATES)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Applivery MDM exporter</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:left}}
.views{{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}}</style></head>
<body><h1>Applivery MDM exporter</h1>
<p>Version {html.escape(hooks.version)} &middot; organization
{html.escape(hooks.organization())}</p>
<ul><li><a href="/metrics">Metrics</a></li><li><a href="/-/healthy">Health</a></li>
<li><a href="/-/ready">Readiness</a></li></ul>
<p>{html.escape(hooks.exposition.guard_summary)}</p>
{_upstream_notes(hooks.metrics)}
<div class="views"><section id="devices"><h2>Watched devices</h2>
<table><thead><tr><th>device</th><th>name</th><th>last success</th><th>result</th>{head}
<th>last check-in</th><th>state</th></tr></thead><tbody>
{_device_rows(hooks.state)}
</tbody></table></section>
<section id="rollouts"><h2>Rollouts</h2>
<p>Batches sharing a name: devices per state of their latest batch of that name.</p>
<table><thead><tr><th>rollout</th>{rollout_head}<th>devices</th></tr></thead><tbody>
{_rollout_rows(hooks.exposition.rollouts())}
</tbody></table></section></div></body></html>
"""
    return web.Response(text=page, content_type="text/html")


def make_app(
    hooks: Hooks, security: WebSecurity | None = None, *, lifecycle: bool = False
) -> web.Application:
    """The routes; with a web config, every one of them behind its rate limit and basic auth.
    ``POST /-/reload`` answers 403 unless ``lifecycle`` (``--web.enable-lifecycle``)."""
    app = web.Application()
    app[HOOKS] = hooks
    app[LIFECYCLE] = lifecycle
    if security is not None:
        install(app, security)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    app.router.add_post("/-/reload", reload)
    app.router.add_put("/-/reload", reload)
    app.router.add_get("/", landing)
    return app
