"""Fleet health read from the device list: compliance and OS version of each device.

The device list already carries ``summary.compliance`` and ``summary.osVersion``, so this
costs no request of its own (records.py decodes them, the scheduler hands them to the view).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

COMPLIANT, NON_COMPLIANT, UNKNOWN = "compliant", "non_compliant", "unknown"
# Every value is exported, zeros included: a share of non-compliant devices needs its total.
COMPLIANCE_VALUES = (COMPLIANT, NON_COMPLIANT, UNKNOWN)
# Distinct OS versions exported before the rest are counted under ``other``: a fleet of
# 10,000 devices stays a few dozen series whatever upstream sends.
MAX_OS_VERSIONS = 100
OTHER = "other"


@dataclass(frozen=True, slots=True)
class DeviceHealth:
    """What the device list shows of a device's health; ``os_version`` as upstream spells it."""

    compliance: str = UNKNOWN
    last_check: float | None = None
    os_version: str | None = None

    @property
    def os_label(self) -> str:
        return self.os_version or UNKNOWN


NO_HEALTH = DeviceHealth()


def bounded_versions(counts: Mapping[str, int], limit: int = MAX_OS_VERSIONS) -> dict[str, int]:
    """Devices per OS version, the first ``limit`` versions in ``counts``' order kept (as
    first seen) and the later ones summed under ``other``; ``unknown`` is not a version."""
    out: dict[str, int] = {}
    kept = 0
    for version, count in counts.items():
        if count <= 0:
            continue
        if version == UNKNOWN or kept < limit:
            kept += version != UNKNOWN
            out[version] = out.get(version, 0) + count
        else:
            out[OTHER] = out.get(OTHER, 0) + count
    return out

