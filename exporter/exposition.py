"""The /metrics body, rendered once per change into cached bytes.

A scrape serves bytes that already exist. ``refresh()`` re-renders only what moved since the
previous call: sample lines are cached per device and per family group (device info, poll
status, command data), keyed by the generations FleetState keeps for them, and a body is one
``b"".join`` of cached chunks. Gauge, counter and histogram sample lines are the same in the
text format 0.0.4 and in OpenMetrics 1.0, so both bodies share the chunks and differ only in
their HELP/TYPE headers and the closing ``# EOF``.
"""

from __future__ import annotations

import gzip
import math
import re
import threading
from collections import Counter
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import structlog
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import generate_latest as generate_text
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.utils import floatToGoString

from exporter.histogram import Histogram
from exporter.rollouts import STATES, Part, Rollout, RolloutTotals, device_parts
from exporter.selfmetrics import SelfMetrics
from exporter.state import CLASSES, DEVICE_STATES, DeviceGenerations, DeviceView, FleetState

log = structlog.get_logger("exporter.exposition")

CONTENT_TYPE_TEXT = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

# Upstream strings become label values; bound them so one bad value cannot bloat a scrape.
MAX_LABEL_VALUE = 1024
TRUNCATED = "...[truncated]"
# Level 1: on a 12 MB body of 74k series, 2.4x faster than level 6 for a body 14% larger
# (bench/exposition.py); the CPU of the exporter matters more than scrape bandwidth.
GZIP_LEVEL = 1
# Devices rendered between two pauses of refresh_steps(): tens of milliseconds of work.
RENDER_STEP_DEVICES = 200


# --- negotiation --------------------------------------------------------------------------


def _version_at_least_1(parameters: Sequence[str]) -> bool | None:
    """Whether a ``version=`` parameter is >= 1.0.0; None when there is none."""
    for token in parameters:
        key, sep, value = token.strip().partition("=")
        if sep and key == "version":
            parts = []
            for part in value.split("."):
                if not part.isdigit():
                    return False
                parts.append(int(part))
            return tuple(parts) >= (1, 0, 0)
    return None


def wants_openmetrics(accept_header: str | None) -> bool:
    """Same choice as ``prometheus_client.exposition.choose_encoder``: the first
    ``application/openmetrics-text`` entry without a version or with version >= 1.0.0 wins,
    unless a ``text/plain`` entry with version >= 1.0.0 comes first; q-values are ignored."""
    for accepted in (accept_header or "").split(","):
        media, *parameters = accepted.split(";")
        media = media.strip()
        if media == "application/openmetrics-text":
            if _version_at_least_1(parameters) in (None, True):
                return True
        elif media == "text/plain" and _version_at_least_1(parameters):
            return False
    return False


# --- formatting ---------------------------------------------------------------------------


def escape_label_value(value: str) -> str:
    if len(value) > MAX_LABEL_VALUE:
        value = value[:MAX_LABEL_VALUE] + TRUNCATED
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


_NOT_LABEL_CHAR = re.compile(r"[^a-zA-Z0-9_]")


def label_name(name: str) -> str | None:
    """A valid label name for a free-form key, or None when it cannot be one."""
    clean = _NOT_LABEL_CHAR.sub("_", name)
    if not clean or clean[0].isdigit():
        clean = "_" + clean
    return None if clean.startswith("__") else clean


def format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{name}="{escape_label_value(value)}"' for name, value in pairs)


def _histogram_lines(name: str, labels: str, histogram: Histogram) -> list[str]:
    """``_bucket`` lines (cumulative, ``+Inf`` last), ``_sum`` and ``_count`` of one series."""
    prefix = labels + "," if labels else ""
    bounds = [*histogram.buckets, math.inf]
    lines = [
        f'{name}_bucket{{{prefix}le="{floatToGoString(bound)}"}} {count}\n'
        for bound, count in zip(bounds, histogram.cumulative(), strict=True)
    ]
    braces = f"{{{labels}}}" if labels else ""
    lines.append(f"{name}_sum{braces} {format_value(float(histogram.sum))}\n")
    lines.append(f"{name}_count{braces} {histogram.count}\n")
    return lines


# --- families -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Family:
    name: str  # counters without ``_total``
    type: str
    help: str

    def header(self, *, openmetrics: bool) -> bytes:
        name = self.name
        if self.type == "counter" and not openmetrics:
            name += "_total"  # the text format names a counter family by its sample
        return f"# HELP {name} {self.help}\n# TYPE {name} {self.type}\n".encode()


ACTIONS = Family(
    "applivery_windows_command_actions",
    "gauge",
    "Actions in each status in a watched command batch, as of its last successful poll.",
)
TRANSITIONS = Family(
    "applivery_windows_command_action_transitions",
    "counter",
    "Actions seen entering a status since the exporter started.",
)
LATENCY = Family(
    "applivery_windows_command_ack_latency_seconds",
    "histogram",
    "receivedAt minus sentAt of each action, observed once when the device answers.",
)
OLDEST_PENDING = Family(
    "applivery_windows_command_oldest_pending_sent_timestamp_seconds",
    "gauge",
    "sentAt (or batch creation) of the oldest action of the device still pending.",
)
DEVICE_INFO = Family(
    "applivery_windows_device_info", "gauge", "Watched device: name, labels and identifiers."
)
COMMAND_INFO = Family("applivery_windows_command_info", "gauge", "Name of a command batch.")
ROLLOUT_DEVICES = Family(
    "applivery_windows_rollout_devices",
    "gauge",
    "Watched devices per state of their latest batch of each name (rollout).",
)
ROLLOUT_ACTIONS = Family(
    "applivery_windows_rollout_actions",
    "gauge",
    "Actions per status class of the latest batch of each name (rollout) on watched devices.",
)
SETTING_RESULTS = Family(
    "applivery_windows_setting_results",
    "counter",
    "Actions that reached a final status, per CSP setting and operation, counted once.",
)
CHECK_IN = Family(
    "applivery_windows_device_last_check_in_timestamp_seconds",
    "gauge",
    "lastStatusReportTime of the device: its last check-in (OMA-DM session).",
)
DEVICES = Family(
    "applivery_windows_devices",
    "gauge",
    "Watched devices per upstream device state (not_listed: not in the device list).",
)
TARGET_UP = Family(
    "applivery_exporter_target_up", "gauge", "1 when the last poll of the device succeeded."
)
LAST_SUCCESS = Family(
    "applivery_exporter_last_success_timestamp_seconds",
    "gauge",
    "When the last successful poll of the device finished.",
)
API_REQUESTS = Family(
    "applivery_exporter_api_requests",
    "counter",
    "Upstream API requests by API endpoint and HTTP code (or timeout, connection, invalid_body).",
)
API_DURATION = Family(
    "applivery_exporter_api_request_duration_seconds",
    "histogram",
    "Duration of upstream API requests.",
)
BUDGET = Family(
    "applivery_exporter_api_budget_requests_per_hour",
    "gauge",
    "Request budget the scheduler currently keeps under.",
)
ROUND = Family(
    "applivery_exporter_poll_round_duration_seconds", "gauge", "Duration of the last poll round."
)
POLL_ROUNDS = Family(
    "applivery_exporter_poll_rounds", "counter", "Poll rounds started, crashed ones included."
)
POLL_FAILURES = Family(
    "applivery_exporter_poll_failures",
    "counter",
    "Polls that raised outside the API's own errors: round = a whole round, device = one device.",
)
PLANNED = Family(
    "applivery_exporter_api_requests_planned",
    "gauge",
    "Upstream API requests the scheduler planned for its latest poll round.",
)
PARSE_PROBLEMS = Family(
    "applivery_exporter_parse_problems",
    "counter",
    "Upstream data problems by kind, counted once per affected action or response.",
)
RELOAD_OK = Family(
    "applivery_exporter_config_last_reload_successful",
    "gauge",
    "1 when the last configuration reload succeeded.",
)
BUILD_INFO = Family("applivery_exporter_build_info", "gauge", "Exporter version.")
SERIES_DROPPED = Family(
    "applivery_exporter_series_dropped",
    "gauge",
    "Series left out of /metrics by the cardinality guard (metrics.max_series).",
)
GUARD_LEVEL = Family(
    "applivery_exporter_cardinality_guard_level",
    "gauge",
    "Detail the cardinality guard removed: 0 = full detail, see docs/cardinality.md.",
)

# --- the cardinality guard ------------------------------------------------------------------

# What each level of the guard removes, cumulatively, most specific labels first. Every alert
# keeps working at every level: they read target_up, last_success, oldest_pending and the
# check-in time (kept per device), the fleet views (rollouts, settings, devices per state,
# whose series do not grow with the fleet), the fleet-wide transition counter and
# self-metrics; the recording rules sum the action gauges ``without (command, status)`` and
# so read every level alike.
GUARD_LEVELS: tuple[str, ...] = (
    "full detail",
    "applivery_windows_command_actions summed over command",
    "applivery_windows_command_info dropped",
    "applivery_windows_command_actions summed over status (per status_class)",
    "applivery_windows_device_info dropped",
    "applivery_windows_command_actions summed over device (per status_class)",
)
# Back to more detail only when it fits with this much room, so a fleet hovering at the
# ceiling does not flip its series back and forth every round.
GUARD_RELAX = 0.9


# --- per-device chunks --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Chunks:
    """Rendered sample lines of one device, one bytes object per family."""

    generations: DeviceGenerations
    info: bytes
    # From the poll status and the device list.
    up: bytes
    last_success: bytes
    check_in: bytes
    state: str
    # From the batches.
    actions: bytes
    oldest: bytes
    command_info: bytes
    rollouts: tuple[Part, ...]
    # Coarser renderings of ``actions`` for the cardinality guard (empty while it is off).
    by_status: bytes = b""
    by_class: bytes = b""
    class_counts: tuple[tuple[str, int], ...] = ()

    def lines(self) -> tuple[bytes | str, ...]:
        return (
            self.info, self.up, self.last_success, self.check_in, self.state, self.actions,
            self.oldest, self.command_info, self.by_status, self.by_class,
        )

    def series(self) -> tuple[int, int, int, int, int, int]:
        """Sample lines of (always kept, actions, by status, by class, command info, info)."""
        kept = (self.up + self.last_success + self.check_in + self.oldest).count(b"\n")
        return (
            kept,
            self.actions.count(b"\n"),
            self.by_status.count(b"\n"),
            self.by_class.count(b"\n"),
            self.command_info.count(b"\n"),
            self.info.count(b"\n"),
        )


def _info_lines(organization: str, view: DeviceView) -> bytes:
    pairs = [("organization", organization), ("device", view.device), ("name", view.name or "")]
    taken = {name for name, _ in pairs}
    for key, value in [*view.labels.items(), *view.info.items()]:
        name = label_name(key)
        if name is not None and name not in taken:
            taken.add(name)
            pairs.append((name, value))
    return f"{DEVICE_INFO.name}{{{_labels(pairs)}}} 1\n".encode(errors="replace")


def _status_lines(organization: str, view: DeviceView) -> tuple[bytes, bytes, bytes]:
    """Lines of target_up, last_success and the check-in time."""
    base = _labels((("organization", organization), ("device", view.device)))
    lines = [f"{TARGET_UP.name}{{{base}}} {1 if view.up else 0}\n", "", ""]
    if view.last_success is not None:
        lines[1] = f"{LAST_SUCCESS.name}{{{base}}} {format_value(view.last_success)}\n"
    if view.check_in is not None:
        lines[2] = f"{CHECK_IN.name}{{{base}}} {format_value(view.check_in)}\n"
    up, last_success, check_in = (line.encode(errors="replace") for line in lines)
    return up, last_success, check_in


def _command_lines(organization: str, view: DeviceView) -> tuple[bytes, bytes, bytes]:
    base = _labels((("organization", organization), ("device", view.device)))
    actions: list[str] = []
    infos: list[str] = []
    for batch in view.batches:
        labels = f'{base},command="{escape_label_value(batch.id)}"'
        for status, status_class, count in batch.counts:
            actions.append(
                f'{ACTIONS.name}{{{labels},status="{escape_label_value(status)}",'
                f'status_class="{status_class}"}} {count}\n'
            )
        if batch.name is not None:
            infos.append(
                f'{COMMAND_INFO.name}{{{labels},name="{escape_label_value(batch.name)}"}} 1\n'
            )
    oldest = ""
    if view.oldest_pending is not None:
        oldest = f"{OLDEST_PENDING.name}{{{base}}} {format_value(view.oldest_pending)}\n"
    return (
        "".join(actions).encode(errors="replace"),
        oldest.encode(errors="replace"),
        "".join(infos).encode(errors="replace"),
    )


def _coarse_lines(organization: str, view: DeviceView) -> tuple[bytes, bytes]:
    """The action gauges summed over ``command``, and over ``command`` and ``status``."""
    base = _labels((("organization", organization), ("device", view.device)))
    by_status: Counter[tuple[str, str]] = Counter()
    for batch in view.batches:
        for status, status_class, count in batch.counts:
            by_status[(status, status_class)] += count
    status_lines = "".join(
        f'{ACTIONS.name}{{{base},status="{escape_label_value(status)}",'
        f'status_class="{status_class}"}} {count}\n'
        for (status, status_class), count in sorted(by_status.items())
    )
    class_lines = "".join(
        f'{ACTIONS.name}{{{base},status_class="{status_class}"}} {count}\n'
        for status_class, count in sorted(view.class_counts.items())
        if count
    )
    return status_lines.encode(errors="replace"), class_lines.encode(errors="replace")


def _fleet_class_lines(organization: str, chunks: Iterable[_Chunks]) -> bytes:
    """The action gauges summed over device too: one series per status_class."""
    totals: Counter[str] = Counter()
    for chunk in chunks:
        for status_class, count in chunk.class_counts:
            totals[status_class] += count
    org = f'organization="{escape_label_value(organization)}"'
    return "".join(
        f'{ACTIONS.name}{{{org},status_class="{status_class}"}} {totals[status_class]}\n'
        for status_class in CLASSES
        if totals[status_class]
    ).encode(errors="replace")


def _sample_lines(body: bytes) -> int:
    """Sample lines of a rendered section (every line not starting with ``#``)."""
    return body.count(b"\n") - (b"\n" + body).count(b"\n#")


def _render_device(
    organization: str,
    state: FleetState,
    device: str,
    generations: DeviceGenerations,
    previous: _Chunks | None,
    *,
    coarse: bool = False,
) -> _Chunks:
    old = previous.generations if previous is not None else None
    commands_moved = previous is None or old is None or old.commands != generations.commands
    view = state.device_view(device, with_batches=commands_moved)
    if previous is not None and old is not None and old.info == generations.info:
        info = previous.info
    else:
        info = _info_lines(organization, view)
    if previous is not None and old is not None and old.status == generations.status:
        up, last_success, check_in = previous.up, previous.last_success, previous.check_in
    else:
        up, last_success, check_in = _status_lines(organization, view)
    if previous is not None and not commands_moved:
        return replace(
            previous, generations=generations, info=info, up=up, last_success=last_success,
            check_in=check_in, state=view.state,
        )
    actions, oldest, command_info = _command_lines(organization, view)
    chunks = _Chunks(
        generations, info, up, last_success, check_in, view.state, actions, oldest,
        command_info, device_parts(view.batches),
    )
    if not coarse:
        return chunks
    by_status, by_class = _coarse_lines(organization, view)
    class_counts = tuple((c, n) for c, n in view.class_counts.items() if n)
    return replace(chunks, by_status=by_status, by_class=by_class, class_counts=class_counts)


# --- fleet-wide and self-metrics sections -------------------------------------------------


def _fleet_sections(organization: str, state: FleetState) -> tuple[bytes, bytes, bytes]:
    """Sample lines of the transition counter, the latency histogram and the setting
    results: the counters that move with the ledger."""
    org = f'organization="{escape_label_value(organization)}"'
    transitions = [
        f'{TRANSITIONS.name}_total{{{org},status="{escape_label_value(status)}",'
        f'status_class="{status_class}"}} {count}\n'
        for status, status_class, count in state.transitions()
    ]
    latency: list[str] = []
    for status_class, histogram in sorted(state.latency().items()):
        latency += _histogram_lines(LATENCY.name, f'{org},status_class="{status_class}"', histogram)
    return (
        "".join(transitions).encode(errors="replace"),
        "".join(latency).encode(errors="replace"),
        _setting_lines(organization, state),
    )


def _setting_lines(organization: str, state: FleetState) -> bytes:
    org = f'organization="{escape_label_value(organization)}"'
    return "".join(
        f'{SETTING_RESULTS.name}_total{{{org},setting="{escape_label_value(setting)}",'
        f'operation="{escape_label_value(operation)}",status_class="{status_class}"}} {count}\n'
        for setting, operation, status_class, count in state.setting_results()
    ).encode(errors="replace")


def _rollout_lines(organization: str, rollouts: Sequence[Rollout]) -> tuple[bytes, bytes]:
    """Lines of the rollout gauges: every state and every class of each rollout, zeros too
    (a share of failed devices needs its denominator)."""
    org = f'organization="{escape_label_value(organization)}"'
    devices: list[str] = []
    actions: list[str] = []
    for rollout in rollouts:
        labels = f'{org},rollout="{escape_label_value(rollout.name)}"'
        devices += (
            f'{ROLLOUT_DEVICES.name}{{{labels},state="{state}"}} {count}\n'
            for state, count in zip(STATES, rollout.devices, strict=True)
        )
        actions += (
            f'{ROLLOUT_ACTIONS.name}{{{labels},status_class="{status_class}"}} {count}\n'
            for status_class, count in zip(CLASSES, rollout.actions, strict=True)
        )
    return "".join(devices).encode(errors="replace"), "".join(actions).encode(errors="replace")


def _device_state_lines(organization: str, chunks: Iterable[_Chunks]) -> bytes:
    org = f'organization="{escape_label_value(organization)}"'
    states = Counter(dict.fromkeys(DEVICE_STATES, 0))
    states.update(chunk.state for chunk in chunks)
    return "".join(
        f'{DEVICES.name}{{{org},state="{escape_label_value(state)}"}} {count}\n'
        for state, count in sorted(states.items())
    ).encode(errors="replace")


def _self_section(metrics: SelfMetrics, version: str, *, openmetrics: bool) -> bytes:
    out: list[bytes] = []

    def family(fam: Family, lines: Iterable[str]) -> None:
        out.append(fam.header(openmetrics=openmetrics))
        out.append("".join(lines).encode(errors="replace"))

    family(
        API_REQUESTS,
        (
            f'{API_REQUESTS.name}_total{{api_endpoint="{escape_label_value(endpoint)}",'
            f'code="{escape_label_value(code)}"}} {count}\n'
            for (endpoint, code), count in sorted(metrics.api_requests.items())
        ),
    )
    durations: list[str] = []
    for endpoint, histogram in sorted(metrics.api_durations.items()):
        durations += _histogram_lines(
            API_DURATION.name, f'api_endpoint="{escape_label_value(endpoint)}"', histogram
        )
    family(API_DURATION, durations)
    family(BUDGET, [f"{BUDGET.name} {format_value(float(metrics.budget_requests_per_hour))}\n"])
    family(ROUND, [f"{ROUND.name} {format_value(float(metrics.poll_round_seconds))}\n"])
    family(POLL_ROUNDS, [f"{POLL_ROUNDS.name}_total {metrics.poll_rounds}\n"])
    family(
        POLL_FAILURES,
        (
            f'{POLL_FAILURES.name}_total{{kind="{kind}"}} {count}\n'
            for kind, count in sorted(metrics.poll_failures.items())
        ),
    )
    family(PLANNED, [f"{PLANNED.name} {metrics.requests_planned}\n"])
    family(
        PARSE_PROBLEMS,
        (
            f'{PARSE_PROBLEMS.name}_total{{kind="{escape_label_value(kind)}"}} {count}\n'
            for kind, count in sorted(metrics.parse_problems.items())
        ),
    )
    family(RELOAD_OK, [f"{RELOAD_OK.name} {1 if metrics.config_reload_successful else 0}\n"])
    family(BUILD_INFO, [f'{BUILD_INFO.name}{{version="{escape_label_value(version)}"}} 1\n'])
    return b"".join(out)


def _extras(registry: CollectorRegistry, *, openmetrics: bool) -> bytes:
    if not openmetrics:
        return generate_text(registry)
    body = generate_openmetrics(registry)
    return body.removesuffix(b"# EOF\n")


def default_registry() -> CollectorRegistry:
    """Process and platform metrics, as a prometheus_client exporter would show them."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


# --- the exposition -----------------------------------------------------------------------


class Exposition:
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
        self._chunks: dict[str, _Chunks] = {}
        self._order: list[str] = []
        self._state_generation = -1
        self._counters_generation = -1
        self._metrics_generation = -1
        self._fleet = (b"", b"", b"")
        self._rollouts = RolloutTotals()
        self._rollouts_generation = -1
        self._rollout_sections = (b"", b"")
        self._device_states = b""
        self._self_sections: Mapping[bool, bytes] = {False: b"", True: b""}
        self._extras: Mapping[bool, bytes] = {False: b"", True: b""}
        # Replaced as a whole, never mutated: a thread reading them sees one consistent body.
        self._bodies: Mapping[bool, bytes] = {False: b"", True: b""}
        self._gzipped: dict[bool, tuple[bytes, bytes]] = {}
        self._gzip_locks = {False: threading.Lock(), True: threading.Lock()}
        self._max_series = max_series
        self.guard_level = 0
        self.series_total = 0  # series at full detail
        self.series_dropped = 0
        self.refresh()

    # --- the cardinality guard ------------------------------------------------------------

    @property
    def max_series(self) -> int | None:
        return self._max_series

    @max_series.setter
    def max_series(self, value: int | None) -> None:
        """A new ceiling (a reload): every device is rendered again at the next refresh."""
        if value != self._max_series:
            self._max_series = value
            self._chunks = {}
            self._order = []
            self._rollouts = RolloutTotals()
            self._rollouts_generation = -1
            self._state_generation = -1

    @property
    def guard_summary(self) -> str:
        """One line for the landing page and the log."""
        if self._max_series is None:
            return "Cardinality guard: off (no metrics.max_series)."
        if self.guard_level == 0:
            return (
                f"Cardinality guard: {self.series_total} series, within the ceiling of "
                f"{self._max_series}."
            )
        over = self.series_total - self.series_dropped > self._max_series
        return (
            f"Cardinality guard: {self.series_dropped} of {self.series_total} series dropped "
            f"to stay under {self._max_series} (level {self.guard_level}: "
            f"{'; '.join(GUARD_LEVELS[1 : self.guard_level + 1])})"
            + (", still over the ceiling." if over else ".")
        )

    def _level_totals(self, fixed: int) -> list[int]:
        """Series served at each guard level, given the series no level touches."""
        kept = actions = by_status = by_class = command_info = info = 0
        for chunk in self._chunks.values():
            k, a, s, c, ci, i = chunk.series()
            kept, actions, by_status, by_class = kept + k, actions + a, by_status + s, by_class + c
            command_info, info = command_info + ci, info + i
        base = fixed + kept + 2  # + the two guard gauges
        fleet_classes = _sample_lines(_fleet_class_lines("", self._chunks.values()))
        return [
            base + actions + command_info + info,
            base + by_status + command_info + info,
            base + by_status + info,
            base + by_class + info,
            base + by_class,
            base + fleet_classes,
        ]

    def _choose_level(self, fixed: int) -> bool:
        """Pick the guard level for the current series; True when it changed."""
        ceiling = self._max_series
        if ceiling is None:
            self.series_total = self.series_dropped = 0
            changed, self.guard_level = self.guard_level != 0, 0
            return changed
        totals = self._level_totals(fixed)
        level = next((i for i, n in enumerate(totals) if n <= ceiling), len(totals) - 1)
        if level < self.guard_level and totals[level] > ceiling * GUARD_RELAX:
            # More detail only with room to spare; else stay, unless the old level overflows.
            level = max(level, min(self.guard_level, self._fitting_level(totals, ceiling)))
        previous = (self.guard_level, self.series_dropped)
        self.guard_level = level
        self.series_total = totals[0]
        self.series_dropped = totals[0] - totals[level]
        if level != previous[0]:
            (log.warning if level else log.info)(
                "cardinality_guard",
                level=level,
                removed=list(GUARD_LEVELS[1 : level + 1]),
                series=totals[0],
                dropped=self.series_dropped,
                max_series=ceiling,
                over_ceiling=totals[level] > ceiling,
            )
        return (self.guard_level, self.series_dropped) != previous

    @staticmethod
    def _fitting_level(totals: Sequence[int], ceiling: int) -> int:
        """The most detailed level whose series fit with GUARD_RELAX room."""
        return next(
            (i for i, n in enumerate(totals) if n <= ceiling * GUARD_RELAX), len(totals) - 1
        )

    def refresh(self) -> bool:
        """Bring the cached bodies up to date in one go; True when their bytes changed."""
        steps = self.refresh_steps()
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return bool(done.value)

    def refresh_steps(self) -> Generator[None, None, bool]:
        """:meth:`refresh` in steps: it pauses after every ``RENDER_STEP_DEVICES`` devices it
        renders and between the two bodies it assembles, so that a caller on the event loop
        lets scrapes through a large first render (seconds for millions of actions). Changes
        made while it is paused are seen by the next refresh."""
        state, metrics = self._state, self._metrics
        state_generation = state.generation
        state_moved = state_generation != self._state_generation
        metrics_moved = metrics.generation != self._metrics_generation
        if not (state_moved or metrics_moved):
            return False
        changed = False
        if state_moved:
            changed |= yield from self._refresh_devices()
            changed |= self._refresh_fleet_views()
            self._state_generation = state_generation
        if metrics_moved:
            self._metrics_generation = metrics.generation
            sections = {
                om: _self_section(metrics, self._version, openmetrics=om) for om in (False, True)
            }
            changed |= sections != self._self_sections
            self._self_sections = sections
        extras = {om: _extras(self._registry, openmetrics=om) for om in (False, True)}
        changed |= extras != self._extras
        self._extras = extras
        if self._max_series is not None or self.guard_level:
            untouched = (
                *self._fleet, *self._rollout_sections, self._device_states,
                self._self_sections[False], extras[False],
            )
            changed |= self._choose_level(sum(_sample_lines(part) for part in untouched))
        if changed:
            plain = self._assemble(openmetrics=False)
            yield  # a large body takes a while to copy together: one at a time
            self._bodies = {False: plain, True: self._assemble(openmetrics=True)}
        return changed

    def _refresh_fleet_views(self) -> bool:
        """Re-render the fleet-wide sections that moved; True when any bytes changed."""
        state, organization = self._state, self._state.organization
        changed = False
        if state.counters_generation != self._counters_generation:
            fleet = _fleet_sections(organization, state)
            changed |= fleet != self._fleet
            self._fleet = fleet
            self._counters_generation = state.counters_generation
        if self._rollouts.generation != self._rollouts_generation:
            rollouts = _rollout_lines(organization, self._rollouts.top())
            changed |= rollouts != self._rollout_sections
            self._rollout_sections = rollouts
            self._rollouts_generation = self._rollouts.generation
        device_states = _device_state_lines(organization, self._chunks.values())
        changed |= device_states != self._device_states
        self._device_states = device_states
        return changed

    def rollouts(self) -> list[Rollout]:
        """The exported rollouts, by name (for the landing page)."""
        return self._rollouts.top()

    def _refresh_devices(self) -> Generator[None, None, bool]:
        """Re-render the devices whose generations moved; True when any bytes changed."""
        state = self._state
        watched = state.watched()
        changed = False
        if len(watched) != len(self._order) or set(watched) != set(self._order):
            changed = True
            self._order = sorted(watched)
            for gone in self._chunks.keys() - set(watched):
                self._rollouts.replace(self._chunks.pop(gone).rollouts, ())
        organization = state.organization
        chunks = self._chunks
        rendered = 0
        for device in self._order:
            try:
                generations = state.device_generations(device)
            except KeyError:
                continue  # unwatched while paused: the next refresh drops it
            previous = chunks.get(device)
            if previous is None or previous.generations != generations:
                fresh = _render_device(
                    organization, state, device, generations, previous,
                    coarse=self._max_series is not None,
                )
                changed = changed or previous is None or fresh.lines() != previous.lines()
                chunks[device] = fresh
                self._rollouts.replace(previous.rollouts if previous else (), fresh.rollouts)
                rendered += 1
                if rendered % RENDER_STEP_DEVICES == 0:
                    yield
        if rendered >= RENDER_STEP_DEVICES:  # paused: the watched set may have moved
            self._order = [device for device in self._order if device in chunks]
        return changed

    def _assemble(self, *, openmetrics: bool) -> bytes:
        chunks = [self._chunks[device] for device in self._order]
        transitions, latency, settings = self._fleet
        rollout_devices, rollout_actions = self._rollout_sections
        level = self.guard_level
        parts: list[bytes] = [ACTIONS.header(openmetrics=openmetrics)]
        if level == 0:
            parts += [c.actions for c in chunks]
        elif level < 3:
            parts += [c.by_status for c in chunks]
        elif level < 5:
            parts += [c.by_class for c in chunks]
        else:
            parts.append(_fleet_class_lines(self._state.organization, chunks))
        parts += [TRANSITIONS.header(openmetrics=openmetrics), transitions]
        parts += [LATENCY.header(openmetrics=openmetrics), latency]
        parts.append(OLDEST_PENDING.header(openmetrics=openmetrics))
        parts += [c.oldest for c in chunks]
        parts.append(DEVICE_INFO.header(openmetrics=openmetrics))
        if level < 4:
            parts += [c.info for c in chunks]
        parts.append(COMMAND_INFO.header(openmetrics=openmetrics))
        if level < 2:
            parts += [c.command_info for c in chunks]
        parts.append(TARGET_UP.header(openmetrics=openmetrics))
        parts += [c.up for c in chunks]
        parts.append(LAST_SUCCESS.header(openmetrics=openmetrics))
        parts += [c.last_success for c in chunks]
        parts += [ROLLOUT_DEVICES.header(openmetrics=openmetrics), rollout_devices]
        parts += [ROLLOUT_ACTIONS.header(openmetrics=openmetrics), rollout_actions]
        parts += [SETTING_RESULTS.header(openmetrics=openmetrics), settings]
        parts.append(CHECK_IN.header(openmetrics=openmetrics))
        parts += [c.check_in for c in chunks]
        parts += [DEVICES.header(openmetrics=openmetrics), self._device_states]
        parts.append(self._self_sections[openmetrics])
        parts.append(SERIES_DROPPED.header(openmetrics=openmetrics))
        parts.append(f"{SERIES_DROPPED.name} {self.series_dropped}\n".encode())
        parts.append(GUARD_LEVEL.header(openmetrics=openmetrics))
        parts.append(f"{GUARD_LEVEL.name} {level}\n".encode())
        parts.append(self._extras[openmetrics])
        if openmetrics:
            parts.append(b"# EOF\n")
        return b"".join(parts)

    def body(self, *, openmetrics: bool) -> bytes:
        return self._bodies[openmetrics]

    def gzip_body(self, *, openmetrics: bool) -> bytes:
        """gzip of the current body, compressed once per change. Safe from any thread: it
        compresses an immutable bytes object and swaps the cache entry in one assignment."""
        plain = self._bodies[openmetrics]
        cached = self._gzipped.get(openmetrics)
        if cached is not None and cached[0] is plain:
            return cached[1]
        with self._gzip_locks[openmetrics]:
            cached = self._gzipped.get(openmetrics)
            if cached is not None and cached[0] is plain:
                return cached[1]
            compressed = gzip.compress(plain, compresslevel=GZIP_LEVEL, mtime=0)
            self._gzipped[openmetrics] = (plain, compressed)
            return compressed
