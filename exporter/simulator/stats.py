"""Requests served, per (route name, HTTP status); a reset connection counts as status 0.

``dialect`` counts, per (route name, what), the requests whose ``sort`` or ``tags`` the
simulator's dialect ignored, refused or could not read (``dialect.SORT_IGNORED`` …); a
refused sort is also a 400 in ``counts``.
"""

from __future__ import annotations

from collections import Counter

RESET = 0


class Stats:
    def __init__(self) -> None:
        self.counts: Counter[tuple[str, int]] = Counter()
        self.dialect: Counter[tuple[str, str]] = Counter()

    def record(self, route: str, status: int) -> None:
        self.counts[(route, status)] += 1

    def note(self, route: str, what: str) -> None:
        self.dialect[(route, what)] += 1

    def total(self, route: str | None = None) -> int:
        return sum(n for (name, _), n in self.counts.items() if route is None or name == route)

    def reset(self) -> None:
        self.counts.clear()
        self.dialect.clear()

    def as_rows(self) -> list[dict[str, object]]:
        return [
            {"route": route, "status": status, "count": count}
            for (route, status), count in sorted(self.counts.items())
        ]

    def dialect_rows(self) -> list[dict[str, object]]:
        return [
            {"route": route, "what": what, "count": count}
            for (route, what), count in sorted(self.dialect.items())
        ]
