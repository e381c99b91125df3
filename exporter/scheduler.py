"""What to poll when: targets from config and discovery, poll rounds, applying results.

A round polls every watched device once: its batches (explicit ``commands`` or discovered
from the command history), then the actions of each batch that can still have changed.
Results go to :class:`FleetState`; the scheduler never renders or serves anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from exporter.client import ApiClient, ApiError, AuthError, NotFoundError
from exporter.config import Config, DeviceConfig
from exporter.records import Batch, Device
from exporter.selfmetrics import SelfMetrics
from exporter.state import FleetState

log = structlog.get_logger("exporter.scheduler")


@dataclass(frozen=True, slots=True)
class Shard:
    index: int
    total: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``INDEX/TOTAL`` with 0 <= INDEX < TOTAL."""
        index_text, sep, total_text = text.partition("/")
        if not sep or not index_text.isdigit() or not total_text.isdigit():
            raise ValueError(f"--shard must be INDEX/TOTAL (e.g. 0/3), got {text!r}")
        index, total = int(index_text), int(total_text)
        if total < 1 or index >= total:
            raise ValueError(f"--shard index must be below total, got {text!r}")
        return cls(index, total)

    def owns(self, device: str) -> bool:
        # A stable hash (not Python's salted hash()) so every replica agrees on the split.
        digest = hashlib.sha256(device.lower().encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.total == self.index


@dataclass(frozen=True, slots=True)
class Target:
    """One watched device: from the config, or discovered."""

    device: str
    name: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    commands: tuple[str, ...] | None = None
    info: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_config(cls, device: DeviceConfig) -> Target:
        return cls(device.id, device.name, device.labels, device.commands)

    @classmethod
    def discovered(cls, device: Device) -> Target:
        info = {"serial": device.serial, "imei": device.imei, "win_id": device.win_id}
        return cls(
            device.id,
            device.name,
            info=tuple((k, v) for k, v in info.items() if v),
        )


@dataclass(slots=True)
class RoundResult:
    polled: int = 0
    succeeded: int = 0
    failed: int = 0
    batches_fetched: int = 0
    batches_skipped: int = 0


@dataclass(slots=True)
class _DeviceProgress:
    dropped_batches: set[str] = field(default_factory=set)


class Scheduler:
    def __init__(
        self,
        config: Config,
        client: ApiClient,
        state: FleetState,
        metrics: SelfMetrics,
        *,
        shard: Shard | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._state = state
        self._metrics = metrics
        self._shard = shard
        self._clock = clock
        self._rng = rng or random.Random()
        self._targets: dict[str, Target] = {}
        self._discovered: dict[str, Target] = {}
        self._discovered_at: float | None = None
        self._progress: dict[str, _DeviceProgress] = {}
        self._completed: set[str] = set()
        self._wake = asyncio.Event()
        self.rounds = 0
        self.config = config
        self._apply_targets()

    # --- targets --------------------------------------------------------------------------

    def _owns(self, device: str) -> bool:
        return self._shard is None or self._shard.owns(device)

    def _apply_targets(self) -> None:
        """Merge explicit and discovered devices; watch new ones, unwatch gone ones."""
        wanted: dict[str, Target] = {}
        for device in self.config.devices:
            if self._owns(device.id):
                wanted[device.id] = Target.from_config(device)
        for device_id, target in self._discovered.items():
            # An explicit entry wins: its name, labels and commands are what the user asked for.
            if device_id not in wanted and self._owns(device_id):
                wanted[device_id] = target
        for device_id in self._targets.keys() - wanted.keys():
            self._state.unwatch(device_id)
            self._progress.pop(device_id, None)
            self._completed.discard(device_id)
            log.info("device_unwatched", device=device_id)
        for device_id, target in wanted.items():
            previous = self._targets.get(device_id)
            if previous != target:
                self._state.watch(
                    device_id, name=target.name, labels=dict(target.labels), info=dict(target.info)
                )
                if previous is not None and previous.commands != target.commands:
                    self._progress.pop(device_id, None)
        self._targets = wanted

    def reload(self, config: Config) -> None:
        """Swap the config; unchanged targets keep their state and counters."""
        if config.discovery.devices != self.config.discovery.devices:
            self._discovered_at = None
            if config.discovery.devices is None:
                self._discovered = {}
        self.config = config
        self._apply_targets()
        self._wake.set()

    @property
    def targets(self) -> dict[str, Target]:
        return dict(self._targets)

    @property
    def ready(self) -> bool:
        """Every watched device completed one full poll (and discovery ran once)."""
        if self.config.discovery.devices is not None and self._discovered_at is None:
            return False
        return bool(self._targets) and self._targets.keys() <= self._completed

    # --- discovery ------------------------------------------------------------------------

    async def _discover_devices(self) -> None:
        spec = self.config.discovery.devices
        if spec is None:
            return
        now = self._clock()
        if self._discovered_at is not None and now - self._discovered_at < spec.refresh_seconds:
            return
        try:
            devices = await self._client.list_devices(tags=spec.tags, segment=spec.segment)
        except ApiError as exc:
            log.error("discovery_failed", endpoint="devices", reason=str(exc))
            return
        self._discovered = {d.id: Target.discovered(d) for d in devices}
        self._discovered_at = now
        self._apply_targets()
        log.info("devices_discovered", count=len(self._discovered), watched=len(self._targets))

    # --- polling --------------------------------------------------------------------------

    async def run_round(self) -> RoundResult:
        started = time.monotonic()
        await self._discover_devices()
        result = RoundResult()
        queue: asyncio.Queue[Target] = asyncio.Queue()
        for target in self._targets.values():
            queue.put_nowait(target)

        async def worker() -> None:
            while not queue.empty():
                target = queue.get_nowait()
                await self._poll_device(target, result)

        workers = max(1, min(self.config.api.max_concurrency * 2, queue.qsize()))
        await asyncio.gather(*(worker() for _ in range(workers)))
        stale_after = self.config.poll.stale_after_rounds * self.config.poll.interval_seconds
        for device in self._state.expire(stale_after):
            log.warning("device_series_expired", device=device, stale_after_seconds=stale_after)
        self.rounds += 1
        self._metrics.poll_round_seconds = time.monotonic() - started
        self._metrics.touch()
        log.info(
            "poll_round",
            round=self.rounds,
            devices=result.polled,
            succeeded=result.succeeded,
            failed=result.failed,
            batches_fetched=result.batches_fetched,
            batches_skipped=result.batches_skipped,
            seconds=round(self._metrics.poll_round_seconds, 3),
        )
        return result

    async def _poll_device(self, target: Target, result: RoundResult) -> None:
        result.polled += 1
        device = target.device
        try:
            batches = await self._device_batches(target)
            for batch in batches:
                await self._poll_batch(device, batch, result)
        except ApiError as exc:
            result.failed += 1
            self._state.poll_failed(device, exc.reason)
            level = log.error if isinstance(exc, AuthError) else log.warning
            level("device_poll_failed", device=device, endpoint=exc.endpoint, reason=str(exc))
            return
        if device in self._targets:  # a reload may have removed it meanwhile
            result.succeeded += 1
            self._state.poll_succeeded(device)
            self._completed.add(device)

    async def _device_batches(self, target: Target) -> list[Batch]:
        device = target.device
        if target.commands is None:
            spec = self.config.discovery.batches
            batches = await self._client.list_batches(
                device,
                max_items=spec.max_per_device,
                since=self._clock() - spec.max_age_seconds,
            )
            self._state.retain_batches(device, [b.id for b in batches])
            return batches
        progress = self._progress.setdefault(device, _DeviceProgress())
        batches = []
        for command in target.commands:
            if command in progress.dropped_batches:
                continue
            try:
                batches.append(await self._client.get_batch(device, command))
            except NotFoundError:
                await self._batch_not_found(device, command, progress)
        self._state.retain_batches(device, [b.id for b in batches])
        return batches

    async def _batch_not_found(self, device: str, command: str, progress: _DeviceProgress) -> None:
        # Upstream answers 3001 for a missing device and a missing batch alike: one
        # history call tells them apart, and only when a 404 happens.
        await self._client.list_batches(device, max_items=1)
        progress.dropped_batches.add(command)
        self._state.drop_batch(device, command)
        log.warning("batch_not_found", device=device, command=command, action="dropped")

    async def _poll_batch(self, device: str, batch: Batch, result: RoundResult) -> None:
        if not self._state.needs_actions(device, batch):
            self._state.apply_summary(device, batch)
            result.batches_skipped += 1
            return
        try:
            actions = await self._client.list_actions(device, batch.id)
        except NotFoundError:
            self._state.drop_batch(device, batch.id)
            log.warning("batch_not_found", device=device, command=batch.id, action="dropped")
            return
        self._state.apply_actions(device, batch, actions)
        result.batches_fetched += 1

    # --- the loop -------------------------------------------------------------------------

    def _next_delay(self, elapsed: float) -> float:
        interval = self.config.poll.interval_seconds
        jitter = self.config.poll.jitter * interval
        return max(0.0, interval + self._rng.uniform(-jitter, jitter) - elapsed)

    async def run(self, on_round: Callable[[RoundResult], object] | None = None) -> None:
        """Poll rounds until cancelled."""
        while True:
            started = time.monotonic()
            result = await self.run_round()
            if on_round is not None:
                on_round(result)
            self._wake.clear()
            delay = self._next_delay(time.monotonic() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
