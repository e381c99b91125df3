"""Generate prometheus/recording.yml and prometheus/alerts.yml from prometheus/params.yml.

    python3 prometheus/build_rules.py                 # rewrite both files and the PrometheusRule
    python3 prometheus/build_rules.py --check         # exit 1 when a generated file is stale
    python3 prometheus/build_rules.py --params mine.yml --output-dir /etc/prometheus/rules

The rules are code, like a monitoring mixin: the job selector, the labels that group the
instances of one deployment, every threshold and the runbook URL come from one parameter
file, so the expressions, their annotations and their tests stay consistent. A file given with
--params only needs the keys it changes; the rest come from prometheus/params.yml. Written to
the default directory, the rules are also copied into the Kubernetes PrometheusRule by
deploy/kubernetes/generate.py. tests/test_rules.py fails when a generated file is stale.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_PARAMS = HERE / "params.yml"
RECORDING = "recording.yml"
ALERTS = "alerts.yml"
KUBERNETES_GENERATOR = ROOT / "deploy" / "kubernetes" / "generate.py"


def _load_script(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The PrometheusRule's generator: it carries these rule files, and its YAML style is theirs.
_KUBERNETES = _load_script(KUBERNETES_GENERATOR)

_DURATION = re.compile(r"(\d+)(s|m|h|d|w)")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_UNIT_WORDS = (("week", 604800), ("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


# --- parameters ------------------------------------------------------------------------------


class ParamsError(ValueError):
    """A parameter file that cannot produce rules; the message names the key."""


@dataclass(frozen=True, slots=True)
class Params:
    selector: str
    group_labels: tuple[str, ...]
    runbook_url_pattern: str
    landing_url_pattern: str
    alerts: Mapping[str, Mapping[str, Any]]

    def seconds(self, alert: str, key: str) -> int:
        return duration_seconds(self.alerts[alert][key])

    def value(self, alert: str, key: str) -> float:
        return self.alerts[alert][key]

    def for_(self, alert: str) -> str:
        return str(self.alerts[alert]["for"])

    def runbook_url(self, alert: str) -> str:
        return self.runbook_url_pattern.format(alert=alert, anchor=alert.lower())

    @property
    def runbook_index(self) -> str:
        """The runbook itself: the pattern up to its first placeholder."""
        pattern = self.runbook_url_pattern
        first = min(i for i in (pattern.find("{anchor}"), pattern.find("{alert}")) if i >= 0)
        return pattern[:first].rstrip("#")


def duration_seconds(text: object) -> int:
    if not isinstance(text, str) or not _DURATION.fullmatch(text):
        raise ParamsError(f"{text!r} is not a duration such as 30s, 15m, 1h or 1d")
    number, unit = _DURATION.fullmatch(text).groups()  # type: ignore[union-attr]
    return int(number) * _UNIT_SECONDS[unit]


def human_duration(seconds: int) -> str:
    """15 minutes, 1 hour, 1 day: for alert descriptions."""
    for word, size in _UNIT_WORDS:
        if seconds % size == 0:
            count = seconds // size
            return f"{count} {word}{'s' if count != 1 else ''}"
    raise AssertionError(seconds)


def percent(ratio: float) -> str:
    return f"{ratio * 100:g}%"


def _merge(base: Any, override: Any, path: str) -> Any:
    """override on top of base; every key of override must exist in base (no typos)."""
    if isinstance(base, dict):
        if not isinstance(override, dict):
            raise ParamsError(f"{path or 'parameters'}: expected a mapping")
        unknown = sorted(set(override) - set(base))
        if unknown:
            known = ", ".join(sorted(base))
            raise ParamsError(f"{path or 'parameters'}: unknown key {unknown[0]!r} ({known})")
        return {
            key: _merge(base[key], override[key], f"{path}.{key}" if path else key)
            if key in override
            else base[key]
            for key in base
        }
    return override


def load_params(path: Path | None = None) -> Params:
    """The defaults of prometheus/params.yml, with path's values on top."""
    document = yaml.safe_load(DEFAULT_PARAMS.read_text(encoding="utf-8"))
    if path is not None and path.resolve() != DEFAULT_PARAMS:
        document = _merge(document, yaml.safe_load(path.read_text(encoding="utf-8")) or {}, "")
    return _validate(document)


def _validate(document: Mapping[str, Any]) -> Params:
    selector = document["selector"]
    if not isinstance(selector, str):
        raise ParamsError("selector: expected label matchers such as 'job=\"name\"'")
    groups = document["group_labels"]
    if not isinstance(groups, list) or not groups:
        raise ParamsError("group_labels: expected a list of label names")
    for label in groups:
        if not isinstance(label, str) or not _LABEL.fullmatch(label):
            raise ParamsError(f"group_labels: {label!r} is not a label name")
        if label in {"instance", "organization"}:
            raise ParamsError(f"group_labels: {label!r} would split a deployment by instance")
    pattern = document["runbook_url_pattern"]
    if not isinstance(pattern, str) or ("{anchor}" not in pattern and "{alert}" not in pattern):
        raise ParamsError("runbook_url_pattern: must contain {anchor} or {alert}")
    try:
        pattern.format(alert="A", anchor="a")
    except (KeyError, IndexError, ValueError) as exc:
        raise ParamsError(f"runbook_url_pattern: {exc!r}; only {{alert}} and {{anchor}}") from exc
    landing = document["landing_url_pattern"]
    if not isinstance(landing, str) or "{instance}" not in landing:
        raise ParamsError("landing_url_pattern: must contain {instance}")
    alerts = document["alerts"]
    for alert, values in alerts.items():
        for key, value in values.items():
            where = f"alerts.{alert}.{key}"
            if key in {"for", "after"}:
                try:
                    duration_seconds(value)
                except ParamsError as exc:
                    raise ParamsError(f"{where}: {exc}") from None
            elif isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ParamsError(f"{where}: expected a number ≥ 0, got {value!r}")
            elif key in {"ratio", "share"} and value >= 1:
                raise ParamsError(f"{where}: a share is below 1, got {value!r}")
    return Params(selector, tuple(groups), pattern, landing, alerts)


# --- rules ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    expr: str
    record: str | None = None
    alert: str | None = None
    for_: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    comment: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"record": self.record} if self.record else {"alert": self.alert}
        out["expr"] = self.expr
        if self.for_:
            out["for"] = self.for_
        if self.labels:
            out["labels"] = dict(self.labels)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    rules: Sequence[Rule]


def _sel(params: Params, metric: str, *matchers: str) -> str:
    """metric{matchers..., selector}."""
    inner = ", ".join(m for m in (*matchers, params.selector) if m)
    return f"{metric}{{{inner}}}" if inner else metric


def _ratio(numerator: str, denominator: str) -> str:
    """numerator / denominator, 0 rather than nothing when the numerator has no series."""
    return f"(\n    {numerator}\n  or\n    {denominator} * 0\n)\n/\n{denominator}\n"


TRANSITIONS = "applivery_windows_command_action_transitions"
FINAL = "applivery_windows_command_action_final_transitions"
ERRORS_PER_FINAL = "applivery_windows_command_action_errors_per_final"
LATENCY = "applivery_windows_command_ack_latency_seconds"
REQUESTS = "applivery_exporter_api_requests"
QUANTILES = ("0.5", "0.95", "0.99")
WINDOWS = ("5m", "1h")


def _siblings(comment: str, rules: Sequence[Rule]) -> list[Rule]:
    """A series of rules that differ in one parameter, under one comment (on the first)."""
    first, *rest = rules
    return [replace(first, comment=comment), *rest]


def recording_groups(params: Params) -> list[Group]:
    by_group = ", ".join(params.group_labels)
    commands = [
        Rule(
            record="instance_device_status_class:applivery_windows_command_actions:sum",
            expr=f"sum without (command, status) "
            f"({_sel(params, 'applivery_windows_command_actions')})",
            comment="Actions of watched batches per device and status class, as of the last "
            "poll.",
        ),
        Rule(
            record="instance_status_class:applivery_windows_command_actions:sum",
            expr="sum without (device) "
            "(instance_device_status_class:applivery_windows_command_actions:sum)",
        ),
    ]
    commands += _siblings(
        "Transitions into each status class per second, per instance.",
        [
            Rule(
                record=f"instance_status_class:{TRANSITIONS}:rate{window}",
                expr=f"sum without (status) (\n"
                f"  rate({_sel(params, TRANSITIONS + '_total')}[{window}])\n)\n",
            )
            for window in WINDOWS
        ],
    )
    commands += _siblings(
        "The same summed over the instances of a deployment (its shards): the error alerts' "
        "ratios\nand volume guards read these.",
        [
            Rule(
                record=f"job_status_class:{TRANSITIONS}:rate{window}",
                expr=f"sum by ({by_group}, organization, status_class) (\n"
                f"  instance_status_class:{TRANSITIONS}:rate{window}\n)\n",
            )
            for window in WINDOWS
        ],
    )
    commands += _siblings(
        "Final transitions: an action leaving the pending class (success, canceled, error, "
        "unknown).",
        [
            Rule(
                record=f"job:{FINAL}:rate{window}",
                expr=f"sum without (status_class) (\n"
                f'  job_status_class:{TRANSITIONS}:rate{window}{{status_class!="pending"}}\n)\n',
            )
            for window in WINDOWS
        ],
    )
    commands += _siblings(
        "Share of final transitions that ended in the error class: 0 when none did, NaN when "
        "nothing\nfinished at all.",
        [
            Rule(
                record=f"job:{ERRORS_PER_FINAL}:ratio_rate{window}",
                expr=_ratio(
                    f"sum without (status_class) (\n      job_status_class:{TRANSITIONS}"
                    f':rate{window}{{status_class="error"}}\n    )',
                    f"job:{FINAL}:rate{window}",
                ),
            )
            for window in WINDOWS
        ],
    )

    watched = "job:applivery_exporter_target_up:count"
    down = "job:applivery_exporter_targets_down:count"
    devices = [
        Rule(
            record=watched,
            expr=f"count by ({by_group}, organization) "
            f"({_sel(params, 'applivery_exporter_target_up')})",
            comment="Devices watched by a deployment, those whose last poll failed, and their "
            "share.",
        ),
        Rule(
            record=down,
            expr=f"count by ({by_group}, organization) (\n"
            f"  {_sel(params, 'applivery_exporter_target_up')} == 0\n)\nor\n{watched} * 0\n",
        ),
        Rule(record="job:applivery_exporter_targets_down:ratio", expr=f"{down} / {watched}"),
    ]

    latency: list[Rule] = [
        Rule(
            record=f"instance_status_class_le:{LATENCY}_bucket:rate1h",
            expr=f"rate({_sel(params, LATENCY + '_bucket')}[1h])",
        ),
        Rule(
            record=f"instance_le:{LATENCY}_bucket:rate1h",
            expr=f"sum without (status_class) (\n"
            f"  instance_status_class_le:{LATENCY}_bucket:rate1h\n)\n",
        ),
    ]
    latency += _siblings(
        "Send-to-acknowledge latency quantiles over all classes.",
        [
            Rule(
                record=f"instance_quantile:{LATENCY}:histogram_quantile_rate1h",
                expr=f"histogram_quantile({quantile}, instance_le:{LATENCY}_bucket:rate1h)",
                labels={"quantile": quantile},
            )
            for quantile in QUANTILES
        ],
    )
    latency += _siblings(
        "The same per status class: errors often come back faster than successes.",
        [
            Rule(
                record=f"instance_status_class_quantile:{LATENCY}:histogram_quantile_rate1h",
                expr=f"histogram_quantile(\n"
                f"  {quantile}, instance_status_class_le:{LATENCY}_bucket:rate1h\n)\n",
                labels={"quantile": quantile},
            )
            for quantile in QUANTILES
        ],
    )

    total = _sel(params, REQUESTS + "_total")
    throttled = f'sum by ({by_group}) (instance_code:{REQUESTS}:rate5m{{code=~"429|503"}})'
    api = [
        Rule(
            record=f"instance_code:{REQUESTS}:rate5m",
            expr=f"sum without (api_endpoint) (\n  rate({total}[5m])\n)\n",
        ),
        Rule(
            record=f"instance:{REQUESTS}:rate5m",
            expr=f"sum without (code) (instance_code:{REQUESTS}:rate5m)",
        ),
        Rule(
            record=f"instance:{REQUESTS}:rate1h",
            expr=f"sum without (api_endpoint, code) (\n  rate({total}[1h])\n)\n",
        ),
        Rule(
            record=f"job:{REQUESTS}_throttled:ratio_rate5m",
            expr=_ratio(throttled, f"sum by ({by_group}) (instance:{REQUESTS}:rate5m)"),
            comment="Share of a deployment's requests answered 429 or 503 (the client backs "
            "off on both); 0 when\nnone were. The organization's limit is shared by the "
            "shards, so they count together.",
        ),
        Rule(
            record="instance:applivery_exporter_api_budget_used:ratio_rate1h",
            expr=f"instance:{REQUESTS}:rate1h * 3600\n/\n"
            f"({_sel(params, 'applivery_exporter_api_budget_requests_per_hour')} > 0)\n",
            comment="Requests of the last hour against the budget the scheduler currently "
            "keeps under (each\nshard has its share; the budget shrinks while upstream "
            "throttles). Absent while the budget is 0.",
        ),
    ]
    return [
        Group("applivery-windows-commands.rules", commands),
        Group("applivery-exporter-devices.rules", devices),
        Group("applivery-windows-ack-latency.rules", latency),
        Group("applivery-exporter-api.rules", api),
    ]


def _alert(
    params: Params,
    name: str,
    expr: str,
    severity: str,
    summary: str,
    description: str,
    comment: str = "",
) -> Rule:
    return Rule(
        alert=name,
        expr=expr,
        for_=params.for_(name),
        labels={"severity": severity},
        annotations={
            "summary": summary,
            "description": " ".join(description.split()),
            "runbook_url": params.runbook_url(name),
        },
        comment=comment,
    )


def alert_groups(params: Params) -> list[Group]:
    p = params
    by_group = ", ".join(p.group_labels)

    def lasting(name: str) -> str:
        return human_duration(p.seconds(name, "for"))

    stale = p.seconds("AppliveryExporterStale", "after")
    stuck = p.seconds("AppliveryActionsStuckPending", "after")
    high = "AppliveryCommandErrorRatioHigh"
    spike = "AppliveryCommandErrorSpike"
    rejected = _sel(p, REQUESTS + "_total", 'code=~"401|403"')
    rules = [
        _alert(
            p,
            "AppliveryExporterDown",
            f"{_sel(p, 'up')} == 0",
            "warning",
            "Applivery MDM exporter is down.",
            f"""Prometheus has failed to scrape {{{{ $labels.instance }}}} (job
            {{{{ $labels.job }}}}) for {lasting('AppliveryExporterDown')}; Windows command
            results are not being collected.""",
        ),
        _alert(
            p,
            "AppliveryExporterAbsent",
            f"absent({_sel(p, 'up')})",
            "warning",
            "Applivery MDM exporter has disappeared from Prometheus.",
            f"""No scrape target matching {{{p.selector}}} has been discovered for
            {lasting('AppliveryExporterAbsent')}.""",
        ),
        _alert(
            p,
            "AppliveryExporterStale",
            f"time()\n-\nmax without (device) (\n"
            f"  {_sel(p, 'applivery_exporter_last_success_timestamp_seconds')}\n)\n> {stale}\n",
            "warning",
            "Applivery MDM exporter has stopped polling successfully.",
            """{{ $labels.instance }} has not completed a successful poll of any device for
            {{ $value | humanizeDuration }}; its command metrics are going stale.""",
        ),
        _alert(
            p,
            "AppliveryDeviceTargetsDown",
            f"job:applivery_exporter_targets_down:ratio "
            f"> {p.value('AppliveryDeviceTargetsDown', 'share')}",
            "warning",
            "Polls of many Applivery MDM devices keep failing.",
            f"""For {lasting('AppliveryDeviceTargetsDown')}, more than
            {percent(p.value('AppliveryDeviceTargetsDown', 'share'))} of the devices that job
            {{{{ $labels.job }}}} watches in organization {{{{ $labels.organization }}}} have
            failed their last poll (now {{{{ $value | humanizePercentage }}}}); the dashboard's
            "Devices failing their polls" table lists them.""",
            comment="One alert per deployment and organization, not per device: an upstream "
            "outage is one\nincident. The dashboard lists the devices.",
        ),
        _alert(
            p,
            high,
            f"job:{ERRORS_PER_FINAL}:ratio_rate1h > {p.value(high, 'ratio')}\nand\n"
            f"job:{FINAL}:rate1h * 3600 >= {p.value(high, 'min_finished')}\n",
            "warning",
            "Many Windows MDM command actions end in error.",
            """{{ $value | humanizePercentage }} of the command actions that finished in the
            last hour in organization {{ $labels.organization }} (all instances of job
            {{ $labels.job }}) ended in an error status.""",
            comment="Ratios and volume guards sum over every instance of a deployment, so "
            "sharding the fleet\nneither hides a burst nor lowers the bar.",
        ),
        _alert(
            p,
            spike,
            f"job:{ERRORS_PER_FINAL}:ratio_rate5m > {p.value(spike, 'ratio')}\nand\n"
            f"job:{FINAL}:rate5m * 300 >= {p.value(spike, 'min_finished')}\n",
            "critical",
            "A burst of Windows MDM command actions is failing.",
            """{{ $value | humanizePercentage }} of the command actions that finished in the
            last 5 minutes in organization {{ $labels.organization }} (all instances of job
            {{ $labels.job }}) ended in an error status; a command being rolled out is
            probably broken.""",
        ),
        _alert(
            p,
            "AppliveryActionsStuckPending",
            f"count by ({by_group}, organization) (\n"
            f"  time() - "
            f"{_sel(p, 'applivery_windows_command_oldest_pending_sent_timestamp_seconds')}\n"
            f"  > {stuck}\n)\n"
            f">= {p.value('AppliveryActionsStuckPending', 'min_devices')}\n",
            "warning",
            "Windows MDM command actions have been pending for a long time on many devices.",
            f"""{{{{ $value }}}} devices of organization {{{{ $labels.organization }}}} (job
            {{{{ $labels.job }}}}) have had a command action pending for over
            {human_duration(stuck)}; the dashboard's "Devices with actions stuck pending"
            table lists them.""",
            comment="Counts devices: single offline laptops are normal in MDM and listed on "
            "the dashboard.",
        ),
        _alert(
            p,
            "AppliveryApiAuthenticationFailing",
            f"sum without (api_endpoint, code) (\n"
            f"  increase({rejected}[10m])\n) > 0\n",
            "warning",
            "The Applivery API rejects the exporter's token.",
            """{{ $value | humanize }} requests of {{ $labels.instance }} were answered 401 or
            403 in the last 10 minutes; the token is missing, expired, revoked or lacks
            permissions.""",
        ),
        _alert(
            p,
            "AppliveryApiThrottled",
            f"job:{REQUESTS}_throttled:ratio_rate5m "
            f"> {p.value('AppliveryApiThrottled', 'ratio')}",
            "warning",
            "The Applivery API is throttling the exporter.",
            """{{ $value | humanizePercentage }} of the API requests of job {{ $labels.job }}
            (all its instances) were answered 429 or 503 over the last 5 minutes.""",
        ),
        _alert(
            p,
            "AppliveryApiBudgetExhausted",
            f"instance:applivery_exporter_api_budget_used:ratio_rate1h "
            f"> {p.value('AppliveryApiBudgetExhausted', 'ratio')}",
            "warning",
            "The exporter is using up its API request budget.",
            """{{ $labels.instance }} sent {{ $value | humanizePercentage }} of its request
            budget in the last hour; polls are being spaced out and data gets older than
            configured.""",
        ),
        _alert(
            p,
            "AppliveryExporterParseProblems",
            f"increase({_sel(p, 'applivery_exporter_parse_problems_total')}[1h]) "
            f"> {p.value('AppliveryExporterParseProblems', 'per_hour')}",
            "warning",
            "The exporter cannot fully understand upstream data.",
            """{{ $labels.instance }} met {{ $value | humanize }} problems of kind
            {{ $labels.kind }} in the last hour; upstream may have changed its data.""",
        ),
        _alert(
            p,
            "AppliveryExporterConfigReloadFailed",
            f"max_over_time(\n"
            f"  {_sel(p, 'applivery_exporter_config_last_reload_successful')}[5m]\n) == 0\n",
            "warning",
            "The exporter failed to reload its configuration.",
            """{{ $labels.instance }} rejected its new configuration and keeps running on the
            previous one.""",
        ),
        _alert(
            p,
            "AppliveryExporterCardinalityGuardActive",
            f"{_sel(p, 'applivery_exporter_cardinality_guard_level')} > 0",
            "warning",
            "The exporter serves less detail than configured to stay under metrics.max_series.",
            f"""{{{{ $labels.instance }}}} has left out detail (guard level {{{{ $value }}}},
            see docs/cardinality.md) for
            {lasting('AppliveryExporterCardinalityGuardActive')}; dashboard panels lose batch,
            status or device detail. Raise metrics.max_series or shard the fleet.""",
            comment="The cardinality guard (docs/cardinality.md) keeps every alert working; "
            "this is a ticket, not a page.",
        ),
        _alert(
            p,
            "AppliveryExporterStorageFailing",
            f"increase({_sel(p, 'applivery_exporter_storage_write_failures_total')}[10m]) > 0",
            "warning",
            "The exporter cannot write its durable state.",
            f"""{{{{ $labels.instance }}}} has failed to write to --storage.path for
            {lasting('AppliveryExporterStorageFailing')}. It keeps polling and serving, but a
            restart now would lose what it counted since the last write.""",
            comment="Polling and serving go on; what is at stake is the next restart.",
        ),
        *_fleet_view_alerts(p),
    ]
    return [Group("applivery-mdm-exporter.alerts", rules)]


ROLLOUT_DEVICES = "applivery_windows_rollout_devices"
SETTING_RESULTS = "applivery_windows_setting_results_total"
LAST_CHECK_IN = "applivery_windows_device_last_check_in_timestamp_seconds"
COMPLIANCE = "applivery_windows_devices_compliance"


def _fleet_view_alerts(p: Params) -> list[Rule]:
    """Alerts on the fleet views (docs/design.md): rollouts, settings, check-ins. Each sums
    over the instances of a deployment, whose shards each export the part of their own
    devices, and none fires per device."""
    by_group = ", ".join(p.group_labels)
    rollout, setting, silent = (
        "AppliveryRolloutFailing",
        "AppliverySettingErrorRatioHigh",
        "AppliveryDevicesSilent",
    )

    def fleet(labels: str, expr: str) -> str:
        return f"sum by ({by_group}, organization{labels}) (\n  {expr}\n)"

    failed = fleet(", rollout", _sel(p, ROLLOUT_DEVICES, 'state="failed"'))
    in_rollout = fleet(", rollout", _sel(p, ROLLOUT_DEVICES))
    error_results = _sel(p, SETTING_RESULTS, 'status_class="error"')
    errors = fleet(", setting", f"increase({error_results}[1h])")
    finished = fleet(", setting", f"increase({_sel(p, SETTING_RESULTS)}[1h])")
    after = p.seconds(silent, "after")
    return [
        _alert(
            p,
            rollout,
            f"{failed}\n/\n{in_rollout}\n>= {p.value(rollout, 'share')}\nand\n"
            f"{failed}\n>= {p.value(rollout, 'min_devices')}\n",
            "warning",
            "A rollout of Windows MDM commands has failed on many devices.",
            f"""{{{{ $value | humanizePercentage }}}} of the watched devices in rollout
            "{{{{ $labels.rollout }}}}" of organization {{{{ $labels.organization }}}} (all
            instances of job {{{{ $labels.job }}}}), and at least
            {p.value(rollout, 'min_devices')} devices, failed it: their latest batch of that
            name holds an action in error. The dashboard's "Rollouts" table shows its devices
            per state.""",
            comment="Fleet views (docs/design.md): rollouts, settings, check-ins. Each sums "
            "over the shards of a\ndeployment (they export the part of their own devices): "
            "one alert per rollout, per\nsetting, per deployment, never per device.",
        ),
        _alert(
            p,
            setting,
            f"{errors}\n/\n{finished}\n> {p.value(setting, 'ratio')}\nand\n"
            f"{finished}\n>= {p.value(setting, 'min_finished')}\n",
            "warning",
            "One Windows MDM setting keeps failing.",
            f"""{{{{ $value | humanizePercentage }}}} of the actions on setting
            {{{{ $labels.setting }}}} that finished in the last hour in organization
            {{{{ $labels.organization }}}} (all instances of job {{{{ $labels.job }}}}) ended
            in an error status, with at least {p.value(setting, 'min_finished')} finished; the
            dashboard's "Top failing settings" panel ranks the settings.""",
        ),
        _alert(
            p,
            silent,
            f"count by ({by_group}, organization) (\n"
            f"  time() - {_sel(p, LAST_CHECK_IN)} > {after}\n)\n"
            f"/\njob:applivery_exporter_target_up:count\n> {p.value(silent, 'share')}\n",
            "warning",
            "Many Windows MDM devices have stopped checking in.",
            f"""{{{{ $value | humanizePercentage }}}} of the devices that job
            {{{{ $labels.job }}}} watches in organization {{{{ $labels.organization }}}} have
            not checked in for over {human_duration(after)}, so no command reaches them; the
            dashboard's "Check-in age" panel and "Silent devices with pending actions" table
            show them.""",
        ),
        *_compliance_alerts(p, fleet),
    ]


def _compliance_alerts(p: Params, fleet: Callable[[str, str], str]) -> list[Rule]:
    """Compliance of the watched devices, per deployment (summed over its shards)."""
    share, rise = "AppliveryDevicesNonCompliant", "AppliveryDevicesFallingOutOfCompliance"
    non = fleet("", _sel(p, COMPLIANCE, 'compliance="non_compliant"'))
    watched = fleet("", _sel(p, COMPLIANCE))
    before = fleet("", _sel(p, COMPLIANCE, 'compliance="non_compliant"') + " offset 1h")
    return [
        _alert(
            p,
            share,
            f"{non}\n/\n{watched}\n> {p.value(share, 'share')}\nand\n"
            f"{non}\n>= {p.value(share, 'min_devices')}\n",
            "warning",
            "Many Windows MDM devices are not compliant.",
            f"""{{{{ $value | humanizePercentage }}}} of the devices that job
            {{{{ $labels.job }}}} watches in organization {{{{ $labels.organization }}}} are
            not compliant (and at least {p.value(share, 'min_devices')}); the landing page lists
            each device's compliance and OS version.""",
        ),
        _alert(
            p,
            rise,
            f"{non}\n-\n{before}\n>= {p.value(rise, 'devices')}\n",
            "warning",
            "Windows MDM devices are falling out of compliance.",
            """{{ $value }} more devices that job {{ $labels.job }} watches in
            organization {{ $labels.organization }} are not compliant than an hour ago: a
            policy sent recently may be failing (the "Top failing settings" table says
            which).""",
        ),
    ]


# --- output ----------------------------------------------------------------------------------



HEADERS = {
    RECORDING: """\
# Recording rules shared by prometheus/alerts.yml and the Grafana dashboard.
#
# Generated by prometheus/build_rules.py from prometheus/params.yml: do not edit, change the
# parameters and regenerate (docs/monitoring.md).
#
# Names follow level:metric:operations. Levels starting with `instance` keep every target
# label (aggregations use `without`); levels starting with `job` sum over the instances of a
# deployment, by its group labels ({groups}) and `organization`. The level names
# the labels that matter besides those.
#
# Windows of 1h for latency and for the error ratio fit MDM reality: devices answer on their
# next OMA-DM session, so answers arrive in bursts spread over minutes to hours.
""",
    ALERTS: """\
# Alerts for applivery-mdm-exporter. Several read series of prometheus/recording.yml: load
# both files. Thresholds and their reasons are in docs/runbook.md, one section per alert.
#
# Generated by prometheus/build_rules.py from prometheus/params.yml: do not edit, change the
# parameters and regenerate (docs/monitoring.md).
#
# Severity: critical = act now (something is harming the fleet); warning = act within
# business hours (monitoring is blind or degraded, or devices need a look).
""",
}


def render_groups(header: str, groups: Sequence[Group]) -> str:
    lines = [header.rstrip("\n"), "groups:"]
    for group_index, group in enumerate(groups):
        if group_index:
            lines.append("")
        lines += [f"  - name: {group.name}", "    rules:"]
        for rule in group.rules:
            if rule.comment:
                if rule is not group.rules[0]:
                    lines.append("")
                lines += [f"      # {line}".rstrip() for line in rule.comment.splitlines()]
            elif rule.alert and rule is not group.rules[0]:
                lines.append("")
            lines += _rule_lines(rule)
    return "\n".join(lines) + "\n"


_PLACEHOLDER = "DESCRIPTION_PLACEHOLDER"
_WORD = re.compile(r"(?:\{\{.*?\}\}|\S)+")  # a template action {{ ... }} is never split


def _rule_lines(rule: Rule) -> list[str]:
    """The rule as a YAML list item at the depth of a group's rules; a description is a
    folded block wrapped between words."""
    document = rule.as_dict()
    description = document.get("annotations", {}).get("description")
    if description is not None:
        document["annotations"]["description"] = _PLACEHOLDER
    body = yaml.dump(
        document, Dumper=_KUBERNETES.BlockDumper, sort_keys=False, width=10_000, allow_unicode=True
    ).splitlines()
    lines = [f"      - {body[0]}"] + [f"        {line}".rstrip() for line in body[1:]]
    if description is None:
        return lines
    (index,) = [i for i, line in enumerate(lines) if line.endswith(f"description: {_PLACEHOLDER}")]
    indent = lines[index][: len(lines[index]) - len(lines[index].lstrip())] + "  "
    wrapped = textwrap_words(_WORD.findall(description), 96 - len(indent))
    lines[index] = lines[index].replace(_PLACEHOLDER, ">-")
    lines[index + 1 : index + 1] = [indent + line for line in wrapped]
    return lines


def textwrap_words(words: Sequence[str], width: int) -> list[str]:
    lines: list[str] = []
    for word in words:
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def render(params: Params) -> dict[str, str]:
    """File name -> content of each generated rule file."""
    recording_header = HEADERS[RECORDING].format(groups=", ".join(params.group_labels))
    return {
        RECORDING: render_groups(recording_header, recording_groups(params)),
        ALERTS: render_groups(HEADERS[ALERTS], alert_groups(params)),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS,
                        help="parameter file; keys it omits come from prometheus/params.yml")
    parser.add_argument("--output-dir", type=Path, default=HERE,
                        help="where to write recording.yml and alerts.yml")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a generated file differs from what it would be")
    args = parser.parse_args(argv)
    try:
        files = render(load_params(args.params))
    except (OSError, ParamsError, yaml.YAMLError) as exc:
        print(f"build_rules.py: {exc}", file=sys.stderr)
        return 2
    stale = []
    for name, text in files.items():
        path = args.output_dir / name
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if args.check:
            if current != text:
                stale.append(str(path))
        elif current != text:
            args.output_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"stale: {', '.join(stale)}: run python3 prometheus/build_rules.py", file=sys.stderr)
        return 1
    if args.output_dir.resolve() == HERE:
        # The PrometheusRule carries exactly these rule files.
        return int(_KUBERNETES.main(["--check"] if args.check else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
