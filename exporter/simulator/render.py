"""JSON of devices, batches and actions exactly as upstream shapes them (shared/upstream-api.md).

Bodies are built from cached per-entity bytes: an action's JSON is rendered once and kept
until the action changes (the fleet drops the cache on every change), so a 100-action page
costs a join. Data faults (``doc_timestamps``, ``unknown_status``, ``missing_fields``) bypass
the caches; their choices are stable per entity (faults.py), so the same action renders the
same way on every request while a fault is set.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

from exporter.simulator.faults import Faults
from exporter.simulator.fleet import Action, Batch, Device, Fleet
from exporter.statuses import KNOWN_STATUSES

_ORDER = {status: index for index, status in enumerate(KNOWN_STATUSES)}
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

# Optional fields ``missing_fields`` may drop, per entity kind. Final timestamps stay: without
# them no one could tell when an action ended, which upstream always records.
ACTION_OPTIONAL = ("statusCode", "sentAt", "config", "data")
BATCH_OPTIONAL = ("summary", "updatedAt", "name")
DEVICE_OPTIONAL = ("lastStatusReportTime", "tags", "mdmUser", "enrolledDate")


def iso(moment: float) -> str:
    """Canonical ISO-8601 UTC with milliseconds: ``2026-02-10T10:05:00.000Z``."""
    total_ms = round(moment * 1000.0)
    seconds, ms = divmod(total_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


def doc_iso(moment: float) -> str:
    """The docs' malformed style: ``2026-02-10T10: 05: 00.000Z``."""
    return iso(moment).replace(":", ": ")


class Renderer:
    def __init__(self, fleet: Fleet, faults: Faults, organization_id: str) -> None:
        self.fleet = fleet
        self.faults = faults
        self.organization_id = organization_id

    # --- actions ---------------------------------------------------------------------------

    def action(self, action: Action) -> bytes:
        if self.faults.data_active:
            return _dumps(self.action_dict(action)).encode()
        cached = action.json
        if cached is None:
            cached = action.json = _dumps(self.action_dict(action)).encode()
        return cached

    def action_dict(self, action: Action) -> dict[str, Any]:
        key = action.key
        stamp = self._stamp("action/" + key)
        path, verb, value, fmt = action.config
        config: dict[str, Any] = {"path": path, "action": verb}
        if value is not None:
            config["value"] = value
        config["format"] = fmt
        out: dict[str, Any] = {
            "cmdId": action.cmd_id,
            "status": self.fleet.shown_status(action),
            "config": config,
            "data": [dict(action.data)] if action.data else [],
        }
        if action.code is not None:
            out["statusCode"] = action.code
        if action.sent is not None:
            out["sentAt"] = stamp(action.sent)
        if action.received is not None:
            out["receivedAt"] = stamp(action.received)
        if action.canceled is not None:
            out["canceledAt"] = stamp(action.canceled)
        return self._drop("action/" + key, out, ACTION_OPTIONAL)

    # --- batches ---------------------------------------------------------------------------

    def batch(self, batch: Batch) -> bytes:
        if self.faults.data_active:
            return _dumps(self.batch_dict(batch)).encode()
        cached = batch.json
        if cached is None:
            cached = batch.json = _dumps(self.batch_dict(batch)).encode()
        return cached

    def summary(self, batch: Batch) -> list[dict[str, Any]]:
        """Per-status counts of the batch's actions as served (only statuses with n > 0)."""
        counts = Counter(self.fleet.shown_status(action) for action in batch.actions)
        ordered = sorted(counts.items(), key=lambda item: (_ORDER.get(item[0], 999), item[0]))
        return [{"status": status, "count": count} for status, count in ordered]

    def batch_dict(self, batch: Batch) -> dict[str, Any]:
        stamp = self._stamp("batch/" + batch.id)
        out = {
            "id": batch.id,
            "name": batch.name,
            "winDeviceId": batch.device.id,
            "summary": self.summary(batch),
            "createdAt": stamp(batch.created),
            "updatedAt": stamp(batch.updated),
        }
        return self._drop("batch/" + batch.id, out, BATCH_OPTIONAL)

    # --- devices ---------------------------------------------------------------------------

    def device(self, device: Device) -> bytes:
        if self.faults.data_active:
            return _dumps(self.device_dict(device)).encode()
        cached = device.json
        if cached is None:
            cached = device.json = _dumps(self.device_dict(device)).encode()
        return cached

    def device_dict(self, device: Device) -> dict[str, Any]:
        stamp = self._stamp("device/" + device.id)
        os_version, os_name = device.os
        summary: dict[str, Any] = {
            "name": device.name,
            "osVersion": os_version,
            "osVersionName": os_name,
            "os": "Windows",
            "serialNumber": device.serial,
        }
        if device.imei is not None:
            summary["imei"] = device.imei
        summary["supervised"] = False
        summary["compliance"] = {"isCompliant": device.index % 11 != 0}
        user = None
        if device.user is not None:
            user_id, email, display = device.user
            user = {"id": user_id, "email": email, "displayName": display}
        out: dict[str, Any] = {
            "id": device.id,
            "organizationId": self.organization_id,
            "winEnterpriseId": self.fleet.enterprise_id,
            "mdmUser": user,
            "displayName": device.name,
            "tags": list(device.tags),
            "winId": device.win_id,
            "state": "ACTIVE",
            "summary": summary,
            "lastStatusReportTime": stamp(device.last_report) if device.last_report else None,
            "type": "windows",
            "subType": "device",
            "refreshInfoNeeded": [],
            "enrolledDate": stamp(device.enrolled),
        }
        return self._drop("device/" + device.id, out, DEVICE_OPTIONAL)

    # --- data faults -----------------------------------------------------------------------

    def _stamp(self, key: str) -> Any:
        if self.faults.data_active and self.faults.stable("doc_timestamps", key):
            return doc_iso
        return iso

    def _drop(self, key: str, out: dict[str, Any], optional: tuple[str, ...]) -> dict[str, Any]:
        if not (self.faults.data_active and self.faults.stable("missing_fields", key)):
            return out
        victim = self.faults.pick("missing_fields", key, optional)
        out.pop(victim, None)
        return out
