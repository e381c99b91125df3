"""The HTTP side: /metrics, health, readiness, reload and the landing page (landing.py).

Nothing here calls the upstream API: a scrape serves the bytes the exposition rendered
last, so its cost does not depend on the fleet or on how the upstream behaves.
"""

from __future__ import annotations

import asyncio
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
from exporter.landing import DEFAULT_BOUNDS, Bounds, Busy, LandingPage, search_text
from exporter.selfmetrics import SelfMetrics
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
        # The published body shows a whole fleet (a complete round, or a restored store):
        # what /-/ready answers, so that ready never precedes the body that shows it.
        self.whole = False

    def publish(self, *, whole: bool) -> None:
        """Take the exposition's current body (its gzip is usually compressed already);
        ``whole``: it was rendered from a whole fleet."""
        self.whole = self.whole or whole
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
    telemetry_path: str = "/metrics"  # --web.telemetry-path: where /metrics is served


HOOKS = web.AppKey("hooks", Hooks)
LIFECYCLE = web.AppKey("lifecycle", bool)
LANDING = web.AppKey("landing", LandingPage)


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
        if hooks.body is not None:  # compressed by the render loop before it was published
            parts = hooks.body.gzip_parts(openmetrics=openmetrics)
        else:
            # Compressing what changed may take tens of ms; zlib releases the GIL, so a
            # thread keeps the loop free.
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


async def landing(request: web.Request) -> web.Response:
    try:
        body = await request.app[LANDING].body(search_text(request.query.get("device")))
    except Busy:
        return web.Response(status=503, headers={"Retry-After": "1"},
                            text="Too many searches at once: try again in a moment.\n")
    return web.Response(body=body, content_type="text/html", charset="utf-8")


async def _stop_landing(app: web.Application) -> None:
    await app[LANDING].close()


def make_app(
    hooks: Hooks,
    security: WebSecurity | None = None,
    *,
    lifecycle: bool = False,
    landing_bounds: Bounds = DEFAULT_BOUNDS,
) -> web.Application:
    """The routes; with a web config, every one of them behind its rate limit and basic auth.
    ``POST /-/reload`` answers 403 unless ``lifecycle`` (``--web.enable-lifecycle``);
    ``landing_bounds``: what one render of ``/`` may cost, and how long it is reused."""
    app = web.Application()
    app[HOOKS] = hooks
    app[LIFECYCLE] = lifecycle
    app[LANDING] = LandingPage(hooks, landing_bounds)
    app.on_cleanup.append(_stop_landing)
    if security is not None:
        install(app, security)
    # Only the telemetry path: /metrics answers 404 when another is set, as node_exporter.
    app.router.add_get(hooks.telemetry_path, metrics)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    app.router.add_post("/-/reload", reload)
    app.router.add_put("/-/reload", reload)
    app.router.add_get("/", landing)
    return app
