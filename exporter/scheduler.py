"""Poll rounds: what to read when, and the results applied to the state.

A ``budget`` round (``poll.strategy``, the default), top-down:

1. **credit**: the requests the budget earned since the previous round (:class:`Credit`);
2. **device lists**: the reads of :mod:`exporter.devicelists` that are due. Discovery's full
   list brings membership (applied to :class:`~exporter.targets.Watchlist`), states and
   check-ins; otherwise the sorted list names the devices that checked in since the last
   look. Only a check-in (an OMA-DM session) changes an action;
3. **plan**: :mod:`exporter.planner` takes the devices due first (never read; checked in
   with pending actions; looks for answers and other check-ins by due time, a look two
   rounds ahead; then the sweep) while the credit left after the lists lasts;
4. **reads**: each chosen device's batches (explicit ``commands`` or the command history),
   then the actions of each batch that can still have changed. A pending batch is not read
   again while its summary stays the same and its device has not checked in: a summary
   counts actions per status, and on the path ``Pending -> Awaiting -> final`` equal counts
   mean nothing moved;
5. **state**: every result goes to :class:`FleetState`.

``round_robin`` (the naive baseline) skips the check-ins and the plan: every round reads
every watched device, and the client's token bucket spaces the requests out, so with a large
fleet a round simply takes longer than ``interval_seconds``. The scheduler never renders or
serves anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from exporter.client import ApiClient, ApiError, AuthError, NotFoundError
from exporter.config import Config
from exporter.devicelists import DeviceLists, Listed
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
from exporter.selfmetrics import SelfMetrics
from exporter.state import FleetState
from exporter.targets import Changes, Shard, Target, Watchlist

__all__ = ["BUDGET", "ROUND_ROBIN", "RoundResult", "Scheduler"]

log = structlog.get_logger("exporter.scheduler")

BUDGET, ROUND_ROBIN = "budget", "round_robin"
# A configured batch that answered 404 is asked again after this many poll intervals.
DROPPED_RETRY_ROUNDS = 10


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


@dataclass(slots=True)
class Credit:
    """Requests the budget earned that no round has spent yet.

    Measured on the bucket's clock, not on upstream's time line (check-ins): the rate is per
    hour of the bucket's clock, and upstream's may run at another pace (the demo's simulator
    runs 30x) or stand still, which would starve the plan.
    """

    balance: float = 0.0
    earned_at: float | None = None  # the bucket's clock at the last accrual
    # Credit piles up to at least this (the dearest device plus the round's device lists),
    # so that device is not deferred for ever.
    floor: float = 2.0

    def accrue(self, now: float, rate_per_hour: float, interval: float) -> float:
        """Add what ``rate_per_hour`` (the client's current, maybe throttled rate) earned
        since the last round, up to ``CREDIT_ROUNDS`` rounds' worth; the balance."""
        per_round = rate_per_hour * interval / 3600
        if self.earned_at is None:
            self.balance = per_round
        else:
            self.balance += rate_per_hour * max(0.0, now - self.earned_at) / 3600
        self.balance = min(self.balance, max(self.floor, per_round * CREDIT_ROUNDS))
        self.earned_at = now
        return self.balance

    def spend(self, requests: int) -> None:
        self.balance -= requests


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
        self._clock = clock
        self._rng = rng or random.Random()
        self._lists = DeviceLists(
            config, client, metrics, clock=clock, future_limit=state.future_limit
        )
        self._watchlist = Watchlist(shard)
        self._tracking: dict[str, Tracking] = {}
        self._completed: set[str] = set()
        self._credit = Credit()
        self._restored: set[str] = set()  # restored devices no target names (yet)
        self._wake = asyncio.Event()
        self.rounds = 0
        self.config = config
        self._watch(self._watchlist.reconfigure(
            config.devices, discovering=config.discovery.devices is not None
        ))

    def reload(self, config: Config) -> None:
        """Swap the config; unchanged targets keep their state and counters."""
        self._lists.reconfigure(config)
        self.config = config
        self._watch(self._watchlist.reconfigure(
            config.devices, discovering=config.discovery.devices is not None
        ))
        self._wake.set()

    def adopt_restored(self) -> None:
        """After the store brought a fleet back: the targets take their current names and
        labels, and a restored device no target names leaves: at once without discovery,
        else at discovery's first read unless it lists the device again."""
        targets = self._watchlist.targets
        self._watch(Changes(changed=tuple((t, t) for t in targets.values())))
        self._restored = set(self._state.watched()) - targets.keys()
        if self.config.discovery.devices is None:
            self._drop_restored()

    def _drop_restored(self) -> None:
        gone = self._restored - self._watchlist.targets.keys()
        self._restored = set()
        self._watch(Changes(unwatched=tuple(sorted(gone))))

    @property
    def targets(self) -> dict[str, Target]:
        return dict(self._watchlist.targets)

    @property
    def tracking(self) -> dict[str, Tracking]:
        """Per watched device: what the plan knows (read-only use)."""
        return self._tracking

    @property
    def ready(self) -> bool:
        """Every watched device completed one full poll (and discovery ran once)."""
        if not self._lists.ready:
            return False
        # A shard (or a discovery) may own no device at all: that is a complete round too.
        return self.rounds > 0 and self._watchlist.targets.keys() <= self._completed

    @property
    def strategy(self) -> str:
        return self.config.poll.strategy

    # --- a round: credit, device lists, plan, reads, state --------------------------------

    async def run_round(self) -> RoundResult:
        started = time.monotonic()
        spent_before = self._client.budget.spent
        result = RoundResult()
        if self.strategy == ROUND_ROBIN:
            await self._read_device_lists(checkins=False)
            await self._poll_all(list(self._watchlist.targets.values()), result)
        else:
            await self._budget_round(result)
        result.spent = self._client.budget.spent - spent_before
        if self.strategy != ROUND_ROBIN:
            self._credit.spend(result.spent)
        self._end_round(result, started)
        return result

    async def _budget_round(self, result: RoundResult) -> None:
        """The credit earned, the device lists that are due, the plan within what is left,
        then the reads it chose."""
        budget = self._client.budget
        interval = self.config.poll.interval_seconds
        credit = self._credit.accrue(budget.now(), budget.effective_rate_per_hour, interval)
        spent = budget.spent
        await self._read_device_lists(checkins=True)
        looked = budget.spent - spent
        candidates = self._candidates()
        self._credit.floor = looked + max((c.cost for c in candidates), default=1)
        chosen, planned = plan(candidates, math.floor(credit - looked), interval)
        result.planned = planned + looked
        targets = self._watchlist.targets
        result.deferred = len(targets) - len(chosen)
        await self._poll_all([targets[d] for d in chosen], result)

    # --- device lists ---------------------------------------------------------------------

    async def _read_device_lists(self, *, checkins: bool) -> None:
        """The device lists that are due: discovery's full list when membership is, then the
        whole list for configured devices it does not show; else, with ``checkins``, the
        devices that checked in since the last look."""
        refreshed = await self._lists.refresh()
        if refreshed is not None:
            self._apply_list(refreshed)
        unlisted = self._watchlist.configured_only()
        devices = await self._lists.look_up(unlisted)
        if devices is not None:
            # Their check-ins, a refresh old, are not fresh enough for the plan.
            shown = self._note_devices(devices, only=unlisted, plan=False)
            self._note_unlisted(shown, only=unlisted)
        if checkins and refreshed is None:
            for listed in await self._lists.checkins():
                self._apply_list(listed)

    def _apply_list(self, listed: Listed) -> None:
        """What a read of the watched list showed: membership (full list), then states and
        check-ins of the watched devices."""
        if listed.full and self.config.discovery.devices is not None:
            changes = self._watchlist.discover(listed.devices)
            self._watch(changes)
            if self._restored:
                self._drop_restored()
            if listed.refresh or changes.discovered_moved:
                log.info("devices_discovered", count=self._watchlist.discovered_count,
                         watched=len(self._watchlist.targets))
        shown = self._note_devices(listed.devices)
        if listed.full and listed.unfiltered:  # a watched device it lacks is not listed
            self._note_unlisted(shown)

    def _watch(self, changes: Changes) -> None:
        """Apply a change of the watched devices to the state and the plan."""
        for device in changes.unwatched:
            self._state.unwatch(device)
            self._tracking.pop(device, None)
            self._completed.discard(device)
            log.info("device_unwatched", device=device)
        for target, previous in changes.changed:
            self._state.watch(
                target.device, name=target.name, labels=dict(target.labels),
                info=dict(target.info),
            )
            if previous is not None and previous.commands != target.commands:
                self._tracking.pop(target.device, None)
        for device in self._watchlist.targets:
            self._tracking.setdefault(device, Tracking())

    def _note_devices(
        self, devices: Sequence[Device], *, only: set[str] | None = None, plan: bool = True
    ) -> set[str]:
        """What a device list shows of the watched devices (of ``only``, when given): their
        state, check-in and document problems to the state, with ``plan`` their check-ins to
        the plan too. Returns the watched devices it showed."""
        shown: set[str] = set()
        for device in devices:
            key = self._watchlist.key_of(device)
            if key is None or (only is not None and key not in only):
                continue
            shown.add(key)
            moment = device.last_status_report
            self._state.device_problems(key, device.problems)
            self._state.device_listed(
                key, state=device.state or "UNKNOWN", check_in=moment, health=device.health
            )
            tracking = self._tracking.get(key)
            if plan and tracking is not None and moment is not None:
                tracking.saw_checkin(moment)
        return shown

    def _note_unlisted(self, shown: set[str], only: set[str] | None = None) -> None:
        """Watched devices (of ``only``) that a whole device list did not show."""
        watched = self._watchlist.targets.keys()
        for key in (watched if only is None else only) - shown:
            self._state.device_listed(key, state=None, check_in=None)

    # --- plan -----------------------------------------------------------------------------

    def _candidates(self) -> list[Candidate]:
        """Every watched device, when it is due and why, and what its read will cost."""
        now = self._clock()
        wait = answer_wait(self._state.latency().values())
        return [
            Candidate(
                device,
                due(self._tracking[device], now, answer_seconds=wait),
                cost(self._tracking[device], target.commands),
            )
            for device, target in self._watchlist.targets.items()
        ]

    # --- reads ----------------------------------------------------------------------------

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
        device = target.device
        tracking = self._tracking.get(device)
        if tracking is None:  # unwatched by a reload while the round ran: nothing to keep
            return
        result.polled += 1
        read_at, checkin = self._clock(), tracking.checkin
        try:
            batches = await self._device_batches(target, tracking)
            for batch in sorted(batches, key=_pending_first):
                await self._poll_batch(device, batch, tracking, result)
        except Exception as exc:
            result.failed += 1
            self._state.poll_failed(device, self._failure_reason(device, exc))
            return
        if device in self._watchlist.targets:  # a reload may have removed it meanwhile
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
            # A refused token fails every device every round: the client logs it once when it
            # begins and once when it ends (api_unauthorized, api_token_invalid), not here.
            level = log.debug if isinstance(exc, AuthError) else log.warning
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

    # --- end of the round -----------------------------------------------------------------


    def _end_round(self, result: RoundResult, started: float) -> None:
        """Expire stale series, prune the ledger, count the round (``started`` on the
        monotonic clock) and say what it did."""
        stale_after = self.config.poll.stale_after_rounds * self.config.poll.interval_seconds
        for device in self._state.expire(stale_after):
            log.warning("device_series_expired", device=device, stale_after_seconds=stale_after)
        self._state.prune_ledger()
        self.rounds += 1
        seconds = self._metrics.poll_round_seconds = time.monotonic() - started
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
            seconds=round(seconds, 3),
        )

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
