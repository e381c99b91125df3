"""Validation of what clients send: create bodies and query parameters (pure functions).

Messages follow the Joi style Node APIs answer with; upstream does not document its 400
bodies (docs/upstream-api.md §9), so the wording and the code are ours.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from exporter.simulator.catalog import ACTIONS, FORMATS, Config

MAX_TEXT = 500
MAX_NAME = 500
MAX_COMMANDS = 1000  # upstream states no limit; one keeps a runaway client in check
SORT = re.compile(r"^[\w.]*((:asc)|(:desc))?$")


class ValidationError(ValueError):
    """A request that upstream would answer with 400."""


def parse_create_body(body: Any) -> tuple[list[Config], str | None]:
    """Commands and optional batch name of a ``POST .../commands`` body."""
    if not isinstance(body, Mapping):
        raise ValidationError('"value" must be of type object')
    unknown = sorted(set(body) - {"commands", "name"})
    if unknown:
        raise ValidationError(f'"{unknown[0]}" is not allowed')
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or not 0 < len(name) <= MAX_NAME):
        raise ValidationError(f'"name" must be a string of 1..{MAX_NAME} characters')
    return parse_commands(body.get("commands")), name


def parse_commands(commands: Any) -> list[Config]:
    if commands is None:
        raise ValidationError('"commands" is required')
    if not isinstance(commands, list):
        raise ValidationError('"commands" must be an array')
    if not commands:
        raise ValidationError('"commands" must contain at least 1 items')
    if len(commands) > MAX_COMMANDS:
        raise ValidationError(f'"commands" must contain less than or equal to {MAX_COMMANDS} items')
    return [_command(f"commands[{i}]", command) for i, command in enumerate(commands)]


def _command(where: str, command: Any) -> Config:
    if not isinstance(command, Mapping):
        raise ValidationError(f'"{where}" must be of type object')
    for key in command:
        if key != "config":
            raise ValidationError(f'"{where}.{key}" is not allowed')
    config = command.get("config")
    where = f"{where}.config"
    if config is None:
        raise ValidationError(f'"{where}" is required')
    if not isinstance(config, Mapping):
        raise ValidationError(f'"{where}" must be of type object')
    for key in config:
        if key not in ("path", "action", "value", "format"):
            raise ValidationError(f'"{where}.{key}" is not allowed')
    path = _text(config, "path", where, required=True)
    action = _choice(config, "action", where, ACTIONS)
    value = _text(config, "value", where, required=False)
    fmt = _choice(config, "format", where, FORMATS)
    assert path is not None  # required above
    return (path, action, value, fmt)


def _text(config: Mapping[str, Any], key: str, where: str, *, required: bool) -> str | None:
    value = config.get(key)
    if value is None:
        if required:
            raise ValidationError(f'"{where}.{key}" is required')
        return None
    if not isinstance(value, str):
        raise ValidationError(f'"{where}.{key}" must be a string')
    if required and not value:
        raise ValidationError(f'"{where}.{key}" is not allowed to be empty')
    if len(value) > MAX_TEXT:
        raise ValidationError(
            f'"{where}.{key}" length must be less than or equal to {MAX_TEXT} characters long'
        )
    return value


def _choice(config: Mapping[str, Any], key: str, where: str, choices: tuple[str, ...]) -> str:
    value = config.get(key)
    if value is None:
        raise ValidationError(f'"{where}.{key}" is required')
    if value not in choices:
        raise ValidationError(f'"{where}.{key}" must be one of [{", ".join(choices)}]')
    return value


def parse_sort(text: str | None) -> tuple[str, bool] | None:
    """(field, descending) of a ``sort`` parameter; None for the natural order."""
    if text is None:
        return None
    if not SORT.match(text):
        raise ValidationError(
            f'"sort" with value "{text}" fails to match the required pattern: {SORT.pattern}'
        )
    field, _, direction = text.partition(":")
    if not field:
        return None
    return field, direction == "desc"


def parse_page(text: str | None) -> int:
    """1-based page; missing or < 1 means 1."""
    if text is None or text == "":
        return 1
    number = _integer("page", text)
    return max(number, 1)


def parse_limit(text: str | None, default: int, cap: int) -> int:
    """Page size, capped at ``cap``; missing or < 1 means ``default``."""
    if text is None or text == "":
        return min(default, cap)
    number = _integer("limit", text)
    return min(number if number >= 1 else default, cap)


def _integer(name: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValidationError(f'"{name}" must be a number') from None
