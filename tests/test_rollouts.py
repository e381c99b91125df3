"""Rollouts: the latest batch per device and name, its state by precedence, fleet sums."""

from __future__ import annotations

import pytest

from exporter.rollouts import MAX_ROLLOUTS, STATES, RolloutTotals, device_parts, device_state
from exporter.state import CLASSES, BatchView


def view(batch_id: str, name: str | None, created: float | None, **classes: int) -> BatchView:
    counts = tuple((f"S-{c}", c, n) for c, n in sorted(classes.items()))
    return BatchView(batch_id, name, created, counts, None)


@pytest.mark.parametrize(
    ("classes", "state"),
    [
        ({"error": 1, "pending": 5, "unknown": 1, "canceled": 1, "success": 9}, "failed"),
        ({"pending": 1, "unknown": 1, "canceled": 1, "success": 9}, "pending"),
        ({"unknown": 1, "canceled": 1, "success": 9}, "unknown"),
        ({"canceled": 1, "success": 9}, "canceled"),
        ({"success": 9}, "succeeded"),
        ({}, "succeeded"),  # a batch with nothing to do did all of it
    ],
)
def test_device_state_by_precedence(classes: dict[str, int], state: str) -> None:
    assert device_state([classes.get(c, 0) for c in CLASSES]) == state


def test_the_latest_batch_of_each_name_is_the_devices_part() -> None:
    parts = device_parts([
        view("b1", "Baseline", 100.0, error=2),
        view("b2", "Baseline", 200.0, success=3),
        view("b3", "Wi-Fi", 50.0, pending=1),
        view("b4", None, 300.0, error=1),  # no name: no rollout
        view("b5", "", 300.0, error=1),
    ])
    assert [(p.rollout, p.state, p.classes) for p in parts] == [
        ("Baseline", "succeeded", tuple(3 if c == "success" else 0 for c in CLASSES)),
        ("Wi-Fi", "pending", tuple(1 if c == "pending" else 0 for c in CLASSES)),
    ]


def test_equal_creation_times_are_told_apart_by_batch_id() -> None:
    [part] = device_parts([view("b2", "X", 100.0, success=1), view("b1", "X", 100.0, error=1)])
    assert part.state == "succeeded"
    [part] = device_parts([view("b1", "X", None, error=1), view("b2", "X", 5.0, success=1)])
    assert part.state == "succeeded"  # a known creation time is newer than none


def test_totals_follow_each_device_part_replaced_and_removed() -> None:
    totals = RolloutTotals()
    a = device_parts([view("a1", "Baseline", 10.0, error=1, success=2)])
    b = device_parts([view("b1", "Baseline", 20.0, pending=4)])
    totals.replace((), a)
    totals.replace((), b)
    [rollout] = totals.top()
    assert dict(zip(STATES, rollout.devices, strict=True)) == {
        "failed": 1, "pending": 1, "unknown": 0, "canceled": 0, "succeeded": 0}
    assert dict(zip(CLASSES, rollout.actions, strict=True))["pending"] == 4
    fixed = device_parts([view("a2", "Baseline", 30.0, success=3)])
    totals.replace(a, fixed)
    [rollout] = totals.top()
    assert rollout.devices == (0, 1, 0, 0, 1)
    totals.replace(fixed, ())
    totals.replace(b, ())
    assert totals.top() == [] and len(totals) == 0
    generation = totals.generation
    totals.replace((), ())
    assert totals.generation == generation  # nothing moved, nothing to render


def test_at_most_the_newest_names_are_exported() -> None:
    totals = RolloutTotals()
    for n in range(MAX_ROLLOUTS + 20):
        totals.replace((), device_parts([view(f"b{n}", f"rollout {n:04}", float(n), success=1)]))
    top = totals.top()
    assert len(top) == MAX_ROLLOUTS
    assert {r.name for r in top} == {f"rollout {n:04}" for n in range(20, MAX_ROLLOUTS + 20)}
