"""The server's connections: a cap, a header-read timeout, and accept() failures logged once
a minute.

Without them a few hundred connections that never finish a request hold every file
descriptor the process may open: accept() then fails with EMFILE, asyncio logs a traceback
for each failure, and probes and scrapes wait for a descriptor. Here, a connection that has
not sent complete request headers within ``HEADER_TIMEOUT_SECONDS`` is closed, and past the
cap (derived from ``RLIMIT_NOFILE``) the connection that costs least to lose is closed:
first one still reading its headers (oldest first), then an idle keep-alive one (idle
longest first); one serving a request never is. A TLS handshake in progress is bounded by
``ssl_handshake_timeout`` instead: the connection is not the server's until it completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import structlog
from aiohttp import web

log = structlog.get_logger("exporter")

HEADER_TIMEOUT_SECONDS = 5.0  # from the first byte (or the connection) to complete headers
KEEPALIVE_SECONDS = 75.0  # an idle keep-alive connection is closed after this (aiohttp: 3,630)
MAX_CONNECTIONS = 1024
MAX_BACKLOG = 128  # aiohttp's default
FD_RESERVE = 64  # descriptors kept for the store, upstream connections, logs and the rest
ACCEPT_LOG_SECONDS = 60.0
SWEEP_SECONDS = 0.5
# What asyncio's BaseSelectorEventLoop._accept_connection reports on EMFILE, ENFILE, ENOBUFS
# and ENOMEM (it then pauses accepting for a second).
ACCEPT_FAILED = "socket.accept() out of system resource"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class Limits(NamedTuple):
    cap: int  # client connections held
    backlog: int  # the listen queue; asyncio accepts up to this many before any is seen


def limits(soft_limit: int | None = None) -> Limits:
    """What ``RLIMIT_NOFILE`` allows: a reserve, the connections one accept burst brings in
    before they are counted, and the cap on the rest."""
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY:
        return Limits(MAX_CONNECTIONS, MAX_BACKLOG)
    backlog = max(8, min(MAX_BACKLOG, soft_limit // 8))
    reserve = max(FD_RESERVE, soft_limit // 4)
    return Limits(max(8, min(MAX_CONNECTIONS, soft_limit - reserve - backlog)), backlog)


class Connections:
    """Every client connection, in one of three tables: reading its request headers (by
    deadline), idle between requests (by when it became idle), or serving requests."""

    def __init__(
        self,
        limits: Limits,
        *,
        header_timeout: float = HEADER_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self._header_timeout = header_timeout
        self._clock = clock
        self._reading: OrderedDict[asyncio.BaseTransport, float] = OrderedDict()  # deadline
        self._idle: OrderedDict[asyncio.BaseTransport, None] = OrderedDict()
        self._busy: dict[asyncio.BaseTransport, int] = {}  # requests in progress
        self.closed = {"evicted": 0, "header_timeout": 0, "refused": 0}
        self._accept_failures = AcceptFailures()

    def __len__(self) -> int:
        return len(self._reading) + len(self._idle) + len(self._busy)

    def protocol_factory(self, factory: ProtocolFactory) -> ProtocolFactory:
        return lambda: _Tracked(factory(), self)

    # --- what the transports and the requests tell ---------------------------------------

    def opened(self, transport: asyncio.BaseTransport) -> None:
        self._reading[transport] = self._clock() + self._header_timeout
        if len(self) > self.limits.cap:
            self._make_room(transport)

    def received(self, transport: asyncio.BaseTransport) -> None:
        """Bytes came in: an idle connection starts its next request's headers."""
        if transport in self._idle:
            del self._idle[transport]
            self._reading[transport] = self._clock() + self._header_timeout

    def lost(self, transport: asyncio.BaseTransport) -> None:
        self._reading.pop(transport, None)
        self._idle.pop(transport, None)
        self._busy.pop(transport, None)

    def request_began(self, transport: asyncio.BaseTransport | None) -> None:
        if transport is None or not self._known(transport):
            return
        self._reading.pop(transport, None)
        self._idle.pop(transport, None)
        self._busy[transport] = self._busy.get(transport, 0) + 1

    def request_ended(self, transport: asyncio.BaseTransport | None) -> None:
        if transport is None or transport not in self._busy:
            return
        self._busy[transport] -= 1
        if not self._busy[transport]:
            del self._busy[transport]
            self._idle[transport] = None

    def _known(self, transport: asyncio.BaseTransport) -> bool:
        return transport in self._reading or transport in self._idle or transport in self._busy

    # --- closing -----------------------------------------------------------------------

    def _make_room(self, newcomer: asyncio.BaseTransport) -> None:
        """Close one connection to stay at the cap: the oldest still reading headers (the
        newcomer last), else the longest idle, else the newcomer."""
        victim = next((t for t in self._reading if t is not newcomer), None)
        reason = "evicted"
        if victim is None and self._idle:
            victim = next(iter(self._idle))
        if victim is None:
            victim, reason = newcomer, "refused"
        self._close(victim, reason)

    def _close(self, transport: asyncio.BaseTransport, reason: str) -> None:
        idle = transport in self._idle
        self.lost(transport)
        self.closed[reason] += 1
        if idle:
            transport.close()  # whatever of its last response is still buffered goes out
        else:
            _abort(transport)  # nothing to say to it: the descriptor is freed at once

    def sweep(self) -> int:
        """Close the connections past their header deadline; how many."""
        now, expired = self._clock(), 0
        while self._reading:
            transport, deadline = next(iter(self._reading.items()))
            if deadline > now:
                break
            self._close(transport, "header_timeout")
            expired += 1
        return expired

    async def run(self, interval: float = SWEEP_SECONDS) -> None:
        """Sweep until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.sweep()

    def shed(self, share: float = 0.25) -> int:
        """Close a share of the connections reading headers (oldest first): descriptors for
        the next accept() when something else took them."""
        victims = list(self._reading)[: max(1, int(len(self._reading) * share))]
        for transport in victims:
            self._close(transport, "evicted")
        return len(victims)

    # --- the hooks the server installs ---------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        self.request_began(transport)
        try:
            return await handler(request)
        finally:
            self.request_ended(transport)

    def exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The loop's exception handler: accept() failures counted and logged once a minute,
        connections shed to free descriptors; anything else as asyncio would."""
        if context.get("message") != ACCEPT_FAILED:
            loop.default_exception_handler(context)
            return
        self.shed()
        self._accept_failures.note(context.get("exception"))


class AcceptFailures:
    """One log line a minute at most, with the number of failures it stands for."""

    def __init__(
        self, interval: float = ACCEPT_LOG_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._logged_at: float | None = None
        self.unlogged = 0
        self.total = 0

    def note(self, exc: object) -> None:
        self.total += 1
        self.unlogged += 1
        now = self._clock()
        if self._logged_at is not None and now - self._logged_at < self._interval:
            return
        log.error("accept_failed", reason=str(exc), failures=self.unlogged,
                  failures_total=self.total, next_log_seconds=self._interval)
        self._logged_at, self.unlogged = now, 0


def _abort(transport: asyncio.BaseTransport) -> None:
    abort = getattr(transport, "abort", None)
    if abort is not None:
        abort()
    else:
        transport.close()


class _Tracked(asyncio.Protocol):
    """aiohttp's protocol, with the transport's events told to ``Connections`` first."""

    __slots__ = ("_book", "_inner", "_transport")

    def __init__(self, inner: asyncio.BaseProtocol, book: Connections) -> None:
        self._inner: Any = inner
        self._book = book
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._inner.connection_made(transport)
        self._book.opened(transport)

    def data_received(self, data: bytes) -> None:
        if self._transport is not None:
            self._book.received(self._transport)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._book.lost(self._transport)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class GuardedSite(web.TCPSite):
    """A TCP site whose connections ``Connections`` keeps, the TLS handshake bounded too."""

    __slots__ = ("_connections",)

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *,
                 connections: Connections, ssl_context: Any = None) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context)
        self._connections = connections

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site; TCPSite.start would bind it
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        handshake = {"ssl_handshake_timeout": HEADER_TIMEOUT_SECONDS} if self._ssl_context else {}
        self._server = await loop.create_server(
            self._connections.protocol_factory(server), self._host, self._port,
            ssl=self._ssl_context, backlog=self._connections.limits.backlog, **handshake,
        )
        with contextlib.suppress(IndexError, AttributeError):
            self._bound_port = self._server.sockets[0].getsockname()[1]


def runner_options() -> dict[str, Any]:
    """``web.AppRunner`` options: idle keep-alive connections closed after a while. Handlers
    are not cancelled when their client goes (``handler_cancellation``): a bcrypt check
    would give its slot back while its thread still runs, and the bound would not hold."""
    return {"keepalive_timeout": KEEPALIVE_SECONDS}


def install(app: web.Application, connections: Connections) -> None:
    """Outermost middleware: a request whose headers are complete is no longer half-open."""
    app.middlewares.insert(0, connections.middleware)


@dataclass(slots=True)
class Serving:
    """A started server: its connections, the ports bound (in the order of the addresses;
    port 0: the kernel's pick), and how to stop it."""

    runner: web.AppRunner
    connections: Connections
    ports: list[int]
    _handler: Any  # the loop's exception handler before this server's

    async def stop(self) -> None:
        """Release the addresses and give the loop its exception handler back."""
        await self.runner.cleanup()
        asyncio.get_running_loop().set_exception_handler(self._handler)


async def start_server(
    app: web.Application, addresses: Sequence[tuple[str, int]], ssl_context: object | None
) -> Serving:
    """The app on each of its addresses, their connections capped together and their header
    reads timed (connections.py); accept() failures logged once a minute instead of each
    time."""
    connections = Connections(limits())
    install(app, connections)
    loop = asyncio.get_running_loop()
    serving = Serving(web.AppRunner(app, access_log=None, **runner_options()), connections,
                      [], loop.get_exception_handler())
    loop.set_exception_handler(connections.exception_handler)
    try:
        await serving.runner.setup()
        for host, port in addresses:
            site = GuardedSite(serving.runner, host, port, connections=connections,
                               ssl_context=ssl_context)
            await site.start()
            serving.ports.append(site.port)  # aiohttp's: the bound one once started
    except BaseException:
        await serving.stop()  # the addresses already bound are released
        raise
    return serving
