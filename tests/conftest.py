"""Shared fixtures: the upstream API simulator served by a real aiohttp server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from clientrig import simulated

from exporter.simulator import Simulator

# A fixed simulated start so that every run sees the same fleet.
SIM_START = 1_770_717_600.0  # 2026-02-10T10:00:00Z

SimulatorServer = tuple[Simulator, str]


@pytest.fixture
async def make_simulator_server(
    aiohttp_server: Any,
) -> Callable[..., Awaitable[SimulatorServer]]:
    """Factory: ``await make_simulator_server(**Simulator kwargs)`` -> (sim, base_url).

    Defaults: seed 1, 8 devices, manual clock (speed 0) starting at SIM_START.
    ``base_url`` ends in ``/v1``.
    """

    async def make(**kwargs: Any) -> SimulatorServer:
        options: dict[str, Any] = {"seed": 1, "devices": 8, "speed": 0, "start": SIM_START}
        options.update(kwargs)
        sim = Simulator(**options)
        server = await aiohttp_server(sim.app())
        return sim, str(server.make_url("/v1"))

    return make


@pytest.fixture
async def simulator_server(
    make_simulator_server: Callable[..., Awaitable[SimulatorServer]],
) -> SimulatorServer:
    """(sim, base_url) of a small simulator with a manual clock."""
    return await make_simulator_server()


@pytest.fixture
async def make_rig(aiohttp_server: Any, aiohttp_client: Any) -> Any:
    """Factory: ``await make_rig(upstream, **config)`` -> a Rig (tests/scripted.py)."""
    from scripted import rig_factory

    async with rig_factory(aiohttp_server, aiohttp_client) as make:
        yield make


@pytest.fixture
async def sim(make_simulator_server: Any) -> Any:
    """A client of the project's own against the simulator (clientrig.Simulated)."""
    return await simulated(make_simulator_server)
