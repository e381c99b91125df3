"""The /metrics body, rendered once per change into cached bytes.

The words below mean the same in every module of the exposition (devicestore, fleetwide,
selfexposition, gzipstream):

- A **body** is what one scrape gets in one format (text 0.0.4 or OpenMetrics 1.0): a
  tuple of **sections** (bytes) written one after the other, never joined into one copy.
- First the **fleet part**: per family, its **header** (HELP and TYPE lines), then its
  sample lines. A per-device family's lines are the device store's **blocks** of one
  **column**: each watched device's lines of that family, rendered once per change and
  joined for ``BLOCK_DEVICES`` devices at a time. A fleet-wide family's lines are one
  section, bounded whatever the fleet's size.
- Last the **self part**, one section: self-metrics, the guard's gauges, process metrics
  (and ``# EOF``). It moves with every API request and is then the only one rendered.
- gzip: each section deflated once is a **piece**; the gzip body is one member strung from
  the pieces.

Sample lines are the same in both formats, so the two bodies share every section but the
headers and the self part. A section whose bytes did not change keeps its object: bodies are
compared by identity, and an unchanged section is neither compressed nor checksummed again.
The poll-status families, which every device read moves, come last in the fleet part,
because the gzip CRC runs from the first changed section on.

``refresh_steps()`` renders in steps (:class:`exporter.devicestore.Pace`), so that the event
loop serving scrapes never waits for a whole fleet.
"""

from __future__ import annotations

from collections.abc import Generator, Hashable, Mapping, Sequence

from prometheus_client import CollectorRegistry

from exporter.devicestore import BLOCK_DEVICES, RENDER_STEP_DEVICES, Column, DeviceStore, Pace
from exporter.families import (
    ACTIONS,
    CHECK_IN,
    COMMAND_INFO,
    COMPLIANCE_CHECK,
    DEVICE_INFO,
    DEVICES,
    DEVICES_COMPLIANCE,
    DEVICES_OS_VERSION,
    LAST_SUCCESS,
    LATENCY,
    MAX_LABEL_VALUE,
    OLDEST_PENDING,
    ROLLOUT_ACTIONS,
    ROLLOUT_DEVICES,
    SETTING_RESULTS,
    TARGET_UP,
    TRANSITIONS,
    TRUNCATED,
    Family,
    sample_lines,
    truncation_mark,
)
from exporter.fleetwide import FleetWide
from exporter.guard import GUARD_LEVELS, Guard, Level, level_series
from exporter.gzipstream import GzipStreams
from exporter.rollouts import Rollout
from exporter.selfexposition import (
    default_registry,
    guard_section,
    registry_sections,
    self_metrics_section,
)
from exporter.selfmetrics import SelfMetrics
from exporter.state import FleetState

__all__ = [
    "BLOCK_DEVICES",
    "CONTENT_TYPE_OPENMETRICS",
    "CONTENT_TYPE_TEXT",
    "GUARD_LEVELS",
    "GZIP_LEVEL",
    "MAX_LABEL_VALUE",
    "RENDER_STEP_DEVICES",
    "TRUNCATED",
    "Exposition",
    "truncation_mark",
    "wants_openmetrics",
]

CONTENT_TYPE_TEXT = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

# Level 1: on a 12 MB body of 74k series, 2.4x faster than level 6 for a body 14% larger
# (bench/exposition.py); the CPU of the exporter matters more than scrape bandwidth.
GZIP_LEVEL = 1


# --- negotiation --------------------------------------------------------------------------


# A version is a few small numbers; anything longer is not one (and int() of thousands of
# digits raises, past Python's limit on integer strings).
MAX_VERSION_PART = 9


def _version_number(value: str) -> tuple[int, ...] | None:
    """``1.0.0`` as (1, 0, 0); None for anything else (``²``, ``1e3``, 5,000 digits)."""
    numbers = []
    for part in value.split("."):
        if not (part.isascii() and part.isdigit() and len(part) <= MAX_VERSION_PART):
            return None
        numbers.append(int(part))
    return tuple(numbers)


def _version_at_least_1(parameters: Sequence[str]) -> bool | None:
    """Whether a ``version=`` parameter is >= 1.0.0 (False when it is not a version); None
    when there is none."""
    for token in parameters:
        key, sep, value = token.strip().partition("=")
        if sep and key == "version":
            number = _version_number(value)
            return number is not None and number >= (1, 0, 0)
    return None


def wants_openmetrics(accept_header: str | None) -> bool:
    """Same choice as ``prometheus_client.exposition.choose_encoder``: the first
    ``application/openmetrics-text`` entry without a version or with version >= 1.0.0 wins,
    unless a ``text/plain`` entry with version >= 1.0.0 comes first; q-values are ignored.
    Whatever cannot be read as such an entry is passed over: a hostile header gets the
    text format, never an error."""
    for accepted in (accept_header or "").split(","):
        media, *parameters = accepted.split(";")
        media = media.strip()
        if media == "application/openmetrics-text":
            if _version_at_least_1(parameters) in (None, True):
                return True
        elif media == "text/plain" and _version_at_least_1(parameters):
            return False
    return False


# --- the body ---------------------------------------------------------------------------------

Body = tuple[bytes, ...]  # sections in order; the last one is the self part

# The fleet part's families in order, each with the store column its lines come from (None:
# a fleet-wide section): per-device command data, the fleet-wide families, then the poll
# status. ACTIONS stands for whichever detail of the action gauges the guard's level serves.
FLEET_PART: tuple[tuple[Family, Column | None], ...] = (
    (ACTIONS, Column.ACTIONS),
    (OLDEST_PENDING, Column.OLDEST),
    (DEVICE_INFO, Column.INFO),
    (COMMAND_INFO, Column.COMMAND_INFO),
    (TRANSITIONS, None),
    (LATENCY, None),
    (SETTING_RESULTS, None),
    (ROLLOUT_DEVICES, None),
    (ROLLOUT_ACTIONS, None),
    (TARGET_UP, Column.UP),
    (LAST_SUCCESS, Column.LAST_SUCCESS),
    (CHECK_IN, Column.CHECK_IN),
    (COMPLIANCE_CHECK, Column.COMPLIANCE_CHECK),
    (DEVICES, None),
    (DEVICES_COMPLIANCE, None),
    (DEVICES_OS_VERSION, None),
)


def _same(old: Sequence[bytes], new: Sequence[bytes]) -> bool:
    return len(old) == len(new) and all(a is b for a, b in zip(old, new, strict=True))


class Exposition:
    """The current body in both formats, plain and gzip, brought up to date by refresh."""

    def __init__(
        self,
        state: FleetState,
        metrics: SelfMetrics,
        *,
        version: str,
        registry: CollectorRegistry | None = None,
        max_series: int | None = None,
    ) -> None:
        self._state = state
        self._metrics = metrics
        self._version = version
        self._registry = registry if registry is not None else default_registry()
        self._guard = Guard(max_series)
        self._store = DeviceStore(coarse=max_series is not None)
        self._fleet_wide = FleetWide()
        # A new ceiling, put in force at the start of the next refresh (a refresh paused
        # meanwhile goes on with the one it began with).
        self._next_ceiling: tuple[int | None] | None = None
        # The generations of FleetState and SelfMetrics the bodies were rendered at.
        self._rendered_at = (-1, -1)
        self._self_metrics: Mapping[bool, bytes] = {False: b"", True: b""}
        # Replaced as a whole, never mutated: a thread reading them sees one consistent body.
        self._bodies: Mapping[bool, Body] = {False: (), True: ()}
        self._joined: dict[Hashable, tuple[Body, bytes]] = {}
        self._gzip = GzipStreams(GZIP_LEVEL)
        self.refresh()

    # --- the cardinality guard ------------------------------------------------------------

    @property
    def max_series(self) -> int | None:
        if self._next_ceiling is not None:
            return self._next_ceiling[0]
        return self._guard.max_series

    @max_series.setter
    def max_series(self, value: int | None) -> None:
        """A new ceiling (a reload): every device is rendered again at the next refresh.

        Only noted here: a reload may come while a refresh is paused between its steps, and
        that refresh goes on with the devices and the ceiling it holds."""
        if value != self.max_series:
            self._next_ceiling = (value,)

    @property
    def guard_level(self) -> Level:
        return self._guard.level

    @property
    def series_total(self) -> int:
        """Series at full detail (while the guard is on)."""
        return self._guard.series_total

    @property
    def series_dropped(self) -> int:
        return self._guard.series_dropped

    @property
    def guard_summary(self) -> str:
        """One line for the landing page and the log."""
        return self._guard.summary

    def rollouts(self) -> list[Rollout]:
        """The exported rollouts, by name (for the landing page)."""
        return self._store.rollouts.top()

    # --- refreshing -----------------------------------------------------------------------

    def refresh(self) -> bool:
        """Bring the bodies up to date in one go; True when their bytes changed (or every
        device was rendered again, under a new ceiling)."""
        steps = self.refresh_steps()
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return bool(done.value)

    def refresh_steps(self) -> Generator[None, None, bool]:
        """:meth:`refresh` in steps, pausing whenever a step did what one step may do, so
        that a caller on the event loop lets scrapes through a large first render (seconds
        for millions of actions). Changes made while it is paused are seen by the next
        refresh. The fleet part is touched only when FleetState moved (or the guard's level
        changed); a self-metrics change renders the self part alone."""
        ceiling, self._next_ceiling = self._next_ceiling, None
        if ceiling is not None:
            (self._guard.max_series,) = ceiling
            self._store.forget(coarse=self._guard.max_series is not None)
            self._rendered_at = (-1, self._rendered_at[1])
        state, metrics = self._state, self._metrics
        at = (state.generation, metrics.generation)
        if at == self._rendered_at:
            return False
        fleet_moved = at[0] != self._rendered_at[0]
        pace = Pace()
        if fleet_moved:
            yield from self._store.update(state, pace)
            self._fleet_wide.refresh(state, self._store)
        if at[1] != self._rendered_at[1]:
            self._self_metrics = {
                om: self_metrics_section(metrics, self._version, openmetrics=om)
                for om in (False, True)
            }
        registry = registry_sections(self._registry)
        level = self._guard.level
        self._weigh(registry[False])
        if fleet_moved or self._guard.level != level:
            yield from self._store.join(self._guard.level.columns, pace)
        self._rendered_at = at
        return self._publish(registry) or ceiling is not None  # a new ceiling: a change

    def _weigh(self, registry: bytes) -> None:
        """Let the guard pick its level from the series each level would serve."""
        guard = self._guard
        if guard.max_series is None and guard.level == Level.FULL:
            return
        fixed = (
            sample_lines(self._self_metrics[False])
            + sample_lines(registry)
            + self._fleet_wide.sample_lines()
        )
        guard.choose(level_series(self._store.series, fixed))

    def _publish(self, registry: Mapping[bool, bytes]) -> bool:
        """Lay the bodies out anew; True (and published) when any section changed."""
        bodies = {
            om: (*self._fleet_part(openmetrics=om), self._self_part(registry[om], openmetrics=om))
            for om in (False, True)
        }
        if all(_same(self._bodies[om], bodies[om]) for om in (False, True)):
            return False
        self._bodies = bodies
        return True

    def _fleet_part(self, *, openmetrics: bool) -> list[bytes]:
        level = self._guard.level
        actions, served = level.actions, level.columns
        out: list[bytes] = []
        for family, column in FLEET_PART:
            out.append(family.header(openmetrics=openmetrics))
            if column is None:
                out.append(self._fleet_wide.section(family))
            elif column is Column.ACTIONS:
                if actions is None:
                    out.append(self._fleet_wide.fleet_classes)
                else:
                    out += self._store.blocks(actions)
            elif column in served:
                out += self._store.blocks(column)
        return [section for section in out if section]

    def _self_part(self, registry: bytes, *, openmetrics: bool) -> bytes:
        guard = self._guard
        part = b"".join((
            self._self_metrics[openmetrics],
            guard_section(int(guard.level), guard.series_dropped, openmetrics=openmetrics),
            registry,
            b"# EOF\n" if openmetrics else b"",
        ))
        old = self._bodies[openmetrics]
        return old[-1] if old and old[-1] == part else part

    # --- serving --------------------------------------------------------------------------

    def parts(self, *, openmetrics: bool) -> Body:
        """The current body as its sections, in order (the self part last): what a scrape
        writes, one after the other."""
        return self._bodies[openmetrics]

    def gzip_parts(self, *, openmetrics: bool) -> Body:
        """The current body as one gzip member, in parts to write one after the other.

        Safe from any thread: only sections not seen before are deflated (the fleet part's
        once per change, for both formats), and the CRC-32 runs from the first section that
        changed."""
        return self._gzip.member(openmetrics, self._bodies[openmetrics])

    def body(self, *, openmetrics: bool) -> bytes:
        """The current body in one bytes object (joined on demand, once per change)."""
        return self._join((openmetrics, False), self.parts(openmetrics=openmetrics))

    def gzip_body(self, *, openmetrics: bool) -> bytes:
        """:meth:`gzip_parts` in one bytes object (joined once per change)."""
        return self._join((openmetrics, True), self.gzip_parts(openmetrics=openmetrics))

    def _join(self, key: Hashable, parts: Body) -> bytes:
        joined = self._joined.get(key)
        if joined is None or joined[0] is not parts:
            joined = (parts, b"".join(parts))
            self._joined[key] = joined
        return joined[1]
