"""Typed records of the upstream API and their tolerant decoding.

Everything here is a pure function of the decoded JSON. Upstream is loosely specified
(see shared/upstream-api.md §14), so decoding never raises for a bad field: the record
keeps what could be read and names each problem by kind in ``problems``:

- ``timestamp``: a date-time that could not be parsed (the field becomes ``None``);
- ``unknown_status``: a status outside the 65 known names (kept as-is);
- ``schema``: a missing or mistyped field.

Only a body that is not a JSON envelope at all raises :class:`InvalidBody`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Generic, TypeVar

from exporter.statuses import STATUS_CLASS, is_known, is_pending

TIMESTAMP = "timestamp"
UNKNOWN_STATUS = "unknown_status"
SCHEMA = "schema"
PROBLEM_KINDS = (TIMESTAMP, UNKNOWN_STATUS, SCHEMA)

NO_PROBLEMS: frozenset[str] = frozenset()

# Upstream path-parameter patterns (shared/upstream-api.md §1).
ORGANIZATION_ID = re.compile(r"^(([a-fA-F0-9]{24})|([a-zA-Z0-9\-]{3,}))$")
DEVICE_ID = re.compile(r"^(([a-fA-F0-9]{24})|(\w{1,}))$")
COMMAND_ID = re.compile(r"^[a-fA-F0-9]{24}$")
OBJECT_ID = COMMAND_ID


class InvalidBody(ValueError):
    """A 2xx body that is not a decodable JSON envelope."""


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    name: str | None = None
    serial: str | None = None
    imei: str | None = None
    win_id: str | None = None
    state: str | None = None
    tags: tuple[str, ...] = ()
    last_status_report: float | None = None
    problems: frozenset[str] = NO_PROBLEMS


@dataclass(frozen=True, slots=True)
class Batch:
    id: str
    device_id: str | None = None
    name: str | None = None
    created_at: float | None = None
    updated_at: float | None = None
    # (status, count) sorted by status; None when upstream sent no summary.
    summary: tuple[tuple[str, int], ...] | None = None
    problems: frozenset[str] = NO_PROBLEMS

    @property
    def finished(self) -> bool:
        """True when the summary shows no action that can still change."""
        return self.summary is not None and not any(
            count and is_pending(status) for status, count in self.summary
        )


@dataclass(frozen=True, slots=True)
class Action:
    cmd_id: str
    status: str
    status_code: int | None = None
    sent_at: float | None = None
    received_at: float | None = None
    canceled_at: float | None = None
    problems: frozenset[str] = NO_PROBLEMS


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: tuple[T, ...]
    total_docs: int | None = None
    page: int | None = None
    limit: int | None = None
    has_next_page: bool | None = None
    # Problems of the page itself (items that could not be decoded at all).
    problems: tuple[str, ...] = ()


# --- timestamps -------------------------------------------------------------------------


_from_iso = datetime.fromisoformat


def _parse_iso(text: str) -> float:
    # Canonical strings parse directly (no cache: most timestamps are seen once per poll
    # and a cache miss costs more than the parse); only untidy ones pay for tidying.
    try:
        moment = _from_iso(text)
    except ValueError:
        return _parse_untidy(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@lru_cache(maxsize=4096)  # untidy strings come back unchanged on every poll
def _parse_untidy(text: str) -> float:
    cleaned = "".join(text.split())
    if cleaned.endswith(("z", "Z")):
        cleaned = cleaned[:-1] + "+00:00"
    moment = datetime.fromisoformat(cleaned)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_timestamp(value: object) -> float | None:
    """Epoch seconds of an upstream date-time; ``None`` when absent.

    Accepts stray whitespace (the docs' ``"2026-02-10T10: 05: 00.000Z"``), with or without
    fractions, ``Z`` or numeric offsets, and epoch numbers (seconds or milliseconds).
    Raises ``ValueError`` for a value that is present but not a date-time.
    """
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return _parse_iso(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value / 1000.0 if value > 1e11 else float(value)
    raise ValueError(f"not a date-time: {type(value).__name__}")


def _timestamp(obj: Mapping[str, Any], key: str, problems: set[str]) -> float | None:
    try:
        return parse_timestamp(obj.get(key))
    except (ValueError, TypeError, OverflowError):
        problems.add(TIMESTAMP)
        return None


def _text(obj: Mapping[str, Any], key: str, problems: set[str]) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    problems.add(SCHEMA)
    return str(value)


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


# --- envelopes and pages -------------------------------------------------------------------


def decode_json(body: bytes | str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # deep nesting: a bomb
        raise InvalidBody(f"body is not JSON: {exc.__class__.__name__}") from None


def envelope_data(document: Any) -> Any:
    """The ``data`` of a success envelope ``{"status": true, "data": ...}``."""
    if not isinstance(document, dict):
        raise InvalidBody("body is not a JSON object")
    if document.get("status") is False:
        raise InvalidBody("error envelope on a success response")
    if "data" in document:
        return document["data"]
    if "items" in document:  # a live shape seen without the envelope
        return document
    raise InvalidBody("envelope has no data")


def decode_page(data: Any, decode_item: Callable[[Any], T | None]) -> Page[T]:
    """A list page from ``data.items`` (or ``data`` as a bare array)."""
    if isinstance(data, list):
        raw_items: list[Any] = data
        meta: Mapping[str, Any] = {}
    elif isinstance(data, dict) and isinstance(data.get("items"), list):
        raw_items = data["items"]
        meta = data
    else:
        raise InvalidBody("page has no items array")
    # Records are always truthy (no __len__ or __bool__), so filter(None) drops exactly the
    # undecodable items, in C; `None in items` would call every record's __eq__.
    items = tuple(filter(None, map(decode_item, raw_items)))
    has_next = meta.get("hasNextPage")
    return Page(
        items=items,
        total_docs=_int(meta.get("totalDocs")),
        page=_int(meta.get("page")),
        limit=_int(meta.get("limit")),
        has_next_page=has_next if isinstance(has_next, bool) else None,
        problems=(SCHEMA,) * (len(raw_items) - len(items)),
    )


def error_code(document: Any) -> int | None:
    """``error.code`` of a failure envelope, when there is one."""
    if isinstance(document, dict) and isinstance(document.get("error"), dict):
        return _int(document["error"].get("code"))
    return None


# --- records ---------------------------------------------------------------------------------


def decode_device(raw: Any) -> Device | None:
    if not isinstance(raw, dict):
        return None
    device_id = raw.get("id") or raw.get("winDeviceId")
    if not isinstance(device_id, str) or not device_id:
        return None
    problems: set[str] = set()
    summary = raw.get("summary") if isinstance(raw.get("summary"), dict) else {}
    tags = raw.get("tags")
    if tags is None:
        tags = ()
    elif not isinstance(tags, list):
        problems.add(SCHEMA)
        tags = ()
    name = _text(raw, "displayName", problems) or _text(summary, "name", problems)
    return Device(
        id=device_id,
        name=name,
        serial=_text(summary, "serialNumber", problems),
        imei=_text(summary, "imei", problems),
        win_id=_text(raw, "winId", problems),
        state=_text(raw, "state", problems),
        tags=tuple(str(tag) for tag in tags),
        last_status_report=_timestamp(raw, "lastStatusReportTime", problems),
        problems=frozenset(problems),
    )


_COUNT_KEYS = ("count", "total", "value", "n", "actions")


def _summary_entry(entry: Any) -> tuple[str, int] | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("status"), str):
        return None
    for key in _COUNT_KEYS:
        count = _int(entry.get(key))
        if count is not None and count >= 0:
            return entry["status"], count
    return None


def decode_summary(raw: Any, problems: set[str]) -> tuple[tuple[str, int], ...] | None:
    """Per-status counts from a list of ``{status, count}`` or a ``{status: count}`` map."""
    if raw is None:
        return None
    if isinstance(raw, dict):
        pairs = [(status, _int(count)) for status, count in raw.items()]
        entries = [(s, c) for s, c in pairs if c is not None and c >= 0]
        if len(entries) != len(pairs):
            problems.add(SCHEMA)
    elif isinstance(raw, list):
        entries = []
        for entry in raw:
            decoded = _summary_entry(entry)
            if decoded is None:
                problems.add(SCHEMA)
            else:
                entries.append(decoded)
    else:
        problems.add(SCHEMA)
        return None
    merged: dict[str, int] = {}
    for status, count in entries:
        if not is_known(status):
            problems.add(UNKNOWN_STATUS)
        merged[status] = merged.get(status, 0) + count
    return tuple(sorted(merged.items()))


def decode_batch(raw: Any) -> Batch | None:
    if not isinstance(raw, dict):
        return None
    batch_id = raw.get("id") or raw.get("_id")
    if not isinstance(batch_id, str) or not batch_id:
        return None
    problems: set[str] = set()
    return Batch(
        id=batch_id,
        device_id=_text(raw, "winDeviceId", problems),
        name=_text(raw, "name", problems),
        created_at=_timestamp(raw, "createdAt", problems),
        updated_at=_timestamp(raw, "updatedAt", problems),
        summary=decode_summary(raw.get("summary"), problems),
        problems=frozenset(problems),
    )


def _action_constructor() -> Callable[..., Action]:
    """``Action(...)`` at about half the cost, for the decoding hot path.

    A frozen dataclass's ``__init__`` assigns every field through ``object.__setattr__``;
    writing the slots through their descriptors skips that. Actions are decoded by the
    hundred per page, and construction was most of their decoding time.
    """
    names = tuple(f.name for f in fields(Action))
    # Fails at import when Action gains a field, so the two cannot drift apart.
    assert names == (
        "cmd_id",
        "status",
        "status_code",
        "sent_at",
        "received_at",
        "canceled_at",
        "problems",
    ), names
    set1, set2, set3, set4, set5, set6, set7 = (getattr(Action, n).__set__ for n in names)
    new = object.__new__

    def new_action(
        cmd_id: str,
        status: str,
        status_code: int | None,
        sent_at: float | None,
        received_at: float | None,
        canceled_at: float | None,
        problems: frozenset[str],
    ) -> Action:
        action = new(Action)
        set1(action, cmd_id)
        set2(action, status)
        set3(action, status_code)
        set4(action, sent_at)
        set5(action, received_at)
        set6(action, canceled_at)
        set7(action, problems)
        return action

    return new_action


_new_action = _action_constructor()


def _when(raw: dict[str, Any], key: str, problems: set[str]) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    try:
        if value.__class__ is str:
            return _parse_iso(value) if value else None
        return parse_timestamp(value)
    except (ValueError, TypeError, OverflowError):
        problems.add(TIMESTAMP)
        return None


def decode_action(raw: Any) -> Action | None:
    """One action; ``None`` only when it has no usable ``cmdId``."""
    # Actions come by the hundred per page: the common shape is checked in one go and
    # anything unusual (or a timestamp that does not parse) takes the careful path.
    if raw.__class__ is dict:
        cmd_id = raw.get("cmdId")
        status = raw.get("status")
        code = raw.get("statusCode")
        if (
            cmd_id.__class__ is str
            and cmd_id
            and status.__class__ is str
            and status in STATUS_CLASS
            and (code is None or code.__class__ is int)
        ):
            sent = raw.get("sentAt")
            received = raw.get("receivedAt")
            canceled = raw.get("canceledAt")
            try:
                return _new_action(
                    cmd_id,
                    status,
                    code,
                    None if sent is None else _parse_iso(sent),
                    None if received is None else _parse_iso(received),
                    None if canceled is None else _parse_iso(canceled),
                    NO_PROBLEMS,
                )
            except (ValueError, TypeError, AttributeError, OverflowError):
                pass
    return _decode_action_carefully(raw)


def _decode_action_carefully(raw: Any) -> Action | None:
    if not isinstance(raw, dict):
        return None
    cmd_id = raw.get("cmdId")
    if cmd_id.__class__ is not str:
        if not isinstance(cmd_id, int) or isinstance(cmd_id, bool):
            return None
        cmd_id = str(cmd_id)
    if not cmd_id:
        return None
    problems: set[str] = set()
    status = raw.get("status")
    if status.__class__ is not str or not status:
        problems.add(SCHEMA)
        status = "Unknown"
    elif status not in STATUS_CLASS:
        problems.add(UNKNOWN_STATUS)
    code = raw.get("statusCode")
    if code is None or code.__class__ is int:
        status_code = code
    else:
        status_code = _int(code)
        if status_code is None:
            problems.add(SCHEMA)
    return _new_action(
        cmd_id,
        status,
        status_code,
        _when(raw, "sentAt", problems),
        _when(raw, "receivedAt", problems),
        _when(raw, "canceledAt", problems),
        frozenset(problems) if problems else NO_PROBLEMS,
    )
