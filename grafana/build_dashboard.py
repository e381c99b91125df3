"""Generate grafana/dashboards/applivery-mdm-exporter.json.

    python grafana/build_dashboard.py          # rewrite the JSON
    python grafana/build_dashboard.py --check  # exit 1 when the committed JSON is out of date
    python grafana/build_dashboard.py --params site.yml --output site.json  # your parameters

The dashboard is code so that panel ids, grid positions, datasource references and the
label filters of every query stay consistent; tests/test_dashboard.py checks the result.
Queries read the exporter's metrics and the series of prometheus/recording.yml; the alert
thresholds quoted in panel descriptions, the thresholds of the stuck-pending and
silent-devices tables, the runbook links and the landing page links come from
prometheus/params.yml (or a site file on top of it, as for the rules).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "dashboards" / "applivery-mdm-exporter.json"
RULES_GENERATOR = HERE.parent / "prometheus" / "build_rules.py"

UID = "applivery-mdm-exporter"
TITLE = "Applivery MDM / Windows commands"
SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Label filters shared by the queries. The exporter's own series carry no organization: they
# are filtered by instance, and the instance variable offers only the selected organizations'.
SEL_SELF = 'job=~"$job", instance=~"$instance"'
SEL = f'{SEL_SELF}, organization=~"$organization"'
SEL_DEVICE = f'{SEL}, device=~"$device"'
DEVICE_KEY = "job, instance, device"
# Columns of the per-device tables, by label.
DEVICE_COLUMNS = {
    "device": "Device",
    "name": "Name",
    "instance": "Instance",
    "organization": "Organization",
}


# The alert rules' generator: the thresholds quoted here are the ones it puts in the rules.
sys.path.insert(0, str(RULES_GENERATOR.parent))
import build_rules  # noqa: E402

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False
    format: str = "time_series"


@dataclass(frozen=True, slots=True)
class Panel:
    """A panel without id and position; ``width`` and ``height`` are grid units."""

    type: str
    title: str
    description: str
    queries: Sequence[Query]
    width: int
    height: int
    field_config: Json = field(default_factory=dict)
    options: Json = field(default_factory=dict)
    extra: Json = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Row:
    title: str
    panels: Sequence[Panel]


# --- panel kinds -----------------------------------------------------------------------------


def _defaults(unit: str, **custom: Any) -> Json:
    return {
        "defaults": {"unit": unit, "custom": custom, "color": {"mode": "palette-classic"}},
        "overrides": [],
    }


def timeseries(
    title: str,
    description: str,
    queries: Sequence[Query],
    *,
    unit: str,
    width: int = 12,
    height: int = 8,
    stacked: bool = False,
    log_scale: bool = False,
    thresholds: Sequence[tuple[str, float | None]] = (),
    overrides: Sequence[Json] = (),
) -> Panel:
    custom: Json = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 20 if stacked else 0,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stacked else "none", "group": "A"},
        "scaleDistribution": {"type": "log", "log": 10} if log_scale else {"type": "linear"},
    }
    config = _defaults(unit, **custom)
    if thresholds:
        config["defaults"]["custom"]["thresholdsStyle"] = {"mode": "dashed"}
        config["defaults"]["thresholds"] = _thresholds(thresholds)
    config["overrides"] = list(overrides)
    return Panel(
        "timeseries",
        title,
        description,
        queries,
        width,
        height,
        config,
        {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    )


def _thresholds(steps: Sequence[tuple[str, float | None]]) -> Json:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in steps]}


def bargauge(
    title: str,
    description: str,
    query: Query | Sequence[Query],
    *,
    unit: str,
    thresholds: Sequence[tuple[str, float | None]],
    width: int = 8,
    height: int = 9,
    orientation: str = "horizontal",
    overrides: Sequence[Json] = (),
) -> Panel:
    """One bar per series; several queries give one bar each, in their order."""
    config = _defaults(unit)
    config["defaults"]["color"] = {"mode": "thresholds"}
    config["defaults"]["thresholds"] = _thresholds(thresholds)
    config["overrides"] = list(overrides)
    return Panel(
        "bargauge",
        title,
        description,
        [query] if isinstance(query, Query) else list(query),
        width,
        height,
        config,
        {
            "displayMode": "gradient",
            "orientation": orientation,
            "showUnfilled": True,
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        },
    )


def stat(
    title: str,
    description: str,
    queries: Sequence[Query],
    *,
    unit: str = "none",
    width: int = 6,
    height: int = 8,
    mappings: Sequence[Json] = (),
    thresholds: Sequence[tuple[str, float | None]] = (("green", None),),
) -> Panel:
    config = _defaults(unit)
    config["defaults"]["color"] = {"mode": "thresholds"}
    config["defaults"]["thresholds"] = _thresholds(thresholds)
    config["defaults"]["mappings"] = list(mappings)
    return Panel(
        "stat",
        title,
        description,
        queries,
        width,
        height,
        config,
        {
            "colorMode": "value",
            "graphMode": "none",
            "justifyMode": "auto",
            "textMode": "value_and_name",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        },
    )


def table(
    title: str,
    description: str,
    query: Query | Sequence[Query],
    *,
    rename: Json,
    sort_by: str,
    unit: str = "none",
    width: int = 8,
    height: int = 9,
    overrides: Sequence[Json] = (),
) -> Panel:
    """Instant table queries; several are merged into one row per label set, their values
    in columns "Value #A", "Value #B", ... (named through ``rename``)."""
    queries = [query] if isinstance(query, Query) else list(query)
    config = _defaults(unit, align="auto")
    config["overrides"] = list(overrides)
    transformations: list[Json] = [{"id": "merge", "options": {}}] if len(queries) > 1 else []
    transformations.append(
        {"id": "organize", "options": {"excludeByName": {"Time": True}, "renameByName": rename}}
    )
    return Panel(
        "table",
        title,
        description,
        queries,
        width,
        height,
        config,
        {"showHeader": True, "sortBy": [{"displayName": sort_by, "desc": True}]},
        {"transformations": transformations},
    )


def heatmap(
    title: str, description: str, query: Query, *, width: int = 12, height: int = 9
) -> Panel:
    return Panel(
        "heatmap",
        title,
        description,
        [query],
        width,
        height,
        {"defaults": {"custom": {"scaleDistribution": {"type": "linear"}}}, "overrides": []},
        {
            "calculate": False,
            "cellGap": 1,
            "color": {
                "mode": "scheme",
                "scheme": "Oranges",
                "scale": "exponential",
                "exponent": 0.5,
                "steps": 64,
                "reverse": False,
            },
            "yAxis": {"axisPlacement": "left", "unit": "s"},
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"show": True, "yHistogram": False},
            "legend": {"show": True},
            "filterValues": {"le": 1e-9},
            "showValue": "never",
        },
        # MDM answers are minutes to hours apart: finer buckets in time are mostly empty.
        {"interval": "5m"},
    )


# --- the dashboard ---------------------------------------------------------------------------


def _with_names(devices: str) -> str:
    """A per-device vector with each device's configured name as a label."""
    names = f"max by ({DEVICE_KEY}, name) (applivery_windows_device_info{{{SEL}}})"
    # Devices without an info series keep their row, just without a name.
    return (
        f"({devices} * on ({DEVICE_KEY}) group_left (name) {names})"
        f" or on ({DEVICE_KEY}) {devices}"
    )


def _error_devices_query() -> str:
    return _with_names(
        "topk(10, sum by (job, instance, device) ("
        "instance_device_status_class:applivery_windows_command_actions:sum"
        f'{{status_class="error", {SEL_DEVICE}}}) > 0)'
    )


def _failing_devices_query() -> str:
    """Devices whose last poll failed, by time since their last successful poll (+Inf when
    none ever succeeded)."""
    down = f"applivery_exporter_target_up{{{SEL_DEVICE}}} == 0"
    since = f"time() - applivery_exporter_last_success_timestamp_seconds{{{SEL_DEVICE}}}"
    failing = f"(({since}) and on ({DEVICE_KEY}) ({down})) or on ({DEVICE_KEY}) (({down}) + inf)"
    return _with_names(f"topk(100, max by ({DEVICE_KEY}, organization) ({failing}))")


def _stuck_devices_query(after_seconds: int) -> str:
    return _with_names(
        "topk(100, max by (job, instance, device, organization) (time() - "
        "applivery_windows_command_oldest_pending_sent_timestamp_seconds"
        f"{{{SEL_DEVICE}}}) > {after_seconds})"
    )


def _error_ratio_query(window: str) -> str:
    """Errors per finished action over the selected instances, per organization: what the
    error alerts compute over a whole deployment."""
    rate = f"instance_status_class:applivery_windows_command_action_transitions:rate{window}"
    finished = f'sum by (job, organization) ({rate}{{status_class!="pending", {SEL}}})'
    errors = f'sum by (job, organization) ({rate}{{status_class="error", {SEL}}})'
    return f"({errors} or {finished} * 0) / {finished}"


# --- fleet views (docs/design.md): every shard exports the part of its own devices, so each
# query sums over the selected instances. ---------------------------------------------------

ROLLOUT_STATES = ("failed", "pending", "unknown", "canceled", "succeeded")
ROLLOUT_KEY = "organization, rollout"
LAST_CHECK_IN = "applivery_windows_device_last_check_in_timestamp_seconds"
OLDEST_PENDING = "applivery_windows_command_oldest_pending_sent_timestamp_seconds"
# Check-in age buckets: (legend, lower bound or None, upper bound or None), seconds.
CHECK_IN_AGES = (
    ("< 1h", None, 3600),
    ("1h – 24h", 3600, 86400),
    ("1d – 7d", 86400, 604800),
    ("> 7d", 604800, None),
)


def _rollout_devices(*matchers: str) -> str:
    inner = ", ".join((*matchers, SEL))
    return f"sum by ({ROLLOUT_KEY}) (applivery_windows_rollout_devices{{{inner}}})"


def _rollout_queries() -> list[Query]:
    """Devices per state, the succeeded share and the actions in error of each rollout: one
    table row per organization and rollout."""
    per_state = [
        Query(_rollout_devices(f'state="{state}"'), instant=True, format="table")
        for state in ROLLOUT_STATES
    ]
    succeeded = _rollout_devices('state="succeeded"')
    share = f"{succeeded} / {_rollout_devices()}"
    errors = (
        f"sum by ({ROLLOUT_KEY}) ("
        f'applivery_windows_rollout_actions{{status_class="error", {SEL}}})'
    )
    return [
        *per_state,
        Query(share, instant=True, format="table"),
        Query(errors, instant=True, format="table"),
    ]


def _check_in_age_query(low: int | None, high: int | None) -> str:
    """Devices whose last check-in is that old; 0, not nothing, when none is."""
    age = f"time() - {LAST_CHECK_IN}{{{SEL_DEVICE}}}"
    # Chained comparisons filter: age >= low < high keeps the ages in [low, high). A check-in
    # slightly ahead of Prometheus' clock counts as recent.
    bounds = (f" >= {low}" if low is not None else "") + (f" < {high}" if high is not None else "")
    return f"count({age}{bounds}) or count({LAST_CHECK_IN}{{{SEL_DEVICE}}}) * 0"


def _silent_devices(after_seconds: int) -> str:
    """Devices without a check-in for after_seconds that hold a pending action, by time since
    their last check-in."""
    silent = f"time() - {LAST_CHECK_IN}{{{SEL_DEVICE}}} > {after_seconds}"
    return (
        f"topk(100, max by ({DEVICE_KEY}, organization) (({silent}) "
        f"and on ({DEVICE_KEY}) {OLDEST_PENDING}{{{SEL_DEVICE}}}))"
    )


def _silent_devices_queries(after_seconds: int) -> list[Query]:
    """Since the last check-in, and the age of the oldest pending action, of the same
    devices (one table row each)."""
    silent = _silent_devices(after_seconds)
    pending = (
        f"(max by ({DEVICE_KEY}, organization) (time() - {OLDEST_PENDING}{{{SEL_DEVICE}}})"
        f" and on ({DEVICE_KEY}) {silent})"
    )
    return [
        Query(_with_names(silent), instant=True, format="table"),
        Query(_with_names(pending), instant=True, format="table"),
    ]


def _link(title: str, url: str) -> Json:
    return {"title": title, "url": url, "targetBlank": True}


def _by_name(name: str, *properties: Json) -> Json:
    return {"matcher": {"id": "byName", "options": name}, "properties": list(properties)}


def _share_column(name: str, *properties: Json) -> Json:
    """A table column of shares, 0 to 1, drawn as a gauge in each cell."""
    return _by_name(
        name,
        {"id": "unit", "value": "percentunit"},
        {"id": "min", "value": 0},
        {"id": "max", "value": 1},
        {"id": "custom.cellOptions", "value": {"type": "gauge", "mode": "basic"}},
        *properties,
    )


def _fixed_color(color: str) -> Json:
    return {"id": "color", "value": {"mode": "fixed", "fixedColor": color}}


def fleet_views(alerts: Mapping[str, Mapping[str, Any]]) -> Row:
    percent = build_rules.percent
    rollout = alerts["AppliveryRolloutFailing"]
    setting = alerts["AppliverySettingErrorRatioHigh"]
    silent = alerts["AppliveryDevicesSilent"]
    silent_after = build_rules.duration_seconds(silent["after"])
    state_columns = {
        f"Value #{ref}": state.capitalize()
        for ref, state in zip("ABCDE", ROLLOUT_STATES, strict=True)
    }
    age_colors = ("green", "yellow", "orange", "red")
    return Row(
        "Fleet views",
        [
            table(
                "Rollouts",
                "Each rollout (the watched batches sharing a name; per device only the latest "
                "batch of that name counts) with its devices per state, summed over the selected "
                "instances: failed (an action in error), else pending, else unknown, else "
                "canceled, else succeeded; the share of devices that succeeded, and the actions "
                "in error. Most failed devices first. AppliveryRolloutFailing fires when at "
                f"least {percent(rollout['share'])} of a rollout's devices, and at least "
                f"{rollout['min_devices']}, failed it for {rollout['for']}.",
                _rollout_queries(),
                rename={
                    "organization": "Organization",
                    "rollout": "Rollout",
                    **state_columns,
                    "Value #F": "Succeeded share",
                    "Value #G": "Actions in error",
                },
                sort_by="Failed",
                width=24,
                height=10,
                overrides=(
                    _share_column(
                        "Succeeded share", {"id": "color", "value": {"mode": "continuous-RdYlGr"}}
                    ),
                    _by_name(
                        "Failed",
                        {"id": "custom.cellOptions", "value": {"type": "color-text"}},
                        {"id": "color", "value": {"mode": "thresholds"}},
                        {"id": "thresholds", "value": _thresholds((("green", None), ("red", 1)))},
                    ),
                ),
            ),
            bargauge(
                "Top failing settings",
                "Actions that ended in an error status during the selected time range, per "
                "setting (the CSP path with instance segments as *) and operation, over the "
                "selected instances. AppliverySettingErrorRatioHigh fires when over "
                f"{percent(setting['ratio'])} of a setting's actions finished in an hour are "
                f"errors, with at least {setting['min_finished']} finished.",
                Query(
                    "topk(10, sum by (setting, operation) (increase("
                    'applivery_windows_setting_results_total{status_class="error", '
                    f"{SEL}}}[$__range])))",
                    "{{setting}} ({{operation}})",
                    instant=True,
                ),
                unit="short",
                thresholds=(("red", None),),
                width=12,
            ),
            bargauge(
                "Check-in age",
                "Watched devices by the age of their last check-in (OMA-DM session, "
                "lastStatusReportTime): only a check-in delivers commands. Devices whose "
                "check-in is not known yet are not counted. AppliveryDevicesSilent fires when "
                f"more than {percent(silent['share'])} of a deployment's devices have not "
                f"checked in for {silent['after']}.",
                [
                    Query(_check_in_age_query(low, high), legend, instant=True)
                    for legend, low, high in CHECK_IN_AGES
                ],
                unit="short",
                thresholds=(("blue", None),),
                width=6,
                orientation="vertical",
                overrides=[
                    _by_name(legend, _fixed_color(color))
                    for (legend, _, _), color in zip(CHECK_IN_AGES, age_colors, strict=True)
                ],
            ),
            bargauge(
                "Devices by state",
                "Watched devices per upstream device state (ACTIVE, PROVISIONING, "
                "DELETE_REQUESTED, DELETED, UNKNOWN, or as sent); not_listed: watched devices "
                "the device list has not shown.",
                Query(
                    f"sum by (state) (applivery_windows_devices{{{SEL}}})",
                    "{{state}}",
                    instant=True,
                ),
                unit="short",
                thresholds=(("blue", None),),
                width=6,
            ),
            table(
                "Silent devices with pending actions",
                f"Devices that have not checked in for over {silent['after']} and hold an "
                "action still pending, by time since their last check-in, with the age of the "
                "oldest pending action: what they hold waits for a session that does not come. "
                "AppliveryDevicesSilent counts silent devices; single devices are listed here "
                "instead of paging.",
                _silent_devices_queries(silent_after),
                rename={
                    **DEVICE_COLUMNS,
                    "Value #A": "Since last check-in",
                    "Value #B": "Oldest pending",
                },
                sort_by="Since last check-in",
                unit="s",
                width=24,
                height=8,
            ),
        ],
    )


# --- fleet health: compliance and OS versions from the device list (design.md, "Fleet health").

COMPLIANCE = "applivery_windows_devices_compliance"
OS_VERSION = "applivery_windows_devices_os_version"
LAST_COMPLIANCE_CHECK = "applivery_windows_device_compliance_last_check_timestamp_seconds"
COLORS = (("compliant", "green"), ("non_compliant", "red"), ("unknown", "text"))


def _non_compliant_share() -> str:
    """Non-compliant devices per watched device, summed over the selected shards: what
    AppliveryDevicesNonCompliant computes over a deployment."""
    watched = f"sum by (organization) ({COMPLIANCE}{{{SEL}}})"
    return f'sum by (organization) ({COMPLIANCE}{{compliance="non_compliant", {SEL}}}) / {watched}'


def _os_version_queries() -> list[Query]:
    """Devices per OS version over the selected shards, and their share of the watched."""
    devices = f"sum by (os_version) ({OS_VERSION}{{{SEL}}})"
    return [
        Query(devices, instant=True, format="table"),
        Query(f"{devices} / scalar(sum({OS_VERSION}{{{SEL}}}))", instant=True, format="table"),
    ]


def _non_compliant_devices_query() -> str:
    """Non-compliant devices by time since their last compliance check (+Inf when the list
    showed none), with their names and OS versions."""
    info = (
        f"max by ({DEVICE_KEY}, organization, name, os_version) ("
        f'applivery_windows_device_info{{compliance="non_compliant", {SEL_DEVICE}}})'
    )
    # A check a little ahead of Prometheus' clock is a check just now.
    since = f"clamp_min(time() - {LAST_COMPLIANCE_CHECK}{{{SEL_DEVICE}}}, 0)"
    known = f"{since} * on ({DEVICE_KEY}) group_left (name, os_version) {info}"
    return f"topk(100, ({known}) or on ({DEVICE_KEY}) ({info} * 0 + inf))"


def fleet_health(alerts: Mapping[str, Mapping[str, Any]]) -> Row:
    percent = build_rules.percent
    share = alerts["AppliveryDevicesNonCompliant"]
    rise = alerts["AppliveryDevicesFallingOutOfCompliance"]
    alerting = (
        f"AppliveryDevicesNonCompliant fires when more than {percent(share['share'])} of a "
        f"deployment's watched devices, and at least {share['min_devices']}, are non-compliant "
        f"for {share['for']}; AppliveryDevicesFallingOutOfCompliance when "
        f"{rise['devices']} more are non-compliant than an hour before, for {rise['for']}."
    )
    return Row(
        "Fleet health",
        [
            timeseries(
                "Compliance",
                "Watched devices per compliance verdict of the device list "
                "(summary.compliance), summed over the selected instances; unknown: no "
                "readable verdict, or a device the list has not shown. " + alerting,
                [Query(f"sum by (compliance) ({COMPLIANCE}{{{SEL}}})", "{{compliance}}")],
                unit="short",
                stacked=True,
                overrides=[_by_name(value, _fixed_color(color)) for value, color in COLORS],
            ),
            stat(
                "Non-compliant share",
                "Non-compliant devices per watched device of each organization, over the "
                "selected instances. " + alerting,
                [Query(_non_compliant_share(), "{{organization}}", instant=True)],
                unit="percentunit",
                width=4,
                thresholds=(("green", None), ("red", share["share"])),
            ),
            table(
                "OS versions",
                "Watched devices per Windows build (summary.osVersion as upstream spells it), "
                "summed over the selected instances, most devices first: the first 100 "
                "versions an exporter saw, the rest as other; unknown: no version listed.",
                _os_version_queries(),
                rename={"os_version": "OS version", "Value #A": "Devices", "Value #B": "Share"},
                sort_by="Devices",
                overrides=(_share_column("Share"),),
            ),
            table(
                "Non-compliant devices",
                "Devices the device list shows as non-compliant, by time since their last "
                "compliance check (infinite: no check listed), with their names and OS "
                "versions (none while the cardinality guard leaves device_info out); single "
                "devices are listed here instead of paging.",
                Query(_non_compliant_devices_query(), instant=True, format="table"),
                rename={
                    **DEVICE_COLUMNS,
                    "os_version": "OS version",
                    "Value": "Since compliance check",
                },
                sort_by="Since compliance check",
                unit="s",
                width=24,
                height=8,
            ),
        ],
    )


def _exporter_queries() -> list[Query]:
    """One row per exporter of the selected organizations: scrape health, devices watched and
    up, seconds since its last store write; each joined to its build and organization."""
    # Over the last hour, so that an exporter Prometheus cannot scrape keeps its row.
    build = (
        "group by (job, instance, version, revision) "
        f"(last_over_time(applivery_exporter_build_info{{{SEL_SELF}}}[1h]))"
    )
    serving = f"group by (job, instance, organization) (last_over_time({COMPLIANCE}{{{SEL}}}[1h]))"
    labels = (
        "on (job, instance) group_left (version, revision, organization) "
        f"({build} * on (job, instance) group_left (organization) {serving})"
    )
    values = (
        f"max by (job, instance) (up{{{SEL_SELF}}})",
        f"count by (job, instance) (applivery_exporter_target_up{{{SEL}}})",
        f"sum by (job, instance) (applivery_exporter_target_up{{{SEL}}})",
        "max by (job, instance) (time() - "
        f"applivery_exporter_storage_last_write_timestamp_seconds{{{SEL_SELF}}})",
    )
    return [Query(f"{value} * {labels}", instant=True, format="table") for value in values]


UP_MAPPINGS = (
    {
        "type": "value",
        "options": {"0": {"text": "down", "color": "red"}, "1": {"text": "up", "color": "green"}},
    },
)


def exporters(landing_url: str) -> Panel:
    return table(
        "Exporters",
        "Each exporter serving the selected organizations: its version and revision, whether "
        "Prometheus scrapes it, the devices it watches and those whose last poll succeeded, and "
        "the seconds since it last wrote its state (--storage.path; empty when it keeps state "
        "in memory). The instance links to its landing page, which lists its devices.",
        _exporter_queries(),
        rename={
            "instance": "Instance",
            "organization": "Organization",
            "version": "Version",
            "revision": "Revision",
            "Value #A": "Scraped",
            "Value #B": "Devices",
            "Value #C": "Devices up",
            "Value #D": "State written",
        },
        sort_by="Devices",
        width=24,
        height=6,
        overrides=(
            _by_name("Instance", {"id": "links", "value": [_link("Landing page", landing_url)]}),
            _by_name("State written", {"id": "unit", "value": "s"}),
            _by_name(
                "Scraped",
                {"id": "mappings", "value": list(UP_MAPPINGS)},
                {"id": "custom.cellOptions", "value": {"type": "color-text"}},
            ),
        ),
    )


def rows(params: build_rules.Params) -> list[Row]:
    alerts = params.alerts
    percent = build_rules.percent
    high = alerts["AppliveryCommandErrorRatioHigh"]
    spike = alerts["AppliveryCommandErrorSpike"]
    stuck = alerts["AppliveryActionsStuckPending"]
    down = alerts["AppliveryDeviceTargetsDown"]
    stuck_after = build_rules.duration_seconds(stuck["after"])
    commands = Row(
        "Windows commands",
        [
            timeseries(
                "Actions by status class",
                "Actions of the watched command batches per status class, as of each batch's "
                "last successful poll.",
                [
                    Query(
                        "sum by (status_class) ("
                        "instance_device_status_class:applivery_windows_command_actions:sum"
                        f"{{{SEL_DEVICE}}})",
                        "{{status_class}}",
                    )
                ],
                unit="short",
                stacked=True,
            ),
            timeseries(
                "Error ratio of finished actions",
                "Share of actions leaving the pending class (success, canceled, error, unknown) "
                "that ended in error, over the selected instances together (all shards of a "
                "deployment count as one). AppliveryCommandErrorRatioHigh fires above "
                f"{percent(high['ratio'])} over 1h with at least {high['min_finished']} "
                f"finished actions, AppliveryCommandErrorSpike above {percent(spike['ratio'])} "
                f"over 5m with at least {spike['min_finished']}.",
                [
                    Query(_error_ratio_query("5m"), "5m {{organization}}"),
                    Query(_error_ratio_query("1h"), "1h {{organization}}"),
                ],
                unit="percentunit",
                thresholds=(("green", None), ("orange", high["ratio"]), ("red", spike["ratio"])),
            ),
            bargauge(
                "Transitions per status (top 10)",
                "Actions seen entering each status during the selected time range.",
                Query(
                    "topk(10, sum by (status, status_class) (increase("
                    f"applivery_windows_command_action_transitions_total{{{SEL}}}[$__range])))",
                    "{{status}} ({{status_class}})",
                    instant=True,
                ),
                unit="short",
                thresholds=(("blue", None),),
            ),
            table(
                "Devices with most error actions",
                "Devices whose watched batches hold the most actions in an error status now.",
                Query(_error_devices_query(), instant=True, format="table"),
                rename={"device": "Device", "name": "Name", "Value": "Error actions"},
                sort_by="Error actions",
            ),
            bargauge(
                "Oldest pending action age",
                "How long the oldest action still pending on each device has waited. Devices "
                "answer on their next OMA-DM session; AppliveryActionsStuckPending fires when "
                f"{stuck['min_devices']} devices have waited over {stuck['after']}.",
                Query(
                    "topk(10, time() - "
                    "applivery_windows_command_oldest_pending_sent_timestamp_seconds"
                    f"{{{SEL_DEVICE}}})",
                    "{{device}}",
                    instant=True,
                ),
                unit="s",
                thresholds=(("green", None), ("orange", 28800), ("red", stuck_after)),
            ),
        ],
    )
    devices = Row(
        "Devices needing a look",
        [
            table(
                "Devices failing their polls",
                "Devices whose last poll failed, by time since their last successful poll "
                "(infinite: never polled successfully). AppliveryDeviceTargetsDown fires when "
                f"more than {percent(down['share'])} of a deployment's devices are here for "
                f"{down['for']}; single devices are listed here instead of paging.",
                Query(_failing_devices_query(), instant=True, format="table"),
                rename={**DEVICE_COLUMNS, "Value": "Since last success"},
                sort_by="Since last success",
                unit="s",
                width=12,
            ),
            table(
                "Devices with actions stuck pending",
                f"Devices whose oldest pending action was sent over {stuck['after']} ago. "
                f"AppliveryActionsStuckPending fires when at least {stuck['min_devices']} "
                "devices of a deployment are here for "
                f"{stuck['for']}; single devices are listed here instead of paging.",
                Query(_stuck_devices_query(stuck_after), instant=True, format="table"),
                rename={**DEVICE_COLUMNS, "Value": "Oldest pending"},
                sort_by="Oldest pending",
                unit="s",
                width=12,
            ),
        ],
    )
    quantile_rule = (
        "instance_quantile:applivery_windows_command_ack_latency_seconds:histogram_quantile_rate1h"
    )
    latency = Row(
        "Send-to-acknowledge latency",
        [
            heatmap(
                "Send-to-acknowledge latency",
                "receivedAt minus sentAt of each answered action, per histogram bucket.",
                Query(
                    "sum by (le) (increase("
                    f"applivery_windows_command_ack_latency_seconds_bucket{{{SEL}}}[$__interval]))",
                    "{{le}}",
                    format="heatmap",
                ),
            ),
            timeseries(
                "Latency p50 / p95 / p99 (1h)",
                "Quantiles of the send-to-acknowledge latency over the last hour, all classes.",
                [
                    Query(f'{quantile_rule}{{quantile="{q}", {SEL}}}', f"p{p} {{{{instance}}}}")
                    for q, p in (("0.5", 50), ("0.95", 95), ("0.99", 99))
                ],
                unit="s",
                log_scale=True,
                height=9,
            ),
        ],
    )
    landing_url = params.landing_url_pattern.format(instance="${__value.raw}")
    health = Row(
        "Exporter health",
        [
            exporters(landing_url),
            stat(
                "Targets up",
                "Exporters scraped successfully, and devices whose last poll succeeded out of "
                "those watched.",
                [
                    Query(f"sum(up{{{SEL_SELF}}})", "exporters up", instant=True),
                    Query(
                        f"sum(applivery_exporter_target_up{{{SEL_DEVICE}}})",
                        "devices up",
                        instant=True,
                    ),
                    Query(
                        f"count(applivery_exporter_target_up{{{SEL_DEVICE}}})",
                        "devices watched",
                        instant=True,
                    ),
                ],
            ),
            timeseries(
                "API requests by code",
                "Upstream API requests per second by HTTP code (or timeout, connection, "
                "invalid_body).",
                [
                    Query(
                        "sum by (code) ("
                        f"instance_code:applivery_exporter_api_requests:rate5m{{{SEL_SELF}}})",
                        "{{code}}",
                    )
                ],
                unit="reqps",
                width=6,
            ),
            timeseries(
                "Request budget",
                "Requests per hour: sent in the last hour, the current pace, and the budget the "
                "scheduler keeps under (it shrinks while upstream throttles).",
                [
                    Query(
                        "sum(instance:applivery_exporter_api_requests:rate1h"
                        f"{{{SEL_SELF}}}) * 3600",
                        "used (last hour)",
                    ),
                    Query(
                        "sum(instance:applivery_exporter_api_requests:rate5m"
                        f"{{{SEL_SELF}}}) * 3600",
                        "pace (5m)",
                    ),
                    Query(
                        f"sum(applivery_exporter_api_budget_requests_per_hour{{{SEL_SELF}}})",
                        "budget",
                    ),
                ],
                unit="short",
                width=6,
            ),
            timeseries(
                "Poll round duration",
                "Duration of the last poll round; rounds longer than poll.interval_seconds "
                "leave data older than configured.",
                [
                    Query(
                        f"applivery_exporter_poll_round_duration_seconds{{{SEL_SELF}}}",
                        "{{instance}}",
                    )
                ],
                unit="s",
                width=6,
            ),
            timeseries(
                "Parse problems",
                "Upstream data the exporter could not fully understand, by kind.",
                [
                    Query(
                        "sum by (kind) (increase("
                        f"applivery_exporter_parse_problems_total{{{SEL_SELF}}}[$__rate_interval]))",
                        "{{kind}}",
                    )
                ],
                unit="short",
                width=8,
            ),
            bargauge(
                "Time since last successful poll",
                "Devices whose last successful poll is the oldest.",
                Query(
                    "topk(10, time() - "
                    f"applivery_exporter_last_success_timestamp_seconds{{{SEL_DEVICE}}})",
                    "{{device}}",
                    instant=True,
                ),
                unit="s",
                thresholds=(("green", None), ("orange", 300), ("red", 900)),
                height=8,
            ),
            stat(
                "Last config reload",
                "Whether the last configuration reload succeeded, per exporter.",
                [
                    Query(
                        f"applivery_exporter_config_last_reload_successful{{{SEL_SELF}}}",
                        "{{instance}}",
                        instant=True,
                    )
                ],
                width=8,
                mappings=(
                    {
                        "type": "value",
                        "options": {
                            "0": {"text": "failed", "color": "red"},
                            "1": {"text": "ok", "color": "green"},
                        },
                    },
                ),
            ),
            timeseries(
                "API requests by API endpoint",
                "Upstream API requests per second by API endpoint (label api_endpoint): "
                "devices, commands, command, actions.",
                [
                    Query(
                        "sum by (api_endpoint) (rate("
                        f"applivery_exporter_api_requests_total{{{SEL_SELF}}}[$__rate_interval]))",
                        "{{api_endpoint}}",
                    )
                ],
                unit="reqps",
                width=8,
            ),
            timeseries(
                "API request duration p95 by API endpoint",
                "95th percentile of upstream request durations per API endpoint.",
                [
                    Query(
                        "histogram_quantile(0.95, sum by (api_endpoint, le) (rate("
                        "applivery_exporter_api_request_duration_seconds_bucket"
                        f"{{{SEL_SELF}}}[$__rate_interval])))",
                        "{{api_endpoint}}",
                    )
                ],
                unit="s",
                width=8,
            ),
            timeseries(
                "Cardinality guard",
                "Detail the exporter leaves out to stay under metrics.max_series: the guard "
                "level (0 = full detail, see docs/cardinality.md) and the series dropped, per "
                "instance. AppliveryExporterCardinalityGuardActive fires after "
                f"{alerts['AppliveryExporterCardinalityGuardActive']['for']} above level 0.",
                [
                    Query(
                        f"applivery_exporter_cardinality_guard_level{{{SEL_SELF}}}",
                        "level {{instance}}",
                    ),
                    Query(
                        f"applivery_exporter_series_dropped{{{SEL_SELF}}}",
                        "dropped {{instance}}",
                    ),
                ],
                unit="short",
                width=8,
                thresholds=(("green", None), ("orange", 1)),
                overrides=(
                    {
                        "matcher": {"id": "byRegexp", "options": "^dropped .*"},
                        "properties": [{"id": "custom.axisPlacement", "value": "right"}],
                    },
                ),
            ),
        ],
    )
    return [commands, fleet_views(alerts), fleet_health(alerts), devices, latency, health]


def _runbook_links(panel: Panel, params: build_rules.Params) -> list[Json]:
    """A link to the runbook section of each alert the panel's description names."""
    return [
        _link(f"Runbook: {alert}", params.runbook_url(alert))
        for alert in params.alerts
        if re.search(rf"\b{alert}\b", panel.description)
    ]


def _layout(row_list: Sequence[Row], params: build_rules.Params) -> Iterator[Json]:
    """Panels with ids and grid positions: rows of full width, panels left to right."""
    ids = iter(range(1, 1000))
    y = 0
    for row in row_list:
        yield {
            "type": "row",
            "id": next(ids),
            "title": row.title,
            "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            "panels": [],
        }
        y += 1
        x = 0
        line_height = 0
        for panel in row.panels:
            if x + panel.width > 24:
                y += line_height
                x, line_height = 0, 0
            grid = {"h": panel.height, "w": panel.width, "x": x, "y": y}
            yield _panel_json(panel, next(ids), grid, _runbook_links(panel, params))
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height


def _panel_json(panel: Panel, panel_id: int, grid: Json, links: Sequence[Json]) -> Json:
    targets = []
    for ref, query in zip("ABCDEFGH", panel.queries, strict=False):
        target: Json = {
            "datasource": DATASOURCE,
            "refId": ref,
            "expr": query.expr,
            "legendFormat": query.legend or "__auto",
            "range": not query.instant,
            "instant": query.instant,
            "format": query.format,
            "editorMode": "code",
        }
        targets.append(target)
    return {
        "type": panel.type,
        "id": panel_id,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": grid,
        "fieldConfig": panel.field_config,
        "options": panel.options,
        "targets": targets,
        "links": list(links),
        **panel.extra,
    }


def _query_variable(
    name: str, label: str, query: str, *, multi: bool, all_value: str | None = ".+"
) -> Json:
    """A variable from label_values(); with ``multi``, "All" stands for ``all_value``, or for
    each value offered when None (a variable whose offer depends on another)."""
    variable: Json = {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-variable"},
        "refresh": 2,
        "sort": 1,
        "regex": "",
        "hide": 0,
        "multi": multi,
        "includeAll": multi,
        "current": {},
        "options": [],
    }
    if multi and all_value is not None:
        variable["allValue"] = all_value
    return variable


def templating() -> Json:
    return {
        "list": [
            {
                "type": "datasource",
                "name": "datasource",
                "label": "Data source",
                "query": "prometheus",
                "regex": "",
                "hide": 0,
                "refresh": 1,
                "current": {},
                "options": [],
            },
            _query_variable(
                "job", "Job", "label_values(applivery_exporter_build_info, job)", multi=False
            ),
            # Every exporter exports each compliance value, zeros included: its organization
            # is known from its first scrape, devices or not.
            _query_variable(
                "organization",
                "Organization",
                f'label_values({COMPLIANCE}{{job=~"$job"}}, organization)',
                multi=True,
            ),
            # The exporter's own series carry no organization: "All" instances means those
            # serving the selected organizations, not every instance of the job.
            _query_variable(
                "instance",
                "Instance",
                f'label_values({COMPLIANCE}{{job=~"$job", organization=~"$organization"}}, '
                "instance)",
                multi=True,
                all_value=None,
            ),
            _query_variable(
                "device",
                "Device",
                f"label_values(applivery_exporter_target_up{{{SEL}}}, device)",
                multi=True,
            ),
        ]
    }


def dashboard(params: build_rules.Params) -> Json:
    return {
        "uid": UID,
        "title": TITLE,
        "description": "Windows MDM command batches, per-action results and the health of "
        "applivery-mdm-exporter.",
        "tags": ["applivery", "mdm", "windows"],
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "timezone": "browser",
        "time": {"from": "now-24h", "to": "now"},
        "refresh": "1m",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [
            {
                "title": "Runbook",
                "type": "link",
                "url": params.runbook_index,
                "icon": "doc",
                "tooltip": "What each alert means and what to do",
                "targetBlank": True,
                "asDropdown": False,
                "includeVars": False,
                "keepTime": False,
                "tags": [],
            }
        ],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": templating(),
        "panels": list(_layout(rows(params), params)),
    }


def render(params: build_rules.Params | None = None) -> str:
    chosen = params if params is not None else build_rules.load_params()
    return json.dumps(dashboard(chosen), indent=2, sort_keys=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--params",
        type=Path,
        default=None,
        help="parameter file of the rules (thresholds quoted, runbook and landing page URLs); "
        "keys it omits come from prometheus/params.yml",
    )
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write the JSON")
    parser.add_argument("--check", action="store_true", help="fail when the JSON is out of date")
    args = parser.parse_args(argv)
    try:
        text = render(build_rules.load_params(args.params))
    except (OSError, build_rules.ParamsError, yaml.YAMLError) as exc:
        print(f"build_dashboard.py: {exc}", file=sys.stderr)
        return 2
    output: Path = args.output
    if args.check:
        current = output.read_text() if output.exists() else ""
        if current != text:
            print(f"{output} is out of date: run python grafana/build_dashboard.py")
            return 1
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
