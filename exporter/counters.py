"""The fleet's counters: status transitions, send-to-acknowledge latency, setting results.

Only the ledger moves them (each thing it counts, once); exposition.py reads them. They are
monotonic for the life of the store, not of the process: the store saves them with the
ledger and ``restore`` puts them back on start.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from exporter.histogram import Histogram
from exporter.records import Action
from exporter.settings import operation, setting
from exporter.statuses import StatusClass, StatusTable

CLASSES: tuple[str, ...] = tuple(c.value for c in StatusClass)
FINAL_CLASSES: tuple[str, ...] = tuple(c for c in CLASSES if c != StatusClass.PENDING.value)

# Distinct settings counted under their own name; later ones under OTHER_SETTING.
MAX_SETTINGS = 500
OTHER_SETTING = "other"
# Raw (path, operation) pairs remembered with their counts (cleared when full: a cache).
_SETTING_CACHE_SIZE = 4096


class FleetCounters:
    def __init__(self, statuses: StatusTable, latency_buckets: Sequence[float]) -> None:
        self.statuses = statuses
        # Sorted, finite and unique: the renderer adds +Inf, and OpenMetrics rejects disorder.
        self.latency_buckets = tuple(
            sorted({float(b) for b in latency_buckets if math.isfinite(b)})
        )
        # status index -> times entered. Every known status starts at 0 so the first
        # increase shows in rate().
        self._transitions: list[int] = [0] * len(statuses.names)
        self._latency = {c: Histogram(self.latency_buckets) for c in CLASSES}
        # (setting, operation) -> actions that reached a final status there, per class of
        # FINAL_CLASSES. Created at 0 when an action of the pair is first seen, so that its
        # first result shows in increase() (a series born at 1 hides it).
        self._settings: dict[tuple[str, str], list[int]] = {}
        self._setting_names: set[str] = set()
        # (config.path, config.action) as sent -> its counts in _settings.
        self._counts_of: dict[tuple[str | None, str | None], list[int]] = {}
        # Moves with every change: transitions, latencies, new setting pairs.
        self.events = 0

    # --- counting (the ledger calls these) ---------------------------------------------------

    def entered(self, status: int, action: Action, *, first_final: bool) -> None:
        """Count ``status`` entered; a final one also counts for the action's setting, when
        ``first_final`` (the action reached no final status before)."""
        transitions = self._transitions
        while len(transitions) <= status:
            transitions.append(0)
        transitions[status] += 1
        self.events += 1
        status_class = self.statuses.classes[status]
        if first_final and status_class in FINAL_CLASSES:
            self.setting_counts(action)[FINAL_CLASSES.index(status_class)] += 1

    def setting_counts(self, action: Action) -> list[int]:
        """The result counts of the action's (setting, operation), created at 0."""
        raw = (action.path, action.operation)
        counts = self._counts_of.get(raw)  # every new action asks: normalize once per path
        if counts is None:
            counts = self._setting_pair(self._setting(action.path), operation(action.operation))
            if len(self._counts_of) >= _SETTING_CACHE_SIZE:
                self._counts_of.clear()
            self._counts_of[raw] = counts
        return counts

    def _setting_pair(self, name: str, op: str) -> list[int]:
        counts = self._settings.get((name, op))
        if counts is None:
            counts = self._settings[(name, op)] = [0] * len(FINAL_CLASSES)
            self.events += 1  # a new pair's series, at 0, move the counters too
        return counts

    def _setting(self, path: str | None) -> str:
        """The setting label of a CSP path: one of MAX_SETTINGS names, then OTHER_SETTING."""
        name = setting(path)
        if name not in self._setting_names:
            if len(self._setting_names) >= MAX_SETTINGS:
                return OTHER_SETTING
            self._setting_names.add(name)
        return name

    def latency_observed(self, status: int, action: Action) -> None:
        if action.sent_at is None or action.received_at is None:
            return
        seconds = action.received_at - action.sent_at
        if seconds >= 0:
            self._latency[self.statuses.classes[status]].observe(seconds)
            self.events += 1

    # --- reads -------------------------------------------------------------------------------

    def transitions(self) -> list[tuple[str, str, int]]:
        """(status, status_class, count) for every status ever interned, known ones first."""
        names, classes = self.statuses.names, self.statuses.classes
        counts = self._transitions + [0] * (len(names) - len(self._transitions))
        return [(names[i], classes[i], n) for i, n in enumerate(counts)]

    def latency(self) -> Mapping[str, Histogram]:
        """Latency histogram per status_class (read-only use)."""
        return MappingProxyType(self._latency)

    def setting_results(self) -> list[tuple[str, str, str, int]]:
        """(setting, operation, status_class, count) of every pair seen, zeros included."""
        return [
            (name, op, status_class, count)
            for (name, op), counts in sorted(self._settings.items())
            for status_class, count in zip(FINAL_CLASSES, counts, strict=True)
        ]

    # --- the store ---------------------------------------------------------------------------

    def saved(self) -> dict[str, object]:
        """Everything counted, by name (status indexes are this process's own)."""
        names = self.statuses.names
        return {
            "transitions": {names[i]: n for i, n in enumerate(self._transitions) if n},
            "latency": {
                c: {"counts": h.counts, "sum": h.sum, "count": h.count}
                for c, h in self._latency.items()
            },
            "settings": [[name, op, counts] for (name, op), counts in self._settings.items()],
        }

    def restore(self, saved: Mapping[str, Any]) -> None:
        """Continue from what a previous process counted: ``saved()``'s shape, checked by
        the store's decoding (snapshot.SavedCounters)."""
        for status, count in saved["transitions"].items():
            index = self.statuses.intern(status)
            while len(self._transitions) <= index:
                self._transitions.append(0)
            self._transitions[index] += count
        for status_class, hist in saved["latency"].items():
            target = self._latency.get(status_class)
            if target is not None and len(hist["counts"]) == len(target.counts):
                target.counts = hist["counts"]
                target.sum, target.count = hist["sum"], hist["count"]
        for name, op, counts in saved["settings"]:
            if name != OTHER_SETTING:
                self._setting_names.add(name)
            pair = self._setting_pair(name, op)
            for i, n in enumerate(counts[: len(pair)]):
                pair[i] += n
        self.events += 1
