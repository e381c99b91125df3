"""Problem lines: pydantic's errors as the one-line, key-path messages users read."""

from __future__ import annotations

from typing import Annotated, ClassVar

import pytest
from pydantic import AliasChoices, Field, TypeAdapter, ValidationError

from exporter.configvalues import Section, checked, integer, model, unique_items
from exporter.problems import ConfigError, IfMissing, Problems, also, key_path, problem_lines


def _names(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError("not a list")
    return unique_items(value, str)


@model
class Inner:
    UNSUPPORTED_KEYS: ClassVar[dict[str, str]] = {"legacy": "not supported: use count"}

    count: Annotated[int, integer(1)] = 1
    names: Annotated[tuple[str, ...], checked(_names, list[str])] = ()
    age: Annotated[int, integer(0)] = Field(0, validation_alias=AliasChoices("age", "age_days"))


def _top_level_rule(value: object, problems: Problems) -> None:
    if isinstance(value, dict) and value.get("inner") is None:
        problems.add(("inner",), "must be set")


@model
class Outer:
    id: Annotated[str, IfMissing("required (an id)")]
    inner: Section[Inner] = Inner()
    items: tuple[Inner, ...] = ()


OUTER = TypeAdapter(Annotated[Outer, also(_top_level_rule)])


def lines(document: object) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        OUTER.validate_python(document)
    return problem_lines(caught.value, Outer)


def test_every_problem_is_one_line_in_declaration_order_unknown_keys_first() -> None:
    document = {"inner": {"names": ["a", "b", "a"], "count": 0, "cuont": 2}, "id": "x",
                "items": [{}, {"count": "many"}]}  # fmt: skip
    assert lines(document) == [
        "inner.cuont: unknown key (did you mean count?)",
        "inner.count: must be an integer > 0, got 0",
        "inner.names[2]: duplicate of inner.names[0] ('a')",
        "items[1].count: must be an integer > 0, got 'many'",
    ]


def test_missing_keys_say_what_the_field_asks_for() -> None:
    assert lines({"inner": {}}) == ["id: required (an id)"]
    assert lines({"id": "x", "inner": {}, "items": [{"x": 1}]}) == [
        "items[0].x: unknown key (expected one of: count, names, age, age_days)"
    ]


def test_a_check_of_the_raw_value_is_reported_next_to_the_fields_problems() -> None:
    assert lines({"id": "x", "inner": None, "items": [{"count": 0}]}) == [
        "inner: must be set",
        "items[0].count: must be an integer > 0, got 0",
    ]


def test_sections_and_their_spellings() -> None:
    assert lines({"id": "x", "inner": [1]}) == ["inner: must be a mapping, got a list"]
    assert lines({"id": "x", "inner": {"age": 1, "age_days": 2}}) == [
        "inner.age_days: set either age or age_days, not both"
    ]
    assert lines({"id": "x", "inner": {"legacy": 1}}) == ["inner.legacy: not supported: use count"]


def test_key_paths_quote_keys_that_are_not_plain() -> None:
    assert key_path(["devices", 2, "labels", "a b"]) == 'devices[2].labels["a b"]'
    assert key_path(["labels", "site-code"]) == "labels.site-code"
    assert key_path([]) == ""


def test_a_config_error_is_its_lines() -> None:
    error = ConfigError(["a: one", "b: two"])
    assert error.problems == ("a: one", "b: two")
    assert str(error) == "a: one\nb: two"
