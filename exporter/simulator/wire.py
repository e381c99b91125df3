"""Upstream's JSON: envelopes, pages, and the device, batch and action documents.

Compact JSON as an Express ``res.json`` sends it. Each entity keeps its serialised bytes
until it changes, so a page is a join of cached fragments. Data faults (doc-style
timestamps, unknown status names, missing fields) render the entities they pick afresh;
every other entity still comes from the cache.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

from exporter.simulator.faults import DEVICE_OPTIONAL, Faults
from exporter.simulator.fleet import Fleet
from exporter.simulator.health import (
    BAD_FORMS,
    NO_SUMMARY,
    compliance_value,
    served_form,
    win_policy,
)
from exporter.simulator.model import Action, Batch, Device
from exporter.statuses import KNOWN_STATUSES, PENDING_STATUSES

_ENUM_ORDER = {status: index for index, status in enumerate(KNOWN_STATUSES)}

# Optional fields the missing_fields fault may drop, per entity.
ACTION_OPTIONAL = ("statusCode", "sentAt", "config", "data")
BATCH_OPTIONAL = ("summary", "updatedAt", "name")


def dumps(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def iso(moment: float) -> str:
    """Canonical ISO-8601 UTC with milliseconds: ``2026-02-10T10:05:00.000Z``."""
    minute, millis = divmod(round(moment * 1000), 60_000)
    return f"{_minute_prefix(minute)}{millis // 1000:02d}.{millis % 1000:03d}Z"


@lru_cache(maxsize=1 << 14)
def _minute_prefix(minute: int) -> str:
    # Calendar arithmetic once per minute; a page's timestamps cluster in a few minutes.
    return time.strftime("%Y-%m-%dT%H:%M:", time.gmtime(minute * 60))


@lru_cache(maxsize=4096)
def _config_json(config: tuple[str, str, str | None, str]) -> str:
    path, verb, value, _ = config
    document = {"path": path, "action": verb}
    if value is not None:
        document["value"] = value
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


@lru_cache(maxsize=256)
def _data_json(data: tuple[tuple[str, str], ...]) -> str:
    return json.dumps([dict(data)] if data else [], separators=(",", ":"), ensure_ascii=False)


def doc_iso(moment: float) -> str:
    """The docs' malformed style: ``2026-02-10T10: 05: 00.000Z``."""
    return iso(moment).replace(":", ": ")


def success(data: bytes) -> bytes:
    return b'{"status":true,"data":' + data + b"}"


def failure(code: int, message: str) -> bytes:
    return dumps({"status": False, "error": {"code": code, "message": message}})


def page(items: Iterable[bytes], total: int, number: int, limit: int) -> bytes:
    """A mongoose-paginate page (``docs`` renamed ``items``) inside the success envelope."""
    pages = max(1, -(-total // limit))
    has_prev, has_next = number > 1, number < pages
    meta = dumps({
        "totalDocs": total,
        "limit": limit,
        "totalPages": pages,
        "page": number,
        "pagingCounter": (number - 1) * limit + 1,
        "hasPrevPage": has_prev,
        "hasNextPage": has_next,
        "prevPage": number - 1 if has_prev else None,
        "nextPage": number + 1 if has_next else None,
    })
    return success(b'{"items":[' + b",".join(items) + b"]," + meta[1:])


def stale_action(document: bytes) -> bytes:
    """An action as a lagging replica serves it: still ``Pending``, nothing answered yet."""
    action = json.loads(document)
    action["status"] = "Pending"
    for key in ("sentAt", "receivedAt", "canceledAt", "statusCode"):
        action.pop(key, None)
    return dumps(action)


class Renderer:
    """Serialises fleet entities as upstream does, applying the data faults in force."""

    def __init__(self, fleet: Fleet, faults: Faults) -> None:
        self._fleet = fleet
        self._faults = faults

    # --- actions ---------------------------------------------------------------------------

    def action(self, action: Action) -> bytes:
        if self._faults.data_active:
            key = action.key
            if self._picked(key):
                return dumps(self._action_document(action, key))
        if action.json is None:
            action.json = _plain_action(action)
        return action.json

    def _action_document(self, action: Action, key: str | None) -> dict[str, Any]:
        stamp, dropped = self._view(key, ACTION_OPTIONAL)
        status = action.status
        if key is not None:
            status = self._faults.shown_status(key, status, status not in PENDING_STATUSES)
        path, verb, value, _ = action.config
        config = {"path": path, "action": verb}
        if value is not None:
            config["value"] = value
        document: dict[str, Any] = {"cmdId": action.cmd_id, "status": status, "config": config}
        if action.data is not None:
            document["data"] = [dict(action.data)] if action.data else []
        if action.code is not None:
            document["statusCode"] = action.code
        if action.sent is not None:
            document["sentAt"] = stamp(action.sent)
        if action.received is not None:
            document["receivedAt"] = stamp(action.received)
        if action.canceled is not None:
            document["canceledAt"] = stamp(action.canceled)
        if dropped:
            document.pop(dropped, None)
        return document

    # --- batches ---------------------------------------------------------------------------

    def batch(self, batch: Batch) -> bytes:
        if self._faults.data_active:
            return dumps(self._batch_document(batch, batch.id))
        if batch.json is None:
            batch.json = _plain_batch(batch)
        return batch.json

    def _batch_document(self, batch: Batch, key: str | None) -> dict[str, Any]:
        stamp, dropped = self._view(key, BATCH_OPTIONAL)
        if key is None:
            counts = Counter(action.status for action in batch.actions)
        else:
            counts = Counter(self._fleet.shown_status(action) for action in batch.actions)
        document: dict[str, Any] = {
            "id": batch.id,
            "name": batch.name,
            "winDeviceId": batch.device.id,
            "summary": [
                {"status": status, "count": counts[status]}
                for status in sorted(counts, key=_summary_order)
            ],
            "createdAt": stamp(batch.created),
            "updatedAt": stamp(batch.updated),
        }
        if dropped:
            document.pop(dropped, None)
        return document

    # --- devices ---------------------------------------------------------------------------

    def device(self, device: Device) -> bytes:
        if self._faults.data_active and self._picked(device.id):
            return dumps(self._device_document(device, device.id))
        if device.json is None:
            device.json = dumps(self._device_document(device, None))
        return device.json

    def _device_document(self, device: Device, key: str | None) -> dict[str, Any]:
        stamp, dropped = self._view(key, DEVICE_OPTIONAL)
        fleet = self._fleet
        profile = device.profile
        health = device.health
        bad = key is not None and self._faults.stable("bad_compliance", key)
        pick = self._faults.pick("bad_compliance", key, BAD_FORMS) if bad and key else None
        form = served_form(bad, pick, dropped, health)
        last_check = health.last_check if health is not None else None
        version, version_name = profile.os
        user = None
        if profile.user is not None:
            user_id, email, name = profile.user
            user = {"id": user_id, "email": email, "displayName": name}
        document: dict[str, Any] = {
            "id": device.id,
            "organizationId": fleet.organization_id,
            "winEnterpriseId": fleet.enterprise_id,
            "mdmUser": user,
            "displayName": profile.name,
            "tags": list(profile.tags),
            "winId": profile.win_id,
            "state": device.state,
            "summary": {
                "name": profile.name,
                "osVersion": version,
                "osVersionName": version_name,
                "os": "Windows",
                "serialNumber": profile.serial,
                "imei": profile.imei,
                "supervised": False,
                # Not in the documented summary fields (docs/upstream-api.md §5.1), which
                # name no hardware model; ours sits with the other hardware facts.
                "model": profile.model,
                "compliance": compliance_value(
                    health, form, stamp(last_check) if last_check is not None else None
                ),
            },
            "lastStatusReportTime": stamp(device.last_report) if device.last_report else None,
            "type": "device",
            "enrolledDate": stamp(profile.enrolled),
            "winPolicy": win_policy(fleet.organization_id, profile.tags),
        }
        if dropped:
            document.pop(dropped, None)
        if form == NO_SUMMARY:
            document.pop("summary", None)
        return document

    # --- data faults -----------------------------------------------------------------------

    def _picked(self, key: str) -> bool:
        faults = self._faults
        return (
            faults.stable("doc_timestamps", key)
            or faults.stable("unknown_status", key)
            or faults.stable("missing_fields", key)
            or faults.stable("bad_compliance", key)
        )

    def _view(
        self, key: str | None, optional: tuple[str, ...]
    ) -> tuple[Callable[[float], str], str | None]:
        """(timestamp formatter, field to drop) for the entity ``key`` (None: plain)."""
        if key is None:
            return iso, None
        faults = self._faults
        stamp = doc_iso if faults.stable("doc_timestamps", key) else iso
        dropped = None
        if faults.stable("missing_fields", key):
            dropped = faults.pick("missing_fields", key, optional)
        return stamp, dropped


def _plain_action(action: Action) -> bytes:
    """The action as ``_action_document`` renders it without faults, built from pieces.

    Equivalent to ``dumps`` of the document (statuses and cmdIds need no escaping), several
    times faster: first renders of whole pages are what a fleet in motion mostly serves.
    """
    parts = ['{"cmdId":"', action.cmd_id, '","status":"', action.status, '","config":',
             _config_json(action.config)]
    if action.data is not None:
        parts += [',"data":', _data_json(action.data)]
    if action.code is not None:
        parts += [',"statusCode":', str(action.code)]
    if action.sent is not None:
        parts += [',"sentAt":"', iso(action.sent), '"']
    if action.received is not None:
        parts += [',"receivedAt":"', iso(action.received), '"']
    if action.canceled is not None:
        parts += [',"canceledAt":"', iso(action.canceled), '"']
    parts.append("}")
    return "".join(parts).encode()


def _plain_batch(batch: Batch) -> bytes:
    """The batch as ``_batch_document`` renders it without faults, built from pieces."""
    counts: dict[str, int] = {}
    for action in batch.actions:
        counts[action.status] = counts.get(action.status, 0) + 1
    summary = ",".join(
        f'{{"status":"{status}","count":{counts[status]}}}'
        for status in sorted(counts, key=_summary_order)
    )
    return (
        f'{{"id":"{batch.id}","name":{_string_json(batch.name)},'
        f'"winDeviceId":"{batch.device.id}","summary":[{summary}],'
        f'"createdAt":"{iso(batch.created)}","updatedAt":"{iso(batch.updated)}"}}'
    ).encode()


@lru_cache(maxsize=4096)
def _string_json(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _summary_order(status: str) -> tuple[int, str]:
    return _ENUM_ORDER.get(status, len(_ENUM_ORDER)), status
