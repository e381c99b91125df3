"""Metric families and the text syntax of their sample lines.

Gauge, counter and histogram sample lines are the same in the text format 0.0.4 and in
OpenMetrics 1.0; only a family's HELP/TYPE header differs (a counter's name in the text
format ends in ``_total``). So lines are rendered once and shared by both formats, and a
header is one bytes object per family and format.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.utils import floatToGoString

from exporter.histogram import Histogram

# Upstream strings become label values; bound them so one bad value cannot bloat a scrape.
MAX_LABEL_VALUE = 1024
TRUNCATED = "...[truncated]"
DIGEST_CHARS = 12  # 48 bits of the whole value: two long values of one fleet never collide


# --- formatting ---------------------------------------------------------------------------


def truncation_mark(value: str) -> str:
    """What follows the kept prefix of a value over MAX_LABEL_VALUE: the marker and a digest
    of the whole value, so that two values sharing the prefix stay two series (the same
    series twice in a family is a body OpenMetrics parsers refuse)."""
    whole = value.encode("utf-8", "surrogatepass")  # a lone surrogate is hashed, not refused
    return f"{TRUNCATED}{hashlib.sha256(whole).hexdigest()[:DIGEST_CHARS]}"


def escape_label_value(value: str) -> str:
    if len(value) > MAX_LABEL_VALUE:
        value = value[:MAX_LABEL_VALUE] + truncation_mark(value)
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


def join_labels(pairs: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{name}="{escape_label_value(value)}"' for name, value in pairs)


def histogram_lines(name: str, labels: str, histogram: Histogram) -> list[str]:
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
COMPLIANCE_CHECK = Family(
    "applivery_windows_device_compliance_last_check_timestamp_seconds",
    "gauge",
    "summary.compliance.lastCheck of the device: when its compliance was last evaluated.",
)
DEVICES_COMPLIANCE = Family(
    "applivery_windows_devices_compliance",
    "gauge",
    "Watched devices per compliance (unknown: unreadable, or not in the device list).",
)
DEVICES_OS_VERSION = Family(
    "applivery_windows_devices_os_version",
    "gauge",
    "Watched devices per summary.osVersion (first 100 versions, then other; unknown: none).",
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
BUILD_INFO = Family(
    "applivery_exporter_build_info", "gauge", "Exporter version, git revision and Python version."
)
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
STORAGE_FAILURES = Family(
    "applivery_exporter_storage_write_failures",
    "counter",
    "Writes to the durable store (--storage.path), or attempts to open it, that failed.",
)
STORAGE_LAST_WRITE = Family(
    "applivery_exporter_storage_last_write_timestamp_seconds",
    "gauge",
    "When the last transaction was committed to the durable store.",
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


def sample_lines(section: bytes) -> int:
    """Sample lines of a rendered section (every line not starting with ``#``)."""
    return section.count(b"\n") - (b"\n" + section).count(b"\n#")
