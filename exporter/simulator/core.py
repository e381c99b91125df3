"""``Simulator``: one simulated organization — clock, fleet, faults, stats and its web app."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aiohttp import web

from exporter.simulator.clock import SimClock
from exporter.simulator.dialect import Dialect, SortModeSpec
from exporter.simulator.faults import Faults
from exporter.simulator.fleet import Fleet
from exporter.simulator.stats import Stats


class Simulator:
    """A deterministic (seeded) stand-in for the Applivery MDM Windows command API.

    ``speed``: simulated seconds per real second (0: only :meth:`advance` moves time).
    ``start``: the simulated epoch at creation (real time when None); the history before it
    is built at creation. ``record_events=False`` keeps no ground-truth event log (large
    fleets). ``new_batches_per_device_hour``: how often new batches arrive once running,
    ``rollout_share`` of them in rollouts (one policy pushed to 30–70 % of the devices at
    once). ``checkin_seconds``: every device's mean time between sessions (else each draws
    its own, minutes to days). ``os_versions``: that many distinct ``summary.osVersion``
    values, each on a device at least (fleets of that many devices or more), builds fixed;
    else a realistic spread of Windows 10 and 11 builds that update now and then
    (exporter/simulator/health.py, with compliance).

    How ``sort`` and the device list's ``tags`` are read (exporter/simulator/dialect.py; the
    defaults are the faithful upstream): ``sort_mode`` ``"honour"``, ``"ignore"`` or
    ``"reject"`` for every list, or per list (``{"devices": "reject"}``, or
    ``"devices=reject,commands=ignore"``); ``sort_fields`` narrows it to those fields;
    ``tags_format`` ``"any"``, ``"repeated"``, ``"brackets"``, ``"comma"`` or ``"ignore"``;
    ``unknown_filter`` ``"ignore"`` or ``"nothing"`` for a ``tags`` spelling not read.
    :meth:`set_dialect` changes them at run time.
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
        new_batches_per_device_hour: float = 0.25,
        push: bool = True,
        checkin_seconds: float | None = None,
        rollout_share: float = 0.5,
        sort_mode: SortModeSpec = "honour",
        sort_fields: Iterable[str] | None = None,
        tags_format: str = "any",
        unknown_filter: str = "ignore",
        os_versions: int | None = None,
    ) -> None:
        if max_limit < 1:
            raise ValueError("max_limit must be >= 1")
        self.seed = seed
        self.organization = organization
        self.token = token
        self.control = control
        self.max_limit = max_limit
        self.dialect = Dialect.of(sort_mode, sort_fields, tags_format, unknown_filter)
        self.clock = SimClock(start=start, speed=speed)
        self.faults = Faults(seed, faults)
        self.stats = Stats()
        self.fleet = Fleet(
            seed=seed,
            devices=devices,
            clock=self.clock,
            faults=self.faults,
            batches_per_device=batches_per_device,
            actions_per_batch=actions_per_batch,
            record_events=record_events,
            new_batches_per_device_hour=new_batches_per_device_hour,
            push=push,
            checkin_seconds=checkin_seconds,
            rollout_share=rollout_share,
            os_versions=os_versions,
        )

    def advance(self, seconds: float) -> None:
        """Move simulated time forward and apply everything due until then."""
        self.clock.advance(seconds)
        self.fleet.sync()

    def set_dialect(self, /, **changes: Any) -> Dialect:
        """Change some dialect settings now; raises ``ValueError`` and keeps the old ones on a
        bad value. Takes the keyword arguments of the same names as the constructor."""
        self.dialect = self.dialect.changed(**changes)
        return self.dialect

    def app(self) -> web.Application:
        from exporter.simulator.app import build_app  # the model needs no web stack

        return build_app(self)

    def burst(
        self, device: str | None, batches: int, error_ratio: float
    ) -> list[tuple[str, str]]:
        """Batches that resolve at their device's next check-in, ``error_ratio`` into errors.

        ``device`` None spreads them over random devices. Returns (device id, batch id) pairs.
        """
        created = []
        for _ in range(batches):
            target = self.fleet.device(device) if device else self.fleet.random_device()
            created.append(
                (target.id, self.fleet.create_random_batch(target.id, error_ratio=error_ratio))
            )
        return created

    @property
    def base_path(self) -> str:
        """Path prefix of this organization's Windows routes."""
        return f"/v1/organizations/{self.organization}/mdm/windows/enterprise"
