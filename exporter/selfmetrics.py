"""The exporter's own counters: API requests, parse problems, budget, rounds, reloads.

Plain data with no I/O; exposition.py renders it. ``generation`` moves on every change so
the renderer knows when its cached bytes are out of date.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from exporter.histogram import Histogram
from exporter.records import PROBLEM_KINDS

REQUEST_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ENDPOINTS = ("devices", "commands", "command", "actions")
POLL_FAILURE_KINDS = ("round", "device")
# Where the budget strategy learns check-ins: the device list sorted by lastStatusReportTime
# (one page a look) while upstream honours that sort, else the whole list.
SORTED_LIST, FULL_LIST = "sorted_list", "full_list"
CHECKIN_SOURCES = (SORTED_LIST, FULL_LIST)


@dataclass(slots=True)
class SelfMetrics:
    api_requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    api_durations: dict[str, Histogram] = field(
        default_factory=lambda: {e: Histogram(REQUEST_DURATION_BUCKETS) for e in ENDPOINTS}
    )
    parse_problems: Counter[str] = field(
        default_factory=lambda: Counter({kind: 0 for kind in PROBLEM_KINDS})
    )
    poll_rounds: int = 0
    # Every kind starts at 0 so the first failure shows in rate().
    poll_failures: Counter[str] = field(
        default_factory=lambda: Counter({kind: 0 for kind in POLL_FAILURE_KINDS})
    )
    budget_requests_per_hour: float = 0.0
    poll_round_seconds: float = 0.0
    requests_planned: int = 0  # by the scheduler for its latest round
    config_reload_successful: bool = True
    checkin_source: str = CHECKIN_SOURCES[0]
    # (api_endpoint, parameter) -> what upstream does with a query parameter the exporter
    # relies on: honoured, ignored, rejected or unchecked (kept by the client as they change).
    query_verdicts: dict[tuple[str, str], str] = field(default_factory=dict)
    # The durable store (--storage.path): failed transactions, and the last one written.
    storage_write_failures: int = 0
    storage_last_write: float | None = None  # epoch seconds
    storage_failing: bool = False
    generation: int = 0

    def observe_request(self, endpoint: str, code: str, seconds: float) -> None:
        self.api_requests[(endpoint, code)] += 1
        histogram = self.api_durations.get(endpoint)
        if histogram is None:
            histogram = self.api_durations[endpoint] = Histogram(REQUEST_DURATION_BUCKETS)
        histogram.observe(seconds)
        self.generation += 1

    def parse_problem(self, kind: str, count: int = 1) -> None:
        if count:
            self.parse_problems[kind] += count
            self.generation += 1

    def poll_failed(self, kind: str) -> None:
        """A round (``round``) or a device poll (``device``) raised outside the API errors."""
        self.poll_failures[kind] += 1
        self.generation += 1

    def touch(self) -> None:
        """Mark a change made to a plain attribute."""
        self.generation += 1

    def storage_written(self, now: float) -> bool:
        """A transaction was committed; True if writes had been failing until now."""
        recovered = self.storage_failing
        self.storage_last_write, self.storage_failing = now, False
        self.generation += 1
        return recovered

    def storage_failed(self) -> bool:
        """A write (or opening the store) failed; True if it is the first in a row."""
        first = not self.storage_failing
        self.storage_write_failures += 1
        self.storage_failing = True
        self.generation += 1
        return first
