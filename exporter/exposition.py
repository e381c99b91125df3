"""The /metrics body, rendered once per change into cached bytes.

A scrape serves bytes that already exist. ``refresh()`` re-renders only what moved since the
previous call: sample lines are cached per device and per family group (device info, poll
status, command data), keyed by the generations FleetState keeps for them. Gauge, counter and
histogram sample lines are the same in the text format 0.0.4 and in OpenMetrics 1.0, so both
bodies share them and differ only in their HELP/TYPE headers and the closing ``# EOF``.

A body is a tuple of sections, never one big copy: the fleet part (each per-device family's
lines joined in blocks of ``BLOCK_DEVICES`` devices, and the fleet-wide families), then the
self part (the exporter's own metrics, which move with every API request). A change re-joins
only the blocks and sections it touched; a self-metrics change re-renders only the self part.
gzip follows the same cut: each section is deflated once on its own and the pieces are strung
into one gzip member (``gzip_parts``), so compressing after a change costs the changed
sections only.
"""

from __future__ import annotations

import functools
import math
import re
import struct
import threading
import zlib
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
from exporter.selfmetrics import CHECKIN_SOURCES, SelfMetrics
from exporter.state import CLASSES, DeviceGenerations, DeviceView, FleetState

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
# Devices whose lines of one family are joined (and compressed) together: a device's change
# costs its block, a few hundred kB at most, instead of the whole family.
BLOCK_DEVICES = 256
# Blocks joined between two pauses of refresh_steps() when many moved (a first render).
JOIN_STEP_BLOCKS = 4


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
        """HELP and TYPE lines: one bytes object per family and format, so a body's sections
        can be compared by identity."""
        return _header(self, openmetrics)


@functools.cache
def _header(family: Family, openmetrics: bool) -> bytes:
    name = family.name
    if family.type == "counter" and not openmetrics:
        name += "_total"  # the text format names a counter family by its sample
    return f"# HELP {name} {family.help}\n# TYPE {name} {family.type}\n".encode()


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
CHECKIN_SOURCE = Family(
    "applivery_exporter_checkin_source",
    "gauge",
    "1 for where the budget strategy learns check-ins: the device list sorted by check-in, "
    "or the whole list where upstream does not honour that sort.",
)
QUERY_VERDICT = Family(
    "applivery_exporter_api_query_verdict",
    "gauge",
    "What upstream does with a query parameter the exporter relies on (sort, tags): "
    "honoured, ignored, rejected or unchecked.",
)
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
    # From the batches.
    actions: bytes
    oldest: bytes
    command_info: bytes
    rollouts: tuple[Part, ...]
    # Coarser renderings of ``actions`` for the cardinality guard (empty while it is off).
    by_status: bytes = b""
    by_class: bytes = b""
    class_counts: tuple[tuple[str, int], ...] = ()

    def lines(self) -> tuple[bytes, ...]:
        return (
            self.info, self.up, self.last_success, self.check_in, self.actions, self.oldest,
            self.command_info, self.by_status, self.by_class,
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


def _fleet_class_lines(organization: str, totals: Mapping[str, int]) -> bytes:
    """The action gauges summed over device too: one series per status_class."""
    org = _labels((("organization", organization),))
    return "".join(
        f'{ACTIONS.name}{{{org},status_class="{status_class}"}} {totals[status_class]}\n'
        for status_class in CLASSES
        if totals.get(status_class)
    ).encode(errors="replace")


class _SeriesTotals:
    """Every device's sample lines by kind (:meth:`_Chunks.series`) and its actions per
    status class, summed: moved by the devices re-rendered, so that the guard weighs the
    fleet without walking it on every refresh."""

    def __init__(self) -> None:
        self.lines = [0] * 6
        self.classes: Counter[str] = Counter()

    def replace(self, old: _Chunks | None, new: _Chunks | None) -> None:
        for chunk, sign in ((old, -1), (new, 1)):
            if chunk is not None:
                for i, count in enumerate(chunk.series()):
                    self.lines[i] += sign * count
                for status_class, count in chunk.class_counts:
                    self.classes[status_class] += sign * count


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
            check_in=check_in,
        )
    actions, oldest, command_info = _command_lines(organization, view)
    chunks = _Chunks(
        generations, info, up, last_success, check_in, actions, oldest, command_info,
        device_parts(view.batches),
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
    org = _labels((("organization", organization),))
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
    org = _labels((("organization", organization),))
    return "".join(
        f'{SETTING_RESULTS.name}_total{{{org},setting="{escape_label_value(setting)}",'
        f'operation="{escape_label_value(operation)}",status_class="{status_class}"}} {count}\n'
        for setting, operation, status_class, count in state.setting_results()
    ).encode(errors="replace")


def _rollout_lines(organization: str, rollouts: Sequence[Rollout]) -> tuple[bytes, bytes]:
    """Lines of the rollout gauges: every state and every class of each rollout, zeros too
    (a share of failed devices needs its denominator)."""
    org = _labels((("organization", organization),))
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


def _device_state_lines(organization: str, states: Mapping[str, int]) -> bytes:
    org = _labels((("organization", organization),))
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
    family(
        CHECKIN_SOURCE,
        (
            f'{CHECKIN_SOURCE.name}{{source="{source}"}} {int(source == metrics.checkin_source)}\n'
            for source in CHECKIN_SOURCES
        ),
    )
    family(
        QUERY_VERDICT,
        (
            f'{QUERY_VERDICT.name}{{api_endpoint="{escape_label_value(endpoint)}",'
            f'parameter="{escape_label_value(parameter)}",'
            f'verdict="{escape_label_value(verdict)}"}} 1\n'
            for (endpoint, parameter), verdict in sorted(metrics.query_verdicts.items())
        ),
    )
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


# --- gzip in pieces -----------------------------------------------------------------------

# One gzip member (RFC 1952) strung together from sections deflated on their own: each piece is
# raw deflate that ends in a sync flush (byte-aligned, not final) and refers to nothing before
# it, so a section compressed once serves every body it is part of, in either format. One
# member rather than one per section: Go's reader (Prometheus) and Python's read every member
# of a stream, but curl stops after the first.
GZIP_HEADER = b"\x1f\x8b\x08\x00" + b"\x00\x00\x00\x00" + b"\x04\xff"  # mtime 0, level 1
LAST_BLOCK = b"\x03\x00"  # an empty final block (fixed codes): the end of the deflate stream


def deflate_piece(section: bytes) -> bytes:
    """``section`` as raw deflate blocks that any deflate stream may continue with."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(section) + compressor.flush(zlib.Z_SYNC_FLUSH)


def gzip_trailer(crc: int, size: int) -> bytes:
    """The end of the member: the final block, then CRC-32 and size of the whole body."""
    return LAST_BLOCK + struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF)


# --- the exposition -----------------------------------------------------------------------

# Fields of _Chunks whose lines go in blocks, per guard level: the action gauges at the
# detail the level keeps (none at the last level: one fleet-wide section), then the families
# that do not depend on the level.
_ACTION_FIELDS = ("actions", "by_status", "by_status", "by_class", "by_class", None)


def _block_fields(level: int) -> tuple[str, ...]:
    actions = _ACTION_FIELDS[level]
    return (
        *((actions,) if actions else ()),
        "oldest",
        *(("info",) if level < 4 else ()),
        *(("command_info",) if level < 2 else ()),
        "up",
        "last_success",
        "check_in",
    )


Body = tuple[bytes, ...]  # sections in order; the last one is the self part


def _keep_equal(old: tuple[bytes, ...], new: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """``new``, with the old object wherever the bytes are equal (sections are compared by
    identity: an unchanged one is neither compressed nor checksummed again)."""
    return tuple(o if o == n else n for o, n in zip(old, new, strict=True))


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
        # Blocks holding a device re-rendered since they were last joined; None: every block.
        self._dirty: set[int] | None = None
        # Per _Chunks field: per block, the lines it was joined from and the joined bytes.
        self._blocks: dict[str, list[tuple[list[bytes] | None, bytes]]] = {}
        self._state_generation = -1
        self._counters_generation = -1
        self._metrics_generation = -1
        self._fleet: tuple[bytes, ...] = (b"", b"", b"")
        self._rollouts = RolloutTotals()
        self._rollouts_generation = -1
        self._rollout_sections: tuple[bytes, ...] = (b"", b"")
        self._series = _SeriesTotals()  # kept while the guard is on
        self._render_again = False  # the ceiling changed: every device at the next refresh
        self._class_section = b""  # level 5's fleet-wide action lines, kept while equal
        self._device_states = b""
        self._self_sections: Mapping[bool, bytes] = {False: b"", True: b""}
        self._extras: Mapping[bool, bytes] = {False: b"", True: b""}
        self._fleet_parts: Mapping[bool, Body] | None = None
        self._own: Mapping[bool, bytes] = {False: b"", True: b""}
        # Series of the fleet part at each guard level, while the fleet does not move.
        self._fleet_totals: list[int] | None = None
        # Replaced as a whole, never mutated: a thread reading them sees one consistent body.
        self._bodies: Mapping[bool, Body] = {False: (), True: ()}
        self._joined: dict[bool, tuple[Body, bytes]] = {}
        self._gzipped: dict[bool, tuple[Body, Body]] = {}
        self._gzip_joined: dict[bool, tuple[Body, bytes]] = {}
        # Under _gzip_lock: deflated pieces by id of their section (shared by both formats)
        # and the CRC-32 after each section of the last body compressed in each format.
        self._gzip_lock = threading.Lock()
        self._pieces: dict[int, tuple[bytes, bytes]] = {}
        self._crcs: dict[bool, tuple[Body, list[int]]] = {}
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
        """A new ceiling (a reload): every device is rendered again at the next refresh.

        Only noted here: a reload may come while a refresh is paused between its steps, and
        that refresh goes on with the devices it holds."""
        if value != self._max_series:
            self._max_series = value
            self._render_again = True

    def _forget_devices(self) -> None:
        """Drop every rendered device and what was summed from them."""
        self._render_again = False
        self._chunks = {}
        self._order = []
        self._dirty = None
        self._rollouts = RolloutTotals()
        self._rollouts_generation = -1
        self._series = _SeriesTotals()
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
        kept, actions, by_status, by_class, command_info, info = self._series.lines
        base = fixed + kept + 2  # + the two guard gauges
        fleet_classes = sum(1 for count in self._series.classes.values() if count)
        return [
            base + actions + command_info + info,
            base + by_status + command_info + info,
            base + by_status + info,
            base + by_class + info,
            base + by_class,
            base + fleet_classes,
        ]

    def _choose_level(self, own_series: int, *, fleet_moved: bool) -> bool:
        """Pick the guard level for the current series; True when it (or the number of
        series it drops) changed. The fleet's share is counted again only when it moved."""
        ceiling = self._max_series
        if ceiling is None:
            self._fleet_totals = None
            self.series_total = self.series_dropped = 0
            changed, self.guard_level = self.guard_level != 0, 0
            return changed
        if fleet_moved or self._fleet_totals is None:
            fleet = (*self._fleet, *self._rollout_sections, self._device_states)
            self._fleet_totals = self._level_totals(sum(_sample_lines(part) for part in fleet))
        totals = [n + own_series for n in self._fleet_totals]
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

    # --- refreshing -----------------------------------------------------------------------

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
        renders and every ``JOIN_STEP_BLOCKS`` blocks it joins, so that a caller on the event
        loop lets scrapes through a large first render (seconds for millions of actions).
        Changes made while it is paused are seen by the next refresh.

        The fleet part is touched only when FleetState moved (or the guard level changed);
        a self-metrics change re-renders the self part alone."""
        if self._render_again:
            self._forget_devices()
        state, metrics = self._state, self._metrics
        state_generation = state.generation
        state_moved = state_generation != self._state_generation
        metrics_moved = metrics.generation != self._metrics_generation
        if not (state_moved or metrics_moved):
            return False
        fleet_changed = own_changed = False
        if state_moved:
            fleet_changed |= yield from self._refresh_devices()
            fleet_changed |= self._refresh_fleet_views()
            self._state_generation = state_generation
        if metrics_moved:
            self._metrics_generation = metrics.generation
            sections = {
                om: _self_section(metrics, self._version, openmetrics=om) for om in (False, True)
            }
            own_changed |= sections != self._self_sections
            self._self_sections = sections
        extras = {om: _extras(self._registry, openmetrics=om) for om in (False, True)}
        own_changed |= extras != self._extras
        self._extras = extras
        level = self.guard_level
        if self._max_series is not None or self.guard_level:
            own_series = _sample_lines(self._self_sections[False]) + _sample_lines(extras[False])
            own_changed |= self._choose_level(own_series, fleet_moved=state_moved)
        relayout = self.guard_level != level or self._fleet_parts is None
        if state_moved or relayout:
            fleet_changed |= yield from self._join_blocks()
            if fleet_changed or relayout:
                fleet_changed = True
                self._fleet_parts = {om: self._fleet_layout(openmetrics=om) for om in (False, True)}
        if own_changed:
            self._own = {om: self._own_section(openmetrics=om) for om in (False, True)}
        if not (fleet_changed or own_changed):
            return False
        fleet = self._fleet_parts
        assert fleet is not None
        self._bodies = {om: (*fleet[om], self._own[om]) for om in (False, True)}
        return True

    def _refresh_fleet_views(self) -> bool:
        """Re-render the fleet-wide sections that moved; True when any bytes changed."""
        state, organization = self._state, self._state.organization
        changed = False
        # Equal bytes keep their old object: sections are compared by identity downstream.
        if state.counters_generation != self._counters_generation:
            fleet = _fleet_sections(organization, state)
            if fleet != self._fleet:
                changed = True
                self._fleet = _keep_equal(self._fleet, fleet)
            self._counters_generation = state.counters_generation
        if self._rollouts.generation != self._rollouts_generation:
            rollouts = _rollout_lines(organization, self._rollouts.top())
            if rollouts != self._rollout_sections:
                changed = True
                self._rollout_sections = _keep_equal(self._rollout_sections, rollouts)
            self._rollouts_generation = self._rollouts.generation
        device_states = _device_state_lines(organization, state.device_states())
        if device_states != self._device_states:
            changed = True
            self._device_states = device_states
        if self._max_series is not None:  # what level 5 keeps of the actions
            classes = _fleet_class_lines(organization, self._series.classes)
            if classes != self._class_section:
                changed = True
                self._class_section = classes
        return changed

    def rollouts(self) -> list[Rollout]:
        """The exported rollouts, by name (for the landing page)."""
        return self._rollouts.top()

    def _set_order(self, order: list[str]) -> None:
        self._order = order
        self._dirty = None  # blocks hold other devices now

    def _refresh_devices(self) -> Generator[None, None, bool]:
        """Re-render the devices whose generations moved; True when any bytes changed."""
        state = self._state
        watched = state.watched()
        changed = False
        if len(watched) != len(self._order) or set(watched) != set(self._order):
            changed = True
            self._set_order(sorted(watched))
            for gone in self._chunks.keys() - set(watched):
                old = self._chunks.pop(gone)
                self._rollouts.replace(old.rollouts, ())
                if self._max_series is not None:
                    self._series.replace(old, None)
        organization = state.organization
        chunks = self._chunks
        rendered = 0
        for index, device in enumerate(self._order):
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
                if self._dirty is not None:
                    self._dirty.add(index // BLOCK_DEVICES)
                self._rollouts.replace(previous.rollouts if previous else (), fresh.rollouts)
                if self._max_series is not None:  # only the guard weighs the fleet
                    self._series.replace(previous, fresh)
                rendered += 1
                if rendered % RENDER_STEP_DEVICES == 0:
                    yield
        if rendered >= RENDER_STEP_DEVICES:  # paused: the watched set may have moved
            order = [device for device in self._order if device in chunks]
            if len(order) != len(self._order):
                self._set_order(order)
        return changed

    def _join_blocks(self) -> Generator[None, None, bool]:
        """Re-join the blocks of per-device lines that hold a re-rendered device (all of them
        after the watched set or the guard level changed); True when any bytes changed."""
        order, chunks = self._order, self._chunks
        fields = _block_fields(self.guard_level)
        count = -(-len(order) // BLOCK_DEVICES)
        blocks = self._blocks
        if tuple(blocks) != fields:
            # Every block of a new field is joined; a field kept keeps its joined bytes (and
            # so the identity of sections that do not change).
            blocks = self._blocks = {field: blocks.get(field, []) for field in fields}
            self._dirty = None
        for joined in blocks.values():
            del joined[count:]
            joined.extend([(None, b"")] * (count - len(joined)))
        # Without a note of blocks, every one is looked at; those whose lines stay are kept.
        todo = range(count) if self._dirty is None else sorted(self._dirty)
        self._dirty = set()
        changed = False
        for joined_blocks, index in enumerate(todo, 1):
            block = [chunks[d] for d in order[index * BLOCK_DEVICES : (index + 1) * BLOCK_DEVICES]]
            for field in fields:
                lines = [getattr(chunk, field) for chunk in block]
                if lines != blocks[field][index][0]:
                    blocks[field][index] = (lines, b"".join(lines))
                    changed = True
            if joined_blocks % JOIN_STEP_BLOCKS == 0:
                yield
        return changed

    def _fleet_layout(self, *, openmetrics: bool) -> Body:
        """The fleet part's sections in order: per-device command data first, the fleet-wide
        families, then the poll status that moves with every device read, so that a device
        read changes sections near the end (the gzip CRC is recomputed from the first
        changed section on)."""
        blocks = self._blocks
        level = self.guard_level
        transitions, latency, settings = self._fleet
        rollout_devices, rollout_actions = self._rollout_sections

        def joined(field: str) -> list[bytes]:
            return [lines for _, lines in blocks[field]]

        out: list[bytes] = [ACTIONS.header(openmetrics=openmetrics)]
        actions = _ACTION_FIELDS[level]
        if actions is None:
            out.append(self._class_section)
        else:
            out += joined(actions)
        out.append(OLDEST_PENDING.header(openmetrics=openmetrics))
        out += joined("oldest")
        out.append(DEVICE_INFO.header(openmetrics=openmetrics))
        if level < 4:
            out += joined("info")
        out.append(COMMAND_INFO.header(openmetrics=openmetrics))
        if level < 2:
            out += joined("command_info")
        out += [TRANSITIONS.header(openmetrics=openmetrics), transitions]
        out += [LATENCY.header(openmetrics=openmetrics), latency]
        out += [SETTING_RESULTS.header(openmetrics=openmetrics), settings]
        out += [ROLLOUT_DEVICES.header(openmetrics=openmetrics), rollout_devices]
        out += [ROLLOUT_ACTIONS.header(openmetrics=openmetrics), rollout_actions]
        out.append(TARGET_UP.header(openmetrics=openmetrics))
        out += joined("up")
        out.append(LAST_SUCCESS.header(openmetrics=openmetrics))
        out += joined("last_success")
        out.append(CHECK_IN.header(openmetrics=openmetrics))
        out += joined("check_in")
        out += [DEVICES.header(openmetrics=openmetrics), self._device_states]
        return tuple(section for section in out if section)

    def _own_section(self, *, openmetrics: bool) -> bytes:
        """The self part: self-metrics, the guard's gauges, process metrics (and ``# EOF``)."""
        return b"".join(
            (
                self._self_sections[openmetrics],
                SERIES_DROPPED.header(openmetrics=openmetrics),
                f"{SERIES_DROPPED.name} {self.series_dropped}\n".encode(),
                GUARD_LEVEL.header(openmetrics=openmetrics),
                f"{GUARD_LEVEL.name} {self.guard_level}\n".encode(),
                self._extras[openmetrics],
                b"# EOF\n" if openmetrics else b"",
            )
        )

    # --- serving --------------------------------------------------------------------------

    def parts(self, *, openmetrics: bool) -> Body:
        """The current body as its sections, in order (the self part last): what a scrape
        writes, one after the other."""
        return self._bodies[openmetrics]

    def body(self, *, openmetrics: bool) -> bytes:
        """The current body in one bytes object (joined on demand, once per change)."""
        parts = self._bodies[openmetrics]
        joined = self._joined.get(openmetrics)
        if joined is None or joined[0] is not parts:
            joined = (parts, b"".join(parts))
            self._joined[openmetrics] = joined
        return joined[1]

    def gzip_parts(self, *, openmetrics: bool) -> Body:
        """The current body as one gzip member, in parts to write one after the other.

        Safe from any thread: the body is an immutable tuple; only sections not seen before
        are deflated (the fleet part's once per fleet change, for both formats), and the
        CRC-32 runs from the first section that changed. The result is swapped into the
        cache in one assignment."""
        parts = self._bodies[openmetrics]
        cached = self._gzipped.get(openmetrics)
        if cached is not None and cached[0] is parts:
            return cached[1]
        with self._gzip_lock:
            cached = self._gzipped.get(openmetrics)
            if cached is not None and cached[0] is parts:
                return cached[1]
            known = self._pieces
            pieces: dict[int, tuple[bytes, bytes]] = {}
            out = [GZIP_HEADER]
            for section in parts:
                piece = known.get(id(section))
                if piece is None or piece[0] is not section:
                    piece = (section, deflate_piece(section))
                pieces[id(section)] = piece
                out.append(piece[1])
            for section in self._bodies[not openmetrics]:  # the other format's, still current
                piece = known.get(id(section))
                if piece is not None and piece[0] is section:
                    pieces.setdefault(id(section), piece)
            self._pieces = pieces
            out.append(gzip_trailer(self._crc(parts, openmetrics), sum(map(len, parts))))
            compressed = tuple(out)
            self._gzipped[openmetrics] = (parts, compressed)
            return compressed

    def _crc(self, parts: Body, openmetrics: bool) -> int:
        """CRC-32 of the body, continued from the last section it shares with the previous
        body of its format (under _gzip_lock)."""
        previous, crcs = self._crcs.get(openmetrics, ((), []))
        same = 0
        for old, new in zip(previous, parts, strict=False):
            if old is not new:
                break
            same += 1
        crcs = crcs[:same]
        crc = crcs[-1] if crcs else 0
        for section in parts[same:]:
            crc = zlib.crc32(section, crc)
            crcs.append(crc)
        self._crcs[openmetrics] = (parts, crcs)
        return crc

    def gzip_body(self, *, openmetrics: bool) -> bytes:
        """:meth:`gzip_parts` in one bytes object (joined once per change)."""
        parts = self.gzip_parts(openmetrics=openmetrics)
        joined = self._gzip_joined.get(openmetrics)
        if joined is None or joined[0] is not parts:
            joined = (parts, b"".join(parts))
            self._gzip_joined[openmetrics] = joined
        return joined[1]
