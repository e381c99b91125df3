"""Validation problems as users read them: one line each, prefixed by its key path.

The config and the web config are declared as pydantic dataclasses. Pydantic reports a
failed validation as errors with a location; :func:`problem_lines` turns them into lines like
``devices[2].commands[0]: not a 24-hex id, got 'x'``, ordered as the keys are declared (a
section's unknown keys first, so a misspelt key is read before what its absence caused), with
a "did you mean" hint for unknown keys. Value checks raise :func:`invalid` with the whole
message; checks that find several problems at once collect them in :class:`Problems`.

Nothing here shows an input value unless a message chose to: pydantic's own rendering of an
error (which echoes the input) is never printed.
"""

from __future__ import annotations

import difflib
import json
import re
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import AliasChoices, ValidationError, WrapValidator
from pydantic.dataclasses import is_pydantic_dataclass
from pydantic.fields import FieldInfo
from pydantic_core import InitErrorDetails, PydanticCustomError

T = TypeVar("T")
Loc = tuple[str | int, ...]

_MAPPING_TYPES = frozenset(("dataclass_type", "model_type", "dict_type", "model_attributes_type"))
_UNKNOWN_TYPES = frozenset(("unexpected_keyword_argument", "extra_forbidden", "invalid_key"))
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\-]+")


class ConfigError(Exception):
    """One or more configuration problems; ``str()`` gives one line per problem."""

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems: tuple[str, ...] = (
            (problems,) if isinstance(problems, str) else tuple(problems)
        )
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


@dataclass(frozen=True, slots=True)
class IfMissing:
    """Field metadata: what to say when a required key is absent (default ``required``)."""

    message: str


def invalid(message: str) -> PydanticCustomError:
    """A value's problem, worded in full (pydantic would otherwise fill in the braces)."""
    return PydanticCustomError("invalid", "{message}", {"message": message})


class Problems:
    """Problems found in one value, raised together as one ``ValidationError``."""

    __slots__ = ("_details",)

    def __init__(self) -> None:
        self._details: list[InitErrorDetails] = []

    def add(
        self,
        loc: Loc,
        message: str,
        value: object = None,
        kind: str = "invalid",
        context: dict[str, Any] | None = None,
    ) -> None:
        error = PydanticCustomError(kind, "{message}", {**(context or {}), "message": message})
        self._details.append({"type": error, "loc": loc, "input": value})

    def duplicate(self, loc: Loc, first: int, item: str, first_key: Loc = ()) -> None:
        """The item at ``loc`` repeats the one at index ``first`` (at ``first_key`` in it).

        The line names the first one by its whole key path, which only the reader of the
        whole file knows.
        """
        context = {"first": first, "key": first_key}
        self.add(loc, f"({item!r})", item, kind="duplicate", context=context)

    def extend(self, exc: ValidationError) -> None:
        """Keep another validation's problems, with their kinds (the lines depend on them)."""
        for error in exc.errors(include_url=False):
            loc, kind = tuple(error["loc"]), error["type"]
            self.add(loc, error["msg"], error.get("input"), kind, error.get("ctx"))

    def read(self, loc: Loc, read: Callable[[Any], T], value: object) -> T | None:
        """``read(value)``, or None with its problem noted."""
        try:
            return read(value)
        except PydanticCustomError as exc:
            self.add(loc, exc.message(), value)
            return None

    def __bool__(self) -> bool:
        return bool(self._details)

    def raise_any(self) -> None:
        if self._details:
            raise ValidationError.from_exception_data("config", self._details)


def also(check: Callable[[Any, Problems], None]) -> WrapValidator:
    """Validation plus a check of the raw value, both reported.

    A model's after-validators run only once every field is valid; a check that must be
    reported next to the fields' problems (duplicates, nothing to watch) reads the raw value.
    """

    def validate(value: Any, handler: Callable[[Any], Any]) -> Any:
        problems = Problems()
        check(value, problems)
        try:
            result = handler(value)
        except ValidationError as exc:
            problems.extend(exc)
            result = None
        problems.raise_any()
        return result

    return WrapValidator(validate)


# --- turning errors into lines ------------------------------------------------------------


def problem_lines(exc: ValidationError, root: object, prefix: str = "") -> list[str]:
    """One ``key.path: message`` line per error, in the order the keys are declared."""
    errors = exc.errors(include_url=False)
    placed = [(_Place.find(root, error["loc"]), error) for error in errors]
    placed.sort(key=lambda item: item[0].ranks)
    return [
        f"{prefix}{key_path(error['loc'], error['type'])}: {_message(place, error)}"
        for place, error in placed
    ]


def key_path(loc: Sequence[str | int], kind: str = "") -> str:
    path = ""
    for index, part in enumerate(loc):
        last_key = kind == "invalid_key" and index == len(loc) - 1
        if isinstance(part, int) and not last_key:
            path = f"{path}[{part}]"
        else:
            path = child(path, spelling(part))
    return path


def child(path: str, name: str) -> str:
    if not _PLAIN_KEY.fullmatch(name):
        return f"{path}[{json.dumps(name)}]"
    return f"{path}.{name}" if path else name


def spelling(value: object) -> str:
    """A scalar as the user wrote it."""
    if isinstance(value, str):
        return value
    written = getattr(value, "text", None)  # numbers from the YAML loader keep their text
    return written if isinstance(written, str) else shown(value)


def shown(value: object) -> str:
    """A value for a message: scalars as written, containers by kind."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        written = getattr(value, "text", None)
        return written if isinstance(written, str) else repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _message(place: _Place, error: Any) -> str:
    kind = error["type"]
    if kind == "missing":
        metadata = place.field.metadata if place.field else []
        marks = [mark.message for mark in metadata if isinstance(mark, IfMissing)]
        return marks[0] if marks else "required"
    if kind in _UNKNOWN_TYPES:
        return _unknown_key(place.owner, spelling(error["loc"][-1]))
    if kind in _MAPPING_TYPES:
        return f"must be a mapping, got {shown(error.get('input'))}"
    if kind == "duplicate":
        first = key_path(_first_of(error["loc"], error["ctx"]["first"], error["ctx"]["key"]))
        return f"duplicate of {first} {error['msg']}"
    return str(error["msg"])


def _first_of(loc: Sequence[str | int], index: int, key: Sequence[str | int]) -> Loc:
    """Where the first of a repeated item is: ``loc``'s list with ``index`` and ``key``."""
    last = max(i for i, part in enumerate(loc) if isinstance(part, int))
    return (*loc[:last], index, *key)


def _unknown_key(owner: type | None, name: str) -> str:
    unsupported: dict[str, str] = getattr(owner, "UNSUPPORTED_KEYS", {})
    if name in unsupported:
        return unsupported[name]
    spellings = [keys for keys in _field_keys(owner).values() if name in keys]
    if spellings:  # pydantic takes the first spelling and calls the other unknown
        return f"set either {' or '.join(spellings[0])}, not both"
    keys = [key for keys in _field_keys(owner).values() for key in keys]
    close = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean {close[0]}?)"
    return f"unknown key (expected one of: {', '.join(keys)})"


# --- where an error is in the declared models ---------------------------------------------


@dataclass(frozen=True, slots=True)
class _Place:
    """An error location resolved against the models: the field, its owner, a sort key."""

    ranks: tuple[int, ...]
    owner: type | None
    field: FieldInfo | None

    @classmethod
    def find(cls, root: object, loc: Sequence[str | int]) -> _Place:
        node: object = root
        ranks: list[int] = []
        owner: type | None = None
        field: FieldInfo | None = None
        for part in loc:
            owner, field = _model_in(node), None
            if isinstance(part, int) and owner is None:  # an item of a list
                ranks.append(part)
                node = _item_type(node)
                continue
            keys = _field_keys(owner)
            names = [name for name, spellings in keys.items() if part in spellings]
            # Unknown keys rank first; mapping keys (labels, users) keep the input's order.
            ranks.append(list(keys).index(names[0]) + 1 if names else 0)
            field = owner.__pydantic_fields__[names[0]] if names and owner else None
            node = field.annotation if field else None
        return cls(tuple(ranks), owner, field)


def _field_keys(owner: type | None) -> dict[str, tuple[str, ...]]:
    """Field name -> the keys that set it in a file, in declaration order."""
    if owner is None:
        return {}
    return {name: _spellings(name, info) for name, info in owner.__pydantic_fields__.items()}


def _spellings(name: str, info: FieldInfo) -> tuple[str, ...]:
    if isinstance(info.validation_alias, AliasChoices):
        return tuple(str(choice) for choice in info.validation_alias.choices)
    return (info.alias or name,)


def _unwrapped(node: object) -> Iterator[object]:
    """The types a (possibly annotated, optional) annotation may hold."""
    if typing.get_origin(node) is typing.Annotated:
        node = typing.get_args(node)[0]
    if typing.get_origin(node) in (typing.Union, _UnionType):
        for arg in typing.get_args(node):
            yield from _unwrapped(arg)
    else:
        yield node


_UnionType = type(int | None)


def _model_in(node: object) -> type | None:
    for kind in _unwrapped(node):
        if isinstance(kind, type) and is_pydantic_dataclass(kind):
            return kind
    return None


def _item_type(node: object) -> object:
    for kind in _unwrapped(node):
        args = typing.get_args(kind)
        if typing.get_origin(kind) in (tuple, list) and args:
            return args[0]
    return None
