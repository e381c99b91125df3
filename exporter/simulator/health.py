"""Device health: compliance that follows the fleet's own events, and the Windows builds.

Compliance (``summary.compliance {compliant, lastCheck}``, docs/upstream-api.md §5.1 and §15)
is re-evaluated at every session, which moves ``lastCheck``. A device falls out of
compliance when one of its actions that sets something (not a ``Get``) fails; it comes back
when an action sent at a later session succeeds, or at its first session past a drawn delay
(a policy re-evaluated clean without new work). A device still in its setup sessions has had no
check yet: ``compliance`` is null until its first session as ``ACTIVE``.

Builds: most devices on the latest revisions of a few current builds, a long tail behind
them and on older builds; a session past the device's next update moment installs the next
revision of its build. ``os_versions=N`` replaces that with N distinct versions, each on
one device at least when the fleet has N or more, and no updates (a fixed count).

Everything here draws from the generator :class:`Health` is given (the fleet's
``{seed}/health`` stream), never from the fleet's: a seed builds the same batches, actions
and sessions as it did before devices had health.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache
from typing import NamedTuple

from exporter.simulator.model import ACTIVE, DAY, HOUR, PROVISIONING, Action, Device
from exporter.simulator.timeline import Journal
from exporter.statuses import StatusClass, classify

RECOVER_MEAN = HOUR  # mean delay before a non-compliant device passes a re-check
UPDATE_MEAN = 10 * DAY  # mean time between two revisions installed on one device

# How the compliance of a device is served (Compliance.form); only OBJECT is readable.
OBJECT, NULL, NO_SUMMARY, NOT_OBJECT, NO_FLAG, BAD_FLAG = (
    "object", "null", "no_summary", "not_object", "no_flag", "bad_flag",
)
# What the bad_compliance data fault serves instead of the object, one form per device.
BAD_FORMS = (NO_SUMMARY, NULL, NOT_OBJECT, NO_FLAG, BAD_FLAG)

# Build, its name, its share of a fleet, its update revisions newest first.
_BUILDS: tuple[tuple[str, str, float, tuple[int, ...]], ...] = (
    ("10.0.26100", "Windows 11 24H2", 0.42,
     (7623, 7462, 7171, 6899, 6584, 4946, 4652, 4349, 4061, 3775, 3476, 3194, 2894, 2605)),
    ("10.0.22631", "Windows 11 23H2", 0.26,
     (6491, 6345, 6199, 6060, 5909, 5768, 5624, 5472, 5335, 5189, 5039, 4890, 4751, 4602)),
    ("10.0.19045", "Windows 10 22H2", 0.2,
     (6809, 6691, 6575, 6456, 6332, 6216, 6093, 5965, 5854, 5737, 5608, 5487, 5371, 5247)),
    ("10.0.22621", "Windows 11 22H2", 0.05, (6060, 5909, 5768, 5624, 5472, 5335, 5189)),
    ("10.0.19044", "Windows 10 21H2", 0.04, (6809, 6691, 6575, 6456, 6332, 6216, 6093)),
    ("10.0.22000", "Windows 11 21H2", 0.02, (3260, 3197, 3147, 3079, 2899)),
    ("10.0.17763", "Windows 10 1809", 0.01, (8146, 7919, 7792, 7678, 7558)),
)
_LAG_STAY = 0.45  # chance a device is one more revision behind, drawn again each step
# Role tags (profiles.py) and the policy each role's devices are assigned.
_POLICIES = {"laptop": "Laptops baseline", "desktop": "Desktops baseline",
             "kiosk": "Kiosk lockdown", "pos": "Point of sale lockdown"}


class Compliance(NamedTuple):
    """A device's compliance as served: ``compliant`` None when no reader could tell."""

    compliant: bool | None
    last_check: float | None
    form: str


class ComplianceFlip(NamedTuple):
    """A device's compliance changing (ground truth for tests); ``compliant`` is the new one."""

    time: float
    device_id: str
    compliant: bool
    cause: str  # first_check | failed_action | successful_action | recheck


class Standing:
    """One device's health: compliance, why it was lost, and where its build stands."""

    __slots__ = ("compliant", "failed_session", "last_check", "os_index", "recover_at",
                 "update_at")

    def __init__(self, compliant: bool | None, os_index: int, update_at: float) -> None:
        self.compliant = compliant  # None: never checked (still in setup)
        self.last_check: float | None = None
        self.failed_session: float | None = None  # sentAt of the last failed action
        self.recover_at: float | None = None
        self.os_index = os_index  # into Catalog.versions
        self.update_at = update_at


class Catalog(NamedTuple):
    """Every (osVersion, osVersionName) a fleet may show; ``newer[i]``: the next revision."""

    versions: tuple[tuple[str, str], ...]
    newer: tuple[int | None, ...]
    weights: tuple[float, ...]  # of each version at enrollment

    @classmethod
    def realistic(cls) -> Catalog:
        versions: list[tuple[str, str]] = []
        newer: list[int | None] = []
        weights: list[float] = []
        for build, name, share, revisions in _BUILDS:
            for lag, revision in enumerate(revisions):
                newer.append(len(versions) - 1 if lag else None)
                versions.append((f"{build}.{revision}", name))
                weights.append(share * (1 - _LAG_STAY) * _LAG_STAY**lag)
        return cls(tuple(versions), tuple(newer), tuple(weights))

    @classmethod
    def distinct(cls, count: int) -> Catalog:
        """``count`` versions: the realistic ones, then further 24H2 revisions; no updates."""
        versions = list(cls.realistic().versions)
        revision = 8000
        while len(versions) < count:
            versions.append((f"10.0.26100.{revision}", "Windows 11 24H2"))
            revision += 17
        chosen = tuple(versions[:count])
        # A long tail: the first versions take most devices, as a real fleet's do.
        return cls(chosen, (None,) * count, tuple(1.0 / (index + 1) for index in range(count)))


class Health:
    """Compliance and builds of a fleet's devices, moved by its sessions and answers."""

    __slots__ = ("_catalog", "_journal", "_rng", "_spread")

    def __init__(self, rng: random.Random, journal: Journal, os_versions: int | None) -> None:
        if os_versions is not None and os_versions < 1:
            raise ValueError("os_versions must be >= 1")
        self._rng = rng
        self._journal = journal
        self._spread = os_versions is not None  # each version on a device first
        self._catalog = Catalog.realistic() if os_versions is None else Catalog.distinct(
            os_versions
        )

    def enroll(self, device: Device, index: int, start: float) -> None:
        """Gives ``device`` its build and standing (it is compliant unless still in setup)."""
        catalog = self._catalog
        if self._spread and index < len(catalog.versions):
            os_index = index
        else:
            os_index = self._rng.choices(range(len(catalog.versions)), catalog.weights)[0]
        # The build at the start is the one drawn: updates are installed from then on.
        update_at = start + self._rng.expovariate(1.0 / UPDATE_MEAN)
        compliant = None if device.state == PROVISIONING else True
        device.health = Standing(compliant, os_index, update_at)
        device.profile = replace(device.profile, os=catalog.versions[os_index])

    # --- what the fleet reports -------------------------------------------------------------

    def checked_in(self, when: float, device: Device) -> None:
        """A session: compliance re-evaluated, perhaps an update installed."""
        standing = device.health
        if standing is None:
            return
        if standing.last_check is None or when > standing.last_check:
            standing.last_check = when
        if standing.compliant is None:
            if device.state == ACTIVE:
                self._flip(when, device, standing, True, "first_check")
        elif not standing.compliant and standing.recover_at is not None and (
            when >= standing.recover_at
        ):
            self._flip(when, device, standing, True, "recheck")
        if when >= standing.update_at:
            self._install_update(when, device, standing)

    def answered(self, when: float, action: Action, status: str) -> None:
        device = action.batch.device
        standing = device.health
        if standing is None or standing.compliant is None:
            return
        outcome = classify(status)
        sent = action.sent if action.sent is not None else when
        if outcome is StatusClass.ERROR and action.config[1] != "Get":  # a policy not applied
            if standing.failed_session is None or sent > standing.failed_session:
                standing.failed_session = sent
            if standing.compliant:
                standing.recover_at = when + self._rng.expovariate(1.0 / RECOVER_MEAN)
                self._flip(when, device, standing, False, "failed_action")
        elif outcome is StatusClass.SUCCESS and not standing.compliant and (
            standing.failed_session is None or sent > standing.failed_session
        ):
            self._flip(when, device, standing, True, "successful_action")

    def settled(self, device: Device) -> None:
        """The last session before the start was drawn (history makes only sessions with
        work): it was a check too."""
        if device.health is not None and device.last_report is not None:
            self.checked_in(device.last_report, device)

    def _flip(
        self, when: float, device: Device, standing: Standing, compliant: bool, cause: str
    ) -> None:
        standing.compliant = compliant
        if compliant:
            standing.failed_session = standing.recover_at = None
        if standing.last_check is None or when > standing.last_check:
            standing.last_check = when
        device.json = None
        self._journal.flipped(ComplianceFlip(when, device.id, compliant, cause))

    def _install_update(self, when: float, device: Device, standing: Standing) -> None:
        standing.update_at = when + self._rng.expovariate(1.0 / UPDATE_MEAN)
        newer = self._catalog.newer[standing.os_index]
        if newer is not None:
            standing.os_index = newer
            device.profile = replace(device.profile, os=self._catalog.versions[newer])
            device.json = None


# --- what is served ----------------------------------------------------------------------------


def served_form(bad: bool, pick: str | None, dropped: str | None, standing: Standing | None) -> str:
    """How a device's compliance is served: ``pick`` is the bad_compliance fault's form when
    ``bad``; ``dropped`` the optional field the missing_fields fault takes away."""
    if bad and pick is not None:
        return pick
    if dropped == "summary":
        return NO_SUMMARY
    if standing is None or standing.compliant is None or standing.last_check is None:
        return NULL
    return OBJECT


def served(standing: Standing | None, form: str) -> Compliance:
    """The ground truth a reader of the document can take from it."""
    if standing is None or form not in (OBJECT, NO_FLAG):
        return Compliance(None, None, form)
    compliant = standing.compliant if form == OBJECT else None
    return Compliance(compliant, standing.last_check, form)


def compliance_value(standing: Standing | None, form: str, stamp_text: str | None) -> object:
    """``summary.compliance`` in ``form``; ``stamp_text`` is ``lastCheck`` as written."""
    if form == OBJECT and standing is not None:
        return {"compliant": standing.compliant, "lastCheck": stamp_text}
    if form == NOT_OBJECT:
        return "compliant"
    if form == NO_FLAG:
        return {"lastCheck": stamp_text}
    if form == BAD_FLAG:
        return {"compliant": "yes", "lastCheck": "yesterday"}
    return None


def win_policy(organization_id: str, tags: Sequence[str]) -> dict[str, str] | None:
    """The device's assigned policy. The docs name ``winPolicy`` without its fields (§5.1):
    an id and a name is a small plausible guess, one policy per device role."""
    role = next((tag for tag in tags if tag in _POLICIES), None)
    return None if role is None else dict(_policy(organization_id, role))


@lru_cache(maxsize=64)
def _policy(organization_id: str, role: str) -> tuple[tuple[str, str], ...]:
    digest = hashlib.blake2b(f"{organization_id}/{role}".encode(), digest_size=12).hexdigest()
    return (("id", digest), ("name", _POLICIES[role]))
