"""Value types shared by the config files: a pure check each, with its message and schema.

A type here is ``Annotated[T, PlainValidator(read, json_schema_input_type=...)]``: ``read``
takes the value as YAML gave it and raises :func:`~exporter.problems.invalid` with the
sentence a user reads; the input type is what the published JSON Schema shows for it, built
from the same bounds. Both come from one factory call, so a bound is written once.

``model`` makes a section (a frozen pydantic dataclass that refuses unknown keys) and
``Section[...]`` a field holding one, where null means every default.

Strings may be written unquoted even when YAML reads them as numbers: they are taken as
written. Booleans are not (``yes``, ``on`` and ``true`` read alike): quote them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar, overload

from pydantic import BeforeValidator, ConfigDict, Field, PlainValidator
from pydantic import dataclasses as pydantic_dataclasses

from exporter.problems import Problems, invalid, shown, spelling

DURATION_EXAMPLES = "45s, 30m, 12h, 7d, 1w, 1h30m"
_UNITS = {"w": 604800.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
# Units in descending order, each at most once, as Prometheus writes durations. The same
# expression serves as the schema's pattern (JSON Schema regexes are ECMA-262: no \A, \Z).
_DURATION_UNITS = "".join(rf"(?:(\d+(?:\.\d+)?){unit}(?![a-z]))?" for unit in _UNITS)
_DURATION = re.compile(_DURATION_UNITS, re.ASCII)
DURATION_PATTERN = rf"^\s*(?=\d){_DURATION_UNITS}\s*$"
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|[wdhms])", re.ASCII)
# Unknown keys are errors; a field's docstring is its description in the JSON Schema; a field
# set by another spelling in files (max_age, tls_server_config) is set by its name in code.
SECTION = ConfigDict(
    extra="forbid", use_attribute_docstrings=True, validate_by_name=True, validate_by_alias=True
)
C = TypeVar("C", bound=type)
T = TypeVar("T")


@overload
def model(cls: C, /) -> C: ...
@overload
def model(**config: Any) -> Callable[[C], C]: ...
def model(cls: C | None = None, /, **config: Any) -> C | Callable[[C], C]:
    """A section of a config file: a frozen pydantic dataclass (``config`` adds settings)."""
    decorate = pydantic_dataclasses.dataclass(
        frozen=True, slots=True, config=ConfigDict(SECTION, **config)  # type: ignore[typeddict-item]
    )
    return decorate if cls is None else decorate(cls)  # type: ignore[return-value]


def _null_is_empty(value: object) -> object:
    """``api:`` (null) means every default of the section."""
    return {} if value is None else value


Section = Annotated[T, BeforeValidator(_null_is_empty)]


def checked(read: Callable[..., Any], schema: object) -> PlainValidator:
    """A value type's validator: ``read`` checks, ``schema`` is what the JSON Schema shows."""
    return PlainValidator(read, json_schema_input_type=schema)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- text ---------------------------------------------------------------------------------


def text(value: object, what: str = "a string") -> str:
    """A non-empty string; numbers count, spelled as written."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        hint = " (quote it)" if isinstance(value, bool) else ""
        raise invalid(f"must be {what}, got {shown(value)}{hint}")
    written = spelling(value)
    if not written.strip():
        raise invalid(f"must be {what}, got an empty string")
    return written


def matching(pattern: re.Pattern[str], what: str, wrong: str) -> PlainValidator:
    """Text that matches ``pattern`` (ASCII only), e.g. an id."""

    def read(value: object) -> str:
        written = text(value, what)
        if not pattern.fullmatch(written) or not written.isascii():
            raise invalid(f"{wrong}, got {shown(written)}")
        return written

    return checked(read, Annotated[str, Field(pattern=pattern.pattern)] | int)


TEXT_SCHEMA = Annotated[str, Field(min_length=1)] | float
Text = Annotated[str, checked(text, TEXT_SCHEMA)]


# --- numbers and durations ----------------------------------------------------------------


def integer(minimum: int, maximum: int | None = None) -> PlainValidator:
    wanted = (
        f"an integer from {minimum} to {maximum}" if maximum is not None
        else f"an integer > {minimum - 1}" if minimum > 0 else f"an integer >= {minimum}"
    )  # fmt: skip

    def read(value: object) -> int:
        if (
            not isinstance(value, int) or isinstance(value, bool) or value < minimum
            or (maximum is not None and value > maximum)
        ):  # fmt: skip
            raise invalid(f"must be {wanted}, got {shown(value)}")
        return int(value)

    return checked(read, Annotated[int, Field(ge=minimum, le=maximum)])


def _positive_number(value: object) -> float:
    if not is_number(value) or not math.isfinite(value) or value <= 0:  # type: ignore[arg-type]
        raise invalid(f"must be a number > 0, got {shown(value)}")
    return float(value)  # type: ignore[arg-type]


def _fraction(value: object) -> float:
    if not is_number(value) or not 0 <= value < 1:  # type: ignore[operator]
        raise invalid(f"must be a number from 0 up to (not including) 1, got {shown(value)}")
    return float(value)  # type: ignore[arg-type]


PositiveNumber = Annotated[float, checked(_positive_number, Annotated[float, Field(gt=0)])]
Fraction = Annotated[float, checked(_fraction, Annotated[float, Field(ge=0, lt=1)])]


def parse_duration(value: object) -> float:
    """Seconds from a number, or a string like ``45s``, ``30m``, ``12h``, ``7d``, ``1h30m``.

    Units ``w d h m s ms`` go in that order, each at most once (as Prometheus writes them).
    Raises ``ValueError`` for anything else.
    """
    if is_number(value):
        seconds = float(value)  # type: ignore[arg-type]
    elif isinstance(value, str) and value.strip() and _DURATION.fullmatch(value.strip()):
        seconds = sum(
            float(n) * _UNITS[unit] for n, unit in _DURATION_PART.findall(value.strip())
        )
    else:
        raise ValueError(f"not a duration: {shown(value)}")
    if not math.isfinite(seconds):
        raise ValueError(f"not a finite duration: {shown(value)}")
    return seconds


def _duration_reader(*, zero: bool) -> Callable[[object], float]:
    bound = ">= 0" if zero else "> 0"

    def read(value: object) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError:
            seconds = math.nan
        if not (seconds >= 0 if zero else seconds > 0):
            raise invalid(
                f"must be a number {bound} (seconds) or a duration like {DURATION_EXAMPLES}, "
                f"got {shown(value)}"
            )
        return seconds

    return read


def duration(*, zero: bool = False) -> PlainValidator:
    """Seconds, as a number or a duration string; above 0, or from 0 when ``zero``."""
    seconds = Annotated[float, Field(ge=0) if zero else Field(gt=0)]
    written = Annotated[str, Field(pattern=DURATION_PATTERN)]
    return checked(_duration_reader(zero=zero), seconds | written)


positive_duration = _duration_reader(zero=False)
PositiveDuration = Annotated[float, duration()]


# --- choices and lists --------------------------------------------------------------------


def choice(options: tuple[str, ...]) -> PlainValidator:
    def read(value: object) -> str:
        if value not in options:
            raise invalid(f"must be one of {', '.join(options)}; got {shown(value)}")
        return str(value)

    return checked(read, Literal[options])  # type: ignore[valid-type]


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise invalid("must be true or false")
    return value


Flag = Annotated[bool, checked(_flag, bool)]


def unique_items(values: list[Any], read: Callable[[Any], str]) -> tuple[str, ...]:
    """Each item read; a repeat (case aside) is a problem at its index."""
    problems = Problems()
    items: list[str] = []
    first_seen: dict[str, int] = {}
    for index, raw in enumerate(values):
        item = problems.read((index,), read, raw)
        if item is None:
            continue
        first = first_seen.setdefault(item.lower(), index)
        if first != index:
            problems.duplicate((index,), first, item)
        else:
            items.append(item)
    problems.raise_any()
    return tuple(items)
