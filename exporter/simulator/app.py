"""The simulator's HTTP face: routes, envelopes, auth, paging, faults on the wire, stats.

Every API request first brings the fleet up to the clock's present (so each event is applied
at its own timestamp before anything is read), then meets the transport faults, then auth,
then its handler. Body faults rewrite a successful answer on its way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from exporter.records import COMMAND_ID, DEVICE_ID, ORGANIZATION_ID
from exporter.simulator.fleet import Action, Batch, Device, UnknownEntity
from exporter.simulator.render import Renderer
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
ROUTES = ("devices", "commands", "command", "actions", "create")
DEFAULT_LIMIT = 10  # mongoose-paginate's default when a client sends none
RESET = 0  # the status recorded in stats for a connection closed without a response
VALIDATION_CODE = 1001  # upstream documents no code for a 400 (shared/upstream-api.md §9)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_JSON = "application/json"


class Stats:
    """Requests served per (route name, HTTP status)."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, int]] = Counter()

    def record(self, route: str, status: int) -> None:
        self.counts[(route, status)] += 1

    def total(self, route: str | None = None) -> int:
        return sum(n for (name, _), n in self.counts.items() if route is None or name == route)

    def as_json(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (route, status), count in sorted(self.counts.items()):
            out.setdefault(route, {})[str(status)] = count
        return out


# --- envelopes ---------------------------------------------------------------------------------


def error_response(http_status: int, code: int, message: str) -> web.Response:
    body = {"status": False, "error": {"code": code, "message": message}}
    return web.Response(status=http_status, body=json.dumps(body).encode(), content_type=_JSON)


def data_response(data: bytes) -> web.Response:
    return web.Response(body=b'{"status":true,"data":' + data + b"}", content_type=_JSON)


def not_found() -> web.Response:
    return error_response(404, 3001, "Entity not found")


def bad_request(message: str) -> web.Response:
    return error_response(400, VALIDATION_CODE, message)


class Problem(Exception):
    """A request answered with an error envelope."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


# --- paging ------------------------------------------------------------------------------------


def page_meta(total: int, page: int, limit: int) -> dict[str, Any]:
    """mongoose-paginate-v2's fields around ``items``."""
    pages = math.ceil(total / limit) or 1
    has_prev = page > 1
    has_next = page * limit < total
    return {
        "totalDocs": total,
        "limit": limit,
        "totalPages": pages,
        "page": page,
        "pagingCounter": (page - 1) * limit + 1,
        "hasPrevPage": has_prev,
        "hasNextPage": has_next,
        "prevPage": page - 1 if has_prev else None,
        "nextPage": page + 1 if has_next else None,
    }


def page_body(items: Sequence[bytes], meta: dict[str, Any]) -> bytes:
    tail = json.dumps(meta, separators=(",", ":")).encode()
    return b'{"items":[' + b",".join(items) + b"]," + tail[1:]


def _sort_key(value: Any) -> tuple[bool, Any]:
    # Mongo orders missing values first when ascending.
    return (value is not None, value)


def sort_items(
    items: Sequence[T], sort: tuple[str, bool] | None, fields: dict[str, Callable[[T], Any]]
) -> Sequence[T]:
    """Items in the requested order; an unknown field leaves the natural order (as Mongo does)."""
    if sort is None:
        return items
    field, descending = sort
    getter = fields.get(field)
    if getter is None:
        return list(reversed(items)) if descending else items
    return sorted(items, key=lambda item: _sort_key(getter(item)), reverse=descending)


_DEVICE_FIELDS: dict[str, Callable[[Device], Any]] = {
    "id": lambda d: d.id,
    "_id": lambda d: d.id,
    "displayName": lambda d: d.name,
    "summary.name": lambda d: d.name,
    "summary.serialNumber": lambda d: d.serial,
    "summary.osVersion": lambda d: d.os[0],
    "winId": lambda d: d.win_id,
    "enrolledDate": lambda d: d.enrolled,
    "createdAt": lambda d: d.enrolled,
    "lastStatusReportTime": lambda d: d.last_report,
}
_BATCH_FIELDS: dict[str, Callable[[Batch], Any]] = {
    "id": lambda b: b.id,
    "_id": lambda b: b.id,
    "name": lambda b: b.name,
    "createdAt": lambda b: b.created,
    "updatedAt": lambda b: b.updated,
}
_ACTION_FIELDS: dict[str, Callable[[Action], Any]] = {
    "cmdId": lambda a: a.cmd_id,
    "status": lambda a: a.status,
    "statusCode": lambda a: a.code,
    "sentAt": lambda a: a.sent,
    "receivedAt": lambda a: a.received,
    "canceledAt": lambda a: a.canceled,
}


# --- the API -----------------------------------------------------------------------------------


class Api:
    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.fleet = sim.fleet
        self.render = Renderer(sim.fleet, sim.faults, sim.fleet.organization_id)
        # Listing -> items "inserted at the head" since its page 1 (shifting_pages).
        self._shifts: dict[tuple[str, ...], int] = {}

    # lookups

    def _organization(self, request: web.Request) -> None:
        org = request.match_info["org"]
        if not ORGANIZATION_ID.match(org):
            raise Problem(
                bad_request(
                    f'"organizationId" with value "{org}" fails to match '
                    f"the required pattern: {ORGANIZATION_ID.pattern}"
                )
            )
        if org not in (self.sim.organization, self.fleet.organization_id):
            raise Problem(not_found())

    def _device(self, request: web.Request) -> Device:
        self._organization(request)
        key = request.match_info["dev"]
        if not DEVICE_ID.match(key):
            raise Problem(
                bad_request(
                    f'"winDeviceId" with value "{key}" fails to match '
                    f"the required pattern: {DEVICE_ID.pattern}"
                )
            )
        device = self.fleet.find_device(key)
        if device is None:
            raise Problem(not_found())
        return device

    def _batch(self, request: web.Request) -> Batch:
        device = self._device(request)
        key = request.match_info["cmd"]
        if not COMMAND_ID.match(key):
            raise Problem(
                bad_request(
                    f'"winCommandId" with value "{key}" fails to match '
                    f"the required pattern: {COMMAND_ID.pattern}"
                )
            )
        try:
            return self.fleet.batch(device, key)
        except UnknownEntity:
            raise Problem(not_found()) from None

    def _page(
        self,
        request: web.Request,
        route: str,
        items: Sequence[T],
        fields: dict[str, Callable[[T], Any]],
        default_sort: str | None,
        render: Callable[[T], bytes],
    ) -> web.Response:
        query = request.query
        try:
            page = parse_page(query.get("page"))
            limit = parse_limit(query.get("limit"), DEFAULT_LIMIT, self.sim.max_limit)
            sort = parse_sort(query.get("sort", default_sort))
        except ValidationError as exc:
            raise Problem(bad_request(str(exc))) from None
        ordered = sort_items(items, sort, fields)
        shift = self._shift(request, route, page, limit)
        start = max(0, (page - 1) * limit - shift)
        end = max(0, page * limit - shift)
        meta = page_meta(len(ordered) + shift, page, limit)
        return data_response(page_body([render(item) for item in ordered[start:end]], meta))

    def _shift(self, request: web.Request, route: str, page: int, limit: int) -> int:
        """Items "inserted at the head" of this listing since its page 1 was read.

        A walk sees the count only grow, so offsets shift the way a real insertion shifts
        them: items already seen come again, none is skipped.
        """
        key = (
            route,
            request.path,
            *sorted(f"{k}={v}" for k, v in request.query.items() if k != "page"),
        )
        if page == 1:
            self._shifts.pop(key, None)
            return 0
        shift = self._shifts.get(key, 0)
        if self.sim.faults.draw("shifting_pages") is not None:
            shift += self.sim.faults.randint(1, max(1, min(3, limit)))
            self._shifts[key] = shift
        return shift

    # handlers

    async def devices(self, request: web.Request) -> web.Response:
        self._organization(request)
        devices: Sequence[Device] = self.fleet.devices
        tags = _tags(request)
        if tags:
            devices = [d for d in devices if not tags.isdisjoint(d.tags)]
        segment = request.query.get("segmentId")
        if segment is not None:
            try:
                wanted = int(segment)
            except ValueError:
                raise Problem(bad_request('"segmentId" must be a number')) from None
            devices = [d for d in devices if d.segment == wanted]
        user = request.query.get("mdm-user")
        if user is not None:
            devices = [d for d in devices if d.user is not None and d.user[0] == user]
        return self._page(request, "devices", devices, _DEVICE_FIELDS, None, self.render.device)

    async def commands(self, request: web.Request) -> web.Response:
        device = self._device(request)
        return self._page(
            request, "commands", device.batches, _BATCH_FIELDS, "createdAt:desc", self.render.batch
        )

    async def command(self, request: web.Request) -> web.Response:
        return data_response(self.render.batch(self._batch(request)))

    async def actions(self, request: web.Request) -> web.Response:
        batch = self._batch(request)
        return self._page(
            request, "actions", batch.actions, _ACTION_FIELDS, None, self.render.action
        )

    async def create(self, request: web.Request) -> web.Response:
        device = self._device(request)
        try:
            body = await request.json()
        except ValueError:
            raise Problem(bad_request("body is not valid JSON")) from None
        try:
            configs, name = parse_create_body(body)
        except ValidationError as exc:
            raise Problem(bad_request(str(exc))) from None
        batch_id = self.fleet.create_batch(device.id, configs, name)
        return data_response(self.render.batch(self.fleet.batch(device, batch_id)))


def _tags(request: web.Request) -> frozenset[str]:
    """``tags=a&tags=b``, ``tags=a,b`` and ``tags[]=a`` alike."""
    values = request.query.getall("tags", []) + request.query.getall("tags[]", [])
    return frozenset(tag.strip() for value in values for tag in value.split(",") if tag.strip())


# --- middleware: sync, transport faults, auth, body faults, stats -------------------------------


def _authorize(request: web.Request, token: str) -> web.Response | None:
    header = request.headers.get("Authorization")
    if not header:
        return error_response(401, 4002, "No auth token")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return error_response(401, 4002, "No auth token")
    if value.strip() != token:
        return error_response(401, 4004, "Invalid Token")
    return None


async def _transport_fault(sim: Simulator, request: web.Request) -> web.StreamResponse | None:
    """The wire-level fault drawn for this request, if any (fleet state never changes)."""
    faults = sim.faults
    fault = faults.draw("latency")
    if fault is not None and fault.argument:
        await asyncio.sleep(fault.argument)
    if faults.draw("reset") is not None:
        raise _Reset
    fault = faults.draw("throttle")
    if fault is not None:
        return _throttled(str(round(fault.argument or 0)))
    fault = faults.draw("throttle_date")
    if fault is not None:
        return _throttled(formatdate(_real_now() + (fault.argument or 0), usegmt=True))
    if faults.draw("throttle_bare") is not None:
        return _throttled(None)
    fault = faults.draw("error503")
    if fault is not None:
        response = web.Response(
            status=503,
            text="<html><head><title>503 Service Temporarily Unavailable</title></head>"
            "<body><center><h1>503 Service Temporarily Unavailable</h1></center></body></html>",
            content_type="text/html",
        )
        if fault.argument is not None:
            response.headers["Retry-After"] = str(round(fault.argument))
        return response
    if faults.draw("error500") is not None:
        return error_response(500, 5000, "Internal server error")
    return None


def _real_now() -> float:
    return time.time()


def _throttled(retry_after: str | None) -> web.Response:
    response = error_response(429, 4029, "Too many requests")
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    return response


class _Reset(Exception):
    """Close the connection without answering."""


async def _body_fault(
    sim: Simulator, request: web.Request, response: web.Response
) -> web.StreamResponse:
    faults = sim.faults
    body = response.body
    if not isinstance(body, bytes):
        return response
    if faults.draw("invalid_json") is not None:
        response.body = b'{"status":true,"data":{"items":[' + b"undefined" + b"]}}"
        return response
    if faults.draw("truncated_json") is not None:
        response.body = body[: max(1, len(body) // 2)]
        return response
    fault = faults.draw("huge_body")
    if fault is not None:
        # Whitespace keeps the JSON valid and its meaning unchanged; only the size grows.
        padding = int((fault.argument or 0) * 1024 * 1024)
        body = body[:-1] + b" " * padding + body[-1:]
        response.body = body
    fault = faults.draw("slow_body")
    if fault is not None:
        return await _slow(request, response, body, fault.argument or 1.0)
    return response


async def _slow(
    request: web.Request, response: web.Response, body: bytes, rate: float
) -> web.StreamResponse:
    stream = web.StreamResponse(status=response.status, headers={"Content-Type": _JSON})
    stream.content_length = len(body)
    await stream.prepare(request)
    tick = 0.1
    chunk = max(1, int(rate * tick))
    for offset in range(0, len(body), chunk):
        await stream.write(body[offset : offset + chunk])
        await asyncio.sleep(tick)
    await stream.write_eof()
    return stream


def api_middleware(sim: Simulator) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.name
        if route not in ROUTES:
            return await handler(request)
        sim.fleet.sync()
        try:
            response = await _transport_fault(sim, request)
        except _Reset:
            sim.stats.record(route, RESET)
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError from None
        if response is None:
            response = _authorize(request, sim.token)
        if response is None:
            try:
                response = await handler(request)
            except Problem as problem:
                response = problem.response
            if response.status == 200 and isinstance(response, web.Response):
                response = await _body_fault(sim, request, response)
        sim.stats.record(route, response.status)
        return response

    return middleware


# --- control endpoint -----------------------------------------------------------------------


class Control:
    """``/_simulator/*``: switch faults, read stats, move time, rotate the token, burst errors."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    async def _json(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="body is not valid JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        return body

    async def faults(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        try:
            self.sim.faults.set(str(body.get("spec") or ""))
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        return web.json_response({"spec": self.sim.faults.spec})

    async def stats(self, request: web.Request) -> web.Response:
        sim = self.sim
        sim.fleet.sync()
        return web.json_response(
            {
                "now": sim.clock.now(),
                "faults": sim.faults.spec,
                "requests": sim.stats.as_json(),
                "total": sim.stats.total(),
            }
        )

    async def advance(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        seconds = body.get("seconds")
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds < 0:
            raise web.HTTPBadRequest(text='"seconds" must be a number >= 0')
        self.sim.advance(float(seconds))
        return web.json_response({"now": self.sim.clock.now()})

    async def token(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise web.HTTPBadRequest(text='"token" must be a non-empty string')
        self.sim.token = token
        return web.json_response({"ok": True})

    async def burst(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        count = body.get("batches", 1)
        ratio = body.get("error_ratio", 0.9)
        device_key = body.get("device")
        if not isinstance(count, int) or isinstance(count, bool) or not 0 < count <= 10000:
            raise web.HTTPBadRequest(text='"batches" must be an integer within 1..10000')
        if not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise web.HTTPBadRequest(text='"error_ratio" must be within 0..1')
        fleet = self.sim.fleet
        fleet.sync()
        if device_key is not None and fleet.find_device(str(device_key)) is None:
            raise web.HTTPNotFound(text="no such device")
        created = []
        for _ in range(count):
            device = fleet.device(str(device_key)) if device_key else fleet.random_device()
            batch_id = fleet.create_random_batch(device.id, error_ratio=float(ratio))
            created.append({"device": device.id, "batch": batch_id})
        return web.json_response({"created": created})


# --- the application ------------------------------------------------------------------------


def build_app(sim: Simulator) -> web.Application:
    api = Api(sim)
    app = web.Application(middlewares=[api_middleware(sim)])
    app.router.add_get(BASE + "/devices", api.devices, name="devices")
    app.router.add_get(BASE + "/devices/{dev}/commands", api.commands, name="commands")
    app.router.add_post(BASE + "/devices/{dev}/commands", api.create, name="create")
    app.router.add_get(BASE + "/devices/{dev}/commands/{cmd}", api.command, name="command")
    app.router.add_get(BASE + "/devices/{dev}/commands/{cmd}/actions", api.actions, name="actions")
    if sim.control:
        control = Control(sim)
        app.router.add_post("/_simulator/faults", control.faults)
        app.router.add_get("/_simulator/stats", control.stats)
        app.router.add_post("/_simulator/advance", control.advance)
        app.router.add_post("/_simulator/token", control.token)
        app.router.add_post("/_simulator/burst", control.burst)
    if sim.clock.speed > 0:
        app.cleanup_ctx.append(_ticker(sim))
    return app


TICK_SECONDS = 0.5


def _ticker(sim: Simulator) -> Callable[[web.Application], Any]:
    async def ctx(app: web.Application) -> Any:
        async def tick() -> None:
            # Requests sync the fleet themselves; this keeps the heap short while none come.
            while True:
                await asyncio.sleep(TICK_SECONDS)
                sim.fleet.sync()

        task = asyncio.create_task(tick())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return ctx
