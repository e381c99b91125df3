"""Value types of the config files: each check's message, and the schema it publishes."""

from __future__ import annotations

from typing import Annotated, Any

import pytest
from pydantic import TypeAdapter, ValidationError

from exporter.configvalues import (
    Flag,
    Fraction,
    PositiveDuration,
    PositiveNumber,
    Text,
    choice,
    duration,
    integer,
    unique_items,
)
from exporter.problems import problem_lines


def problem(kind: Any, value: object) -> str:
    with pytest.raises(ValidationError) as caught:
        TypeAdapter(kind).validate_python(value)
    (line,) = problem_lines(caught.value, None)
    return line.removeprefix(": ")


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        (Annotated[int, integer(1)], True, "must be an integer > 0, got true"),
        (Annotated[int, integer(0)], -1, "must be an integer >= 0, got -1"),
        (Annotated[int, integer(1, 10)], 11, "must be an integer from 1 to 10, got 11"),
        (PositiveNumber, float("inf"), "must be a number > 0, got inf"),
        (Fraction, 1, "must be a number from 0 up to (not including) 1, got 1"),
        (PositiveDuration, "0s", "must be a number > 0 (seconds) or a duration like 45s"),
        (Annotated[float, duration(zero=True)], -1, "must be a number >= 0 (seconds)"),
        (Annotated[str, choice(("a", "b"))], "c", "must be one of a, b; got 'c'"),
        (Text, True, "must be a string, got true (quote it)"),
        (Text, " ", "must be a string, got an empty string"),
        (Flag, "yes", "must be true or false"),
    ],
)
def test_each_value_says_what_it_wants(kind: Any, value: object, message: str) -> None:
    assert problem(kind, value).startswith(message)


def test_values_that_pass() -> None:
    assert TypeAdapter(PositiveDuration).validate_python("1h30m") == 5400.0
    assert TypeAdapter(Annotated[float, duration(zero=True)]).validate_python(0) == 0.0
    assert TypeAdapter(Text).validate_python(42) == "42"
    assert TypeAdapter(Annotated[int, integer(1, 10)]).validate_python(10) == 10


def test_the_schema_carries_the_same_bounds() -> None:
    assert TypeAdapter(Annotated[int, integer(1, 10)]).json_schema() == {
        "type": "integer", "minimum": 1, "maximum": 10
    }  # fmt: skip
    durations = TypeAdapter(PositiveDuration).json_schema()["anyOf"]
    assert durations[0] == {"type": "number", "exclusiveMinimum": 0}
    assert durations[1]["type"] == "string"
    assert TypeAdapter(Annotated[str, choice(("a", "b"))]).json_schema() == {"enum": ["a", "b"],
                                                                             "type": "string"}


def test_unique_items_names_the_first_of_a_repeat_case_aside() -> None:
    with pytest.raises(ValidationError) as caught:
        unique_items(["ab", "x", "AB"], str)
    assert problem_lines(caught.value, None) == ["[2]: duplicate of [0] ('AB')"]
    assert unique_items(["a", "b"], str) == ("a", "b")
