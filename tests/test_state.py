"""FleetState: gauges, exactly-once transitions and latencies, device lifecycle.

Inputs are decoded by records.py from upstream-shaped JSON; every expectation is written out
by hand from the story the test tells (the events an action went through), never taken from
the state under test.
"""

from __future__ import annotations

import gc
import random
import tracemalloc
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest

from exporter.records import Action, Batch, decode_action, decode_batch
from exporter.selfmetrics import SelfMetrics
from exporter.state import DEVICE_STATES, FleetState

DEVICE = "65f0c0ffee65f0c0ffee0001"
BATCH = "65f0c0ffee65f0c0ffee1001"
OTHER_BATCH = "65f0c0ffee65f0c0ffee1002"
BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)
START = 1_760_000_000.0  # the moment the device is watched (its watermark)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z")


def action(
    cmd: str,
    status: str,
    *,
    sent: float | None = None,
    received: float | None = None,
    canceled: float | None = None,
    **raw: Any,
) -> Action:
    body = {"cmdId": cmd, "status": status, "sentAt": iso(sent), "receivedAt": iso(received)}
    body["canceledAt"] = iso(canceled)
    body.update(raw)
    decoded = decode_action(body)
    assert decoded is not None
    return decoded


def batch(
    summary: dict[str, int] | None = None,
    *,
    batch_id: str = BATCH,
    created: float | None = START + 10,
    updated: float | None = None,
    name: str | None = "Store policy",
    **raw: Any,
) -> Batch:
    body: dict[str, Any] = {"id": batch_id, "name": name, "createdAt": iso(created)}
    body["updatedAt"] = iso(updated)
    if summary is not None:
        body["summary"] = [{"status": s, "count": n} for s, n in summary.items()]
    body.update(raw)
    decoded = decode_batch(body)
    assert decoded is not None
    return decoded


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
def metrics() -> SelfMetrics:
    return SelfMetrics()


@pytest.fixture
def state(clock: Clock, metrics: SelfMetrics) -> FleetState:
    fleet = FleetState(organization="acme", latency_buckets=BUCKETS, metrics=metrics, clock=clock)
    fleet.watch(DEVICE, name="reception-pc", labels={"site": "madrid"})
    clock.now = START + 60
    return fleet


def transitions(state: FleetState) -> dict[str, int]:
    return {status: n for status, _, n in state.transitions() if n}


def latencies(state: FleetState) -> dict[str, tuple[int, float]]:
    return {c: (h.count, h.sum) for c, h in state.latency().items() if h.count}


def gauges(state: FleetState, device: str = DEVICE) -> dict[str, dict[str, int]]:
    view = state.device_view(device)
    return {b.id: {status: n for status, _, n in b.counts} for b in view.batches}


# --- first sight and history ------------------------------------------------------------


def test_restart_with_history_counts_nothing_but_shows_gauges(state: FleetState) -> None:
    # Everything happened before the exporter started watching.
    old = batch({"Acknowledged": 1, "Awaiting": 1}, created=START - 900)
    state.apply_actions(
        DEVICE,
        old,
        [
            action("1", "Acknowledged", sent=START - 800, received=START - 700),
            action("2", "Awaiting", sent=START - 800),
        ],
    )
    assert transitions(state) == {}
    assert latencies(state) == {}
    assert gauges(state) == {BATCH: {"Acknowledged": 1, "Awaiting": 1}}


def test_batch_created_and_answered_between_polls_counts_in_full(state: FleetState) -> None:
    new = batch({"Acknowledged": 2}, created=START + 10)
    state.apply_actions(
        DEVICE,
        new,
        [
            action("1", "Acknowledged", sent=START + 20, received=START + 50),
            action("2", "Acknowledged", sent=START + 20, received=START + 25),
        ],
    )
    assert transitions(state) == {"Pending": 2, "Awaiting": 2, "Acknowledged": 2}
    assert latencies(state) == {"success": (2, 35.0)}


def test_first_sight_counts_only_steps_after_the_watermark(state: FleetState) -> None:
    # Created before the start, sent and answered after it.
    state.apply_actions(
        DEVICE,
        batch(created=START - 100),
        [
            action("1", "NotSupported", sent=START + 5, received=START + 9),
            action("2", "Awaiting", sent=START - 50),
        ],
    )
    assert transitions(state) == {"Awaiting": 1, "NotSupported": 1}
    assert latencies(state) == {"error": (1, 4.0)}


def test_first_sight_with_missing_timestamps_counts_nothing(state: FleetState) -> None:
    state.apply_actions(
        DEVICE, batch(created=None), [action("1", "Acknowledged"), action("2", "Awaiting")]
    )
    assert transitions(state) == {}
    assert latencies(state) == {}


# --- transitions of actions seen before ---------------------------------------------------


def test_pending_awaiting_acknowledged_over_three_polls(state: FleetState) -> None:
    state.apply_actions(DEVICE, batch(), [action("1", "Pending")])
    assert transitions(state) == {"Pending": 1}
    state.apply_actions(DEVICE, batch(), [action("1", "Awaiting", sent=START + 100)])
    assert transitions(state) == {"Pending": 1, "Awaiting": 1}
    assert latencies(state) == {}
    state.apply_actions(
        DEVICE, batch(), [action("1", "Acknowledged", sent=START + 100, received=START + 130)]
    )
    assert transitions(state) == {"Pending": 1, "Awaiting": 1, "Acknowledged": 1}
    assert latencies(state) == {"success": (1, 30.0)}


def test_pending_to_acknowledged_infers_awaiting_from_sent_at(state: FleetState) -> None:
    state.apply_actions(DEVICE, batch(created=START - 10), [action("1", "Pending")])
    state.apply_actions(
        DEVICE, batch(), [action("1", "Acknowledged", sent=START + 100, received=START + 160)]
    )
    assert transitions(state) == {"Awaiting": 1, "Acknowledged": 1}
    assert latencies(state) == {"success": (1, 60.0)}


def test_pending_to_final_without_sent_at_skips_awaiting(state: FleetState) -> None:
    state.apply_actions(DEVICE, batch(created=START - 10), [action("1", "Pending")])
    state.apply_actions(DEVICE, batch(), [action("1", "CommandFormatError", received=START + 9)])
    assert transitions(state) == {"CommandFormatError": 1}
    assert latencies(state) == {}  # no sentAt, no latency


def test_canceled_from_pending(state: FleetState) -> None:
    state.apply_actions(DEVICE, batch(created=START - 10), [action("1", "Pending")])
    state.apply_actions(DEVICE, batch(), [action("1", "Cancel", canceled=START + 70)])
    assert transitions(state) == {"Cancel": 1}
    assert gauges(state) == {BATCH: {"Cancel": 1}}


# "BrandNewStatus": an administrator's cancel under a name the exporter does not know;
# canceledAt is the only moment it carries, and it decides like any final moment.
@pytest.mark.parametrize("status", ["Cancel", "BrandNewStatus"])
def test_canceled_on_first_sight_uses_canceled_at(state: FleetState, status: str) -> None:
    state.apply_actions(
        DEVICE,
        batch(created=START - 10),
        [
            action("1", status, canceled=START + 70),
            action("2", status, canceled=START - 5),
        ],
    )
    assert transitions(state) == {status: 1}


def test_final_to_final_counts_the_new_status_and_latency_once(state: FleetState) -> None:
    state.apply_actions(
        DEVICE, batch(created=START - 10), [action("1", "Awaiting", sent=START - 5)]
    )
    state.apply_actions(
        DEVICE, batch(), [action("1", "UnexpectedError", sent=START - 5, received=START + 15)]
    )
    state.apply_actions(
        DEVICE, batch(), [action("1", "Acknowledged", sent=START - 5, received=START + 95)]
    )
    assert transitions(state) == {"UnexpectedError": 1, "Acknowledged": 1}
    assert latencies(state) == {"error": (1, 20.0)}  # the first answer only


def test_same_list_twice_counts_once_and_changes_nothing(state: FleetState) -> None:
    polled = [
        action("1", "Acknowledged", sent=START + 20, received=START + 30),
        action("2", "Pending"),
    ]
    state.apply_actions(DEVICE, batch(), polled)
    generation = state.generation
    state.apply_actions(DEVICE, batch(), polled)
    state.apply_actions(DEVICE, batch(), list(polled))
    assert transitions(state) == {"Pending": 2, "Awaiting": 1, "Acknowledged": 1}
    assert latencies(state) == {"success": (1, 10.0)}
    assert state.generation == generation


def test_shifted_and_duplicated_pages_never_double_count(state: FleetState) -> None:
    full = [action(str(i), "Awaiting", sent=START + 20) for i in range(6)]
    state.apply_actions(DEVICE, batch(), full)
    counted = {"Pending": 6, "Awaiting": 6}
    assert transitions(state) == counted
    # A page shifted under pagination: "2" repeated, "3" missing from both pages.
    shifted = [full[0], full[1], full[2], full[2], full[4], full[5]]
    state.apply_actions(DEVICE, batch(), shifted)
    assert gauges(state) == {BATCH: {"Awaiting": 5}}
    state.apply_actions(DEVICE, batch(), full)
    assert transitions(state) == counted
    assert gauges(state) == {BATCH: {"Awaiting": 6}}


def test_duplicate_in_one_list_keeps_the_later_copy(state: FleetState) -> None:
    state.apply_actions(
        DEVICE,
        batch(created=START - 10),
        [
            action("1", "Awaiting", sent=START - 5),
            action("1", "Acknowledged", sent=START - 5, received=START + 5),
        ],
    )
    assert gauges(state) == {BATCH: {"Acknowledged": 1}}
    assert transitions(state) == {"Acknowledged": 1}


def test_unknown_status_is_kept_with_class_unknown(state: FleetState) -> None:
    state.apply_actions(DEVICE, batch(created=START - 10), [action("1", "Pending")])
    state.apply_actions(DEVICE, batch(), [action("1", "BrandNewStatus", received=START + 70)])
    view = state.device_view(DEVICE)
    assert view.batches[0].counts == (("BrandNewStatus", "unknown", 1),)
    assert ("BrandNewStatus", "unknown", 1) in state.transitions()


def test_every_known_status_starts_at_zero(state: FleetState) -> None:
    listed = state.transitions()
    assert len(listed) == 65
    assert {n for _, _, n in listed} == {0}


def test_vanished_action_leaves_the_gauges(state: FleetState) -> None:
    state.apply_actions(DEVICE, batch(), [action("1", "Pending"), action("2", "Pending")])
    state.apply_actions(DEVICE, batch(), [action("1", "Pending")])
    assert gauges(state) == {BATCH: {"Pending": 1}}


# --- latency ---------------------------------------------------------------------------------


def test_latency_observed_once_per_action(state: FleetState) -> None:
    answered = action("1", "Acknowledged", sent=START + 100, received=START + 103)
    state.apply_actions(DEVICE, batch(), [action("1", "Awaiting", sent=START + 100)])
    for _ in range(3):
        state.apply_actions(DEVICE, batch(), [answered])
    assert latencies(state) == {"success": (1, 3.0)}
    buckets = state.latency()["success"].cumulative()
    assert buckets[0] == 0 and buckets[1] == 1  # 3 s falls in le=5


def test_negative_or_incomplete_latency_is_skipped(state: FleetState) -> None:
    state.apply_actions(
        DEVICE,
        batch(),
        [
            action("1", "Acknowledged", sent=START + 100, received=START + 90),
            action("2", "Acknowledged", received=START + 90),
        ],
    )
    assert latencies(state) == {}


# --- gauges, summary and needs_actions ------------------------------------------------------


def test_history_batch_from_summary_counts_nothing(state: FleetState) -> None:
    history = batch({"Acknowledged": 3, "NotSupported": 1}, updated=START - 10)
    assert not state.needs_actions(DEVICE, history)
    state.apply_summary(DEVICE, history)
    assert gauges(state) == {BATCH: {"Acknowledged": 3, "NotSupported": 1}}
    assert transitions(state) == {}


def test_history_batch_that_changes_later_follows_first_sight(state: FleetState) -> None:
    history = batch(
        {"Acknowledged": 1, "CommandNotFound": 1}, created=START - 50, updated=START - 9
    )
    state.apply_summary(DEVICE, history)
    changed = batch({"Acknowledged": 2}, created=START - 50, updated=START + 80)
    assert state.needs_actions(DEVICE, changed)
    state.apply_actions(
        DEVICE,
        changed,
        [
            action("1", "Acknowledged", sent=START - 40, received=START - 30),
            action("2", "Acknowledged", sent=START - 40, received=START + 80),
        ],
    )
    assert transitions(state) == {"Acknowledged": 1}
    assert latencies(state) == {"success": (1, 120.0)}


@pytest.mark.parametrize(
    ("first", "again", "expected"),
    [
        # never seen: finished before the watermark is history, anything else is fetched
        (None, batch({"Acknowledged": 1}, updated=START - 1), False),
        (None, batch({"Acknowledged": 1}, updated=START), False),
        (None, batch({"Acknowledged": 1}, updated=START + 1), True),
        (None, batch({"Acknowledged": 1}), True),  # updatedAt unknown
        (None, batch({"Pending": 1}, updated=START - 1), True),
        (None, batch(None, updated=START - 1), True),  # no summary
        # known: skipped only while finished and unchanged
        (batch({"Acknowledged": 1}), batch({"Acknowledged": 1}), False),
        (batch({"Acknowledged": 1}), batch({"NotSupported": 1}), True),
        (batch({"Awaiting": 1}), batch({"Awaiting": 1}), True),
        (batch(None), batch(None), True),
    ],
)
def test_needs_actions(
    state: FleetState, first: Batch | None, again: Batch, expected: bool
) -> None:
    if first is not None:
        status = first.summary[0][0] if first.summary else "Pending"
        state.apply_actions(DEVICE, first, [action("1", status)])
    assert state.needs_actions(DEVICE, again) is expected


def test_needs_actions_while_own_list_still_pending(state: FleetState) -> None:
    # The summary already says finished, the action list lagged behind: fetch again.
    finished = batch({"Acknowledged": 1})
    state.apply_actions(DEVICE, finished, [action("1", "Awaiting", sent=START + 5)])
    assert state.needs_actions(DEVICE, finished)


def test_apply_summary_keeps_counts_from_actions(state: FleetState) -> None:
    # Upstream summaries can disagree with the list; the list is the truth.
    finished = batch({"Acknowledged": 2})
    state.apply_actions(
        DEVICE, finished, [action("1", "Acknowledged"), action("2", "MethodNotAllowed")]
    )
    state.apply_summary(DEVICE, finished)
    assert gauges(state) == {BATCH: {"Acknowledged": 1, "MethodNotAllowed": 1}}


def test_oldest_pending(state: FleetState, clock: Clock) -> None:
    state.apply_actions(
        DEVICE,
        batch(created=START + 1),
        [
            action("1", "Awaiting", sent=START + 30),
            action("2", "Awaiting", sent=START + 20),
            action("3", "Acknowledged", sent=START + 5, received=START + 6),
        ],
    )
    state.apply_actions(
        DEVICE, batch(batch_id=OTHER_BATCH, created=START + 25), [action("9", "Pending")]
    )
    assert state.device_view(DEVICE).oldest_pending == START + 20
    state.apply_actions(
        DEVICE,
        batch(created=START + 1),
        [action(str(i), "Acknowledged", sent=START + 5, received=START + 90) for i in (1, 2, 3)],
    )
    assert state.device_view(DEVICE).oldest_pending == START + 25  # a Pending: batch createdAt
    state.drop_batch(DEVICE, OTHER_BATCH)
    assert state.device_view(DEVICE).oldest_pending is None


def test_class_counts_and_batch_names(state: FleetState) -> None:
    state.apply_actions(
        DEVICE,
        batch(name="Store policy"),
        [action("1", "Pending"), action("2", "Acknowledged"), action("3", "CommandNotFound")],
    )
    view = state.device_view(DEVICE)
    assert dict(view.class_counts) == {
        "pending": 1,
        "success": 1,
        "canceled": 0,
        "error": 1,
        "unknown": 0,
    }
    assert view.batches[0].name == "Store policy"
    assert view.name == "reception-pc"
    assert dict(view.labels) == {"site": "madrid"}


# --- parse problems ----------------------------------------------------------------------


def test_parse_problems_counted_once_per_action(state: FleetState, metrics: SelfMetrics) -> None:
    bad = action("1", "Awaiting", sentAt="not a date")
    also_bad = action("2", "Mystery")
    for _ in range(3):
        state.apply_actions(DEVICE, batch(), [bad, also_bad])
    assert metrics.parse_problems == {"timestamp": 1, "unknown_status": 1, "schema": 0}
    # The same action now shows a second kind of problem: only that one is new.
    worse = action("1", "Awaiting", sentAt="not a date", statusCode="two hundred")
    state.apply_actions(DEVICE, batch(), [worse, also_bad])
    assert metrics.parse_problems == {"timestamp": 1, "unknown_status": 1, "schema": 1}


def test_batch_problems_counted_once(state: FleetState, metrics: SelfMetrics) -> None:
    odd = batch({"Acknowledged": 1}, updated=START - 5, createdAt="yesterday-ish")
    for _ in range(3):
        state.apply_summary(DEVICE, odd)
    state.apply_actions(DEVICE, odd, [action("1", "Acknowledged")])
    assert metrics.parse_problems["timestamp"] == 1


# --- devices --------------------------------------------------------------------------------


def test_watch_during_run_sets_its_own_watermark(state: FleetState, clock: Clock) -> None:
    late = "65f0c0ffee65f0c0ffee0002"
    clock.now = START + 1000
    state.watch(late)
    assert state.watched() == [DEVICE, late]
    state.apply_actions(
        late,
        batch(created=START + 500),
        [action("1", "Acknowledged", sent=START + 1100, received=START + 1200)],
    )
    assert transitions(state) == {"Awaiting": 1, "Acknowledged": 1}


def test_watch_again_keeps_watermark_and_state(state: FleetState, clock: Clock) -> None:
    state.apply_actions(DEVICE, batch(created=START - 10), [action("1", "Pending")])
    clock.now = START + 5000
    state.watch(DEVICE, name="front-desk", labels={"site": "sevilla"})
    state.apply_actions(
        DEVICE, batch(), [action("1", "Acknowledged", sent=START + 100, received=START + 200)]
    )
    assert transitions(state) == {"Awaiting": 1, "Acknowledged": 1}
    view = state.device_view(DEVICE)
    assert view.watermark == START
    assert view.name == "front-desk"
    assert dict(view.labels) == {"site": "sevilla"}


def test_unwatch_and_rewatch(state: FleetState, clock: Clock) -> None:
    answered = [action("1", "Acknowledged", sent=START + 20, received=START + 30)]
    state.apply_actions(DEVICE, batch(), answered)
    counted = {"Pending": 1, "Awaiting": 1, "Acknowledged": 1}
    assert transitions(state) == counted
    state.unwatch(DEVICE)
    assert state.watched() == []
    assert transitions(state) == counted  # fleet-wide counters never go down
    state.apply_actions(DEVICE, batch(), answered)  # a late result for a gone device
    assert transitions(state) == counted
    clock.now = START + 600
    state.watch(DEVICE)
    assert gauges(state) == {}
    state.apply_actions(DEVICE, batch(), answered)  # history for the new watermark
    assert transitions(state) == counted
    assert gauges(state) == {BATCH: {"Acknowledged": 1}}


def test_drop_batch_removes_its_series(state: FleetState) -> None:
    state.apply_actions(DEVICE, batch(), [action("1", "Pending")])
    state.apply_actions(DEVICE, batch(batch_id=OTHER_BATCH), [action("1", "Pending")])
    state.drop_batch(DEVICE, BATCH)
    assert gauges(state) == {OTHER_BATCH: {"Pending": 1}}
    state.drop_batch(DEVICE, "65f0c0ffee65f0c0ffee9999")  # unknown: nothing happens
    assert gauges(state) == {OTHER_BATCH: {"Pending": 1}}


def test_retain_batches_drops_the_others(state: FleetState) -> None:
    for batch_id in (BATCH, OTHER_BATCH):
        state.apply_actions(DEVICE, batch(batch_id=batch_id), [action("1", "Pending")])
    state.retain_batches(DEVICE, [OTHER_BATCH, "65f0c0ffee65f0c0ffee9999"])
    assert list(gauges(state)) == [OTHER_BATCH]


def test_poll_status(state: FleetState, clock: Clock) -> None:
    view = state.device_view(DEVICE)
    assert (view.up, view.polled, view.last_success) == (False, False, None)
    state.poll_succeeded(DEVICE)
    view = state.device_view(DEVICE)
    assert (view.up, view.last_success, view.last_error) == (True, START + 60, None)
    clock.now = START + 120
    state.poll_failed(DEVICE, "timeout")
    view = state.device_view(DEVICE)
    assert (view.up, view.last_success, view.last_error) == (False, START + 60, "timeout")


def test_expire_after_stale_after(state: FleetState, clock: Clock) -> None:
    state.apply_actions(DEVICE, batch(), [action("1", "Awaiting", sent=START + 20)])
    state.poll_succeeded(DEVICE)  # at START + 60
    clock.now = START + 120
    state.poll_failed(DEVICE, "HTTP 503")
    assert state.expire(180) == []
    assert gauges(state) == {BATCH: {"Awaiting": 1}}  # last good values stay
    clock.now = START + 241  # 181 s after the last success, but only 121 s of failing
    assert state.expire(180) == []
    clock.now = START + 301
    state.poll_failed(DEVICE, "HTTP 503")  # failing on: measured from the first failure
    assert state.expire(180) == [DEVICE]
    view = state.device_view(DEVICE)
    assert (view.batches, view.oldest_pending, view.up) == ((), None, False)
    assert state.watched() == [DEVICE]
    assert state.expire(180) == []  # reported once
    # Back: nothing counted twice, series return.
    state.apply_actions(DEVICE, batch(), [action("1", "Awaiting", sent=START + 20)])
    state.poll_succeeded(DEVICE)
    assert gauges(state) == {BATCH: {"Awaiting": 1}}
    assert transitions(state) == {"Pending": 1, "Awaiting": 1}


def test_expire_device_that_never_succeeded(state: FleetState, clock: Clock) -> None:
    state.poll_failed(DEVICE, "HTTP 401")  # at START + 60: the first failure
    clock.now = START + 240
    assert state.expire(180) == []
    clock.now = START + 241
    assert state.expire(180) == [DEVICE]


def test_generation_moves_only_on_exported_change(state: FleetState) -> None:
    seen = state.generation
    state.needs_actions(DEVICE, batch())
    state.device_view(DEVICE)
    assert state.generation == seen
    state.apply_actions(DEVICE, batch(), [action("1", "Pending")])
    assert state.generation > seen
    seen = state.generation
    state.retain_batches(DEVICE, [BATCH])
    state.watch(DEVICE, name="reception-pc", labels={"site": "madrid"})
    assert state.generation == seen
    state.poll_succeeded(DEVICE)
    assert state.generation > seen


# --- memory -----------------------------------------------------------------------------------


def test_memory_per_tracked_action(metrics: SelfMetrics) -> None:
    devices, batches, per_batch = 100, 10, 20  # 20,000 actions
    clock = Clock(START)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fleet = FleetState(
            organization="acme", latency_buckets=BUCKETS, metrics=metrics, clock=clock
        )
        for d in range(devices):
            device = f"{d:024x}"
            fleet.watch(device)
            for b in range(batches):
                listed = [
                    Action(
                        cmd_id=f"{d:08d}-{b:04d}-{a:04d}-0000-000000000000",
                        status="Acknowledged" if a % 3 else "Awaiting",
                        sent_at=START + a,
                        received_at=START + 2 * a if a % 3 else None,
                    )
                    for a in range(per_batch)
                ]
                fleet.apply_actions(device, Batch(id=f"{d:012x}{b:012x}"), listed)
                del listed
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    tracked = fleet.tracked_actions()
    assert tracked == devices * batches * per_batch
    per_action = used / tracked
    print(f"\nFleetState memory: {per_action:.0f} bytes per tracked action (36-char cmdIds)")
    assert per_action <= 600


def test_latency_buckets_are_sorted_unique_and_finite(metrics: SelfMetrics) -> None:
    fleet = FleetState(
        organization="acme", latency_buckets=[60, 1, 5, 5, float("inf")], metrics=metrics
    )
    assert fleet.latency_buckets == (1.0, 5.0, 60.0)


def test_a_pruned_batch_that_returns_counts_nothing_again_and_new_batches_count_in_full(
    clock: Clock, metrics: SelfMetrics
) -> None:
    day = 86400.0
    state = FleetState(organization="acme", latency_buckets=BUCKETS, metrics=metrics,
                       clock=clock, ledger_retention_seconds=8 * day)
    state.watch(DEVICE)
    state.apply_actions(DEVICE, batch(), [action("1", "Pending")])
    clock.now = START + 100
    state.apply_actions(DEVICE, batch(), [action("1", "Acknowledged", sent=START + 50,
                                                 received=START + 90)])
    assert transitions(state) == {"Pending": 1, "Awaiting": 1, "Acknowledged": 1}
    clock.now = START + 9 * day  # not seen for longer than the retention
    assert state.prune_ledger() == 1
    assert state.tracked_actions() == 0
    # The old batch comes back, answered as before: nothing counts again.
    state.apply_actions(DEVICE, batch(), [action("1", "Acknowledged", sent=START + 50,
                                                 received=START + 90)])
    # A batch created after it, answered since: counted in full.
    newer = batch(batch_id=OTHER_BATCH, created=START + 9 * day - 60)
    state.apply_actions(DEVICE, newer, [action("2", "Acknowledged", sent=START + 9 * day - 50,
                                               received=START + 9 * day - 40)])
    assert transitions(state) == {"Pending": 2, "Awaiting": 2, "Acknowledged": 2}


# --- setting results -------------------------------------------------------------------------

ENCRYPTION = {"path": "./Device/Vendor/MSFT/BitLocker/RequireDeviceEncryption",
              "action": "Replace"}


def results(state: FleetState) -> dict[tuple[str, str, str], int]:
    """Non-zero setting results."""
    return {(s, op, c): n for s, op, c, n in state.setting_results() if n}


def test_an_action_counts_for_its_setting_at_its_first_final_status_only(state, clock) -> None:
    pending = action("a", "Pending", config=ENCRYPTION)
    generation = state.counters_generation
    state.apply_actions(DEVICE, batch(), [pending])
    # Its series exist from the first sight, at 0: the first result shows in increase().
    assert state.setting_results() == [
        ("BitLocker/RequireDeviceEncryption", "Replace", c, 0)
        for c in ("success", "canceled", "error", "unknown")
    ]
    assert state.counters_generation != generation
    done = action("a", "Acknowledged", sent=START + 20, received=START + 30, config=ENCRYPTION)
    state.apply_actions(DEVICE, batch(), [done])
    state.apply_actions(DEVICE, batch(), [done])
    # Upstream revises the answer: a new status counts as a transition, not a second result.
    revised = action("a", "CommandNotFound", sent=START + 20, received=START + 40,
                     config=ENCRYPTION)
    state.apply_actions(DEVICE, batch(), [revised])
    assert transitions(state)["CommandNotFound"] == 1
    assert results(state) == {("BitLocker/RequireDeviceEncryption", "Replace", "success"): 1}


def test_a_final_status_from_before_the_watermark_counts_for_no_setting(state) -> None:
    history = action("a", "Acknowledged", sent=START - 20, received=START - 10,
                     config=ENCRYPTION)
    state.apply_actions(DEVICE, batch(created=START - 30), [history])
    revised = action("a", "CommandNotFound", sent=START - 20, received=START + 40,
                     config=ENCRYPTION)
    state.apply_actions(DEVICE, batch(created=START - 30), [revised])
    assert results(state) == {}  # it reached a final status before it was watched


def test_settings_beyond_the_bound_count_as_other_and_operations_are_bounded(state) -> None:
    from exporter.state import MAX_SETTINGS

    answered = [
        action(f"a{n}", "Acknowledged", sent=START + 20, received=START + 30,
               config={"path": f"./Vendor/MSFT/Policy/Config/Area{n}/X",
                       "action": "replace" if n % 2 else "Frobnicate"})
        for n in range(MAX_SETTINGS + 3)
    ] + [action("none", "Acknowledged", sent=START + 20, received=START + 30)]
    state.apply_actions(DEVICE, batch(), answered)
    found = results(state)
    assert sum(found.values()) == MAX_SETTINGS + 4
    assert len({s for s, _, _ in found}) == MAX_SETTINGS + 1  # "none" took one of the names
    assert found[("other", "Replace", "success")] + found[("other", "other", "success")] == 4
    assert {op for _, op, _ in found} == {"Replace", "other", "none"}


def test_device_states_count_the_watched_devices_and_forget_states_nobody_holds(
    state: FleetState,
) -> None:
    # Upstream may send any state string over time; the counts follow the watched devices
    # through listing, relisting and unwatching, and a state no device holds any more goes.
    rng = random.Random(5)
    devices = [f"dev-{i}" for i in range(8)]
    states = ["ACTIVE", "UNKNOWN", None, *(f"ODD_{i}" for i in range(6))]
    for _ in range(500):
        device = rng.choice(devices)
        move = rng.random()
        if move < 0.2:
            state.unwatch(device)
        elif move < 0.4:
            state.watch(device, name=device, labels={})
        else:
            state.device_listed(device, state=rng.choice(states), check_in=None)
        held = Counter(state.device_view(d, with_batches=False).state for d in state.watched())
        expected = {s: 0 for s in DEVICE_STATES} | dict(held)
        assert state.device_states() == expected
