"""The cardinality guard: under ``metrics.max_series`` the most specific labels go first.

Each level removes, on top of the previous one, the detail it names (docs/cardinality.md).
Every alert keeps working at every level: they read target_up, last_success, oldest_pending
and the check-in time (kept per device), the fleet-wide families (rollouts, settings, devices
per state, whose series do not grow with the fleet), the transition counter and
self-metrics; the recording rules sum the action gauges ``without (command, status)`` and so
read every level alike.

The guard weighs the body without reading it: the device store keeps the sample lines of
each of its columns summed over the fleet (:class:`exporter.devicestore.SeriesTotals`), and
everything else is a few bounded sections.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

import structlog

from exporter.devicestore import Column, SeriesTotals

log = structlog.get_logger("exporter.exposition")

# Back to more detail only when it fits with this much room, so a fleet hovering at the
# ceiling does not flip its series back and forth every round.
GUARD_RELAX = 0.9


class Level(IntEnum):
    """How much detail the guard removed; each level adds its ``removed`` to the previous."""

    removed: str

    def __new__(cls, value: int, removed: str) -> Level:
        member = int.__new__(cls, value)
        member._value_ = value
        member.removed = removed
        return member

    FULL = 0, "full detail"
    BY_STATUS = 1, "applivery_windows_command_actions summed over command"
    NO_COMMAND_INFO = 2, "applivery_windows_command_info dropped"
    BY_CLASS = 3, "applivery_windows_command_actions summed over status (per status_class)"
    NO_DEVICE_INFO = 4, "applivery_windows_device_info dropped"
    FLEET_CLASSES = 5, (
        "applivery_windows_command_actions summed over device (per status_class)"
    )

    @property
    def actions(self) -> Column | None:
        """The store column the action gauges come from; None: one fleet-wide section."""
        if self >= Level.FLEET_CLASSES:
            return None
        if self >= Level.BY_CLASS:
            return Column.BY_CLASS
        return Column.BY_STATUS if self >= Level.BY_STATUS else Column.ACTIONS

    @property
    def columns(self) -> tuple[Column, ...]:
        """The store columns served at this level, in the order of the body."""
        return (
            *((self.actions,) if self.actions is not None else ()),
            Column.OLDEST,
            *((Column.INFO,) if self < Level.NO_DEVICE_INFO else ()),
            *((Column.COMMAND_INFO,) if self < Level.NO_COMMAND_INFO else ()),
            Column.UP,
            Column.LAST_SUCCESS,
            Column.CHECK_IN,
            Column.COMPLIANCE_CHECK,
        )


GUARD_LEVELS: tuple[str, ...] = tuple(level.removed for level in Level)
OWN_GAUGES = 2  # series_dropped and cardinality_guard_level, served at every level


def level_series(totals: SeriesTotals, fixed: int) -> list[int]:
    """Series served at each level, given the series no level touches (``fixed``)."""
    base = fixed + OWN_GAUGES
    out = []
    for level in Level:
        lines = sum(totals.lines[column] for column in level.columns)
        if level.actions is None:
            lines += sum(1 for count in totals.classes.values() if count)
        out.append(base + lines)
    return out


class Guard:
    """The level for the series at hand, with hysteresis, and what it dropped."""

    def __init__(self, max_series: int | None) -> None:
        self.max_series = max_series
        self.level = Level.FULL
        self.series_total = 0  # series at full detail
        self.series_dropped = 0

    def choose(self, totals: Sequence[int]) -> bool:
        """Pick the level for ``totals`` (series per level); True when the level or the
        number of series it drops changed."""
        previous = (self.level, self.series_dropped)
        ceiling = self.max_series
        if ceiling is None:
            self.level, self.series_total, self.series_dropped = Level.FULL, 0, 0
            return self.level != previous[0]
        level = _fitting(totals, ceiling)
        if level < self.level and totals[level] > ceiling * GUARD_RELAX:
            # More detail only with room to spare; else stay, unless the old level overflows.
            level = max(level, min(self.level, _fitting(totals, ceiling * GUARD_RELAX)))
        self.level = Level(level)
        self.series_total = totals[0]
        self.series_dropped = totals[0] - totals[level]
        if self.level != previous[0]:
            self._log(totals, ceiling)
        return (self.level, self.series_dropped) != previous

    def _log(self, totals: Sequence[int], ceiling: int) -> None:
        (log.warning if self.level else log.info)(
            "cardinality_guard",
            level=int(self.level),
            removed=list(GUARD_LEVELS[1 : self.level + 1]),
            series=totals[0],
            dropped=self.series_dropped,
            max_series=ceiling,
            over_ceiling=totals[self.level] > ceiling,
        )

    @property
    def summary(self) -> str:
        """One line for the landing page and the log."""
        if self.max_series is None:
            return "Cardinality guard: off (no metrics.max_series)."
        if self.level == Level.FULL:
            return (
                f"Cardinality guard: {self.series_total} series, within the ceiling of "
                f"{self.max_series}."
            )
        over = self.series_total - self.series_dropped > self.max_series
        return (
            f"Cardinality guard: {self.series_dropped} of {self.series_total} series dropped "
            f"to stay under {self.max_series} (level {int(self.level)}: "
            f"{'; '.join(GUARD_LEVELS[1 : self.level + 1])})"
            + (", still over the ceiling." if over else ".")
        )


def _fitting(totals: Sequence[int], ceiling: float) -> int:
    """The most detailed level whose series fit under ``ceiling``; else the last."""
    return next((i for i, n in enumerate(totals) if n <= ceiling), len(totals) - 1)
