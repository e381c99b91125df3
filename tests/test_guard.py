"""The cardinality guard's levels: what each serves, the most detailed level that fits, more
detail back only with room to spare, and what it says about it (docs/cardinality.md)."""

from __future__ import annotations

import pytest

from exporter.devicestore import Column, SeriesTotals
from exporter.guard import GUARD_LEVELS, OWN_GAUGES, Guard, Level, level_series

# The compliance check time is kept at every level, as the check-in (docs/cardinality.md).
ALWAYS = {
    Column.OLDEST, Column.UP, Column.LAST_SUCCESS, Column.CHECK_IN, Column.COMPLIANCE_CHECK
}


def test_each_level_removes_what_it_names_on_top_of_the_previous() -> None:
    served = {level: set(level.columns) for level in Level}
    assert served[Level.FULL] == ALWAYS | {Column.ACTIONS, Column.INFO, Column.COMMAND_INFO}
    assert served[Level.BY_STATUS] == ALWAYS | {Column.BY_STATUS, Column.INFO, Column.COMMAND_INFO}
    assert served[Level.NO_COMMAND_INFO] == ALWAYS | {Column.BY_STATUS, Column.INFO}
    assert served[Level.BY_CLASS] == ALWAYS | {Column.BY_CLASS, Column.INFO}
    assert served[Level.NO_DEVICE_INFO] == ALWAYS | {Column.BY_CLASS}
    assert served[Level.FLEET_CLASSES] == ALWAYS
    assert Level.FLEET_CLASSES.actions is None
    assert [level.removed for level in Level] == list(GUARD_LEVELS)
    assert "command_info" in Level.NO_COMMAND_INFO.removed
    assert "device_info" in Level.NO_DEVICE_INFO.removed


def test_series_per_level_come_from_the_store_s_totals() -> None:
    totals = SeriesTotals()
    for column, lines in {Column.ACTIONS: 1000, Column.BY_STATUS: 400, Column.BY_CLASS: 100,
                          Column.INFO: 50, Column.COMMAND_INFO: 200, Column.UP: 50,
                          Column.LAST_SUCCESS: 50, Column.OLDEST: 10}.items():
        totals.lines[column] = lines
    totals.classes.update({"success": 7, "error": 2, "pending": 0})
    kept = 50 + 50 + 10 + 30 + OWN_GAUGES  # + 30 series no level touches
    assert level_series(totals, 30) == [
        kept + 1000 + 50 + 200,
        kept + 400 + 50 + 200,
        kept + 400 + 50,
        kept + 100 + 50,
        kept + 100,
        kept + 2,  # one series per status class with actions
    ]


def test_the_guard_is_off_without_a_ceiling() -> None:
    guard = Guard(None)
    assert guard.choose([10**9] * 6) is False
    assert (guard.level, guard.series_total, guard.series_dropped) == (Level.FULL, 0, 0)
    assert guard.summary == "Cardinality guard: off (no metrics.max_series)."


def test_the_most_detailed_level_that_fits() -> None:
    guard = Guard(100)
    assert guard.choose([150, 120, 100, 90, 80, 10]) is True
    assert guard.level == Level.NO_COMMAND_INFO
    assert (guard.series_total, guard.series_dropped) == (150, 50)
    assert guard.summary == (
        "Cardinality guard: 50 of 150 series dropped to stay under 100 (level 2: "
        f"{GUARD_LEVELS[1]}; {GUARD_LEVELS[2]})."
    )
    assert guard.choose([150, 120, 100, 90, 80, 10]) is False


@pytest.mark.parametrize(
    ("totals", "level"),
    [
        ([95, 89, 85, 80, 70, 10], Level.BY_STATUS),  # 0 fits, but only 1 with room
        ([95, 92, 91, 80, 70, 10], Level.NO_COMMAND_INFO),  # nothing better with room: stay
        ([120, 110, 105, 95, 70, 10], Level.BY_CLASS),  # the old level overflows: less detail
        ([80, 70, 60, 50, 40, 10], Level.FULL),  # room to spare
    ],
)
def test_more_detail_comes_back_only_with_room_to_spare(totals: list[int], level: Level) -> None:
    guard = Guard(100)
    guard.choose([150, 120, 100, 90, 80, 10])
    guard.choose(totals)
    assert guard.level == level


def test_over_the_ceiling_even_at_the_last_level() -> None:
    guard = Guard(5)
    guard.choose([150, 120, 100, 90, 80, 10])
    assert guard.level == Level.FLEET_CLASSES
    assert guard.summary.endswith(", still over the ceiling.")
