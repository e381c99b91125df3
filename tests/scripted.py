"""A scripted upstream: an aiohttp app whose documents a test rewrites between rounds.

Every read is the test's story (transient 404s, a batch leaving the history window, a list
briefly short, a lagging replica, rollouts across devices, device check-ins). ``Rig`` runs
one exporter against it with a clock the test moves, and scrapes it over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import yaml
from aiohttp import web
from samples import Samples
from samples import scrape as fetch_samples

from exporter.cli import Exporter, build_exporter
from exporter.client import TokenBucket, TokenSource
from exporter.config import parse_config
from exporter.scheduler import Scheduler
from exporter.server import Hooks, make_app
from exporter.targets import Shard

TOKEN = "ledger-test-token"
ORG = "acme"
BASE = f"/v1/organizations/{ORG}/mdm/windows/enterprise"
DEVICE = "65f0c0ffee65f0c0ffee0001"
START = 1_770_717_600.0  # the exporter's watermark



def iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z")


def batch_id(n: int) -> str:
    return f"65f0c0ffee65f0c0ffee{0x1000 + n:04x}"


def device_id(n: int) -> str:
    return f"65f0c0ffee65f0c0ffee{0x2000 + n:04x}"


def actions(count: int, status: str, *, prefix: str = "a", at: float = START + 60) -> list[Any]:
    """``count`` actions in ``status``, their timestamps after the watermark."""
    out = []
    for i in range(count):
        doc: dict[str, Any] = {"cmdId": f"{prefix}-{i}", "status": status}
        if status != "Pending":
            doc["sentAt"] = iso(at)
        if status not in ("Pending", "Awaiting"):
            doc["receivedAt"] = iso(at + 5)
        out.append(doc)
    return out


def page_of(request: web.Request, items: list[Any]) -> dict[str, Any]:
    """The page of ``items`` the request asks for (``page``, ``limit``), as upstream pages:
    the client cuts whatever goes beyond the limit it asked."""
    number = int(request.query.get("page", "1"))
    limit = int(request.query.get("limit", "100"))
    served = items[(number - 1) * limit : number * limit]
    return {"items": served, "totalDocs": len(items), "hasNextPage": number * limit < len(items)}


def envelope(data: Any) -> web.Response:
    return web.Response(body=json.dumps({"status": True, "data": data}),
                        content_type="application/json")


def not_found() -> web.Response:
    return web.json_response({"status": False, "error": {"code": 3001}}, status=404)


@dataclass
class Upstream:
    """Per device, its batches (newest first) and their actions, rewritten by the test."""

    batches: dict[str, list[str]] = field(default_factory=dict)  # device -> listed history
    actions: dict[str, list[Any]] = field(default_factory=dict)  # batch -> action documents
    created: dict[str, float] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # batch -> name, when not the default
    devices: list[dict[str, Any]] = field(default_factory=list)  # the device list
    missing_once: Counter[str] = field(default_factory=Counter)  # batch -> 404s to answer
    missing: set[str] = field(default_factory=set)  # batches answering 404 until removed
    requests: Counter[str] = field(default_factory=Counter)
    history_reads: Counter[str] = field(default_factory=Counter)  # device -> its reads

    def add(self, device: str, batch: str, docs: list[Any], created: float = START + 30) -> None:
        self.batches.setdefault(device, []).insert(0, batch)
        self.actions[batch] = docs
        self.created[batch] = created

    def document(self, device: str, batch: str) -> dict[str, Any]:
        counts = Counter(d["status"] for d in self.actions[batch] if isinstance(d, dict))
        created = self.created[batch]
        return {
            "id": batch, "name": self.names.get(batch, f"policy {batch[-4:]}"),
            "winDeviceId": device,
            "summary": [{"status": s, "count": n} for s, n in sorted(counts.items())],
            "createdAt": iso(created), "updatedAt": iso(created + 100),
        }

    def app(self) -> web.Application:
        app = web.Application()
        route = app.router.add_get
        route(f"{BASE}/devices", self._devices)
        route(f"{BASE}/devices/{{device}}/commands", self._history)
        route(f"{BASE}/devices/{{device}}/commands/{{batch}}", self._one)
        route(f"{BASE}/devices/{{device}}/commands/{{batch}}/actions", self._actions)
        return app

    async def _devices(self, request: web.Request) -> web.Response:
        self.requests["devices"] += 1
        wanted = set(request.query.getall("tags", []))
        items = [d for d in self.devices if not wanted or wanted & set(d.get("tags", []))]
        return envelope(page_of(request, items))

    async def _history(self, request: web.Request) -> web.Response:
        device = request.match_info["device"]
        self.requests["commands"] += 1
        self.history_reads[device] += 1
        limit = int(request.query.get("limit", "100"))
        listed = [b for b in self.batches.get(device, []) if b not in self.missing][:limit]
        items = [self.document(device, b) for b in listed]
        return envelope({"items": items, "totalDocs": len(items), "hasNextPage": False})

    async def _one(self, request: web.Request) -> web.Response:
        device, batch = request.match_info["device"], request.match_info["batch"]
        self.requests["command"] += 1
        if batch in self.missing or batch not in self.actions:
            return not_found()
        return envelope(self.document(device, batch))

    async def _actions(self, request: web.Request) -> web.Response:
        batch = request.match_info["batch"]
        self.requests["actions"] += 1
        if self.missing_once[batch] > 0:
            self.missing_once[batch] -= 1
            return not_found()
        if batch in self.missing:
            return not_found()
        return envelope(page_of(request, self.actions[batch]))


@dataclass
class Rig:
    upstream: Upstream
    exporter: Exporter
    url: str
    session: Any
    clock: list[float]

    async def poll(self, rounds: int = 1, *, advance: float = 60.0) -> None:
        for _ in range(rounds):
            self.clock[0] += advance
            await self.exporter.scheduler.run_round()
        self.exporter.exposition.refresh()

    async def scrape(self) -> Samples:
        return await fetch_samples(self.session, self.url + "/metrics")

    async def transitions(self) -> dict[str, float]:
        found = await self.scrape()
        return {dict(k)["status"]: v for (n, k), v in found.items()
                if n == "applivery_windows_command_action_transitions_total" and v}

    async def latencies(self) -> float:
        found = await self.scrape()
        return sum(v for (n, _), v in found.items()
                   if n == "applivery_windows_command_ack_latency_seconds_count")

    async def gauges(self) -> dict[tuple[str, str], float]:
        found = await self.scrape()
        return {(dict(k)["command"], dict(k)["status"]): v for (n, k), v in found.items()
                if n == "applivery_windows_command_actions"}


def config_text(url: str, devices: list[dict[str, Any]] | None = None, **extra: Any) -> str:
    document: dict[str, Any] = {
        "organization": ORG,
        "api": {"base_url": url, "requests_per_hour": 1_000_000},
        "poll": {"interval_seconds": 60},
        "devices": devices if devices is not None else [{"id": DEVICE}],
        "discovery": {"batches": {"max_age": "3650d", "max_per_device": 3}},
    }
    for key, value in extra.items():
        document.setdefault(key, {}).update(value)
    return yaml.safe_dump(document)


@contextlib.asynccontextmanager
async def rig_factory(
    aiohttp_server: Any, aiohttp_client: Any
) -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    """Makes Rigs on the test's aiohttp server and client; closes their exporters."""
    exporters: list[Exporter] = []

    async def make(upstream: Upstream, *, shard: Shard | None = None,
                   budget_on_clock: bool = False, **config: Any) -> Rig:
        """``budget_on_clock``: the request budget earns by the test's clock too (else by
        the machine's, which a test's rounds barely move)."""
        server = await aiohttp_server(upstream.app())
        clock = [START]
        parsed = parse_config(config_text(str(server.make_url("/v1")), **config))
        exporter = build_exporter(parsed, TokenSource(value=TOKEN), config_path=None,
                                  clock=lambda: clock[0], shard=shard)
        exporter.client.max_attempts = 1  # each read is exactly what the upstream answered
        if budget_on_clock:
            async def wait(seconds: float) -> None:
                clock[0] += max(0.0, seconds)
                await asyncio.sleep(0)

            exporter.client.budget = TokenBucket(parsed.api.requests_per_hour,
                                                 monotonic=lambda: clock[0], sleep=wait)
        exporters.append(exporter)
        hooks = Hooks(exposition=exporter.exposition, state=exporter.state,
                      ready=lambda: exporter.scheduler.ready, reload=_no_reload,
                      version="test", organization=lambda: ORG)
        client = await aiohttp_client(make_app(hooks))
        return Rig(upstream, exporter, str(client.make_url("")).rstrip("/"), client.session,
                   clock)

    try:
        yield make
    finally:
        for exporter in exporters:
            await exporter.client.close()


async def _no_reload() -> str | None:
    return "no reload in this test"


async def run_until_rounds(scheduler: Scheduler, rounds: int, *, within: float) -> None:
    """Run the scheduler's own loop until ``rounds`` rounds completed, or ``within`` seconds."""
    task = asyncio.create_task(scheduler.run())
    try:
        for _ in range(int(within / 0.02)):
            if scheduler.rounds >= rounds:
                break
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
