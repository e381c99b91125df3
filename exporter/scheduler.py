"""What to poll when: targets from config and discovery, poll rounds, applying results.

Two strategies (``poll.strategy``):

- ``round_robin``: every round polls every watched device: its batches (explicit
  ``commands`` or the command history), then the actions of each batch that can still have
  changed. The client's token bucket spaces the requests out, so with a large fleet a round
  simply takes longer than ``interval_seconds``.
- ``budget`` (default): every round spends at most the requests the budget earned since the
  previous one, on the devices due first by the plan of :mod:`exporter.planner` (never read;
  checked in with pending actions; looks for answers and other check-ins by due time, a
  look two rounds ahead; then the sweep). Only a check-in
  (an OMA-DM session) changes an action, and the device list shows each device's
  ``lastStatusReportTime``: sorted by it, one page names every device that checked in since
  the last look. A pending batch is not read again while its summary stays the same and its
  device has not checked in: a summary counts actions per status, and on the path
  ``Pending -> Awaiting -> final`` equal counts mean nothing moved.

Results go to :class:`FleetState`; the scheduler never renders or serves anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from exporter.client import ApiClient, ApiError, AuthError, NotFoundError, SortRejected
from exporter.config import Config, DeviceConfig, DeviceDiscovery
from exporter.paging import IGNORED
from exporter.planner import (
    CREDIT_ROUNDS,
    Candidate,
    Tracking,
    answer_wait,
    cost,
    due,
    plan,
)
from exporter.records import Batch, Device, until
from exporter.selfmetrics import FULL_LIST, SORTED_LIST, SelfMetrics
from exporter.state import FleetState

log = structlog.get_logger("exporter.scheduler")

BUDGET, ROUND_ROBIN = "budget", "round_robin"
# lastStatusReportTime is written by upstream when a session ends, maybe a little out of
# order: a look at the device list reaches this far behind the newest check-in it knew.
SIGNAL_OVERLAP_SECONDS = 120.0
CHECKIN_SORT = "lastStatusReportTime:desc"
# Where upstream does not honour that sort, the whole device list brings the check-ins, read
# as often as this share of the budget allows (every round on a small fleet); the client
# lets the sorted look try again hourly.
FULL_LIST_SHARE = 0.2
# A configured batch that answered 404 is asked again after this many poll intervals.
DROPPED_RETRY_ROUNDS = 10


@dataclass(frozen=True, slots=True)
class Shard:
    index: int
    total: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``INDEX/TOTAL`` with 0 <= INDEX < TOTAL."""
        index_text, sep, total_text = text.partition("/")
        if not sep or not index_text.isdecimal() or not total_text.isdecimal():
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
    planned: int = 0  # requests the plan expected to spend (budget strategy)
    spent: int = 0  # requests actually sent, retries and extra pages included
    deferred: int = 0  # devices left for a later round by the budget


# --- the scheduler -----------------------------------------------------------------------------


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
        # When the whole (unfiltered) device list was last read for configured devices that
        # discovery does not list: their check-ins and states.
        self._listed_at: float | None = None
        self._shown_by_discovery: set[str] = set()  # watched devices its last list showed
        self._tracking: dict[str, Tracking] = {}
        self._aliases: dict[str, str] = {}  # lower-case id, serial or IMEI -> target key
        self._completed: set[str] = set()
        self._signal_mark: float | None = None  # newest lastStatusReportTime seen
        self._credit = 0.0
        self._credit_at: float | None = None
        self._credit_floor = 2.0
        # The last read of the watched device list (discovery's, or a full look for
        # check-ins): when, on the budget's clock, and what it cost.
        self._full_look_at: float | None = None
        self._full_look_cost: int | None = None
        self._wake = asyncio.Event()
        self.rounds = 0
        self.config = config
        self._apply_targets()

    # --- targets --------------------------------------------------------------------------

    def _owns(self, device: str) -> bool:
        return self._shard is None or self._shard.owns(device)

    def _apply_targets(self) -> None:
        """Merge explicit and discovered devices; watch new ones, unwatch gone ones.

        Shards split the fleet by each device's canonical 24-hex id when discovery knows
        it, so a device configured by serial number or IMEI and also discovered is watched
        by exactly one shard, once. An explicit entry wins (its name, labels and commands
        are what the user asked for).
        """
        canonical: dict[str, str] = {}  # lower-case id, serial or IMEI -> discovered id
        for device_id, target in self._discovered.items():
            canonical[device_id.lower()] = device_id
            for key, value in target.info:
                if key in ("serial", "imei"):
                    canonical.setdefault(value.lower(), device_id)
        wanted: dict[str, Target] = {}
        claimed: set[str] = set()  # discovered ids that a configured entry names
        for device in self.config.devices:
            owner = canonical.get(device.id.lower())
            if owner is not None:
                claimed.add(owner)
            if self._owns(owner or device.id):
                wanted[device.id] = Target.from_config(device)
        for device_id, target in self._discovered.items():
            if device_id not in claimed and self._owns(device_id):
                wanted[device_id] = target
        for device_id in self._targets.keys() - wanted.keys():
            self._state.unwatch(device_id)
            self._tracking.pop(device_id, None)
            self._completed.discard(device_id)
            log.info("device_unwatched", device=device_id)
        for device_id, target in wanted.items():
            previous = self._targets.get(device_id)
            if previous != target:
                self._state.watch(
                    device_id, name=target.name, labels=dict(target.labels), info=dict(target.info)
                )
                if previous is not None and previous.commands != target.commands:
                    self._tracking.pop(device_id, None)
            self._tracking.setdefault(device_id, Tracking())
        self._targets = wanted
        self._aliases = {key.lower(): key for key in wanted}

    def reload(self, config: Config) -> None:
        """Swap the config; unchanged targets keep their state and counters."""
        if config.discovery.devices != self.config.discovery.devices:
            self._discovered_at = None
            self._signal_mark = None
            if config.discovery.devices is None:
                self._discovered = {}
                self._shown_by_discovery = set()
        self._listed_at = None  # configured devices may have changed: look them up now
        self.config = config
        self._apply_targets()
        self._wake.set()

    @property
    def targets(self) -> dict[str, Target]:
        return dict(self._targets)

    @property
    def tracking(self) -> dict[str, Tracking]:
        """Per watched device: what the plan knows (read-only use)."""
        return self._tracking

    @property
    def ready(self) -> bool:
        """Every watched device completed one full poll (and discovery ran once)."""
        if self.config.discovery.devices is not None and self._discovered_at is None:
            return False
        # A shard (or a discovery) may own no device at all: that is a complete round too.
        return self.rounds > 0 and self._targets.keys() <= self._completed

    @property
    def strategy(self) -> str:
        return self.config.poll.strategy

    # --- discovery and check-ins ----------------------------------------------------------

    async def _read_device_lists(self) -> bool:
        """The device lists that are due: discovery's (membership, check-ins for the plan),
        then, for configured devices it does not show, the whole list (their check-ins and
        states), each at least every ``refresh_seconds``. True if discovery's list was read."""
        discovered = await self._discover_devices()
        await self._list_configured()
        return discovered

    async def _discover_devices(self) -> bool:
        """The full device list when membership is due for a refresh; True if it was read."""
        spec = self.config.discovery.devices
        if spec is None:
            return False
        now = self._clock()
        if self._discovered_at is not None and now - self._discovered_at < spec.refresh_seconds:
            return False
        devices = await self._watched_list("discovery_failed", level="error")
        if devices is None:
            return False
        self._discovery(devices, now)
        log.info("devices_discovered", count=len(self._discovered), watched=len(self._targets))
        return True

    def _discovery(self, devices: Sequence[Device], now: float) -> bool:
        """Membership, states and check-ins from the watched device list, whichever read it
        (discovery, or a full look for check-ins); True when the devices discovered moved."""
        spec = self.config.discovery.devices
        assert spec is not None
        discovered = {d.id: Target.discovered(d) for d in devices}
        moved = discovered != self._discovered
        self._discovered, self._discovered_at = discovered, now
        self._apply_targets()
        shown = self._shown_by_discovery = self._note_devices(devices)
        if spec.whole_list:  # a watched device it lacks is not listed at all
            self._note_unlisted(shown)
        return moved

    async def _list_configured(self) -> None:
        """Check-ins and states of configured devices that discovery does not list, from the
        whole device list (⌈N / page_size⌉ requests), at discovery's refresh cadence."""
        spec = self.config.discovery.devices
        if spec is not None and spec.whole_list:
            return  # discovery already reads it
        unlisted = self._configured_only()
        refresh = (spec or DeviceDiscovery()).refresh_seconds
        now = self._clock()
        if not unlisted or (self._listed_at is not None and now - self._listed_at < refresh):
            return
        devices = await self._device_list("device_list_failed")
        if devices is None:
            return
        self._listed_at = now
        # Their check-ins, a refresh old, are not fresh enough for the plan.
        shown = self._note_devices(devices, only=unlisted, plan=False)
        self._note_unlisted(shown, only=unlisted)

    def _configured_only(self) -> set[str]:
        """Watched configured devices that discovery's list does not show."""
        configured = {d.id for d in self.config.devices if d.id in self._targets}
        return configured - self._shown_by_discovery

    async def _read_checkins(self) -> None:
        """Devices that checked in since the last look: one page of the list sorted by
        check-in while upstream honours that sort, else the whole list at the pace
        ``FULL_LIST_SHARE`` of the budget allows (the client has the sorted look tried again
        hourly)."""
        spec = self.config.discovery.devices
        if spec is None or self._signal_mark is None:
            return
        if self._client.worth_sorting_devices() and await self._sorted_look(
            spec.tags, spec.segment
        ):
            return
        self._checkins_from(FULL_LIST)
        last = self._full_look_at
        if last is None or self._client.budget.now() - last >= self._full_look_every():
            now = self._clock()
            devices = await self._watched_list("checkins_unavailable")
            # The list discovery reads: its refresh too (it is not read twice in a row).
            if devices is not None and self._discovery(devices, now):
                log.info("devices_discovered", count=len(self._discovered),
                         watched=len(self._targets))

    async def _sorted_look(self, tags: Sequence[str], segment: int | None) -> bool:
        """The devices that checked in since the mark, newest first; False when upstream
        does not honour the sort (the whole list must tell instead)."""
        assert self._signal_mark is not None
        horizon = self._signal_mark - SIGNAL_OVERLAP_SECONDS

        def older(device: Device) -> bool:
            return device.last_status_report is None or device.last_status_report < horizon

        try:
            devices = await self._client.list_devices(
                tags=tags, segment=segment, sort=CHECKIN_SORT, stop=older
            )
        except SortRejected:
            return False
        except ApiError as exc:
            log.warning("checkins_unavailable", endpoint="devices", reason=str(exc))
            return True
        # Out of order, the list was cut at an arbitrary place: what it showed is true, but
        # not all there is.
        self._note_devices(self._until_now(devices))
        if devices.sort_verdict == IGNORED:
            return False
        self._checkins_from(SORTED_LIST)
        return True

    async def _watched_list(self, failure: str, level: str = "warning") -> list[Device] | None:
        """The device list discovery filters, read by discovery and for check-ins alike:
        either read is a full look, and paces the next one by what it cost (the whole
        organization's list where upstream ignores the filter)."""
        spec = self.config.discovery.devices
        assert spec is not None
        budget = self._client.budget
        spent, self._full_look_at = budget.spent, budget.now()
        devices = await self._device_list(
            failure, tags=spec.tags, segment=spec.segment, level=level
        )
        self._full_look_cost = max(1, budget.spent - spent)
        return devices

    async def _device_list(
        self,
        failure: str,
        *,
        tags: Sequence[str] = (),
        segment: int | None = None,
        level: str = "warning",
    ) -> list[Device] | None:
        """The whole device list (filtered), its timestamps from the future dropped; None
        (and ``failure`` logged at ``level``) when it could not be read."""
        try:
            devices = await self._client.list_devices(tags=tags, segment=segment)
        except ApiError as exc:
            # Looked up now: a logger method bound at import would keep structlog's
            # defaults and miss the configured format and level.
            getattr(log, level)(failure, endpoint="devices", reason=str(exc))
            return None
        return self._until_now(devices)

    def _full_look_every(self) -> float:
        """Seconds between two full looks: what the last one cost (⌈N / page_size⌉ requests
        before any), within FULL_LIST_SHARE of the budget, never more often than every
        round."""
        pages = self._full_look_cost or max(
            1, math.ceil(len(self._discovered) / self.config.api.page_size)
        )
        rate = max(1e-9, self._client.budget.effective_rate_per_hour)
        return max(self.config.poll.interval_seconds, pages * 3600 / (FULL_LIST_SHARE * rate))

    def _checkins_from(self, source: str) -> None:
        """Switch the source of check-ins, saying so once per change."""
        if source != self._metrics.checkin_source:
            (log.info if source == SORTED_LIST else log.warning)(
                "checkin_source", source=source,
                every_seconds=None if source == SORTED_LIST else round(self._full_look_every()),
            )
            self._metrics.checkin_source = source
            self._metrics.touch()

    def _until_now(self, devices: Sequence[Device]) -> list[Device]:
        limit = self._state.future_limit()
        return [until(device, limit) for device in devices]

    def _note_devices(
        self, devices: Sequence[Device], *, only: set[str] | None = None, plan: bool = True
    ) -> set[str]:
        """What a device list shows of the watched devices (of ``only``, when given): their
        state, check-in and document problems to the state, with ``plan`` their check-ins to
        the plan too. Returns the watched devices it showed."""
        shown: set[str] = set()
        for device in devices:
            moment = device.last_status_report
            if plan and moment is not None and (
                self._signal_mark is None or moment > self._signal_mark
            ):
                self._signal_mark = moment
            key = self._key_of(device)
            if key is None or (only is not None and key not in only):
                continue
            shown.add(key)
            self._state.device_problems(key, device.problems)
            self._state.device_listed(key, state=device.state or "UNKNOWN", check_in=moment)
            tracking = self._tracking.get(key)
            if plan and tracking is not None and moment is not None:
                tracking.saw_checkin(moment)
        return shown

    def _note_unlisted(self, shown: set[str], only: set[str] | None = None) -> None:
        """Watched devices (of ``only``) that a whole device list did not show."""
        for key in (self._targets.keys() if only is None else only) - shown:
            self._state.device_listed(key, state=None, check_in=None)

    def _key_of(self, device: Device) -> str | None:
        for ident in (device.id, device.serial, device.imei):
            if ident:
                key = self._aliases.get(ident.lower())
                if key is not None:
                    return key
        return None

    # --- the budget ----------------------------------------------------------------------

    def _accrue(self) -> float:
        """Credit earned since the last round at the client's current (maybe throttled) rate.

        Measured on the bucket's clock, not on ``clock`` (upstream's time line, for check-ins):
        the rate is per hour of the bucket's clock, and upstream's may run at another pace
        (the demo's simulator runs 30x) or stand still, which would starve the plan.
        """
        budget = self._client.budget
        now = budget.now()
        rate = budget.effective_rate_per_hour
        per_round = rate * self.config.poll.interval_seconds / 3600
        if self._credit_at is None:
            self._credit = per_round
        else:
            self._credit += rate * max(0.0, now - self._credit_at) / 3600
        self._credit = min(self._credit, max(self._credit_floor, per_round * CREDIT_ROUNDS))
        self._credit_at = now
        return self._credit

    # --- polling --------------------------------------------------------------------------

    async def run_round(self) -> RoundResult:
        started = time.monotonic()
        spent_before = self._client.budget.spent
        result = RoundResult()
        if self.strategy == ROUND_ROBIN:
            await self._read_device_lists()
            await self._poll_all(list(self._targets.values()), result)
        else:
            await self._budget_round(result)
        result.spent = self._client.budget.spent - spent_before
        if self.strategy != ROUND_ROBIN:
            self._credit -= result.spent
        stale_after = self.config.poll.stale_after_rounds * self.config.poll.interval_seconds
        for device in self._state.expire(stale_after):
            log.warning("device_series_expired", device=device, stale_after_seconds=stale_after)
        self._state.prune_ledger()
        self.rounds += 1
        self._metrics.poll_round_seconds = time.monotonic() - started
        self._metrics.requests_planned = result.planned
        self._metrics.touch()
        log.info(
            "poll_round",
            round=self.rounds,
            strategy=self.strategy,
            devices=result.polled,
            succeeded=result.succeeded,
            failed=result.failed,
            deferred=result.deferred,
            batches_fetched=result.batches_fetched,
            batches_skipped=result.batches_skipped,
            requests_planned=result.planned,
            requests_spent=result.spent,
            seconds=round(self._metrics.poll_round_seconds, 3),
        )
        return result

    async def _budget_round(self, result: RoundResult) -> None:
        credit = self._accrue()
        spent = self._client.budget.spent
        if not await self._read_device_lists():
            await self._read_checkins()
        looked = self._client.budget.spent - spent
        credit -= looked
        now = self._clock()
        wait = answer_wait(self._state.latency().values())
        candidates = [
            Candidate(
                device,
                due(self._tracking[device], now, answer_seconds=wait),
                cost(self._tracking[device], target.commands),
            )
            for device, target in self._targets.items()
        ]
        # Credit piles up to the dearest device after this round's look at the device list,
        # so that one is not deferred for ever.
        self._credit_floor = looked + max((c.cost for c in candidates), default=1)
        chosen, planned = plan(
            candidates, math.floor(credit), self.config.poll.interval_seconds
        )
        result.planned = planned + looked
        result.deferred = len(self._targets) - len(chosen)
        await self._poll_all([self._targets[d] for d in chosen], result)

    async def _poll_all(self, targets: Sequence[Target], result: RoundResult) -> None:
        """Poll ``targets`` with bounded concurrency; every worker ends with the round."""
        queue = list(reversed(targets))

        async def worker() -> None:
            while queue:
                await self._poll_device(queue.pop(), result)

        async with asyncio.TaskGroup() as group:
            for _ in range(max(1, min(self.config.api.max_concurrency * 2, len(queue)))):
                group.create_task(worker())

    async def _poll_device(self, target: Target, result: RoundResult) -> None:
        """One device's read; whatever goes wrong is that device's failure, not the round's."""
        result.polled += 1
        device = target.device
        tracking = self._tracking.setdefault(device, Tracking())
        read_at, checkin = self._clock(), tracking.checkin
        try:
            batches = await self._device_batches(target, tracking)
            for batch in sorted(batches, key=_pending_first):
                await self._poll_batch(device, batch, tracking, result)
        except Exception as exc:
            result.failed += 1
            self._state.poll_failed(device, self._failure_reason(device, exc))
            return
        if device in self._targets:  # a reload may have removed it meanwhile
            result.succeeded += 1
            self._state.poll_succeeded(device)
            self._completed.add(device)
            tracking.read_at, tracking.checkin_read = read_at, checkin
            tracking.pending = sum(1 for b in batches if not b.finished)
            current = {b.id for b in batches}
            for gone in tracking.summaries.keys() - current:
                del tracking.summaries[gone]

    def _failure_reason(self, device: str, exc: Exception) -> str:
        """Log why a device read failed (from an ``except`` block); the reason it shows."""
        if isinstance(exc, ApiError):
            level = log.error if isinstance(exc, AuthError) else log.warning
            level("device_poll_failed", device=device, endpoint=exc.endpoint, reason=str(exc))
            return exc.reason
        # A bug or an input nobody foresaw: the device shows down with the reason, the
        # other devices of the round go on.
        self._metrics.poll_failed("device")
        log.exception("device_poll_crashed", device=device)
        return f"internal error ({type(exc).__name__})"

    async def _device_batches(self, target: Target, tracking: Tracking) -> list[Batch]:
        device = target.device
        limit = self._state.future_limit()
        if target.commands is None:
            spec = self.config.discovery.batches
            batches = await self._client.list_batches(
                device,
                max_items=spec.max_per_device,
                since=self._clock() - spec.max_age_seconds,
            )
        else:
            batches = await self._configured_batches(device, target.commands, tracking)
        batches = [until(batch, limit) for batch in batches]
        self._state.retain_batches(device, [b.id for b in batches])
        return batches

    async def _configured_batches(
        self, device: str, commands: Sequence[str], tracking: Tracking
    ) -> list[Batch]:
        now = self._clock()
        retry_after = DROPPED_RETRY_ROUNDS * self.config.poll.interval_seconds
        batches = []
        for command in commands:
            dropped_at = tracking.dropped.get(command)
            if dropped_at is not None and now - dropped_at < retry_after:
                continue
            try:
                batches.append(await self._client.get_batch(device, command))
            except NotFoundError:
                await self._batch_not_found(device, command, tracking)
                continue
            if tracking.dropped.pop(command, None) is not None:
                log.info("batch_found_again", device=device, command=command)
        return batches

    async def _batch_not_found(self, device: str, command: str, tracking: Tracking) -> None:
        # Upstream answers 3001 for a missing device and a missing batch alike: one
        # history call tells them apart, and only when a 404 happens.
        await self._client.list_batches(device, max_items=1)
        if command not in tracking.dropped:
            log.warning("batch_not_found", device=device, command=command, action="dropped")
        tracking.dropped[command] = self._clock()
        self._state.drop_batch(device, command)

    def _unchanged(self, device: str, tracking: Tracking, batch: Batch) -> bool:
        """A pending batch that cannot have changed since its actions were read.

        Two independent witnesses must agree: the summary is the same, and the device list
        shows no check-in since. Either alone would do in theory; together they survive an
        upstream whose summaries or check-in times lag (neither is documented as exact).
        Without check-in times (no device discovery) the actions are read again.
        """
        if self.strategy == ROUND_ROBIN or batch.summary is None or tracking.checkin is None:
            return False
        if tracking.checked_in or tracking.summaries.get(batch.id) != batch.summary:
            return False
        # The last list must also have matched that summary: a short or stale one did not.
        return self._state.agrees(device, batch)

    async def _poll_batch(
        self, device: str, batch: Batch, tracking: Tracking, result: RoundResult
    ) -> None:
        """Apply one batch: its summary, or its actions when they may have moved."""
        if not self._state.needs_actions(device, batch) or self._unchanged(device, tracking, batch):
            self._state.apply_summary(device, batch)
            result.batches_skipped += 1
            return
        try:
            actions = await self._client.list_actions(device, batch.id)
        except NotFoundError:
            self._state.drop_batch(device, batch.id)
            tracking.summaries.pop(batch.id, None)
            log.warning("batch_not_found", device=device, command=batch.id, action="dropped")
            return
        limit = self._state.future_limit()
        self._state.apply_actions(device, batch, [until(a, limit) for a in actions])
        result.batches_fetched += 1
        if batch.finished or batch.summary is None:
            tracking.summaries.pop(batch.id, None)
        else:
            tracking.summaries[batch.id] = batch.summary

    # --- the loop -------------------------------------------------------------------------

    def _next_delay(self, elapsed: float) -> float:
        interval = self.config.poll.interval_seconds
        jitter = self.config.poll.jitter * interval
        return max(0.0, interval + self._rng.uniform(-jitter, jitter) - elapsed)

    async def run(self, on_round: Callable[[RoundResult], object] | None = None) -> None:
        """Poll rounds until cancelled."""
        while True:
            started = time.monotonic()
            # Cleared before the round, not after: a reload that lands during the round
            # wakes the next one at once instead of being forgotten.
            self._wake.clear()
            self._metrics.poll_rounds += 1
            try:
                result = await self.run_round()
            except Exception:
                # A bug must not end polling silently: count it, say so and try again next
                # round, while /metrics keeps serving the last good values.
                self._metrics.poll_failed("round")
                log.exception("poll_round_crashed")
            else:
                if on_round is not None:
                    on_round(result)
            delay = self._next_delay(time.monotonic() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)


def _pending_first(batch: Batch) -> bool:
    return batch.finished
