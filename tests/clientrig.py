"""Clients of the upstream API against real aiohttp servers: the simulator, or small apps of
a test's own for page shapes the simulator does not produce."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import web
from fakeclock import FakeClock

from exporter.client import ApiClient, TokenSource
from exporter.records import Action
from exporter.selfmetrics import SelfMetrics
from exporter.simulator import Simulator

TOKEN = "test-token-5f1b7d3c9a"
ORG = "demo"


def make_client(
    base_url: str,
    *,
    token: TokenSource | None = None,
    metrics: SelfMetrics | None = None,
    clock: FakeClock | None = None,
    **options: Any,
) -> ApiClient:
    clock = clock or FakeClock()
    settings: dict[str, Any] = {
        "organization": ORG,
        "sleep": clock.sleep,
        "monotonic": clock.monotonic,
        "seed": 7,
        **options,
    }
    return ApiClient(
        base_url=base_url,
        token=token or TokenSource(value=TOKEN),
        metrics=metrics or SelfMetrics(),
        **settings,
    )


ROOT = f"/v1/organizations/{ORG}/mdm/windows/enterprise"
ACTIONS = ROOT + "/devices/{device}/commands/{batch}/actions"


def action_items(count: int) -> list[dict[str, Any]]:
    return [{"cmdId": f"c{n:03d}", "status": "Pending"} for n in range(count)]


def paged_app(
    items: list[dict[str, Any]],
    *,
    cap: int,
    shape: Callable[[list[dict[str, Any]], int, int], Any],
    requests: list[tuple[int, int]],
) -> web.Application:
    """Actions served page by page; ``cap`` bounds the page size whatever is asked."""

    async def handler(request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
        page = int(request.query["page"])
        limit = int(request.query["limit"])
        requests.append((page, limit))
        served = min(limit, cap)
        chunk = items[(page - 1) * served : page * served]
        return web.json_response({"status": True, "data": shape(chunk, page, served)})

    app = web.Application()
    app.router.add_get(ACTIONS, handler)
    return app


class Simulated:
    """A simulator behind a real aiohttp server, and a way to build clients for it."""

    def __init__(self, sim: Simulator, base_url: str) -> None:
        self.sim = sim
        self.base_url = base_url
        self.metrics = SelfMetrics()
        self.clock = FakeClock()

    def client(self, **options: Any) -> ApiClient:
        options.setdefault("metrics", self.metrics)
        options.setdefault("clock", self.clock)
        return make_client(self.base_url, **options)

    def served(self, route: str, status: int) -> int:
        return self.sim.stats.counts[(route, status)]

    def batch_with_actions(self, at_least: int = 1) -> tuple[str, str]:
        for device in self.sim.fleet.device_ids():
            for batch in self.sim.fleet.batch_ids(device):
                if sum(self.sim.fleet.grouped_counts(device, batch).values()) >= at_least:
                    return device, batch
        raise AssertionError(f"no batch with {at_least} actions")


async def simulated(make_simulator_server: Any, **options: Any) -> Simulated:
    """The shared simulator fixture (tests/conftest.py), with this module's token."""
    sim, base_url = await make_simulator_server(
        **{"seed": 3, "devices": 6, "organization": ORG, "token": TOKEN, **options}
    )
    return Simulated(sim, base_url)


def counts(actions: list[Action]) -> dict[str, int]:
    return dict(Counter(action.status for action in actions))


def newest(sim: Simulated, device: str, count: int) -> list[str]:
    """The ``count`` most recently created batches of ``device``, from the fleet itself."""
    batches = sim.sim.fleet.device(device).batches
    return [b.id for b in sorted(batches, key=lambda b: b.created, reverse=True)][:count]
