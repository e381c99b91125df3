"""Sorting and windowing of list endpoints, the way a Mongo query with skip/limit does it.

Sort keys name document fields (dotted paths allowed). An unknown field sorts nothing, as
Mongo does when every document lacks it; missing values come first ascending, last
descending; ties keep the natural order.

``NATURAL`` asks for the stored order itself (Mongo's ``$natural``): a history oldest first.
It is what a list whose dialect ignores ``sort`` serves; clients cannot ask for it, as the
sort pattern admits no ``$``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from exporter.simulator.model import Action, Batch, Device

T = TypeVar("T")
Key = Callable[[Any], Any]

NATURAL = ("$natural", False)  # no key of any list: sort_items leaves the stored order

DEVICE_KEYS: dict[str, Key] = {
    "id": lambda d: d.id,
    "_id": lambda d: d.id,
    "displayName": lambda d: d.profile.name,
    "summary.name": lambda d: d.profile.name,
    "summary.serialNumber": lambda d: d.profile.serial,
    "summary.imei": lambda d: d.profile.imei,
    "summary.osVersion": lambda d: d.profile.os[0],
    "summary.model": lambda d: d.profile.model,
    "state": lambda d: d.state,
    "winId": lambda d: d.profile.win_id,
    "enrolledDate": lambda d: d.profile.enrolled,
    "createdAt": lambda d: d.profile.enrolled,
    "lastStatusReportTime": lambda d: d.last_report,
}
BATCH_KEYS: dict[str, Key] = {
    "id": lambda b: b.id,
    "_id": lambda b: b.id,
    "name": lambda b: b.name,
    "createdAt": lambda b: b.created,
    "updatedAt": lambda b: b.updated,
}
ACTION_KEYS: dict[str, Key] = {
    "cmdId": lambda a: a.cmd_id,
    "status": lambda a: a.status,
    "statusCode": lambda a: a.code,
    "sentAt": lambda a: a.sent,
    "receivedAt": lambda a: a.received,
    "canceledAt": lambda a: a.canceled,
    "config.path": lambda a: a.config[0],
    "config.action": lambda a: a.config[1],
}
KEYS: dict[type, dict[str, Key]] = {Device: DEVICE_KEYS, Batch: BATCH_KEYS, Action: ACTION_KEYS}


def sort_items(
    items: Sequence[T], order: tuple[str, bool] | None, keys: dict[str, Key]
) -> Sequence[T]:
    if order is None:
        return items
    field, descending = order
    key = keys.get(field)
    if key is None:
        return items

    def ranked(item: T) -> tuple[int, Any]:
        value = key(item)
        return (0, 0) if value is None else (1, value)

    return sorted(items, key=ranked, reverse=descending)


def window(items: Sequence[T], page: int, limit: int, shift: int = 0) -> Sequence[T]:
    """Items of 1-based ``page``; ``shift`` moves the window back as if items were added ahead."""
    offset = max(0, (page - 1) * limit - shift)
    return items[offset:offset + limit]
