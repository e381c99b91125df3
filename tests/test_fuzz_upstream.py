"""A fuzzer of upstream bodies: recorded simulator responses, mutated at random, through the
real decoders, a real client over HTTP, and a whole exporter's rounds.

Mutations: types swapped, numbers huge (as text or bare literals) or negative, strings long,
non-ASCII or with lone surrogates, fields and items missing or repeated, nesting deep. What
must hold, whatever the body:

- the decoders raise nothing but ``InvalidBody``, and every record they give is well formed
  (text where text belongs, integers within ``records.MAX_INT``, finite timestamps);
- the client raises nothing but an ``ApiError``, on any status;
- a round never raises, no device poll crashes, and ``/metrics`` answers 200.

The seed is fixed and the budget short (``FUZZ_UPSTREAM_SECONDS``, 3 s by default, split
between the three stages); ``FUZZ_UPSTREAM_SECONDS=300`` is the long run, and
``FUZZ_UPSTREAM_SEED`` another sequence. A failure names the case's seed and mutations.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from aiohttp import web
from clientrig import ORG, ROOT, TOKEN, make_client, simulated
from servedexporter import sample, served_exporter

from exporter.actionpages import decode_actions_body
from exporter.apierrors import ApiError
from exporter.client import _decode_batch_strict
from exporter.config import parse_config
from exporter.dialect import _decode_batches, _decode_devices
from exporter.records import (
    MAX_INT,
    PROBLEM_KINDS,
    Action,
    Batch,
    Device,
    InvalidBody,
    Page,
    decode_json,
    error_code,
)
from exporter.token import TokenSource

SECONDS = float(os.environ.get("FUZZ_UPSTREAM_SECONDS", "3"))
SEED = int(os.environ.get("FUZZ_UPSTREAM_SEED", "24"))
ROUTES = ("devices", "commands", "command", "actions")
STATUSES = (200, 200, 200, 200, 200, 200, 400, 401, 404, 500, 503)


# --- recorded responses -------------------------------------------------------------------------


async def recorded(make_simulator_server: Any) -> dict[str, Any]:
    """One response of each route, as the simulator serves them (the JSON documents)."""
    sim = await simulated(make_simulator_server, devices=3)
    device, batch = sim.batch_with_actions(3)
    paths = {
        "devices": "/devices",
        "commands": f"/devices/{device}/commands",
        "command": f"/devices/{device}/commands/{batch}",
        "actions": f"/devices/{device}/commands/{batch}/actions",
    }
    documents = {}
    async with make_client(sim.base_url) as client:
        session = client._transport._new_session()
        for route, path in paths.items():
            url = sim.base_url.removesuffix("/v1") + ROOT + path
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with session.get(url, headers=headers) as response:
                assert response.status == 200
                documents[route] = await response.json()
    documents["error"] = {"status": False, "error": {"code": 4004, "message": "Invalid Token"}}
    return documents


# --- mutations ----------------------------------------------------------------------------------

ODD_TEXT = ["", " ", "h\u00e9llo", "\u4e2d\u6587", "\U0001f600", "\u202eevil", "\ud800",
            "\udfff x", "a\x00b", "line\u2028sep", "\r\n", "9" * 30, "-1", "NaN", "1e999",
            "2026-13-45T99:99:99Z", "0000-00-00T00:00:00Z", "\u0661\u0662"]
PLAIN = [None, True, False, 0, -1, 1.5, -0.0, 2**63, -(2**63), 1e308, -1e308, [], {}, [1, "a"],
         {"a": 1}, "x"]


@dataclass
class Body:
    """A mutated document and how to write it; ``literals`` are bare numbers written for
    their placeholders (Python's json cannot write integers past 4,300 digits)."""

    document: Any
    literals: dict[str, str] = field(default_factory=dict)
    ascii: bool = True
    notes: list[str] = field(default_factory=list)

    def encodable(self) -> bool:
        """Whether Python's json can write it (deep values nested in deep values cannot)."""
        try:
            self.encode()
        except RecursionError:
            return False
        return True

    def encode(self) -> bytes:
        text = json.dumps(self.document, ensure_ascii=self.ascii, allow_nan=True)
        for placeholder, literal in self.literals.items():
            text = text.replace(json.dumps(placeholder), literal)
        return text.encode("utf-8", "surrogatepass")


def slots(document: Any) -> Iterator[tuple[Any, Any]]:
    """Every (container, key) of a document, depth first."""
    stack = [document]
    while stack:
        node = stack.pop()
        keys = node.keys() if isinstance(node, dict) else range(len(node))
        for key in list(keys):
            yield node, key
            if isinstance(node[key], (dict, list)):
                stack.append(node[key])


def mutate(document: Any, rng: random.Random) -> Body:
    body = Body(copy.deepcopy(document), ascii=rng.random() < 0.7)
    for _ in range(rng.randint(1, 4)):
        places = list(slots(body.document))
        if not places:
            break
        node, key = rng.choice(places)
        operation = rng.choice(MUTATIONS)
        body.notes.append(f"{operation.__name__}@{key!r}")
        operation(body, node, key, rng)
    return body


def swap_type(body: Body, node: Any, key: Any, rng: random.Random) -> None:
    node[key] = copy.deepcopy(rng.choice(PLAIN))


def huge_number(body: Body, node: Any, key: Any, rng: random.Random) -> None:
    digits = ("-" if rng.random() < 0.3 else "") + "9" * rng.choice([20, 400, 4301, 5000])
    if rng.random() < 0.5:
        node[key] = digits  # as text
    else:
        placeholder = f"@@literal{len(body.literals)}@@"
        body.literals[placeholder] = digits
        node[key] = placeholder


def negative(body: Body, node: Any, key: Any, rng: random.Random) -> None:
    node[key] = -rng.choice([1, 7, 2**31, 2**53 + 1, 2**64])


def odd_float(body: Body, node: Any, key: Any, rng: random.Random) -> None:
    node[key] = rng.choice([math.nan, math.inf, -math.inf, 1e-320, 1e16 + 0.5, 12.0])


def long_text(body: Body, node: Any, key: Any, rng: random.Random) -> None:
    node[key] = rng.choice(ODD_TEXT[1:6]) * rng.choice([300, 5000, 100_000])


def odd_text(body: Body, node: Any, key: Any, rng: random.Random) -> None:
    node[key] = rng.choice(ODD_TEXT)


def missing(body: Body, node: Any, key: Any, rng: random.Random) -> None:
    del node[key]


def repeated(body: Body, node: Any, key: Any, rng: random.Random) -> None:
    # The same object again, not a copy: a deep value cannot be copied by recursion.
    if isinstance(node, list):
        node.extend([node[key]] * rng.randint(1, 3))
    else:
        node[key + "_" if isinstance(key, str) else key] = node[key]


def deep(body: Body, node: Any, key: Any, rng: random.Random) -> None:
    value: Any = "bottom"
    for _ in range(rng.choice([50, 500])):
        value = [value]
    node[key] = value


MUTATIONS: list[Callable[[Body, Any, Any, random.Random], None]] = [
    swap_type, huge_number, negative, odd_float, long_text, odd_text, missing, repeated, deep,
]


def cases(documents: dict[str, Any], seconds: float, salt: int) -> Iterator[tuple[str, Body]]:
    """(route, mutated body) until ``seconds`` have passed; each case from its own seed."""
    deadline = time.monotonic() + seconds
    number = 0
    while time.monotonic() < deadline:
        rng = random.Random(f"{SEED}:{salt}:{number}")
        route = rng.choice([*ROUTES, "error"])
        body = mutate(documents[route], rng)
        body.notes.insert(0, f"seed {SEED}:{salt}:{number} on {route}")
        number += 1
        if body.encodable():
            yield route, body


# --- what a record must look like ---------------------------------------------------------------


def is_moment(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isfinite(value))


def is_text(value: Any) -> bool:
    return value is None or isinstance(value, str)


def is_bounded(value: Any) -> bool:
    return value is None or (isinstance(value, int) and -MAX_INT <= value <= MAX_INT)


def well_formed(record: Any) -> bool:
    if not isinstance(record.problems, frozenset) or not record.problems <= set(PROBLEM_KINDS):
        return False
    if isinstance(record, Action):
        return (isinstance(record.cmd_id, str) and bool(record.cmd_id)
                and isinstance(record.status, str) and is_bounded(record.status_code)
                and all(map(is_moment, (record.sent_at, record.received_at, record.canceled_at)))
                and is_text(record.path) and is_text(record.operation))
    if isinstance(record, Batch):
        summary = record.summary or ()
        return (isinstance(record.id, str) and is_text(record.name)
                and is_text(record.device_id)
                and is_moment(record.created_at) and is_moment(record.updated_at)
                and all(isinstance(s, str) and isinstance(n, int) and n >= 0
                        for s, n in summary))
    if isinstance(record, Device):
        return (isinstance(record.id, str) and all(map(is_text, (
                    record.name, record.serial, record.imei, record.win_id, record.state)))
                and all(isinstance(tag, str) for tag in record.tags)
                and is_moment(record.last_status_report))
    return False


def well_formed_page(page: Page[Any]) -> bool:
    return (all(map(is_bounded, (page.total_docs, page.page, page.limit)))
            and page.has_next_page in (None, True, False)
            and all(map(well_formed, page.items)))


DECODERS: dict[str, Callable[[bytes], Any]] = {
    "devices": lambda body: _decode_devices(body, 100),
    "commands": lambda body: _decode_batches(body, 100),
    "command": _decode_batch_strict,
    "actions": lambda body: decode_actions_body(body, 100),
    "error": lambda body: error_code(decode_json(body)),
}


# --- the upstream the client and the exporter read -----------------------------------------------


@dataclass
class Upstream:
    """Serves, per route, the answer the fuzzer set (a good recorded one otherwise)."""

    documents: dict[str, Any]
    answers: dict[str, tuple[int, bytes]] = field(default_factory=dict)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=2**20)
        base = f"{ROOT}/devices"
        app.router.add_get(base, self._route("devices"))
        app.router.add_get(base + "/{device}/commands", self._route("commands"))
        app.router.add_get(base + "/{device}/commands/{batch}", self._route("command"))
        app.router.add_get(base + "/{device}/commands/{batch}/actions", self._route("actions"))
        return app

    def _route(self, route: str) -> Callable[[web.Request], Any]:
        async def handle(_: web.Request) -> web.Response:
            status, body = self.answers.get(
                route, (200, json.dumps(self.documents[route]).encode())
            )
            return web.Response(status=status, body=body, content_type="application/json")

        return handle


async def call(client: Any, route: str) -> Any:
    device, batch = "65f0c0ffee65f0c0ffee0001", "65f0c0ffee65f0c0ffee1001"
    if route == "devices":
        return await client.list_devices()
    if route == "commands":
        return await client.list_batches(device, max_items=20)
    if route == "command":
        return await client.get_batch(device, batch)
    return await client.list_actions(device, batch)


def answer(route: str, body: Body, rng: random.Random) -> tuple[str, int, bytes]:
    """Where a mutated body is served and with which status (error bodies on errors)."""
    if route == "error":
        return rng.choice(ROUTES), rng.choice(STATUSES[6:]), body.encode()
    return route, rng.choice(STATUSES), body.encode()


# --- the fuzzer -----------------------------------------------------------------------------------


@pytest.fixture
async def documents(make_simulator_server: Any) -> dict[str, Any]:
    return await recorded(make_simulator_server)


async def test_decoders_raise_nothing_but_invalid_body(documents: dict[str, Any]) -> None:
    tried = 0
    for route, body in cases(documents, SECONDS / 3, salt=1):
        raw = body.encode()
        tried += 1
        try:
            result = DECODERS[route](raw)
        except InvalidBody:
            continue
        except Exception as exc:
            pytest.fail(f"{type(exc).__name__}: {exc!s:.300} ({'; '.join(body.notes)})")
        if isinstance(result, Page):
            assert well_formed_page(result), body.notes
        elif isinstance(result, Batch):
            assert well_formed(result), body.notes
        else:
            assert is_bounded(result), body.notes
    assert tried > 0


async def test_the_client_raises_nothing_but_api_errors(
    documents: dict[str, Any], aiohttp_server: Any
) -> None:
    upstream = Upstream(documents)
    server = await aiohttp_server(upstream.app())
    tried = 0
    async with make_client(str(server.make_url("/v1")), max_attempts=2, max_pages=5) as client:
        for route, body in cases(documents, SECONDS / 3, salt=2):
            rng = random.Random(body.notes[0])
            served, status, raw = answer(route, body, rng)
            upstream.answers = {served: (status, raw)}
            tried += 1
            try:
                await call(client, served)
            except ApiError:
                pass
            except Exception as exc:
                pytest.fail(f"{type(exc).__name__}: {exc!s:.300} "
                            f"(HTTP {status}; {'; '.join(body.notes)})")
    assert tried > 0


async def test_no_round_dies_and_metrics_answer_whatever_upstream_sends(
    documents: dict[str, Any], aiohttp_server: Any, aiohttp_client: Any
) -> None:
    upstream = Upstream(documents)
    server = await aiohttp_server(upstream.app())
    config = parse_config(yaml.safe_dump({
        "organization": ORG,
        "api": {"base_url": str(server.make_url("/v1")), "requests_per_hour": 10**7,
                "max_pages": 5},
        "discovery": {"devices": {"refresh_seconds": 1},
                      "batches": {"max_age": "3650d"}},
        "poll": {"strategy": "round_robin"},
    }))
    exporter = await served_exporter(aiohttp_client, config, TokenSource(value=TOKEN), time.time)
    exporter.exporter.client.max_attempts = 1
    try:
        for route, body in cases(documents, SECONDS / 3, salt=3):
            rng = random.Random(body.notes[0])
            served, status, raw = answer(route, body, rng)
            upstream.answers = {served: (status, raw)}
            await exporter.poll()  # raises: a round died
            found = await exporter.scrape()  # 200, and it parses
            crashed = sample(found, "applivery_exporter_poll_failures_total", kind="device")
            assert crashed == 0, body.notes
    finally:
        await exporter.close()
