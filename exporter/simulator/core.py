"""``Simulator``: one organization's fleet on a simulated clock, served as the upstream API."""

from __future__ import annotations

from aiohttp import web

from exporter.simulator.app import Stats, build_app
from exporter.simulator.clock import SimClock
from exporter.simulator.faults import Faults
from exporter.simulator.fleet import Fleet


class Simulator:
    """A deterministic (seeded) stand-in for the Applivery MDM Windows command API.

    ``speed``: simulated seconds per real second (0 = the clock moves only by ``advance``).
    ``start``: the simulated epoch at creation (real time when None). History before it is
    built at creation; ``record_events=False`` skips the ground-truth event log (large fleets).
    """

    def __init__(
        self,
        seed: int = 1,
        devices: int = 20,
        organization: str = "demo",
        token: str = "simulator-token",
        speed: float = 1.0,
        faults: str = "",
        start: float | None = None,
        control: bool = False,
        max_limit: int = 100,
        batches_per_device: int = 5,
        actions_per_batch: tuple[int, int] = (3, 12),
        record_events: bool = True,
    ) -> None:
        if max_limit < 1:
            raise ValueError("max_limit must be >= 1")
        self.seed = seed
        self.organization = organization
        self.token = token
        self.control = control
        self.max_limit = max_limit
        self.faults = Faults(seed, faults)
        self.clock = SimClock(start=start, speed=speed)
        self.stats = Stats()
        self.fleet = Fleet(
            seed=seed,
            devices=devices,
            clock=self.clock,
            faults=self.faults,
            batches_per_device=batches_per_device,
            actions_per_batch=actions_per_batch,
            record_events=record_events,
        )

    def advance(self, seconds: float) -> None:
        """Move simulated time forward and apply everything due until then."""
        self.clock.advance(seconds)
        self.fleet.sync()

    def app(self) -> web.Application:
        return build_app(self)
