"""A whole exporter (client, scheduler, state, exposition) behind its real HTTP routes, for
tests that poll an upstream of their choice and look at the exporter from outside."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from samples import Samples, scrape

from exporter.cli import Exporter, build_exporter
from exporter.config import Config
from exporter.server import Hooks, make_app
from exporter.token import TokenSource


@dataclass
class Served:
    exporter: Exporter
    client: Any  # aiohttp's test client of the exporter's routes

    async def poll(self) -> None:
        """One round, then the render a scrape would see."""
        await self.exporter.scheduler.run_round()
        self.exporter.exposition.refresh()

    async def status(self, path: str) -> int:
        async with self.client.get(path) as response:
            return response.status

    async def scrape(self) -> Samples:
        return await scrape(self.client.session, str(self.client.make_url("/metrics")))

    async def close(self) -> None:
        await self.exporter.client.close()


async def served_exporter(
    aiohttp_client: Any, config: Config, token: TokenSource, clock: Callable[[], float]
) -> Served:
    exporter = build_exporter(config, token, config_path=None, clock=clock)
    hooks = Hooks(exposition=exporter.exposition, state=exporter.state,
                  ready=lambda: exporter.scheduler.ready, reload=_no_reload,
                  version="test", organization=lambda: config.organization)
    return Served(exporter, await aiohttp_client(make_app(hooks)))


async def _no_reload() -> str | None:
    return "no reload in this test"


def sample(found: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, k), v in found.items() if n == name and wanted <= k)
