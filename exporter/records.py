"""Typed records of the upstream API and their tolerant decoding.

Everything here is a pure function of the decoded JSON. Upstream is loosely specified
(see docs/upstream-api.md §14), so decoding never raises for a bad field: the record
keeps what could be read and names each problem by kind in ``problems``:

- ``timestamp``: a date-time that could not be parsed (the field becomes ``None``);
- ``unknown_status``: a status outside the 65 known names (kept as-is);
- ``schema``: a missing or mistyped field, a number out of bounds, or an item beyond the
  ``limit`` a page was asked for (cut: see :func:`decode_page`).

Only a body that is not a JSON envelope at all raises :class:`InvalidBody`. Nothing else
raises, whatever the values: a number of any length is read within :data:`MAX_INT`, and
text is kept only where text was sent.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Generic, NamedTuple, TypeVar

from exporter.devicehealth import COMPLIANT, NO_HEALTH, NON_COMPLIANT, UNKNOWN, DeviceHealth
from exporter.statuses import STATUS_CLASS, is_known, is_pending

TIMESTAMP = "timestamp"
UNKNOWN_STATUS = "unknown_status"
SCHEMA = "schema"
PROBLEM_KINDS = (TIMESTAMP, UNKNOWN_STATUS, SCHEMA)

NO_PROBLEMS: frozenset[str] = frozenset()

# The largest count, total or code read from upstream: JSON's exact integers (upstream is a
# JavaScript service, so a larger one is not a count anyway). Text of more digits is refused
# before int() sees it: past 4,300 digits int() raises, and short of that it costs time.
MAX_INT = 2**53
_MAX_INT_DIGITS = len(str(MAX_INT))

# Upstream path-parameter patterns (docs/upstream-api.md §1).
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
    health: DeviceHealth = NO_HEALTH


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


class Action(NamedTuple):
    """One action of a batch.

    A named tuple rather than a frozen dataclass: actions are decoded by the hundred per
    page and a tuple is built in a third of the time, with the same immutability.
    """

    cmd_id: str
    status: str
    status_code: int | None = None
    sent_at: float | None = None
    received_at: float | None = None
    canceled_at: float | None = None
    problems: frozenset[str] = NO_PROBLEMS
    # config.path (the CSP node) and config.action (Add, Replace, ...), as sent.
    path: str | None = None
    operation: str | None = None


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
    # Items served beyond the ``limit`` asked for, cut unread (upstream ignored the limit).
    excess: int = 0
    # Page fields (totalDocs, page, limit, hasNextPage) sent but unreadable.
    flaws: int = 0

    @property
    def served(self) -> int:
        """Every item the response carried: kept, undecodable and cut."""
        return len(self.items) + len(self.problems) + self.excess

    @property
    def schema_problems(self) -> int:
        """The ``schema`` problems of the response: its undecodable and cut items and its
        unreadable page fields."""
        return len(self.problems) + self.excess + self.flaws


# --- timestamps -------------------------------------------------------------------------


_from_iso = datetime.fromisoformat

# Parsed date-times by their text. The actions of a batch share one ``sentAt`` and a
# re-poll brings the same strings again; a hit costs a fifth of a parse. Cleared when full,
# which is cheaper than keeping recency and bounds the memory all the same.
_TIMESTAMP_CACHE_SIZE = 8192
_timestamps: dict[str, float] = {}
_cached_timestamp = _timestamps.get


def _parse_iso(text: str) -> float:
    """Epoch seconds of an ISO 8601 string, remembered; callers look in the cache first."""
    # Canonical strings parse directly; only untidy ones pay for tidying.
    try:
        moment = _from_iso(text)
    except ValueError:
        moment = _from_iso(_tidy(text))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    seconds = moment.timestamp()
    if len(_timestamps) >= _TIMESTAMP_CACHE_SIZE:
        _timestamps.clear()
    _timestamps[text] = seconds
    return seconds


def _tidy(text: str) -> str:
    cleaned = "".join(text.split())
    if cleaned.endswith(("z", "Z")):
        cleaned = cleaned[:-1] + "+00:00"
    return cleaned


def parse_timestamp(value: object) -> float | None:
    """Epoch seconds of an upstream date-time; ``None`` when absent.

    Accepts stray whitespace (the docs' ``"2026-02-10T10: 05: 00.000Z"``), with or without
    fractions, ``Z`` or numeric offsets, and epoch numbers (seconds or milliseconds).
    Raises ``ValueError`` for a value that is present but not a date-time.
    """
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return _cached_timestamp(value) or _parse_iso(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = value / 1000.0 if value > 1e11 else float(value)
        if not math.isfinite(seconds):  # NaN or 1e400: never a moment
            raise ValueError("not a finite date-time")
        return seconds
    raise ValueError(f"not a date-time: {type(value).__name__}")


# A timestamp this far past the reader's clock is garbage (a year 9999, a misplaced
# factor), not a moment: kept, it would pin check-in marks and skew latency sums.
FUTURE_SLACK_SECONDS = 86400.0


# Per record type, its timestamp fields; and the records within a record whose timestamps
# are checked with its own (a device's compliance check).
_MOMENTS: dict[type, tuple[str, ...]] = {
    Action: ("sent_at", "received_at", "canceled_at"),
    Batch: ("created_at", "updated_at"),
    Device: ("last_status_report",),
    DeviceHealth: ("last_check",),
}
_PARTS: dict[type, tuple[str, ...]] = {Device: ("health",)}

Timed = TypeVar("Timed", Action, Batch, Device)


def until(record: Timed, limit: float) -> Timed:
    """``record`` with each timestamp after ``limit`` treated as missing (a problem)."""
    shown = _without_late(record, limit)
    if shown is record:
        return record
    return _replace(shown, problems=record.problems | {TIMESTAMP})


def _without_late(record: Any, limit: float) -> Any:
    """``record`` with each timestamp after ``limit``, its parts' too, set to None; the
    record itself when none is."""
    changes: dict[str, Any] = {
        name: None for name in _MOMENTS[type(record)] if (getattr(record, name) or 0.0) > limit
    }
    for part in _PARTS.get(type(record), ()):
        inner = getattr(record, part)
        shown = _without_late(inner, limit)
        if shown is not inner:
            changes[part] = shown
    return _replace(record, **changes) if changes else record


def _replace(record: Any, **changes: Any) -> Any:
    return record._replace(**changes) if isinstance(record, Action) else replace(record, **changes)


def _when(value: Any, problems: set[str]) -> float | None:
    try:
        return parse_timestamp(value)
    except (ValueError, TypeError, OverflowError):
        problems.add(TIMESTAMP)
        return None


def _text(obj: Mapping[str, Any], key: str, problems: set[str]) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    problems.add(SCHEMA)
    return _scalar_text(value)


def _scalar_text(value: Any) -> str | None:
    """A number or boolean as text; None for a list or an object (its text could be as deep
    and long as the body)."""
    return str(value) if isinstance(value, (int, float, bool)) else None


def _int(value: object) -> int | None:
    """An integer within ±``MAX_INT`` from a number or decimal text; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        value = int(value) if value.is_integer() else None  # NaN and inf are not integers
    elif isinstance(value, str):
        text = value.strip()
        # isdecimal, not isdigit: "²" is a digit that int() refuses.
        value = int(text) if len(text) <= _MAX_INT_DIGITS and text.isdecimal() else None
    if isinstance(value, int) and -MAX_INT <= value <= MAX_INT:
        return value
    return None


def _json_int(text: str) -> int | float:
    """A JSON integer literal: a long one becomes a float (maybe inf) that no integer field
    accepts, instead of a ValueError that would refuse the whole body."""
    return int(text) if len(text) <= _MAX_INT_DIGITS + 1 else float(text)


# One decoder, built once: json.loads with parse_int would build one per body.
_read_json = json.JSONDecoder(parse_int=_json_int).decode


# --- envelopes and pages -------------------------------------------------------------------


def decode_json(body: bytes | str) -> Any:
    try:
        if isinstance(body, bytes):  # as json.loads reads bytes
            body = body.decode(json.detect_encoding(body), "surrogatepass")
        return _read_json(body)
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


def decode_page(
    data: Any, decode_item: Callable[[Any], T | None], limit: int | None = None
) -> Page[T]:
    """A list page from ``data.items`` (or ``data`` as a bare array); items past ``limit``
    (what was asked for) are cut before they are decoded and counted as ``excess``."""
    if isinstance(data, list):
        raw_items: list[Any] = data
        meta: Mapping[str, Any] = {}
    elif isinstance(data, dict) and isinstance(data.get("items"), list):
        raw_items = data["items"]
        meta = data
    else:
        raise InvalidBody("page has no items array")
    # Records are always truthy (non-empty tuples or no __len__), so filter(None) drops
    # exactly the undecodable items, in C; `None in items` would call every record's __eq__.
    kept = raw_items if limit is None else raw_items[:limit]
    items = tuple(filter(None, map(decode_item, kept)))
    meta_fields = (meta.get(key) for key in PAGE_FIELDS)
    return page_of(items, len(kept), len(raw_items) - len(kept), *meta_fields)


# The page fields upstream sends (mongoose-paginate), in page_of's order.
PAGE_FIELDS = ("totalDocs", "page", "limit", "hasNextPage")


def page_of(
    items: tuple[T, ...],
    raw_count: int,
    excess: int,
    total_docs: Any,
    page: Any,
    limit: Any,
    has_next: Any,
) -> Page[T]:
    """A page of ``items`` decoded from ``raw_count`` raw ones, ``excess`` more cut, and its
    page fields as sent."""
    numbers = (_int(total_docs), _int(page), _int(limit))
    has_next_page = has_next if isinstance(has_next, bool) else None
    sent = (total_docs, page, limit, has_next)
    read = (*numbers, has_next_page)
    return Page(
        items=items,
        total_docs=numbers[0],
        page=numbers[1],
        limit=numbers[2],
        has_next_page=has_next_page,
        problems=(SCHEMA,) * (raw_count - len(items)),
        excess=excess,
        flaws=sum(1 for s, r in zip(sent, read, strict=True) if s is not None and r is None),
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
    name = _text(raw, "displayName", problems) or _text(summary, "name", problems)
    return Device(
        id=device_id,
        name=name,
        serial=_text(summary, "serialNumber", problems),
        imei=_text(summary, "imei", problems),
        win_id=_text(raw, "winId", problems),
        state=_text(raw, "state", problems),
        tags=_tags(raw.get("tags"), problems),
        last_status_report=_when(raw.get("lastStatusReportTime"), problems),
        health=_health(summary, problems),
        problems=frozenset(problems),
    )


def _health(summary: Mapping[str, Any], problems: set[str]) -> DeviceHealth:
    """``summary.compliance`` and ``summary.osVersion``: null compliance (a device still in
    setup) is unknown and no problem; an object without a boolean ``compliant`` is one."""
    raw = summary.get("compliance")
    compliance, last_check = UNKNOWN, None
    if isinstance(raw, dict):
        flag = raw.get("compliant")
        if isinstance(flag, bool):
            compliance = COMPLIANT if flag else NON_COMPLIANT
        else:
            problems.add(SCHEMA)
        last_check = _when(raw.get("lastCheck"), problems)
    elif raw is not None:
        problems.add(SCHEMA)
    return DeviceHealth(compliance, last_check, _text(summary, "osVersion", problems) or None)


def _tags(raw: Any, problems: set[str]) -> tuple[str, ...]:
    """The tags as text; a tag that is a list or an object is dropped (a schema problem)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.add(SCHEMA)
        return ()
    tags = tuple(tag if isinstance(tag, str) else _scalar_text(tag) for tag in raw)
    if None in tags:
        problems.add(SCHEMA)
        return tuple(tag for tag in tags if tag is not None)
    return tags  # type: ignore[return-value]  # no None left


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
        created_at=_when(raw.get("createdAt"), problems),
        updated_at=_when(raw.get("updatedAt"), problems),
        summary=decode_summary(raw.get("summary"), problems),
        problems=frozenset(problems),
    )


# ``Action(...)`` without the keyword handling of its generated ``__new__``: all nine
# fields, in order.
_make_tuple = tuple.__new__


def decode_action(raw: Any) -> Action | None:
    """One action; ``None`` only when it has no usable ``cmdId``."""
    if raw.__class__ is not dict:
        return None
    get = raw.get
    config = get("config")
    if config is None:
        path = operation = None
    elif config.__class__ is dict:
        path, operation = config.get("path"), config.get("action")
    else:
        path = operation = _NOT_A_CONFIG
    return action_from_fields(
        get("cmdId"),
        get("status"),
        get("statusCode"),
        get("sentAt"),
        get("receivedAt"),
        get("canceledAt"),
        path,
        operation,
    )


# Stands in for config.path and config.action when ``config`` is not an object: a schema
# problem, and neither is known.
_NOT_A_CONFIG = object()


def action_from_fields(
    cmd_id: Any,
    status: Any,
    code: Any,
    sent: Any,
    received: Any,
    canceled: Any,
    path: Any = None,
    operation: Any = None,
) -> Action | None:
    """An action from its JSON fields, whatever their types; ``None`` without ``cmdId``."""
    # Actions come by the hundred per page: the common shape is checked in one go and
    # anything unusual (or a timestamp that does not parse) takes the careful path.
    if (
        cmd_id.__class__ is str
        and cmd_id
        and status.__class__ is str
        and status in STATUS_CLASS
        and (code is None or (code.__class__ is int and -MAX_INT <= code <= MAX_INT))
        and (path is None or path.__class__ is str)
        and (operation is None or operation.__class__ is str)
    ):
        try:
            if sent is not None:
                sent = _cached_timestamp(sent) or _parse_iso(sent)
            if received is not None:
                received = _cached_timestamp(received) or _parse_iso(received)
            if canceled is not None:
                canceled = _cached_timestamp(canceled) or _parse_iso(canceled)
            if path is not None:
                path = _known_text(path) or _shared_text(path)
            if operation is not None:
                operation = _known_text(operation) or _shared_text(operation)
            return _make_tuple(
                Action,
                (cmd_id, status, code, sent, received, canceled, NO_PROBLEMS, path, operation),
            )
        except (ValueError, TypeError, AttributeError, OverflowError):
            pass
    return _action_carefully(cmd_id, status, code, sent, received, canceled, path, operation)


def _action_carefully(
    cmd_id: Any,
    status: Any,
    code: Any,
    sent: Any,
    received: Any,
    canceled: Any,
    path: Any,
    operation: Any,
) -> Action | None:
    if cmd_id.__class__ is not str:
        if not isinstance(cmd_id, int) or isinstance(cmd_id, bool):
            return None
        cmd_id = str(cmd_id)
    if not cmd_id:
        return None
    problems: set[str] = set()
    if status.__class__ is not str or not status:
        problems.add(SCHEMA)
        status = "Unknown"
    elif status not in STATUS_CLASS:
        problems.add(UNKNOWN_STATUS)
    if code is not None:
        code = _int(code)
        if code is None:
            problems.add(SCHEMA)
    moments = _when(sent, problems), _when(received, problems), _when(canceled, problems)
    path, operation = _config_text(path, problems), _config_text(operation, problems)
    return Action(
        cmd_id, status, code, *moments, frozenset(problems) if problems else NO_PROBLEMS,
        path, operation,
    )


def _config_text(value: Any, problems: set[str]) -> str | None:
    if value is None:
        return None
    if value.__class__ is str:
        return _shared_text(value)
    problems.add(SCHEMA)
    return None


# One string object per distinct config path and operation: decoded pages held for a while
# (the client's memo) would otherwise keep a copy of the same path in every action.
_TEXTS_SIZE = 8192
_texts: dict[str, str] = {}
_known_text = _texts.get


def _shared_text(text: str) -> str:
    shared = _texts.get(text)
    if shared is None:
        if len(_texts) >= _TEXTS_SIZE:
            _texts.clear()
        shared = _texts[text] = text
    return shared
