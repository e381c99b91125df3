"""FleetState: applies what a poll read to the ledger and the view.

The scheduler applies poll results here; exposition.py and the landing page read the view
and the counters through it. No I/O: the only notion of time is the injected clocks.

- ``ledger.py``: per action, what it has entered: the single source of exactly-once truth.
- ``fleetview.py``: what is exported per device and batch.
- ``counters.py``: what the ledger counted (transitions, latency, setting results).

A batch read goes to both: its actions enter the ledger (which counts what is new), and its
counts replace the batch's view (which says what is there now).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence

from exporter.counters import CLASSES, MAX_SETTINGS, FleetCounters
from exporter.devicehealth import NO_HEALTH, DeviceHealth
from exporter.fleetview import (
    DEVICE_STATES,
    EMPTY,
    BatchState,
    BatchView,
    DeviceGenerations,
    DeviceView,
    FleetView,
)
from exporter.histogram import Histogram
from exporter.ledger import Ledger, ledger_retention
from exporter.records import FUTURE_SLACK_SECONDS, SCHEMA, Action, Batch
from exporter.selfmetrics import SelfMetrics
from exporter.statuses import MAX_UNKNOWN_STATUSES, StatusTable

__all__ = [
    "CLASSES",
    "DEVICE_STATES",
    "MAX_SETTINGS",
    "MAX_UNKNOWN_STATUSES",
    "BatchView",
    "DeviceGenerations",
    "DeviceView",
    "FleetState",
    "ledger_retention",
]


class FleetState:
    def __init__(
        self,
        *,
        organization: str,
        latency_buckets: Sequence[float],
        metrics: SelfMetrics,
        clock: Callable[[], float] = time.time,
        wall_clock: Callable[[], float] | None = None,
        ledger_retention_seconds: float = ledger_retention(7 * 86400.0),
    ) -> None:
        """``clock`` is the upstream's time line (watermarks are compared with upstream
        timestamps); ``wall_clock`` dates polls and staleness. They differ only when the
        upstream runs in accelerated time (the simulator). A ledger entry is kept until its
        batch has not been seen for ``ledger_retention_seconds`` (on ``clock``)."""
        self.organization = organization
        self.metrics = metrics
        self._clock = clock
        statuses = StatusTable()
        self.counters = FleetCounters(statuses, latency_buckets)
        self.ledger = Ledger(
            statuses, self.counters, metrics.parse_problem, ledger_retention_seconds
        )
        self.view = FleetView(statuses, wall_clock or clock)

    @property
    def generation(self) -> int:
        return self.view.generation

    @property
    def counters_generation(self) -> int:
        """Moves whenever a counter does."""
        return self.counters.events

    @property
    def latency_buckets(self) -> tuple[float, ...]:
        return self.counters.latency_buckets

    @property
    def ledger_retention_seconds(self) -> float:
        return self.ledger.retention_seconds

    @ledger_retention_seconds.setter
    def ledger_retention_seconds(self, seconds: float) -> None:
        self.ledger.retention_seconds = seconds

    def now(self) -> float:
        """The upstream's time line (check-ins and batch times are on it)."""
        return self._clock()

    def future_limit(self) -> float:
        """Upstream timestamps after this are not moments but garbage: the reader treats
        them as missing (records.until)."""
        return self.now() + FUTURE_SLACK_SECONDS

    # --- watched devices ---------------------------------------------------------------------

    def watch(
        self,
        device: str,
        *,
        name: str | None = None,
        labels: Mapping[str, str] = EMPTY,
        info: Mapping[str, str] = EMPTY,
    ) -> None:
        self.view.watch(device, self._clock(), name=name, labels=labels, info=info)

    def device_problems(self, device: str, kinds: frozenset[str]) -> None:
        """Problems of a watched device's document in the device list, each kind once."""
        dev = self.view.devices.get(device)
        if dev is not None and kinds:
            counted = self.ledger.count_problems(kinds, dev.problems)
            if counted is not dev.problems:
                dev.problems = counted
                self.view.note(device)

    def device_listed(
        self, device: str, *, state: str | None, check_in: float | None,
        health: DeviceHealth = NO_HEALTH,
    ) -> None:
        """What the device list shows of a watched device: its state (``None``: not listed),
        its last check-in (the newest seen is kept: a lagging replica cannot undo it), and its
        compliance and OS version (unknown while not listed)."""
        self.view.listed(device, state=state, check_in=check_in, health=health)

    def unwatch(self, device: str) -> None:
        """Stop exporting the device; its ledger stays until pruned by age."""
        self.view.unwatch(device)

    def watched(self) -> list[str]:
        return list(self.view.devices)

    def device_states(self) -> dict[str, int]:
        return self.view.device_states()

    def device_health(self) -> tuple[dict[str, int], dict[str, int]]:
        """Watched devices per compliance value and per OS version (bounded)."""
        return self.view.compliance(), self.view.os_versions()

    def poll_succeeded(self, device: str) -> None:
        self.view.poll_succeeded(device)

    def poll_failed(self, device: str, reason: str) -> None:
        self.view.poll_failed(device, reason)

    def expire(self, stale_after_seconds: float) -> list[str]:
        return self.view.expire(stale_after_seconds)

    def retain_batches(self, device: str, batch_ids: Collection[str]) -> None:
        self.view.retain_batches(device, batch_ids)

    def drop_batch(self, device: str, batch_id: str) -> None:
        self.view.drop_batch(device, batch_id)

    def prune_ledger(self) -> int:
        """Forget ledger entries not seen for the retention period; how many went."""
        return self.ledger.prune(self._clock(), self.view.devices.__contains__)

    # --- applying a poll ---------------------------------------------------------------------

    def needs_actions(self, device: str, batch: Batch) -> bool:
        dev = self.view.devices.get(device)
        if dev is None:
            return False
        known = dev.batches.get(batch.id)
        if known is None:
            # A summary that did not decode cleanly cannot vouch for the batch: its actions
            # are read once, and the action list is the truth from then on.
            threshold = self.ledger.threshold(device, dev.watermark, batch.created_at)
            history = (
                batch.finished
                and batch.updated_at is not None
                and batch.updated_at <= threshold
                and SCHEMA not in batch.problems
            )
            return not history
        # Our own view must be finished too, and agree with the summary: a summary can run
        # ahead of the action list, and a list can be briefly short or stale.
        settled = not self.view.has_pending(known.counts)
        return not (batch.finished and settled and _agrees(known, batch))

    def agrees(self, device: str, batch: Batch) -> bool:
        """The exported view of ``batch`` matches its summary (an action list with the same
        counts per status, or that summary itself): nothing was missed or read stale."""
        known = self.view.batch(device, batch.id)
        return known is not None and _agrees(known, batch)

    def _batch_state(self, device: str, batch: Batch) -> tuple[BatchState, tuple[object, ...]]:
        """The view of ``batch`` (created on first sight) with its name and creation time
        brought up to date, and what it exported before."""
        batches = self.view.devices[device].batches
        known = batches.get(batch.id)
        if known is None:
            known = batches[batch.id] = BatchState()
        before = known.kept()
        if batch.name is not None:
            known.name = batch.name
        if batch.created_at is not None:
            known.created_at = batch.created_at
        return known, before

    def apply_summary(self, device: str, batch: Batch) -> None:
        if device not in self.view.devices:
            return
        self.ledger.entry(device, batch, self._clock())
        known, before = self._batch_state(device, batch)
        # Counts from actions are the truth; the summary only stands in for them when no
        # action list was applied, or when it disagrees with the one that was.
        if not known.from_actions or batch.summary != known.summary:
            known.counts = self.view.summary_counts(batch.summary or ())
            # A summary standing in for a list it contradicts vouches for nothing: read again.
            known.agrees = not known.from_actions
            pending = self.view.has_pending(known.counts)
            known.oldest_pending = known.created_at if pending else None
        if batch.summary is not None:
            known.summary = batch.summary
        self.view.batch_changed(device, before, known)

    def apply_actions(self, device: str, batch: Batch, actions: Sequence[Action]) -> None:
        dev = self.view.devices.get(device)
        if dev is None:
            return
        entry = self.ledger.entry(device, batch, self._clock())
        known, before = self._batch_state(device, batch)
        events_before = self.counters.events
        threshold = self.ledger.threshold(device, dev.watermark, known.created_at)
        # One copy per action, the later one (a shifted page that repeats an action shows the
        # newer copy last), in the order the ledger has always taken them: from the end
        # (new settings are admitted under their bound in that order).
        latest: dict[str, Action] = {}
        for action in reversed(actions):
            latest.setdefault(action.cmd_id, action)
        unique = list(latest.values())
        self.ledger.record((device, batch.id), entry, threshold, known.created_at, unique)
        known.counts, known.oldest_pending = self.view.list_counts(unique, known.created_at)
        known.summary, known.from_actions = batch.summary, True
        # Judged once per list, not on every round that finds the summary unchanged.
        known.agrees = batch.summary is not None and known.counts == self.view.summary_counts(
            batch.summary
        )
        if self.counters.events != events_before:
            self.view.bump()  # a counter moved with no exported count (a latency): render
        self.view.batch_changed(device, before, known)

    # --- reads -------------------------------------------------------------------------------

    def device_generations(self, device: str) -> DeviceGenerations:
        return self.view.devices[device].generations

    def device_view(self, device: str, *, with_batches: bool = True) -> DeviceView:
        return self.view.device_view(device, with_batches=with_batches)

    def transitions(self) -> list[tuple[str, str, int]]:
        return self.counters.transitions()

    def latency(self) -> Mapping[str, Histogram]:
        return self.counters.latency()

    def setting_results(self) -> list[tuple[str, str, str, int]]:
        return self.counters.setting_results()

    def entered(self, device: str, batch_id: str, cmd_id: str) -> frozenset[str]:
        """The statuses the ledger holds for one action (for tests and the soak's checks)."""
        return self.ledger.entered(device, batch_id, cmd_id)

    def tracked_actions(self) -> int:
        return self.ledger.tracked_actions()


def _agrees(known: BatchState, batch: Batch) -> bool:
    """``known`` agreed with the summary it was read with, and ``batch`` still has it."""
    return known.agrees and batch.summary is not None and batch.summary == known.summary
