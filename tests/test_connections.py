"""connections.py: which connection goes when the cap is reached, the header-read timeout,
and accept() failures logged once a minute with a count."""

from __future__ import annotations

import asyncio
import errno

import aiohttp
import pytest
import structlog
from aiohttp import web

from exporter.connections import (
    ACCEPT_FAILED,
    AcceptFailures,
    Connections,
    GuardedSite,
    Limits,
    install,
    limits,
    runner_options,
)


class FakeTransport(asyncio.Transport):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.ended: str | None = None

    def abort(self) -> None:
        self.ended = "aborted"

    def close(self) -> None:
        self.ended = "closed"

    def __repr__(self) -> str:
        return self.name


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def book(cap: int = 3, clock: Clock | None = None) -> Connections:
    return Connections(Limits(cap, 8), header_timeout=5.0, clock=clock or Clock())


def open_all(connections: Connections, *names: str) -> list[FakeTransport]:
    transports = [FakeTransport(name) for name in names]
    for transport in transports:
        connections.opened(transport)
    return transports


def test_limits_leave_a_reserve_and_one_accept_burst_free():
    cap, backlog = limits(256)
    assert cap + backlog + 64 <= 256 and cap >= 128
    assert limits(1 << 20) == Limits(1024, 128)


def test_past_the_cap_the_oldest_connection_still_reading_headers_goes_first():
    connections = book(cap=3)
    a, b, c = open_all(connections, "a", "b", "c")
    connections.request_began(a)
    connections.request_ended(a)  # idle now
    (d,) = open_all(connections, "d")
    assert (a.ended, b.ended, c.ended, d.ended) == (None, "aborted", None, None)
    assert len(connections) == 3 and connections.closed["evicted"] == 1


def test_then_the_longest_idle_then_the_newcomer_never_one_serving_a_request():
    connections = book(cap=2)
    a, b = open_all(connections, "a", "b")
    connections.request_began(a)
    connections.request_began(b)
    connections.request_ended(b)  # b idle, a serving
    (c,) = open_all(connections, "c")
    assert b.ended == "closed"  # gracefully: its last response may still be going out
    connections.request_began(c)
    (d,) = open_all(connections, "d")
    assert (a.ended, c.ended, d.ended) == (None, None, "aborted")
    assert connections.closed == {"evicted": 1, "header_timeout": 0, "refused": 1}


def test_headers_not_complete_within_the_timeout_close_the_connection():
    clock = Clock()
    connections = book(cap=10, clock=clock)
    slow, served = open_all(connections, "slow", "served")
    connections.request_began(served)
    connections.request_ended(served)
    clock.now += 4.0
    connections.received(served)  # its next request begins: a deadline of its own
    clock.now += 1.5
    assert connections.sweep() == 1
    assert (slow.ended, served.ended) == ("aborted", None)
    clock.now += 4.0
    assert connections.sweep() == 1 and served.ended == "aborted"
    assert len(connections) == 0


def test_a_connection_serving_a_request_has_no_header_deadline():
    clock = Clock()
    connections = book(cap=10, clock=clock)
    (scrape,) = open_all(connections, "scrape")
    connections.request_began(scrape)
    clock.now += 60
    assert connections.sweep() == 0 and scrape.ended is None


def test_accept_failures_are_logged_once_a_minute_with_a_count():
    clock = Clock()
    failures = AcceptFailures(clock=clock)
    with structlog.testing.capture_logs() as logs:
        for _ in range(1000):
            failures.note(OSError(errno.EMFILE, "Too many open files"))
            clock.now += 0.01  # 10 s in all
        clock.now += 60
        failures.note(OSError(errno.EMFILE, "Too many open files"))
    assert [line["failures"] for line in logs] == [1, 1000]
    assert all(line["event"] == "accept_failed" for line in logs)


def test_the_loop_handler_sheds_connections_on_accept_failure_and_passes_the_rest_on():
    connections = book(cap=10)
    transports = open_all(connections, *"abcd")
    loop = asyncio.new_event_loop()
    try:
        seen: list[dict] = []
        loop.default_exception_handler = seen.append  # type: ignore[method-assign]
        with structlog.testing.capture_logs():
            connections.exception_handler(
                loop, {"message": ACCEPT_FAILED, "exception": OSError(errno.EMFILE, "x")}
            )
        connections.exception_handler(loop, {"message": "something else"})
    finally:
        loop.close()
    assert [t.ended for t in transports] == ["aborted", None, None, None]
    assert seen == [{"message": "something else"}]


async def ok(_: web.Request) -> web.Response:
    return web.Response(text="ok")


@pytest.fixture
async def guarded():
    app = web.Application()
    app.router.add_get("/", ok)
    connections = Connections(Limits(4, 8), header_timeout=0.3)
    install(app, connections)
    runner = web.AppRunner(app, **runner_options())
    await runner.setup()
    site = GuardedSite(runner, "127.0.0.1", 0, connections=connections)
    await site.start()
    sweeper = asyncio.create_task(connections.run(interval=0.05))
    try:
        yield site.port, connections
    finally:
        sweeper.cancel()
        await runner.cleanup()


async def test_a_real_server_closes_a_silent_connection_and_serves_requests(guarded):
    port, connections = guarded
    url = f"http://127.0.0.1:{port}/"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finished
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
    assert await asyncio.wait_for(reader.read(), timeout=2) == b""  # closed by the server
    assert connections.closed["header_timeout"] == 1
    writer.close()
