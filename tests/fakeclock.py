"""A monotonic clock for async tests that moves only when someone sleeps on it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class FakeClock:
    """Monotonic time that only moves when someone sleeps on it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.on_sleep: Callable[[], object] | None = None  # runs as each sleep begins

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.on_sleep is not None:
            self.on_sleep()
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)
