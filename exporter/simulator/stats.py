"""Requests served, per (route name, HTTP status); a reset connection counts as status 0."""

from __future__ import annotations

from collections import Counter

RESET = 0


class Stats:
    def __init__(self) -> None:
        self.counts: Counter[tuple[str, int]] = Counter()

    def record(self, route: str, status: int) -> None:
        self.counts[(route, status)] += 1

    def total(self, route: str | None = None) -> int:
        return sum(n for (name, _), n in self.counts.items() if route is None or name == route)

    def reset(self) -> None:
        self.counts.clear()

    def as_rows(self) -> list[dict[str, object]]:
        return [
            {"route": route, "status": status, "count": count}
            for (route, status), count in sorted(self.counts.items())
        ]
