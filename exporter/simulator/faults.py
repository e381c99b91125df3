"""Fault injection: the ``--faults`` SPEC, per-request draws and stable per-entity choices.

SPEC is comma-separated ``kind[=probability][:argument]``; the probability defaults to 1.

Transport faults (latency, errors, throttles, resets, broken or slow bodies) are drawn per
request from a seeded RNG and never change fleet state. Data faults (``doc_timestamps``,
``unknown_status``, ``missing_fields``) are decided per entity by a stable hash of the seed
and the entity's key, so one action looks the same on every request while the fault is set.
``shifting_pages``, ``transient_404``, ``short_list``, ``stale_read`` and ``window_churn``
are drawn per request and never change fleet state (see app.py for what each does).

Ground truth under data faults (``fleet.grouped_counts``, ``events_since``, ``acks_since``):

- ``unknown_status`` renames the *final* status of the actions it picks (pending ones keep
  their names) to a name outside the 65; the truth follows: grouped counts, batch summaries,
  events and acks carry the served name and class ``unknown``. The renaming is applied when
  asked, so switching the fault mid-run renames already finished actions too, as if
  upstream had changed a name.
- ``missing_fields`` drops one optional field of the entities it picks (action:
  ``statusCode``, ``sentAt``, ``config`` or ``data``; batch: ``summary``, ``updatedAt`` or
  ``name``; device: ``displayName``, ``tags``, ``summary``, ``lastStatusReportTime`` or
  ``mdmUser``). ``cmdId``, ``status`` and final timestamps are never dropped, so grouped
  counts and events are unchanged; an ack whose ``sentAt`` is hidden is still in
  ``acks_since`` although a client cannot measure it.
- ``doc_timestamps`` changes only how moments are written; they parse to the same values.
- ``bad_compliance`` serves the devices it picks without a readable ``summary.compliance``:
  no ``summary`` at all, ``compliance`` null, a string, without ``compliant``, or with
  ``compliant: "yes"`` and ``lastCheck: "yesterday"`` (``health.BAD_FORMS``, one form per
  device). ``fleet.compliance`` tells which and what is still readable; the compliance a
  device has underneath (``compliance_flips_since``) goes on moving.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from exporter.simulator.catalog import UNKNOWN_STATUSES

# kind -> (default argument, whether an argument is accepted)
KINDS: dict[str, tuple[float | None, bool]] = {
    "latency": (0.2, True),  # seconds before answering
    "error500": (None, False),
    "error503": (None, True),  # optional Retry-After seconds
    "throttle": (1.0, True),  # 429, Retry-After seconds
    "throttle_date": (1.0, True),  # 429, Retry-After as an HTTP date this many seconds ahead
    "throttle_bare": (None, False),  # 429 without Retry-After
    "reset": (None, False),  # connection closed without a response
    "invalid_json": (None, False),
    "truncated_json": (None, False),
    "doc_timestamps": (None, False),
    "unknown_status": (None, False),
    "missing_fields": (None, False),
    "bad_compliance": (None, False),
    "shifting_pages": (None, False),
    # What replicas and caches in front of a real API do now and then (see app.py):
    "transient_404": (None, False),  # a batch or its actions answer 404 (3001) once
    "short_list": (None, False),  # an actions list holds one item (totalDocs agrees)
    "stale_read": (None, False),  # actions served as they were before they left Pending
    "window_churn": (None, False),  # a batch history misses one of its batches
    "slow_body": (2048.0, True),  # bytes per second
    "huge_body": (5.0, True),  # megabytes of padding
}
DATA_KINDS = frozenset({"doc_timestamps", "unknown_status", "missing_fields", "bad_compliance"})
# A device's optional fields, one of which missing_fields may drop.
DEVICE_OPTIONAL = ("displayName", "tags", "summary", "lastStatusReportTime", "mdmUser")


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    probability: float = 1.0
    argument: float | None = None

    def __str__(self) -> str:
        text = self.kind if self.probability == 1.0 else f"{self.kind}={self.probability:g}"
        return text if self.argument is None else f"{text}:{self.argument:g}"


def parse_spec(spec: str) -> tuple[Fault, ...]:
    """Faults of a SPEC string; raises ``ValueError`` naming the offending part."""
    faults: dict[str, Fault] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        fault = _parse_part(part)
        if fault.kind in faults:
            raise ValueError(f"{part!r}: {fault.kind} given twice")
        faults[fault.kind] = fault
    return tuple(faults.values())


def _parse_part(part: str) -> Fault:
    head, _, argument_text = part.partition(":")
    kind, has_probability, probability_text = head.partition("=")
    kind = kind.strip()
    if kind not in KINDS:
        raise ValueError(f"{part!r}: unknown fault kind (known: {', '.join(KINDS)})")
    probability = _number(part, probability_text) if has_probability else 1.0
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"{part!r}: probability must be within 0..1")
    default, takes_argument = KINDS[kind]
    argument = default
    if argument_text.strip():
        if not takes_argument:
            raise ValueError(f"{part!r}: {kind} takes no argument")
        argument = _number(part, argument_text)
        if argument < 0:
            raise ValueError(f"{part!r}: argument must be >= 0")
    elif ":" in part:
        raise ValueError(f"{part!r}: empty argument")
    return Fault(kind, probability, argument)


def _number(part: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{part!r}: {text.strip()!r} is not a number") from None


def stable_unit(seed: int, kind: str, key: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, kind, key)."""
    digest = hashlib.blake2b(f"{seed}\0{kind}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class Faults:
    """The active faults; ``set``/``clear`` switch them at run time."""

    def __init__(self, seed: int, spec: str = "") -> None:
        self._seed = seed
        self._rng = random.Random(f"{seed}/faults")
        self._active: dict[str, Fault] = {}
        self.data_active = False
        self.set(spec)

    @property
    def spec(self) -> str:
        return ",".join(str(fault) for fault in self._active.values())

    def set(self, spec: str) -> None:
        faults = parse_spec(spec)  # raises before anything changes
        self._active = {fault.kind: fault for fault in faults}
        self.data_active = any(kind in DATA_KINDS for kind in self._active)

    def clear(self) -> None:
        self.set("")

    def get(self, kind: str) -> Fault | None:
        return self._active.get(kind)

    def draw(self, kind: str) -> Fault | None:
        """The fault when it is set and fires on this request."""
        fault = self._active.get(kind)
        if fault is None or self._rng.random() >= fault.probability:
            return None
        return fault

    def stable(self, kind: str, key: str) -> bool:
        """Whether the data fault ``kind`` applies to the entity ``key`` (same every time)."""
        fault = self._active.get(kind)
        if fault is None:
            return False
        if fault.probability >= 1.0:
            return True
        return stable_unit(self._seed, kind, key) < fault.probability

    def pick(self, kind: str, key: str, choices: tuple[str, ...]) -> str:
        """A stable choice among ``choices`` for the entity ``key``."""
        return choices[int(stable_unit(self._seed, kind + "/pick", key) * len(choices))]

    def randint(self, low: int, high: int) -> int:
        return self._rng.randint(low, high)

    def shown_status(self, key: str, status: str, final: bool) -> str:
        """The status name served for an action: ``unknown_status`` renames final ones."""
        if final and self.stable("unknown_status", key):
            return self.pick("unknown_status", key, UNKNOWN_STATUSES)
        return status
