"""Simulated time: a real-time clock scaled by ``speed``, or a manual one (``speed=0``)."""

from __future__ import annotations

import time


class SimClock:
    """Epoch seconds on the simulator's time line.

    ``speed`` simulated seconds pass per real second; with ``speed=0`` time only moves
    through :meth:`advance`. ``start`` is the simulated epoch at creation (real time when
    None).
    """

    __slots__ = ("_offset", "_real0", "speed", "start")

    def __init__(self, start: float | None = None, speed: float = 1.0) -> None:
        if speed < 0:
            raise ValueError("speed must be >= 0")
        self.start = time.time() if start is None else float(start)
        self.speed = float(speed)
        self._real0 = time.monotonic()
        self._offset = 0.0

    def now(self) -> float:
        elapsed = (time.monotonic() - self._real0) * self.speed if self.speed else 0.0
        return self.start + elapsed + self._offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time only moves forward")
        self._offset += seconds
