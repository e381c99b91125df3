"""One token bucket for the whole project: the API request budget and the web rate limit.

A bucket holds at most ``capacity`` tokens and earns ``rate_per_hour`` of them an hour. Async
callers wait in order for their token (``acquire``); a synchronous caller takes one now or
hears no (``try_acquire``), which is what a rate limit on incoming requests needs. The API
client also pauses every caller after a throttle answer (``throttle``); nothing else does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

BURST_SECONDS = 5.0  # the bucket holds this many seconds' worth of requests (at least one)
MIN_RATE_FACTOR = 1 / 16
RECOVERY_SECONDS = 600.0  # a throttled rate climbs back by the full rate over this long
_SLACK = 1e-9  # float refills of exactly one token must count as one


class TokenBucket:
    """Requests per hour with a small burst, plus a client-wide pause.

    Every request takes one token. A throttle answer (429, 503 with Retry-After) pauses every
    caller until a shared moment, empties the bucket and halves the effective rate, which
    climbs back linearly (by the full rate per ``RECOVERY_SECONDS``) once the pause is over.
    ``capacity`` (the burst) defaults to ``burst_seconds`` worth of the rate, at least one.
    """

    def __init__(
        self,
        rate_per_hour: float,
        *,
        burst_seconds: float = BURST_SECONDS,
        capacity: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        if rate_per_hour <= 0:
            raise ValueError("requests_per_hour must be positive")
        self.rate_per_hour = float(rate_per_hour)
        burst = self.rate_per_hour / 3600 * burst_seconds if capacity is None else capacity
        self.capacity = max(1.0, burst)
        self.spent = 0
        self.throttles = 0
        self._per_second = self.rate_per_hour / 3600
        self._monotonic = monotonic
        self._sleep = sleep
        self._tokens = self.capacity
        self._factor = 1.0
        self._stamp = monotonic()
        self._not_before = self._stamp
        self._last_throttle = float("-inf")
        self._lock = asyncio.Lock()

    @classmethod
    def per_interval(
        cls,
        interval_seconds: float,
        *,
        burst: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> TokenBucket:
        """One token per ``interval_seconds`` on average, up to ``burst`` at once (the
        exporter-toolkit ``rate_limit`` reading)."""
        if interval_seconds <= 0:
            raise ValueError("interval_seconds must be positive")
        return cls(3600 / interval_seconds, capacity=burst, monotonic=monotonic)

    @property
    def effective_rate_per_hour(self) -> float:
        self._refill()
        return self.rate_per_hour * self._factor

    def now(self) -> float:
        """The bucket's own clock: its rate is requests per hour of this clock."""
        return self._monotonic()

    @property
    def recovering(self) -> bool:
        """True while the effective rate is below the configured one."""
        return self._factor < 1.0

    def available(self) -> float:
        """Tokens in the bucket now (fractional)."""
        self._refill()
        return self._tokens

    def paused_for(self) -> float:
        """Seconds left of the client-wide pause."""
        return max(0.0, self._not_before - self._monotonic())

    def try_acquire(self) -> bool:
        """Take one token now if there is one and no async caller is queued for it (they
        came first); never waits."""
        return not self._lock.locked() and self._take()

    async def acquire(self) -> None:
        """Take one token, waiting for it (callers are served in order)."""
        if self.try_acquire():  # nobody queued: no lock to pay for
            return
        async with self._lock:
            while not self._take():
                await self._sleep(self._wait())

    def throttle(self, pause_seconds: float, *, sent_at: float | None = None) -> None:
        """Pause everyone for ``pause_seconds`` and halve the rate.

        ``sent_at`` is when the throttled request went out: an answer to a request sent
        before the last throttle tells of the same overload and changes nothing.
        """
        self._refill()
        self.throttles += 1
        if sent_at is not None and sent_at <= self._last_throttle:
            return
        self._last_throttle = self._stamp
        self._factor = max(MIN_RATE_FACTOR, self._factor / 2)
        self._tokens = min(self._tokens, 0.0)
        self._not_before = max(self._not_before, self._stamp + max(0.0, pause_seconds))

    def _take(self) -> bool:
        self._refill()
        if self._not_before > self._stamp or self._tokens < 1.0 - _SLACK:
            return False
        self._tokens -= 1.0
        self.spent += 1
        return True

    def _wait(self) -> float:
        """Seconds until a token may be there, right after a refill that found none."""
        pause = self._not_before - self._stamp
        if pause > 0:
            return pause
        return (1.0 - self._tokens) / (self._per_second * self._factor)

    def _refill(self) -> None:
        now = self._monotonic()
        # A pause freezes the bucket: no tokens pile up and the rate does not recover
        # until it is over.
        elapsed = now - max(self._stamp, self._not_before)
        self._stamp = max(self._stamp, now)
        if elapsed <= 0:
            return
        # The factor of the start of the interval is the lower one: refilling with it errs
        # on the side of fewer requests.
        capacity = max(1.0, self.capacity * self._factor)
        self._tokens = min(capacity, self._tokens + elapsed * self._per_second * self._factor)
        if self._factor < 1.0:
            self._factor = min(1.0, self._factor + elapsed / RECOVERY_SECONDS)
