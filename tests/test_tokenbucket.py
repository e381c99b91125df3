"""exporter/tokenbucket.py: the one token bucket, for the API budget (async, in order, with
throttles) and for the web rate limit (take one now or hear no)."""

from __future__ import annotations

import asyncio

import pytest
from fakeclock import FakeClock

from exporter.tokenbucket import TokenBucket


async def test_bucket_allows_its_burst_then_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(3600, burst_seconds=5, monotonic=clock.monotonic, sleep=clock.sleep)
    assert bucket.capacity == 5
    start = clock.now
    for _ in range(5):
        await bucket.acquire()
    assert clock.now == start  # the burst costs no waiting
    for _ in range(10):
        await bucket.acquire()
    assert bucket.spent == 15
    # 1 request per second after the burst: ten more take ten seconds.
    assert clock.now - start == pytest.approx(10.0)


async def test_tiny_budget_still_allows_one_request() -> None:
    clock = FakeClock()
    bucket = TokenBucket(36, monotonic=clock.monotonic, sleep=clock.sleep)
    assert bucket.capacity == 1
    await bucket.acquire()
    await bucket.acquire()
    assert clock.now - 1000.0 == pytest.approx(100.0)  # 36 per hour = one per 100 s


async def test_concurrent_callers_share_one_budget() -> None:
    clock = FakeClock()
    bucket = TokenBucket(7200, burst_seconds=1, monotonic=clock.monotonic, sleep=clock.sleep)
    await asyncio.gather(*(bucket.acquire() for _ in range(21)))
    assert bucket.spent == 21
    # 2 per second after a burst of 2: nineteen more need 9.5 s.
    assert clock.now - 1000.0 == pytest.approx(9.5)


async def test_throttle_pauses_everyone_and_halves_the_rate_then_recovers() -> None:
    clock = FakeClock()
    bucket = TokenBucket(3600, monotonic=clock.monotonic, sleep=clock.sleep)
    bucket.throttle(30)
    assert bucket.paused_for() == 30
    assert bucket.effective_rate_per_hour == 1800
    assert bucket.available() == 0
    await bucket.acquire()
    # The pause, then a token at half the rate (one per 2 s).
    assert clock.now - 1000.0 >= 30
    assert bucket.effective_rate_per_hour > 1800  # recovering already
    clock.now += 3600
    assert bucket.effective_rate_per_hour == 3600
    assert not bucket.recovering


async def test_answers_to_requests_sent_before_a_throttle_change_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(3600, monotonic=clock.monotonic, sleep=clock.sleep)
    sent = clock.now
    bucket.throttle(10, sent_at=sent)
    clock.now += 4
    bucket.throttle(10, sent_at=sent)  # in flight together with the first
    assert bucket.effective_rate_per_hour == 1800
    assert bucket.paused_for() == 6
    bucket.throttle(10, sent_at=clock.now)  # sent after the first throttle: news
    assert bucket.effective_rate_per_hour == 900
    assert bucket.paused_for() == 10
    assert bucket.throttles == 3


async def test_repeated_throttles_keep_a_floor() -> None:
    clock = FakeClock()
    bucket = TokenBucket(3600, monotonic=clock.monotonic, sleep=clock.sleep)
    for _ in range(20):
        bucket.throttle(0)
    assert 0 < bucket.effective_rate_per_hour < 3600 / 8


def test_budget_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0)


# --- a synchronous caller (the web rate limit) --------------------------------------------------


def test_a_synchronous_caller_takes_a_token_now_or_hears_no() -> None:
    clock = FakeClock()
    bucket = TokenBucket(3600, burst_seconds=2, monotonic=clock.monotonic)
    assert [bucket.try_acquire() for _ in range(3)] == [True, True, False]
    clock.now += 1
    assert bucket.try_acquire()
    assert bucket.spent == 3


def test_per_interval_refills_one_token_per_interval_up_to_the_burst() -> None:
    now = [0.0]
    bucket = TokenBucket.per_interval(10.0, burst=2, monotonic=lambda: now[0])
    assert [bucket.try_acquire() for _ in range(3)] == [True, True, False]
    now[0] = 9.0
    assert not bucket.try_acquire()
    now[0] = 10.5
    assert bucket.try_acquire()
    assert not bucket.try_acquire()
    now[0] = 1000.0
    assert [bucket.try_acquire() for _ in range(3)] == [True, True, False]  # never above the burst


def test_a_throttle_holds_back_a_synchronous_caller_too() -> None:
    clock = FakeClock()
    bucket = TokenBucket(3600, monotonic=clock.monotonic)
    bucket.throttle(30)
    clock.now += 29
    assert not bucket.try_acquire()
    clock.now += 3  # the pause is over and the halved rate has earned a token
    assert bucket.try_acquire()


async def test_a_synchronous_caller_does_not_jump_the_queue() -> None:
    clock = FakeClock()
    bucket = TokenBucket(3600, burst_seconds=1, monotonic=clock.monotonic, sleep=clock.sleep)
    await bucket.acquire()
    waiting = asyncio.ensure_future(bucket.acquire())
    await asyncio.sleep(0)  # queued, asleep until its token
    clock.now += 5
    assert not bucket.try_acquire()  # the queued caller came first
    await waiting
    assert bucket.spent == 2


def test_per_interval_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenBucket.per_interval(0, burst=1)
