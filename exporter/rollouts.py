"""Rollouts: the batches that share a name across devices, summed over the fleet.

Upstream keeps one batch per device: pushing a policy to 3,000 laptops makes 3,000 batches
with one name. Per (device, name) only the most recently created batch counts (a push
repeated after a fix replaces the failed one). Each device's part is a small tuple computed
when its batches change; :class:`RolloutTotals` keeps the fleet's sums up to date by
adding and removing those parts, so a refresh never walks the whole fleet.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from exporter.state import CLASSES, BatchView

# Device states of a rollout, by precedence: an error anywhere in the batch outweighs
# anything still pending, and so on down.
STATES = ("failed", "pending", "unknown", "canceled", "succeeded")
_STATE_OF_CLASS = (("error", "failed"), ("pending", "pending"), ("unknown", "unknown"),
                   ("canceled", "canceled"))
_STATE_INDEX = {state: i for i, state in enumerate(STATES)}
_CLASS_INDEX = {status_class: i for i, status_class in enumerate(CLASSES)}
_PRECEDENCE = tuple((_CLASS_INDEX[status_class], state) for status_class, state in _STATE_OF_CLASS)
# Rollout names exported per process, the most recently created first.
MAX_ROLLOUTS = 500


class Part(NamedTuple):
    """One device's latest batch of a rollout."""

    rollout: str
    created_at: float
    state: str
    classes: tuple[int, ...]  # actions per status class, in CLASSES order


class Rollout(NamedTuple):
    name: str
    devices: tuple[int, ...]  # per state, in STATES order
    actions: tuple[int, ...]  # per status class, in CLASSES order


def device_state(classes: Sequence[int]) -> str:
    """The state of a device's batch from its actions per class (in CLASSES order)."""
    for index, state in _PRECEDENCE:
        if classes[index]:
            return state
    return "succeeded"


def device_parts(batches: Iterable[BatchView]) -> tuple[Part, ...]:
    """The latest batch of each name among one device's batches, as rollout parts."""
    latest: dict[str, tuple[tuple[float, str], BatchView]] = {}
    for batch in batches:
        if not batch.name:
            continue
        # Batch ids are object ids, which start with their creation second: a fair tie-break.
        created = batch.created_at if batch.created_at is not None else -math.inf
        known = latest.get(batch.name)
        if known is None or (created, batch.id) > known[0]:
            latest[batch.name] = ((created, batch.id), batch)
    parts = []
    for name, ((created, _), batch) in latest.items():  # in the order of the batches given
        classes = [0] * len(CLASSES)
        for _, status_class, count in batch.counts:
            classes[_CLASS_INDEX[status_class]] += count
        parts.append(Part(name, created, device_state(classes), tuple(classes)))
    return tuple(parts)


class RolloutTotals:
    """Devices per state and actions per class of every rollout, kept by adding and
    removing device parts."""

    def __init__(self) -> None:
        # name -> [devices per state..., actions per class...]
        self._sums: dict[str, list[int]] = {}
        # name -> newest createdAt among its parts while it has any (never lowered: it
        # only orders names for the MAX_ROLLOUTS cut).
        self._newest: dict[str, float] = {}
        self.generation = 0

    def replace(self, old: tuple[Part, ...], new: tuple[Part, ...]) -> None:
        """One device's parts changed from ``old`` to ``new``."""
        if old == new:
            return
        # A device re-rendered keeps most of its parts: only the others move the sums.
        kept = set(old).intersection(new) if old and new else ()
        for part in old:
            if part not in kept:
                self._add(part, -1)
        for part in new:
            if part not in kept:
                self._add(part, 1)
        self.generation += 1

    def _add(self, part: Part, sign: int) -> None:
        name = part.rollout
        sums = self._sums.get(name)
        if sums is None:
            sums = self._sums[name] = [0] * (len(STATES) + len(CLASSES))
        sums[_STATE_INDEX[part.state]] += sign
        for i, count in enumerate(part.classes, len(STATES)):
            if count:
                sums[i] += sign * count
        if not any(sums[: len(STATES)]):
            del self._sums[name]
            self._newest.pop(name, None)
        elif sign > 0:
            self._newest[name] = max(part.created_at, self._newest.get(name, -math.inf))

    def top(self, limit: int = MAX_ROLLOUTS) -> list[Rollout]:
        """The ``limit`` most recently created rollouts, by name."""
        names = sorted(self._sums, key=lambda n: (-self._newest.get(n, -math.inf), n))[:limit]
        width = len(STATES)
        return [
            Rollout(n, tuple(self._sums[n][:width]), tuple(self._sums[n][width:]))
            for n in sorted(names)
        ]

    def __len__(self) -> int:
        return len(self._sums)
