"""The simulator's HTTP face: upstream routes, envelopes, auth, paging, faults and stats.

Every API request first brings the fleet up to the clock's present (each event applied at
its own timestamp before anything is read). Then, as a gateway in front of an Express app
would: transport faults (latency, reset, 5xx, 429) → bearer auth (401 4002/4004) → path
parameters against upstream's patterns (400) → query parameters (400) → entities (404
3001) → the answer, to which body faults apply (2xx only).

Upstream documents neither its 400 bodies nor its 5xx and 429 responses
(docs/upstream-api.md §9, §10); ours are plausible stand-ins: an error envelope with code
2001 for validation, 5000 for a 500, an nginx-style HTML page for 503 and
express-rate-limit's plain-text message for 429. ``Retry-After`` is in real seconds (or an
HTTP date), never simulated ones; a fractional argument gives a fractional value so that
tests need not wait whole seconds.

``shifting_pages`` (on a page > 1): on a batch history in its default newest-first order a
real batch is created on the device, so everything moves one place down as upstream's would;
elsewhere the page window slides back 1–3 places, as if items had been inserted at the head
— items of the previous page come again, none is skipped, ``totalDocs`` stays true.

What a lagging replica or a cache can serve, drawn per request: ``transient_404`` answers a
batch or its actions with 404 (3001); ``short_list`` serves one action of the list (with a
``totalDocs`` that agrees); ``stale_read`` serves each action as it was before it left
``Pending`` (no timestamps, no code); ``window_churn`` leaves one batch out of a history page.

How ``sort`` and ``tags`` are read is the simulator's dialect (dialect.py), consulted on every
request so that it can change at run time: a list may serve its stored order whatever the
``sort`` (paged as usual), or refuse a sort with 400 and code 5000; the device list may read
only one spelling of the ``tags`` array, or none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

from aiohttp import web

from exporter.records import COMMAND_ID, DEVICE_ID, OBJECT_ID, ORGANIZATION_ID
from exporter.simulator import dialect, listing, wire
from exporter.simulator.model import Batch, Device, UnknownEntity
from exporter.simulator.stats import RESET
from exporter.simulator.validation import (
    ValidationError,
    parse_create_body,
    parse_limit,
    parse_page,
    parse_sort,
)

if TYPE_CHECKING:
    from exporter.simulator.core import Simulator

BASE = "/v1/organizations/{org}/mdm/windows/enterprise"
API_ROUTES = frozenset({"devices", "device", "commands", "command", "actions", "create"})
DEFAULT_LIMIT = 10  # mongoose-paginate's default when a client sends none
VALIDATION_CODE = 2001
TICK_SECONDS = 0.2
MAX_SHIFT = 3
_PATH_PARAMETERS = (
    ("org", "organizationId", ORGANIZATION_ID),
    ("dev", "winDeviceId", DEVICE_ID),
    ("cmd", "winCommandId", COMMAND_ID),
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Order = tuple[str, bool] | None


class ApiFailure(Exception):
    """An upstream error answer: HTTP status and the envelope's code and message."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def not_found() -> ApiFailure:
    return ApiFailure(404, 3001, "Entity not found")


def invalid(message: str) -> ApiFailure:
    return ApiFailure(400, VALIDATION_CODE, message)


class _ConnectionReset(Exception):
    pass


def build_app(sim: Simulator) -> web.Application:
    api = _Api(sim)
    app = web.Application(middlewares=[api.middleware])
    router = app.router
    router.add_get(f"{BASE}/devices", api.devices, name="devices")
    router.add_get(f"{BASE}/devices/{{dev}}", api.device, name="device")
    router.add_get(f"{BASE}/devices/{{dev}}/commands", api.commands, name="commands")
    router.add_post(f"{BASE}/devices/{{dev}}/commands", api.create, name="create")
    router.add_get(f"{BASE}/devices/{{dev}}/commands/{{cmd}}", api.command, name="command")
    router.add_get(
        f"{BASE}/devices/{{dev}}/commands/{{cmd}}/actions", api.actions, name="actions"
    )
    if sim.control:
        control = _Control(sim)
        router.add_post("/_simulator/faults", control.faults)
        router.add_get("/_simulator/stats", control.stats)
        router.add_post("/_simulator/advance", control.advance)
        router.add_post("/_simulator/token", control.token)
        router.add_post("/_simulator/burst", control.burst)
        router.add_post("/_simulator/dialect", control.dialect)
    if sim.clock.speed > 0:
        app.cleanup_ctx.append(_ticker(sim))
    return app


def _ticker(sim: Simulator) -> Callable[[web.Application], AsyncIterator[None]]:
    """Advances the fleet as real time passes, even when nobody asks."""

    async def tick_forever() -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            sim.fleet.sync()

    async def context(_: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(tick_forever())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return context


def _json(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=body, content_type="application/json", charset="utf-8",
        headers=headers,
    )


class _Api:
    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.fleet = sim.fleet
        self.faults = sim.faults
        self.render = wire.Renderer(sim.fleet, sim.faults)

    # --- the pipeline ----------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.name
        if route not in API_ROUTES:
            return await handler(request)
        status = RESET
        try:
            response = await self._serve(request, handler)
            status = response.status
            return response
        except _ConnectionReset:
            raise asyncio.CancelledError() from None
        finally:
            self.sim.stats.record(route, status)

    async def _serve(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.fleet.sync()
        faults = self.faults
        delay = faults.draw("latency")
        if delay is not None:
            await asyncio.sleep(delay.argument or 0.0)
            self.fleet.sync()
        if faults.draw("reset") is not None:
            _reset(request)
        failure = self._fault_response()
        if failure is not None:
            return failure
        try:
            self._authenticate(request)
            self._check_path(request)
            response = await handler(request)
        except ApiFailure as exc:
            return _json(exc.status, wire.failure(exc.code, exc.message))
        if isinstance(response, web.Response) and response.status == 200:
            return await self._deliver(request, response)
        return response

    def _fault_response(self) -> web.Response | None:
        faults = self.faults
        if faults.draw("error500") is not None:
            return _json(500, wire.failure(5000, "Internal server error"))
        fault = faults.draw("error503")
        if fault is not None:
            headers = {} if fault.argument is None else {"Retry-After": _seconds(fault.argument)}
            return web.Response(status=503, text=_HTML_503, content_type="text/html",
                                headers=headers)
        fault = faults.draw("throttle")
        if fault is not None:
            return _throttled({"Retry-After": _seconds(fault.argument or 0.0)})
        fault = faults.draw("throttle_date")
        if fault is not None:
            # HTTP dates have whole seconds: round up so the wait is never shorter than asked.
            moment = int(time.time() + (fault.argument or 0.0)) + 1
            return _throttled({"Retry-After": formatdate(moment, usegmt=True)})
        if faults.draw("throttle_bare") is not None:
            return _throttled({})
        return None

    def _authenticate(self, request: web.Request) -> None:
        scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
        token = token.strip()
        if not scheme or (scheme.lower() == "bearer" and not token):
            raise ApiFailure(401, 4002, "No auth token")
        if scheme.lower() != "bearer" or token != self.sim.token:
            raise ApiFailure(401, 4004, "Invalid Token")

    @staticmethod
    def _check_path(request: web.Request) -> None:
        """Path parameters against upstream's patterns, all before any lookup."""
        params = request.match_info
        for key, name, pattern in _PATH_PARAMETERS:
            value = params.get(key)
            if value is not None and not pattern.match(value):
                raise invalid(
                    f'"{name}" with value "{value}" fails to match the required pattern: '
                    f"{pattern.pattern}"
                )

    async def _deliver(self, request: web.Request, response: web.Response) -> web.StreamResponse:
        faults = self.faults
        body = response.body
        assert isinstance(body, bytes)
        if faults.draw("invalid_json") is not None:
            body = b'{"status":true,"data":undefined}'
        elif faults.draw("truncated_json") is not None:
            body = body[: max(1, len(body) // 2)]
        fault = faults.draw("huge_body")
        if fault is not None:
            # Whitespace keeps the JSON valid and its meaning unchanged; only the size grows.
            padding = b" " * int((fault.argument or 0.0) * 1_000_000)
            body = body[:-1] + padding + body[-1:]
        fault = faults.draw("slow_body")
        if fault is not None:
            return await _trickle(request, body, fault.argument or 1.0)
        if body is response.body:
            return response
        return _json(200, body)

    # --- routes ----------------------------------------------------------------------------

    async def devices(self, request: web.Request) -> web.Response:
        self._organization(request)
        query = request.query
        number, limit, order = self._paging(request)
        tags = self._tags(query)
        segment = _optional_int(query, "segmentId")
        user = query.get("mdm-user")
        if user is not None and not OBJECT_ID.match(user):
            raise invalid(f'"mdm-user" with value "{user}" fails to match the required pattern')
        items: list[Device] = [
            device for device in self.fleet.devices
            if (tags is None or not tags.isdisjoint(device.profile.tags))
            and (segment is None or device.profile.segment == segment)
            and (user is None or _user_id(device) == user.lower())
        ]
        ordered = listing.sort_items(items, order, listing.DEVICE_KEYS)
        shown = listing.window(ordered, number, limit, self._shift(number, limit))
        body = wire.page((self.render.device(d) for d in shown), len(ordered), number, limit)
        return _json(200, body)

    async def device(self, request: web.Request) -> web.Response:
        device = self._device(request)
        return _json(200, wire.success(self.render.device(device)))

    async def commands(self, request: web.Request) -> web.Response:
        device = self._device(request)
        number, limit, order = self._paging(request)
        # The order served, not the one asked for: a history in its stored order (the dialect
        # ignoring sort) grows at its tail.
        newest_first = order is None or order == ("createdAt", True)
        shift = 0
        if number > 1 and self.faults.draw("shifting_pages") is not None:
            if newest_first:
                self.fleet.create_random_batch(device.id)
            else:
                shift = self.faults.randint(1, min(MAX_SHIFT, limit))
        batches: list[Batch] = device.batches
        if order is None:
            ordered = batches[::-1]  # createdAt:desc, upstream's default for the history
        else:
            ordered = list(listing.sort_items(batches, order, listing.BATCH_KEYS))
        shown = list(listing.window(ordered, number, limit, shift))
        total = len(ordered)
        if shown and self.faults.draw("window_churn") is not None:
            del shown[self.faults.randint(0, len(shown) - 1)]
            total -= 1
        body = wire.page((self.render.batch(b) for b in shown), total, number, limit)
        return _json(200, body)

    async def command(self, request: web.Request) -> web.Response:
        batch = self._batch(request)
        if self.faults.draw("transient_404") is not None:
            raise not_found()
        return _json(200, wire.success(self.render.batch(batch)))

    async def actions(self, request: web.Request) -> web.Response:
        batch = self._batch(request)
        if self.faults.draw("transient_404") is not None:
            raise not_found()
        number, limit, order = self._paging(request)
        ordered = listing.sort_items(batch.actions, order, listing.ACTION_KEYS)
        shown = listing.window(ordered, number, limit, self._shift(number, limit))
        items = [self.render.action(a) for a in shown]
        total = len(ordered)
        if self.faults.draw("stale_read") is not None:
            items = [wire.stale_action(item) for item in items]
        if items and self.faults.draw("short_list") is not None:
            items, total, number = items[:1], 1, 1
        return _json(200, wire.page(items, total, number, limit))

    async def create(self, request: web.Request) -> web.Response:
        device = self._device(request)
        try:
            document = json.loads(await request.read() or b"null")
        except ValueError:
            raise invalid("Unexpected token in JSON body") from None
        try:
            configs, name = parse_create_body(document)
        except ValidationError as exc:
            raise invalid(str(exc)) from None
        batch_id = self.fleet.create_batch(device.id, configs, name)
        return _json(200, wire.success(self.render.batch(self.fleet.batch(device, batch_id))))

    # --- parameters and lookups ------------------------------------------------------------

    def _shift(self, number: int, limit: int) -> int:
        """Places the window slides back when shifting_pages fires on a page > 1."""
        if number < 2 or self.faults.draw("shifting_pages") is None:
            return 0
        return self.faults.randint(1, min(MAX_SHIFT, limit))

    def _paging(self, request: web.Request) -> tuple[int, int, Order]:
        """Page, limit and the order to serve (the dialect's), or the 400 of either."""
        query = request.query
        try:
            number = parse_page(query.get("page"))
            limit = parse_limit(query.get("limit"), DEFAULT_LIMIT, self.sim.max_limit)
            order = parse_sort(query.get("sort"))
        except ValidationError as exc:
            raise invalid(str(exc)) from None
        return number, limit, self._served_order(request.match_info.route.name, order)

    def _served_order(self, route: str, order: Order) -> Order:
        """``order`` as the dialect treats it: honoured, the stored order, or refused."""
        mode = self.sim.dialect.sort_for(route, None if order is None else order[0])
        if mode == dialect.HONOUR:
            return order
        if mode == dialect.REJECT:
            assert order is not None  # sort_for refuses only a sort asked for
            self.sim.stats.note(route, dialect.SORT_REJECTED)
            raise ApiFailure(400, dialect.SORT_REJECTED_CODE, f'Invalid sort field "{order[0]}"')
        if order is not None:
            self.sim.stats.note(route, dialect.SORT_IGNORED)
        return listing.NATURAL

    def _tags(self, query: Any) -> dialect.TagFilter:
        tags, unread = self.sim.dialect.read_tags(query)
        if unread is not None:
            self.sim.stats.note("devices", unread)
        return tags

    def _organization(self, request: web.Request) -> None:
        org = request.match_info["org"]
        if org != self.sim.organization and org.lower() != self.fleet.organization_id:
            raise not_found()

    def _device(self, request: web.Request) -> Device:
        self._organization(request)
        device = self.fleet.find_device(request.match_info["dev"])
        if device is None:
            raise not_found()
        return device

    def _batch(self, request: web.Request) -> Batch:
        device = self._device(request)
        try:
            return self.fleet.batch(device, request.match_info["cmd"])
        except UnknownEntity:
            raise not_found() from None


def _optional_int(query: Any, name: str) -> int | None:
    text = query.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise invalid(f'"{name}" must be a number') from None


def _user_id(device: Device) -> str | None:
    user = device.profile.user
    return None if user is None else user[0]


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


_HTML_503 = (
    "<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n"
    "<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n</body>\r\n</html>\r\n"
)


def _throttled(headers: dict[str, str]) -> web.Response:
    return web.Response(status=429, text="Too many requests, please try again later.",
                        headers=headers)


def _reset(request: web.Request) -> None:
    """Drop the connection with a TCP reset, answering nothing."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    raise _ConnectionReset()


async def _trickle(request: web.Request, body: bytes, rate: float) -> web.StreamResponse:
    """Send ``body`` at ``rate`` bytes per second."""
    response = web.StreamResponse(status=200)
    response.content_type = "application/json"
    response.charset = "utf-8"
    response.content_length = len(body)
    await response.prepare(request)
    step = 0.05
    chunk = max(1, int(rate * step))
    try:
        for offset in range(0, len(body), chunk):
            await response.write(body[offset:offset + chunk])
            await asyncio.sleep(step)
        await response.write_eof()
    except ConnectionError:
        pass  # the client gave up waiting
    return response


class _Control:
    """``/_simulator/*``: faults, dialect, stats, time, token and bursts at run time (off by
    default)."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        try:
            document = json.loads(await request.read() or b"{}")
        except ValueError:
            raise _bad("body is not JSON") from None
        if not isinstance(document, dict):
            raise _bad("body must be a JSON object")
        return document

    @staticmethod
    def _ok(data: Any) -> web.Response:
        return _json(200, wire.success(wire.dumps(data)))

    async def faults(self, request: web.Request) -> web.Response:
        spec = (await self._body(request)).get("spec", "")
        if not isinstance(spec, str):
            raise _bad('"spec" must be a string')
        try:
            self.sim.faults.set(spec)
        except ValueError as exc:
            raise _bad(str(exc)) from None
        return self._ok({"spec": self.sim.faults.spec})

    async def stats(self, request: web.Request) -> web.Response:
        sim = self.sim
        sim.fleet.sync()
        return self._ok({"now": sim.clock.now(), "faults": sim.faults.spec,
                         "dialect": sim.dialect.settings(), "total": sim.stats.total(),
                         "counts": sim.stats.as_rows(),
                         "dialect_counts": sim.stats.dialect_rows()})

    async def dialect(self, request: web.Request) -> web.Response:
        """Changes the settings the body names (an empty body changes none); answers all."""
        try:
            self.sim.set_dialect(**await self._body(request))
        except ValueError as exc:
            raise _bad(str(exc)) from None
        return self._ok(self.sim.dialect.settings())

    async def advance(self, request: web.Request) -> web.Response:
        seconds = (await self._body(request)).get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            raise _bad('"seconds" must be a number >= 0')
        self.sim.advance(float(seconds))
        return self._ok({"now": self.sim.clock.now()})

    async def token(self, request: web.Request) -> web.Response:
        token = (await self._body(request)).get("token")
        if not isinstance(token, str) or not token:
            raise _bad('"token" must be a non-empty string')
        self.sim.token = token
        return self._ok({"token": "changed"})

    async def burst(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        device, count = body.get("device"), body.get("batches", 1)
        ratio = body.get("error_ratio", 0.9)
        if device is not None and (not isinstance(device, str)
                                   or self.sim.fleet.find_device(device) is None):
            raise _bad('"device" must be a known device id, serial or IMEI, or null')
        if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= 10_000:
            raise _bad('"batches" must be an integer within 1..10000')
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise _bad('"error_ratio" must be a number within 0..1')
        created = self.sim.burst(device, count, float(ratio))
        return self._ok({"batches": [{"device": d, "id": b} for d, b in created]})


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=wire.failure(VALIDATION_CODE, message).decode(), content_type="application/json"
    )
