"""The self part of the body: the exporter's own metrics, one small function per family.

Self-metrics move with every API request, so they make a section of their own, the last of
the body: a request re-renders this section alone. It holds the families of
:class:`SelfMetrics`, the cardinality guard's two gauges, the process and platform metrics
of a prometheus_client registry and, in OpenMetrics, the closing ``# EOF``.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Metric, PlatformCollector, ProcessCollector
from prometheus_client.exposition import generate_latest as generate_text
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from exporter.families import (
    API_DURATION,
    API_REQUESTS,
    BUDGET,
    BUILD_INFO,
    CHECKIN_SOURCE,
    GUARD_LEVEL,
    PARSE_PROBLEMS,
    PLANNED,
    POLL_FAILURES,
    POLL_ROUNDS,
    QUERY_VERDICT,
    RELOAD_OK,
    ROUND,
    SERIES_DROPPED,
    STORAGE_FAILURES,
    STORAGE_LAST_WRITE,
    Family,
    escape_label_value,
    format_value,
    histogram_lines,
)
from exporter.selfmetrics import CHECKIN_SOURCES, SelfMetrics

# The image sets it from its REVISION build arg; a checkout or a wheel does not know it.
REVISION_VARIABLE = "APPLIVERY_EXPORTER_REVISION"


def build_labels(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """build_info's labels besides ``version``: fixed for the life of the process."""
    revision = (os.environ if environ is None else environ).get(REVISION_VARIABLE, "")
    return {"revision": revision.strip() or "unknown",
            "python_version": platform.python_version()}


BUILD_LABELS = build_labels()

Lines = Iterable[str]


def api_request_lines(metrics: SelfMetrics) -> Lines:
    for (endpoint, code), count in sorted(metrics.api_requests.items()):
        yield (
            f'{API_REQUESTS.name}_total{{api_endpoint="{escape_label_value(endpoint)}",'
            f'code="{escape_label_value(code)}"}} {count}\n'
        )


def api_duration_lines(metrics: SelfMetrics) -> Lines:
    for endpoint, histogram in sorted(metrics.api_durations.items()):
        labels = f'api_endpoint="{escape_label_value(endpoint)}"'
        yield from histogram_lines(API_DURATION.name, labels, histogram)


def budget_lines(metrics: SelfMetrics) -> Lines:
    yield f"{BUDGET.name} {format_value(float(metrics.budget_requests_per_hour))}\n"


def round_lines(metrics: SelfMetrics) -> Lines:
    yield f"{ROUND.name} {format_value(float(metrics.poll_round_seconds))}\n"


def poll_round_lines(metrics: SelfMetrics) -> Lines:
    yield f"{POLL_ROUNDS.name}_total {metrics.poll_rounds}\n"


def poll_failure_lines(metrics: SelfMetrics) -> Lines:
    for kind, count in sorted(metrics.poll_failures.items()):
        yield f'{POLL_FAILURES.name}_total{{kind="{kind}"}} {count}\n'


def planned_lines(metrics: SelfMetrics) -> Lines:
    yield f"{PLANNED.name} {metrics.requests_planned}\n"


def parse_problem_lines(metrics: SelfMetrics) -> Lines:
    for kind, count in sorted(metrics.parse_problems.items()):
        yield f'{PARSE_PROBLEMS.name}_total{{kind="{escape_label_value(kind)}"}} {count}\n'


def reload_lines(metrics: SelfMetrics) -> Lines:
    yield f"{RELOAD_OK.name} {1 if metrics.config_reload_successful else 0}\n"


def checkin_source_lines(metrics: SelfMetrics) -> Lines:
    for source in CHECKIN_SOURCES:
        chosen = int(source == metrics.checkin_source)
        yield f'{CHECKIN_SOURCE.name}{{source="{source}"}} {chosen}\n'


def query_verdict_lines(metrics: SelfMetrics) -> Lines:
    for (endpoint, parameter), verdict in sorted(metrics.query_verdicts.items()):
        yield (
            f'{QUERY_VERDICT.name}{{api_endpoint="{escape_label_value(endpoint)}",'
            f'parameter="{escape_label_value(parameter)}",'
            f'verdict="{escape_label_value(verdict)}"}} 1\n'
        )


def storage_failure_lines(metrics: SelfMetrics) -> Lines:
    yield f"{STORAGE_FAILURES.name}_total {metrics.storage_write_failures}\n"


def storage_last_write_lines(metrics: SelfMetrics) -> Lines:
    if metrics.storage_last_write is not None:  # memory only, or nothing written yet
        yield f"{STORAGE_LAST_WRITE.name} {format_value(metrics.storage_last_write)}\n"


# In the order of the body.
SELF_FAMILIES: tuple[tuple[Family, Callable[[SelfMetrics], Lines]], ...] = (
    (API_REQUESTS, api_request_lines),
    (API_DURATION, api_duration_lines),
    (BUDGET, budget_lines),
    (ROUND, round_lines),
    (POLL_ROUNDS, poll_round_lines),
    (POLL_FAILURES, poll_failure_lines),
    (PLANNED, planned_lines),
    (PARSE_PROBLEMS, parse_problem_lines),
    (RELOAD_OK, reload_lines),
    (CHECKIN_SOURCE, checkin_source_lines),
    (QUERY_VERDICT, query_verdict_lines),
    (STORAGE_FAILURES, storage_failure_lines),
    (STORAGE_LAST_WRITE, storage_last_write_lines),
)


def self_metrics_section(metrics: SelfMetrics, version: str, *, openmetrics: bool) -> bytes:
    """The families of :class:`SelfMetrics`, then the build info."""
    out: list[bytes] = []
    for family, lines in SELF_FAMILIES:
        out.append(family.header(openmetrics=openmetrics))
        out.append("".join(lines(metrics)).encode(errors="replace"))
    out.append(BUILD_INFO.header(openmetrics=openmetrics))
    labels = ",".join(
        f'{name}="{escape_label_value(value)}"'
        for name, value in {"version": version, **BUILD_LABELS}.items()
    )
    build = f"{BUILD_INFO.name}{{{labels}}} 1\n"
    out.append(build.encode(errors="replace"))
    return b"".join(out)


def guard_section(level: int, dropped: int, *, openmetrics: bool) -> bytes:
    """The cardinality guard's gauges: series it left out, and its level."""
    return b"".join((
        SERIES_DROPPED.header(openmetrics=openmetrics),
        f"{SERIES_DROPPED.name} {dropped}\n".encode(),
        GUARD_LEVEL.header(openmetrics=openmetrics),
        f"{GUARD_LEVEL.name} {level}\n".encode(),
    ))


@dataclass(frozen=True, slots=True)
class _Collected:
    """A registry's families as collected once, for both formats to write."""

    families: list[Metric]

    def collect(self) -> list[Metric]:
        return self.families


def registry_sections(registry: CollectorRegistry) -> dict[bool, bytes]:
    """The registry's metrics (process and platform) in each format, by ``openmetrics``,
    without OpenMetrics' ``# EOF``: collected once, as the process collector reads /proc
    each time it is asked."""
    collected = _Collected(list(registry.collect()))
    return {
        False: generate_text(collected),  # type: ignore[arg-type]
        True: generate_openmetrics(collected).removesuffix(b"# EOF\n"),  # type: ignore[arg-type]
    }


def default_registry() -> CollectorRegistry:
    """Process and platform metrics, as a prometheus_client exporter would show them."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry
