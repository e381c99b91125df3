"""The fleet's time line: what is going to happen (:class:`Agenda`) and what did (:class:`Journal`).

Everything that happens to the fleet is an event on one heap ordered by (time, sequence):
applied in that order, each at its own timestamp, nothing is ever visible before the moment
it carries, and a fixed seed gives the same history whatever the real-time pace of the
requests. The journal is the ground truth tests and benchmarks compare the exporter with.
"""

from __future__ import annotations

import heapq
import itertools
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from exporter.simulator.model import PENDING, Action

if TYPE_CHECKING:
    from exporter.simulator.health import ComplianceFlip

# Event kinds. Plain ints: the heap is the simulator's hottest loop.
CREATE, CHECKIN, ANSWER, CANCEL_ACTION, CANCEL_BATCH, ARRIVAL, ROLLOUT = range(7)

Entry = tuple[float, int, int, object, object]  # (time, sequence, kind, subject, extra)


class Agenda:
    """The events to come, earliest first; ties in the order they were pushed."""

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[Entry] = []
        self._seq = itertools.count()

    def push(self, when: float, kind: int, subject: object, extra: object) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), kind, subject, extra))

    def due(self, moment: float) -> Iterator[Entry]:
        """Pops the events up to ``moment``, those the caller pushes meanwhile included."""
        heap = self._heap
        while heap and heap[0][0] <= moment:
            yield heapq.heappop(heap)


class Journal:
    """Every status each action entered, every answer's latency and every compliance flip
    (when ``record``)."""

    __slots__ = ("_acks", "_events", "_flips", "record")

    def __init__(self, record: bool) -> None:
        self.record = record
        self._events: list[tuple[float, Action, str]] = []
        self._acks: list[tuple[float, float, Action]] = []
        self._flips: list[ComplianceFlip] = []

    def created(self, when: float, actions: Iterable[Action]) -> None:
        if self.record:
            self._events.extend((when, action, PENDING) for action in actions)

    def entered(self, when: float, action: Action, status: str) -> None:
        if self.record:
            self._events.append((when, action, status))

    def answered(self, when: float, action: Action) -> None:
        if self.record and action.sent is not None:
            self._acks.append((when, when - action.sent, action))

    def flipped(self, flip: ComplianceFlip) -> None:
        if self.record:
            self._flips.append(flip)

    def sort(self) -> None:
        # History is built device by device, not in time order; afterwards entries come in
        # time order and the lists stay sorted.
        self._events.sort(key=_first)
        self._acks.sort(key=_first)
        self._flips.sort(key=_first)

    def events_after(self, moment: float) -> list[tuple[float, Action, str]]:
        """(time, action, status) of every status entered after ``moment``, in time order."""
        return self._events[bisect_right(self._events, moment, key=_first):]

    def acks_after(self, moment: float) -> list[tuple[float, float, Action]]:
        """(time, receivedAt − sentAt, action) of every answer after ``moment``."""
        return self._acks[bisect_right(self._acks, moment, key=_first):]


    def flips_after(self, moment: float) -> list[ComplianceFlip]:
        return self._flips[bisect_right(self._flips, moment, key=_first):]


def _first(item: tuple[Any, ...]) -> float:
    return item[0]
