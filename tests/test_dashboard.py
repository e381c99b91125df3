"""The Grafana dashboard: structure, variables, and the PromQL of every query.

Also the home of two helpers other tests use:
- ``grafana_queries(dashboard)``: every query of the dashboard with its template variables
  substituted, ready to send to a real Prometheus;
- ``promql_problems(expr)`` / ``metric_names(expr)``: a promtool-free PromQL sanity check.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry
from promstack import ApiError, ScrapeTarget, eventually, running_prometheus
from scripts import load_script

from exporter.devicehealth import COMPLIANT, DeviceHealth
from exporter.exposition import Exposition
from exporter.records import Action, Batch
from exporter.selfmetrics import SelfMetrics
from exporter.state import FleetState

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_PATH = ROOT / "grafana" / "dashboards" / "applivery-mdm-exporter.json"
GENERATOR_PATH = ROOT / "grafana" / "build_dashboard.py"
RECORDING_RULES = ROOT / "prometheus" / "recording.yml"

# The metric contract (docs: design.md, "Metrics", "Exporter self-metrics", "Fleet views").
EXPORTER_METRICS: Mapping[str, str] = {
    "applivery_windows_command_actions": "gauge",
    "applivery_windows_command_action_transitions": "counter",
    "applivery_windows_command_ack_latency_seconds": "histogram",
    "applivery_windows_command_oldest_pending_sent_timestamp_seconds": "gauge",
    "applivery_windows_device_info": "gauge",
    "applivery_windows_command_info": "gauge",
    "applivery_exporter_target_up": "gauge",
    "applivery_exporter_last_success_timestamp_seconds": "gauge",
    "applivery_exporter_api_requests": "counter",
    "applivery_exporter_api_request_duration_seconds": "histogram",
    "applivery_exporter_api_budget_requests_per_hour": "gauge",
    "applivery_exporter_poll_rounds": "counter",
    "applivery_exporter_poll_failures": "counter",
    "applivery_exporter_poll_round_duration_seconds": "gauge",
    "applivery_exporter_parse_problems": "counter",
    "applivery_exporter_config_last_reload_successful": "gauge",
    "applivery_exporter_build_info": "gauge",
    "applivery_exporter_api_requests_planned": "gauge",
    "applivery_exporter_series_dropped": "gauge",
    "applivery_exporter_cardinality_guard_level": "gauge",
    # Fleet views (design.md, "Fleet views").
    "applivery_windows_rollout_devices": "gauge",
    "applivery_windows_rollout_actions": "gauge",
    "applivery_windows_setting_results": "counter",
    "applivery_windows_device_last_check_in_timestamp_seconds": "gauge",
    "applivery_windows_devices": "gauge",
    "applivery_windows_devices_compliance": "gauge",
    "applivery_windows_devices_os_version": "gauge",
    "applivery_windows_device_compliance_last_check_timestamp_seconds": "gauge",
    # What upstream does with the query parameters relied on.
    "applivery_exporter_checkin_source": "gauge",
    "applivery_exporter_api_query_verdict": "gauge",
    "applivery_exporter_storage_write_failures": "counter",
    "applivery_exporter_storage_last_write_timestamp_seconds": "gauge",
}
PROMETHEUS_METRICS = frozenset({"up"})

# What a query may stand for when sent to Prometheus outside Grafana.
DEFAULT_VARIABLES: Mapping[str, str] = {
    "datasource": "prometheus",
    "job": "applivery-mdm-exporter",
    "organization": ".+",
    "instance": ".+",
    "device": ".+",
    "__range": "1h",
    "__rate_interval": "1m",
    "__interval": "1m",
}
GRAFANA_BUILTINS = frozenset({"__range", "__rate_interval", "__interval"})


# --- metric names --------------------------------------------------------------------------


def sample_names() -> frozenset[str]:
    """Every series name the exporter exposes, with counter and histogram suffixes."""
    names = set(PROMETHEUS_METRICS)
    for name, kind in EXPORTER_METRICS.items():
        if kind == "counter":
            names.add(f"{name}_total")
        elif kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(name)
    return frozenset(names)


def test_the_contract_is_what_the_exporter_exposes_and_what_the_docs_name() -> None:
    metrics = SelfMetrics()
    state = FleetState(organization="acme", latency_buckets=(1.0,), metrics=metrics)
    body = Exposition(state, metrics, version="test", registry=CollectorRegistry())
    exposed = dict(
        line.split()[2:4]
        for line in body.body(openmetrics=True).decode().splitlines()
        if line.startswith("# TYPE ")
    )
    assert exposed == EXPORTER_METRICS
    design = (ROOT / "docs" / "design.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for name in EXPORTER_METRICS:
        assert name in design and name in readme, name


def recorded_names(path: Path = RECORDING_RULES) -> frozenset[str]:
    document = yaml.safe_load(path.read_text())
    return frozenset(
        rule["record"]
        for group in document["groups"]
        for rule in group["rules"]
        if "record" in rule
    )


# --- a small PromQL lexer --------------------------------------------------------------------


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


FUNCTIONS = _words(
    """abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes
    clamp clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year
    days_in_month deg delta deriv exp floor histogram_count histogram_fraction
    histogram_quantile histogram_sum holt_winters hour idelta increase irate label_join
    label_replace last_over_time ln log10 log2 max_over_time min_over_time minute month pi
    predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin
    sinh sort sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh time
    timestamp vector year"""
)
AGGREGATIONS = _words(
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile"
)
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = GROUPING | {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
MATCH_OPS = frozenset({"=", "!=", "=~", "!~"})

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
   |(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
   |(?P<duration>(?:\d+(?:ms|s|m|h|d|w|y))+)(?![\w.])
   |(?P<number>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
   |(?P<colon>:)
   |(?P<ident>[a-zA-Z_][a-zA-Z0-9_:]*)
   |(?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=])
   |(?P<open>[({\[])
   |(?P<close>[)}\]])
   |(?P<comma>,)
    """,
    re.VERBOSE,
)
_PAIRS = {"(": ")", "{": "}", "[": "]"}


def _tokens(expr: str) -> Iterator[tuple[str, str]]:
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            yield "bad", expr[position]
            position += 1
            continue
        position = match.end()
        kind = match.lastgroup or "bad"
        if kind != "ws":
            yield kind, match.group()


class _Scan:
    """One pass over the tokens. Brackets open contexts: call, paren, labels (after by,
    without, on, ...), matchers ({...}) and range ([...])."""

    def __init__(self, expr: str) -> None:
        self.tokens = list(_tokens(expr))
        self.problems: list[str] = []
        self.metrics: set[str] = set()
        self.stack: list[tuple[str, str]] = []  # (opening bracket, context)
        self.ended = False  # the last token ended an operand: no operand may follow
        self.aggregation_labels = False  # the open label list belongs to sum by (...) etc.
        self.after_aggregation_labels = False  # such a list was just closed
        if "$" in expr or "[[" in expr:
            self.problems.append("unsubstituted template variable")
        if not self.tokens:
            self.problems.append("empty expression")
        for index in range(len(self.tokens)):
            self._token(index)
        if self.stack:
            self.problems.append(f"unclosed {self.stack[-1][0]!r}")
        if self.tokens and not self.ended:
            self.problems.append("expression ends without an operand")

    def _at(self, index: int) -> tuple[str, str]:
        return self.tokens[index] if 0 <= index < len(self.tokens) else ("edge", "")

    def _token(self, index: int) -> None:
        kind, text = self.tokens[index]
        context = self.stack[-1][1] if self.stack else "top"
        if kind == "bad":
            self.problems.append(f"unexpected character {text!r}")
        elif kind != "close" and context in {"matchers", "labels", "range"}:
            self._inside(context, kind, text, self._at(index + 1))
        elif kind == "close":
            self._close(text)
        else:
            self._outside(index, kind, text)

    def _inside(self, context: str, kind: str, text: str, following: tuple[str, str]) -> None:
        if context == "matchers":
            if kind == "ident" and not (following[0] == "op" and following[1] in MATCH_OPS):
                self.problems.append(f"label {text!r} without a matcher")
            elif kind == "op" and text not in MATCH_OPS:
                self.problems.append(f"{text!r} is not a label matcher")
            elif kind not in {"ident", "op", "string", "comma"}:
                self.problems.append(f"unexpected {text!r} in label matchers")
        elif context == "labels" and kind not in {"ident", "comma"}:
            self.problems.append(f"unexpected {text!r} in a label list")
        elif context == "range" and kind not in {"duration", "colon"}:
            self.problems.append(f"{text!r} is not a duration")

    def _outside(self, index: int, kind: str, text: str) -> None:
        operand = kind in {"number", "string", "duration"} or (kind, text) == ("open", "(")
        operand = operand or (kind == "ident" and text not in KEYWORDS)
        if self.ended and operand:
            self.problems.append(f"missing operator before {text!r}")
        if kind == "ident":
            self._ident(index, text)
        elif kind == "open":
            self._open(index, text)
        elif kind == "op":
            if not self.ended and text not in "+-":
                self.problems.append(f"operator {text!r} without a left operand")
            self.ended = False
        elif kind == "comma":
            if not self.stack or self.stack[-1][1] != "call":
                self.problems.append("comma outside a function call")
            self.ended = False
        elif kind == "colon":
            self.problems.append("colon outside a subquery range")
        else:
            self.ended = True

    def _ident(self, index: int, text: str) -> None:
        following = self._at(index + 1)
        if text in {"by", "without"}:
            previous = self._at(index - 1)
            self.aggregation_labels = previous[0] == "ident" and previous[1] in AGGREGATIONS
        if following == ("open", "("):
            if text not in GROUPING | FUNCTIONS | AGGREGATIONS:
                self.problems.append(f"unknown function {text!r}")
            self.ended = False
        elif text in AGGREGATIONS and following in {("ident", "by"), ("ident", "without")}:
            self.ended = False
        elif text in KEYWORDS:
            self.ended = text in {"inf", "nan"}
        else:
            self.metrics.add(text)
            self.ended = True

    def _open(self, index: int, text: str) -> None:
        previous = self._at(index - 1)
        if text == "{":
            context = "matchers"
        elif text == "[":
            context = "range"
        elif previous[0] == "ident" and previous[1] in GROUPING:
            context = "labels"
        elif previous[0] == "ident" and previous[1] not in KEYWORDS:
            context = "call"
        elif previous == ("close", ")") and self.after_aggregation_labels:
            context = "call"  # the argument list of sum by (job) (...)
        else:
            context = "paren"
        self.stack.append((text, context))
        self.ended = False

    def _close(self, text: str) -> None:
        if not self.stack or _PAIRS[self.stack[-1][0]] != text:
            self.problems.append(f"unbalanced {text!r}")
            self.ended = True
            return
        _, closed = self.stack.pop()
        self.ended = closed != "labels"
        self.after_aggregation_labels = closed == "labels" and self.aggregation_labels


def promql_problems(expr: str) -> list[str]:
    """Syntax problems a lightweight lexer can see; [] for a plausible expression."""
    return _Scan(expr).problems


def metric_names(expr: str) -> set[str]:
    """Metric (and recorded series) names the expression selects."""
    return _Scan(expr).metrics


# --- dashboard helpers ------------------------------------------------------------------------


def load_dashboard(path: Path = DASHBOARD_PATH) -> dict[str, Any]:
    return json.loads(path.read_text())


def _panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def _variable_query(variable: Mapping[str, Any]) -> str:
    query = variable.get("query", "")
    return query.get("query", "") if isinstance(query, Mapping) else str(query)


_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.*),\s*(?P<label>\w+)\s*\)\s*$", re.S)
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def substitute(text: str, values: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        return values.get(name, match.group())

    return _VARIABLE.sub(replace, text)


def referenced_variables(text: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in _VARIABLE.finditer(text)}


def raw_queries(dashboard: Mapping[str, Any]) -> list[str]:
    """Panel target expressions and the series selectors of label_values() variables."""
    queries = [
        target["expr"]
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            match = _LABEL_VALUES.match(_variable_query(variable))
            if match:
                queries.append(match["selector"])
    return queries


def grafana_queries(
    dashboard: Mapping[str, Any], values: Mapping[str, str] | None = None
) -> list[str]:
    """Every query of the dashboard with template variables substituted (DEFAULT_VARIABLES,
    overridden by values): what Grafana would send to Prometheus."""
    merged = {**DEFAULT_VARIABLES, **(values or {})}
    return [substitute(query, merged) for query in raw_queries(dashboard)]


def _load_generator() -> ModuleType:
    return load_script(GENERATOR_PATH, "build_dashboard")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


def _content_panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [p for p in _panels(dashboard) if p.get("type") != "row"]


# --- the PromQL checker itself ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("sum(rate(x_total[5m])", "unclosed"),
        ("rate(x_total[5m]))", "unbalanced"),
        ('x{job=~"$job"}', "unsubstituted"),
        ("rate(x_total[five])", "not a duration"),
        ("rates(x_total[5m])", "unknown function"),
        ("x y", "missing operator"),
        ("sum(x) sum(y)", "missing operator"),
        ("x * / y", "without a left operand"),
        ("x >", "ends without an operand"),
        ('x{job "a"}', "without a matcher"),
        ('x{job=="a"}', "not a label matcher"),
        ("sum by (job, 5) (x)", "label list"),
        ("", "empty"),
    ],
)
def test_promql_checker_rejects_broken_queries(expr: str, problem: str) -> None:
    assert any(problem in p for p in promql_problems(expr)), promql_problems(expr)


@pytest.mark.parametrize(
    "expr",
    [
        'sum by (le) (increase(a_bucket{job=~"j", le!="1"}[1h]))',
        "histogram_quantile(0.95, sum without (x) (rate(a_bucket[5m])))",
        "(a or b * 0) / c",
        "a * on (job, instance) group_left (name) max by (job, instance, name) (b)",
        "a / on (job) (b > 0)",
        'topk(10, time() - a{device=~".+"})',
        "-a + 1e3 - inf",
        "sum(rate(a_total[5m] offset 1h)) > bool 0",
        "max_over_time(a[1h:5m])",
        'level:metric:rate5m{code=~"429|503"} and b >= 20',
    ],
)
def test_promql_checker_accepts_valid_queries(expr: str) -> None:
    assert promql_problems(expr) == []


def test_metric_names_ignore_functions_labels_and_keywords() -> None:
    expr = (
        'sum by (job) (rate(a_total{code="401"}[5m])) / on (job) group_left (name) '
        "max by (job, name) (b:c:sum) and bool d"
    )
    assert metric_names(expr) == {"a_total", "b:c:sum", "d"}


# --- the generator ---------------------------------------------------------------------------


def test_committed_dashboard_is_what_the_generator_renders() -> None:
    generator = _load_generator()
    assert DASHBOARD_PATH.read_text() == generator.render(), (
        "grafana/dashboards/applivery-mdm-exporter.json is out of date: "
        "run python grafana/build_dashboard.py"
    )


# --- structure -------------------------------------------------------------------------------


def test_dashboard_is_a_grafana_10_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 38
    assert dashboard["uid"] and len(dashboard["uid"]) <= 40
    assert dashboard["title"]
    assert "id" not in dashboard or dashboard["id"] is None  # importable anywhere
    assert {"from", "to"} <= dashboard["time"].keys()
    assert isinstance(dashboard["templating"]["list"], list)


def test_panel_ids_are_unique_positive_integers(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in _panels(dashboard)]
    assert all(isinstance(i, int) and i > 0 for i in ids)
    assert len(ids) == len(set(ids))


def test_panels_sit_on_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in _panels(dashboard):
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), panel["title"]
        assert grid["h"] > 0 and grid["w"] > 0
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_every_panel_queries_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    expected = {"type": "prometheus", "uid": "${datasource}"}
    for panel in _content_panels(dashboard):
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]
            assert target["expr"].strip(), panel["title"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == expected, variable["name"]


def _label_values(variable: Mapping[str, Any]) -> tuple[str, str]:
    """The series selector and the label of a label_values() variable."""
    match = _LABEL_VALUES.match(_variable_query(variable))
    assert match is not None, variable["name"]
    return match["selector"], match["label"]


def test_variables_datasource_job_organization_instance_device(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "job", "organization", "instance", "device"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "organization", "instance", "device"):
        assert variables[name]["type"] == "query"
        assert _label_values(variables[name])[1] == name
    # Each variable offers what the ones before it select.
    for name, before in (("organization", "job"), ("instance", "organization"),
                         ("device", "instance")):  # fmt: skip
        selector, _ = _label_values(variables[name])
        assert f"${before}" in selector, name
    # Organizations and instances come from a series every exporter exports from its first
    # scrape, with or without devices (design.md: every compliance value, zeros included).
    for name in ("organization", "instance"):
        selector, _ = _label_values(variables[name])
        assert metric_names(substitute(selector, DEFAULT_VARIABLES)) == {
            "applivery_windows_devices_compliance"
        }
    device_selector, _ = _label_values(variables["device"])
    assert metric_names(substitute(device_selector, DEFAULT_VARIABLES)) == {
        "applivery_exporter_target_up"
    }
    # "All" instances stands for the instances offered (those of the selected organizations),
    # never for every instance of the job; the others may stand for anything.
    assert variables["instance"]["multi"] and variables["instance"]["includeAll"]
    assert "allValue" not in variables["instance"]
    for name in ("organization", "device"):
        assert variables[name]["multi"] and variables[name]["allValue"] == ".+"


def test_every_referenced_variable_exists_and_every_variable_is_used(
    dashboard: dict[str, Any],
) -> None:
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    text = json.dumps(dashboard["panels"]) + json.dumps(dashboard["templating"])
    used = referenced_variables(text)
    assert used - GRAFANA_BUILTINS <= defined
    assert defined <= used


def test_queries_use_only_exporter_metrics_and_recording_rules(dashboard: dict[str, Any]) -> None:
    allowed = sample_names() | recorded_names()
    for query in grafana_queries(dashboard):
        unknown = metric_names(query) - allowed
        assert not unknown, f"{query}: unknown metrics {sorted(unknown)}"


def test_every_query_is_plausible_promql(dashboard: dict[str, Any]) -> None:
    for query in grafana_queries(dashboard):
        assert promql_problems(query) == [], query


def series_with_organization() -> frozenset[str]:
    """The exposed series that carry the ``organization`` label, read from what the exporter
    renders for a watched device with a batch, and the recorded series made of them."""
    metrics = SelfMetrics()
    state = FleetState(organization="acme", latency_buckets=(1.0,), metrics=metrics)
    state.watch("d1", name="pc")
    health = DeviceHealth(COMPLIANT, 1.0, "10.0.26100.7623")
    state.device_listed("d1", state="ACTIVE", check_in=1.0, health=health)
    batch = Batch("b1", device_id="d1", name="Baseline", created_at=1.0)
    path = "./Device/Vendor/MSFT/Policy/Config/Security/RequireDeviceEncryption"
    state.apply_actions("d1", batch, [
        Action("1", "Pending", path=path, operation="Replace"),
        Action("2", "Error", sent_at=2.0, received_at=3.0, path=path, operation="Replace"),
    ])
    state.poll_succeeded("d1")
    exposition = Exposition(state, metrics, version="test", registry=CollectorRegistry())
    body = exposition.body(openmetrics=False)
    exposed = {
        line.split("{")[0]
        for line in body.decode().splitlines()
        if 'organization="acme"' in line
    }
    recorded = {name for name in recorded_names() if any(e in name for e in exposed)}
    return frozenset(exposed | recorded)


_SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}")


def test_queries_filter_by_the_selected_job_instance_and_organization(
    dashboard: dict[str, Any],
) -> None:
    """Every selector filters by job and instance; a series with an organization also by the
    organization. (The exporter's own series have none: the instance variable only offers the
    selected organizations' instances.)"""
    with_organization = series_with_organization()
    assert {"applivery_windows_command_actions", "applivery_exporter_target_up",
            "instance_device_status_class:applivery_windows_command_actions:sum"} <= (
        with_organization
    )
    assert "applivery_exporter_api_requests_total" not in with_organization
    checked = 0
    for panel in _content_panels(dashboard):
        for target in panel["targets"]:
            for name, matchers in _SELECTOR.findall(target["expr"]):
                assert 'job=~"$job"' in matchers, (panel["title"], name)
                assert 'instance=~"$instance"' in matchers, (panel["title"], name)
                if name in with_organization:
                    checked += 1
                    assert 'organization=~"$organization"' in matchers, (panel["title"], name)
    assert checked > 30


def test_dashboard_covers_the_command_and_health_views(dashboard: dict[str, Any]) -> None:
    by_type: dict[str, list[str]] = {}
    for panel in _content_panels(dashboard):
        by_type.setdefault(panel["type"], []).extend(t["expr"] for t in panel["targets"])
    used = set().union(*(metric_names(q) for q in grafana_queries(dashboard)))
    recorded = recorded_names()
    # Every family of the contract that carries a time series worth plotting.
    for base in (
        "applivery_windows_command_actions",
        "applivery_windows_command_action_transitions",
        "applivery_windows_command_oldest_pending_sent_timestamp_seconds",
        "applivery_windows_device_info",
        "applivery_exporter_target_up",
        "applivery_exporter_last_success_timestamp_seconds",
        "applivery_exporter_api_requests",
        "applivery_exporter_api_budget_requests_per_hour",
        "applivery_exporter_poll_round_duration_seconds",
        "applivery_exporter_parse_problems",
        "applivery_exporter_config_last_reload_successful",
    ):
        assert any(base in name for name in used), f"no panel shows {base}"
    heatmaps = by_type.get("heatmap", [])
    assert any("applivery_windows_command_ack_latency_seconds_bucket" in q for q in heatmaps)
    quantile_rules = {n for n in recorded if "histogram_quantile" in n}
    assert quantile_rules & used, "no panel shows latency quantiles"
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(f'quantile="{quantile}"' in q for q in by_type.get("timeseries", []))
    assert by_type.get("table"), "no table (devices with most errors)"


def _panel(dashboard: Mapping[str, Any], title: str) -> dict[str, Any]:
    (panel,) = [p for p in _content_panels(dashboard) if p["title"] == title]
    return panel


def test_devices_needing_a_look_are_listed_not_paged(dashboard: dict[str, Any]) -> None:
    """The device alerts count devices; these tables name them."""
    failing = _panel(dashboard, "Devices failing their polls")
    stuck = _panel(dashboard, "Devices with actions stuck pending")
    params = yaml.safe_load((ROOT / "prometheus" / "params.yml").read_text())["alerts"]
    for panel, alert in ((failing, "AppliveryDeviceTargetsDown"),
                         (stuck, "AppliveryActionsStuckPending")):  # fmt: skip
        assert panel["type"] == "table"
        (target,) = panel["targets"]
        assert target["instant"] and target["format"] == "table"
        assert 'device=~"$device"' in target["expr"]
        assert "applivery_windows_device_info" in target["expr"]  # with the device names
        assert alert in panel["description"]
    (failing_expr,) = [t["expr"] for t in failing["targets"]]
    assert "applivery_exporter_target_up" in failing_expr and "== 0" in failing_expr
    (stuck_expr,) = [t["expr"] for t in stuck["targets"]]
    days = int(params["AppliveryActionsStuckPending"]["after"].removesuffix("d"))
    assert f"> {days * 86400})" in stuck_expr


def test_cardinality_guard_and_api_endpoints_have_panels(dashboard: dict[str, Any]) -> None:
    guard = _panel(dashboard, "Cardinality guard")
    names = set().union(*(metric_names(t["expr"]) for t in guard["targets"]))
    assert names == {
        "applivery_exporter_cardinality_guard_level",
        "applivery_exporter_series_dropped",
    }
    assert "AppliveryExporterCardinalityGuardActive" in guard["description"]
    by_route = [q for q in raw_queries(dashboard) if "api_endpoint" in q]
    assert len(by_route) == 2
    # The exporter's API route label is api_endpoint: `endpoint` is the Prometheus Operator's.
    assert not any(re.search(r"\bendpoint\b", q) for q in raw_queries(dashboard))


def test_error_ratio_panel_sums_the_selected_shards(dashboard: dict[str, Any]) -> None:
    panel = _panel(dashboard, "Error ratio of finished actions")
    for target in panel["targets"]:
        assert "sum by (job, organization)" in target["expr"]
        assert "{{organization}}" in target["legendFormat"]


def test_heatmap_targets_are_heatmap_formatted(dashboard: dict[str, Any]) -> None:
    for panel in _content_panels(dashboard):
        if panel["type"] == "heatmap":
            assert panel["options"]["calculate"] is False
            for target in panel["targets"]:
                assert target["format"] == "heatmap"
                assert "sum by (le)" in target["expr"]


def test_grafana_queries_substitutes_every_variable(dashboard: dict[str, Any]) -> None:
    queries = grafana_queries(dashboard, {"job": "other-job"})
    assert len(queries) == len(raw_queries(dashboard))
    assert all("$" not in q for q in queries)
    assert any('job=~"other-job"' in q for q in queries)


# --- against a real Prometheus ------------------------------------------------------------------


async def test_prometheus_accepts_every_dashboard_query(dashboard: dict[str, Any]) -> None:
    """Prometheus parses and type-checks each query (a bad one answers 400 bad_data)."""
    rejected: list[str] = []
    async with running_prometheus(rule_files=[RECORDING_RULES]) as prometheus:
        for query in grafana_queries(dashboard):
            try:
                await prometheus.query(query)
            except ApiError as exc:
                rejected.append(f"{query}: {exc}")
    assert rejected == []


# --- the fleet views -----------------------------------------------------------------------------

FLEET_PANELS = (
    "Rollouts",
    "Top failing settings",
    "Check-in age",
    "Devices by state",
    "Silent devices with pending actions",
)
ROLLOUT_STATES = ("failed", "pending", "unknown", "canceled", "succeeded")
CHECK_IN_BUCKETS = ("< 1h", "1h – 24h", "1d – 7d", "> 7d")


def _params() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "prometheus" / "params.yml").read_text())["alerts"]


def _row_panels(dashboard: Mapping[str, Any], title: str) -> list[dict[str, Any]]:
    """The panels laid out under the row of that title, up to the next row."""
    panels = list(_panels(dashboard))
    (start,) = [i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == title]
    following = []
    for panel in panels[start + 1 :]:
        if panel["type"] == "row":
            break
        following.append(panel)
    return following


def _exprs(panel: Mapping[str, Any]) -> list[str]:
    return [target["expr"] for target in panel["targets"]]


def _aggregation_labels(expr: str) -> list[set[str]]:
    """The label lists of every ``sum by``, ``count by`` and ``max by`` of expr."""
    return [
        {label.strip() for label in labels.split(",")}
        for labels in re.findall(r"\b(?:sum|count|max) by \(([^)]*)\)", expr)
    ]


def test_fleet_views_row_holds_the_fleet_panels(dashboard: dict[str, Any]) -> None:
    assert [p["title"] for p in _row_panels(dashboard, "Fleet views")] == list(FLEET_PANELS)
    used = set().union(*(metric_names(q) for q in grafana_queries(dashboard)))
    for name in (
        "applivery_windows_rollout_devices",
        "applivery_windows_rollout_actions",
        "applivery_windows_setting_results_total",
        "applivery_windows_device_last_check_in_timestamp_seconds",
        "applivery_windows_devices",
    ):
        assert name in used, f"no panel shows {name}"


def test_fleet_queries_sum_the_selected_shards(dashboard: dict[str, Any]) -> None:
    """Each shard exports the part of its own devices: no fleet panel splits by instance,
    except the per-device table, whose rows are devices."""
    for title in FLEET_PANELS:
        panel = _panel(dashboard, title)
        for expr in _exprs(panel):
            assert 'instance=~"$instance"' in expr and 'job=~"$job"' in expr, title
            groups = _aggregation_labels(expr)
            if title == "Silent devices with pending actions":
                assert all({"job", "instance", "device"} <= labels for labels in groups), expr
            else:
                assert groups or expr.startswith("count("), expr
                assert all("instance" not in labels for labels in groups), expr


def test_rollout_table_shows_devices_per_state_and_the_succeeded_share(
    dashboard: dict[str, Any],
) -> None:
    panel = _panel(dashboard, "Rollouts")
    assert panel["type"] == "table"
    targets = panel["targets"]
    assert all(t["instant"] and t["format"] == "table" for t in targets)
    assert all("sum by (organization, rollout)" in t["expr"] for t in targets)
    rename = panel["transformations"][-1]["options"]["renameByName"]
    # One query, so one column, per state, in the contract's order, then the share.
    for target, state in zip(targets, ROLLOUT_STATES, strict=False):
        assert f'applivery_windows_rollout_devices{{state="{state}", ' in target["expr"]
        assert rename[f"Value #{target['refId']}"] == state.capitalize()
    share = targets[len(ROLLOUT_STATES)]
    assert rename[f"Value #{share['refId']}"] == "Succeeded share"
    numerator, denominator = share["expr"].split(" / ")
    assert 'state="succeeded"' in numerator and "state=" not in denominator
    errors = targets[len(ROLLOUT_STATES) + 1]
    assert 'applivery_windows_rollout_actions{status_class="error", ' in errors["expr"]
    assert panel["transformations"][0]["id"] == "merge"  # one row per rollout
    assert panel["options"]["sortBy"] == [{"displayName": "Failed", "desc": True}]
    (bar,) = [
        o for o in panel["fieldConfig"]["overrides"] if o["matcher"]["options"] == "Succeeded share"
    ]
    properties = {p["id"]: p["value"] for p in bar["properties"]}
    assert properties["custom.cellOptions"]["type"] == "gauge"
    assert (properties["unit"], properties["min"], properties["max"]) == ("percentunit", 0, 1)
    assert "AppliveryRolloutFailing" in panel["description"]


def test_top_failing_settings_rank_error_results_over_the_range(
    dashboard: dict[str, Any],
) -> None:
    panel = _panel(dashboard, "Top failing settings")
    (target,) = panel["targets"]
    assert target["instant"]
    assert target["expr"].startswith("topk(10, sum by (setting, operation) (increase(")
    assert 'applivery_windows_setting_results_total{status_class="error", ' in target["expr"]
    assert target["expr"].endswith("[$__range])))")
    assert "AppliverySettingErrorRatioHigh" in panel["description"]


def test_check_in_age_buckets_cover_every_age_once(dashboard: dict[str, Any]) -> None:
    panel = _panel(dashboard, "Check-in age")
    assert panel["type"] == "bargauge"
    assert [t["legendFormat"] for t in panel["targets"]] == list(CHECK_IN_BUCKETS)
    edges: list[tuple[float, float]] = []
    for target in panel["targets"]:
        assert target["instant"]
        counted, fallback = target["expr"].split(" or ")
        assert counted.startswith(
            "count(time() - applivery_windows_device_last_check_in_timestamp_seconds{"
        )
        assert 'device=~"$device"' in counted
        # 0 rather than no data when no device is that old.
        assert fallback.startswith("count(applivery_windows_device_last_check_in_timestamp")
        assert fallback.endswith(" * 0")
        low = re.search(r">= (\d+)", counted)
        high = re.search(r"(?<!>)< (\d+)", counted)
        edges.append(
            (float(low[1]) if low else -math.inf, float(high[1]) if high else math.inf)
        )
    # Contiguous half-open intervals from -inf to +inf: every device in exactly one bucket.
    assert edges[0][0] == -math.inf and edges[-1][1] == math.inf
    assert all(a[1] == b[0] for a, b in itertools.pairwise(edges))
    assert [high for _, high in edges[:-1]] == [3600, 86400, 7 * 86400]
    assert "AppliveryDevicesSilent" in panel["description"]


def test_silent_devices_table_lists_silent_devices_with_pending_actions(
    dashboard: dict[str, Any],
) -> None:
    panel = _panel(dashboard, "Silent devices with pending actions")
    silent = _params()["AppliveryDevicesSilent"]
    after = int(silent["after"].removesuffix("d")) * 86400
    assert panel["type"] == "table"
    assert panel["transformations"][0]["id"] == "merge"
    for target in panel["targets"]:
        assert target["instant"] and target["format"] == "table"
        expr = target["expr"]
        assert re.search(
            rf"time\(\) - applivery_windows_device_last_check_in_timestamp_seconds\{{[^}}]*\}} "
            rf"> {after}\)",
            expr,
        ), expr
        assert "applivery_windows_command_oldest_pending_sent_timestamp_seconds" in expr
        assert 'device=~"$device"' in expr
        assert "applivery_windows_device_info" in expr  # with the device names
    rename = panel["transformations"][-1]["options"]["renameByName"]
    assert rename["Value #A"] == "Since last check-in"
    assert rename["Value #B"] == "Oldest pending"
    assert "AppliveryDevicesSilent" in panel["description"]


# --- fleet health, the exporters and the links ---------------------------------------------------

FLEET_HEALTH_PANELS = ("Compliance", "Non-compliant share", "OS versions", "Non-compliant devices")
COMPLIANCE = "applivery_windows_devices_compliance"
OS_VERSION = "applivery_windows_devices_os_version"


def test_fleet_health_row_shows_compliance_and_os_versions(dashboard: dict[str, Any]) -> None:
    panels = _row_panels(dashboard, "Fleet health")
    assert [p["title"] for p in panels] == list(FLEET_HEALTH_PANELS)
    used = set().union(*(metric_names(e) for p in panels for e in _exprs(p)))
    assert {COMPLIANCE, OS_VERSION, "applivery_windows_device_info",
            "applivery_windows_device_compliance_last_check_timestamp_seconds"} <= used
    # Compliance over time, one series per verdict, summed over the selected shards.
    (over_time,) = panels[0]["targets"]
    assert panels[0]["type"] == "timeseries" and not over_time["instant"]
    assert over_time["expr"].startswith(f"sum by (compliance) ({COMPLIANCE}{{")
    colors = {o["matcher"]["options"] for o in panels[0]["fieldConfig"]["overrides"]}
    assert colors == {"compliant", "non_compliant", "unknown"}
    # The share the alert computes, its threshold where the alert fires.
    share = _params()["AppliveryDevicesNonCompliant"]["share"]
    steps = panels[1]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1] == {"color": "red", "value": share}
    assert panels[1]["fieldConfig"]["defaults"]["unit"] == "percentunit"
    (ratio,) = _exprs(panels[1])
    numerator, denominator = ratio.split(" / ")
    assert 'compliance="non_compliant"' in numerator and "compliance=" not in denominator
    # OS versions: a table of devices and their share, most devices first.
    versions = panels[2]
    assert versions["type"] == "table" and versions["transformations"][0]["id"] == "merge"
    assert all(f"sum by (os_version) ({OS_VERSION}{{" in e for e in _exprs(versions))
    assert versions["options"]["sortBy"] == [{"displayName": "Devices", "desc": True}]
    # The devices themselves, with names and OS versions.
    (devices,) = _exprs(panels[3])
    assert 'applivery_windows_device_info{compliance="non_compliant", ' in devices
    assert 'device=~"$device"' in devices and "group_left (name, os_version)" in devices
    for panel in panels:
        for alert in ("AppliveryDevicesNonCompliant", "AppliveryDevicesFallingOutOfCompliance"):
            if panel["title"] in ("Compliance", "Non-compliant share"):
                assert alert in panel["description"], (panel["title"], alert)


def test_fleet_health_queries_sum_the_selected_shards(dashboard: dict[str, Any]) -> None:
    for panel in _row_panels(dashboard, "Fleet health"):
        for expr in _exprs(panel):
            groups = _aggregation_labels(expr)
            if panel["title"] == "Non-compliant devices":
                assert all({"job", "instance", "device"} <= labels for labels in groups), expr
            else:
                assert groups and all("instance" not in labels for labels in groups), expr


def test_each_exporter_links_its_landing_page(dashboard: dict[str, Any]) -> None:
    panel = _panel(dashboard, "Exporters")
    assert panel["type"] == "table"
    rename = panel["transformations"][-1]["options"]["renameByName"]
    assert rename["instance"] == "Instance"
    (instance,) = [
        o for o in panel["fieldConfig"]["overrides"] if o["matcher"]["options"] == "Instance"
    ]
    (links,) = [p["value"] for p in instance["properties"] if p["id"] == "links"]
    pattern = yaml.safe_load((ROOT / "prometheus" / "params.yml").read_text())[
        "landing_url_pattern"
    ]
    assert [link["url"] for link in links] == [pattern.format(instance="${__value.raw}")]
    # Rows join on the same labels, whatever the query (the merge makes one row per exporter).
    for expr in _exprs(panel):
        assert expr.endswith(")") and "group_left (version, revision, organization)" in expr
        assert "applivery_exporter_build_info" in expr


def test_the_runbook_is_linked_from_the_dashboard_and_from_each_alerts_panel(
    dashboard: dict[str, Any],
) -> None:
    params = yaml.safe_load((ROOT / "prometheus" / "params.yml").read_text())
    pattern: str = params["runbook_url_pattern"]
    (runbook,) = [link for link in dashboard["links"] if link["title"] == "Runbook"]
    assert runbook["url"] == pattern.split("#")[0] and runbook["targetBlank"]
    linked = 0
    for panel in _content_panels(dashboard):
        named = [a for a in params["alerts"] if re.search(rf"\b{a}\b", panel["description"])]
        urls = [link["url"] for link in panel["links"]]
        assert urls == [pattern.format(alert=a, anchor=a.lower()) for a in named], panel["title"]
        linked += len(urls)
    assert linked >= 12


def test_a_site_parameter_file_reaches_the_dashboard(tmp_path: Path) -> None:
    """Thresholds, the runbook and the landing page come from the rules' parameter file."""
    generator = _load_generator()
    site = tmp_path / "site.yml"
    site.write_text(yaml.safe_dump({
        "runbook_url_pattern": "https://wiki.example.org/mdm/{alert}",
        "landing_url_pattern": "https://mdm-exporter.example.org/{instance}/",
        "alerts": {"AppliveryDevicesNonCompliant": {"share": 0.375}},
    }))
    output = tmp_path / "dashboard.json"
    args = ["--params", str(site), "--output", str(output)]
    assert generator.main(args) == 0
    assert generator.main([*args, "--check"]) == 0
    text = output.read_text()
    built = json.loads(text)
    assert built["links"][0]["url"] == "https://wiki.example.org/mdm/"
    assert "https://wiki.example.org/mdm/AppliveryDevicesNonCompliant" in text
    assert "https://mdm-exporter.example.org/${__value.raw}/" in text
    share = _panel(built, "Non-compliant share")
    assert share["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]["value"] == 0.375
    assert "more than 37.5%" in share["description"]
    assert generator.main(["--check"]) == 0  # the committed file is untouched


def test_a_wrong_parameter_file_is_refused_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site.yml"
    site.write_text("landing_url_pattern: https://mdm-exporter.example.org/\n")
    output = tmp_path / "dashboard.json"
    assert _load_generator().main(["--params", str(site), "--output", str(output)]) == 2
    assert "landing_url_pattern" in capsys.readouterr().err
    assert not output.exists()


# --- the fleet views in a real Prometheus, over two shards ---------------------------------------

HOUR, DAY = 3600.0, 86400.0
# Per shard: its organization, rollouts (devices per state, actions in error), settings whose
# error results grow by this much per scrape, devices (check-in age in seconds or None when
# unknown, pending action or not, upstream state), and what the device list showed of their
# health (compliance, OS version, age of the compliance check or None; unlisted: unknown).
W11, W10, W11_23H2 = "10.0.26100.7623", "10.0.19045.6809", "10.0.22631.6491"
FLEET_SHARDS: tuple[dict[str, Any], ...] = (
    {
        "organization": "acme",
        "rollouts": {
            "Enforce BitLocker": ({"failed": 3, "pending": 1, "succeeded": 6}, 5),
            "Security baseline": ({"succeeded": 4}, 0),
        },
        "errors_per_scrape": {
            ("Policy/Config/Security/RequireDeviceEncryption", "Replace"): 2,
            ("Policy/Config/Update/ActiveHoursStart", "Replace"): 1,
        },
        "devices": {
            "a1": (10 * 60, False, "ACTIVE"),
            "a2": (2 * HOUR, True, "ACTIVE"),  # pending, but checked in lately
            "a3": (3 * DAY, True, "ACTIVE"),  # silent, with a pending action
            "a4": (None, True, "not_listed"),  # check-in unknown: in no bucket
        },
        "health": {
            "a1": ("compliant", W11, HOUR),
            "a2": ("non_compliant", W11, 2 * HOUR),
            "a3": ("non_compliant", W10, None),  # no check listed
        },
    },
    {
        "organization": "acme",
        "rollouts": {
            "Enforce BitLocker": ({"failed": 2, "canceled": 1, "succeeded": 7}, 2),
        },
        "errors_per_scrape": {("Policy/Config/Security/RequireDeviceEncryption", "Replace"): 1},
        "devices": {
            "b1": (30 * DAY, True, "ACTIVE"),  # silent, with a pending action
            "b2": (-5.0, False, "ACTIVE"),  # a check-in a little ahead of Prometheus' clock
            "b3": (30 * HOUR, False, "DELETE_REQUESTED"),  # silent, nothing pending
        },
        "health": {
            "b1": ("compliant", W10, 3 * HOUR),
            "b2": ("non_compliant", W11_23H2, -600.0),  # checked ahead of Prometheus' clock
            "b3": ("compliant", W11, HOUR),
        },
    },
    # Another organization in the same job: every acme panel leaves it out.
    {
        "organization": "globex",
        "rollouts": {"Enforce BitLocker": ({"failed": 40}, 90)},
        "errors_per_scrape": {("Policy/Config/Update/ActiveHoursStart", "Replace"): 50},
        "devices": {
            "c1": (5 * DAY, True, "ACTIVE"),
            "c2": (10 * 60, False, "ACTIVE"),
        },
        "health": {
            "c1": ("non_compliant", W11, HOUR),
            "c2": ("compliant", "10.0.17763.8146", HOUR),
        },
    },
)
ACME = {"organization": "acme"}


class FleetShard:
    """One shard's fleet-view series in the text format; each scrape moves the setting
    counters on, as poll rounds would."""

    def __init__(self, shard: Mapping[str, Any]) -> None:
        self.shard = shard
        self.started = time.time()
        self.scrapes = 0

    def render(self) -> str:
        self.scrapes += 1
        org = f'organization="{self.shard["organization"]}"'
        lines = [
            'applivery_exporter_build_info{version="9.8.7",revision="abc123",'
            'python_version="3.11.7"} 1',
            f"applivery_exporter_storage_last_write_timestamp_seconds {time.time() - 2}",
        ]
        for rollout, (states, errors) in self.shard["rollouts"].items():
            for state in ROLLOUT_STATES:
                lines.append(
                    f'applivery_windows_rollout_devices{{{org},rollout="{rollout}",'
                    f'state="{state}"}} {states.get(state, 0)}'
                )
            lines.append(
                f'applivery_windows_rollout_actions{{{org},rollout="{rollout}",'
                f'status_class="error"}} {errors}'
            )
        for (setting, operation), step in self.shard["errors_per_scrape"].items():
            labels = f'{org},setting="{setting}",operation="{operation}"'
            lines.append(
                f'applivery_windows_setting_results_total{{{labels},status_class="error"}} '
                f"{step * self.scrapes}"
            )
            lines.append(
                f'applivery_windows_setting_results_total{{{labels},status_class="success"}} '
                f"{10 * self.scrapes}"
            )
        states: dict[str, int] = {}
        for device, (age, pending, state) in self.shard["devices"].items():
            labels = f'{org},device="{device}"'
            states[state] = states.get(state, 0) + 1
            lines.append(f"applivery_exporter_target_up{{{labels}}} 1")
            lines.append(self._info(device, labels))
            if age is not None:
                lines.append(
                    "applivery_windows_device_last_check_in_timestamp_seconds"
                    f"{{{labels}}} {self.started - age}"
                )
            if pending:
                lines.append(
                    "applivery_windows_command_oldest_pending_sent_timestamp_seconds"
                    f"{{{labels}}} {self.started - 4 * DAY}"
                )
        for state, count in states.items():
            lines.append(f'applivery_windows_devices{{{org},state="{state}"}} {count}')
        return "\n".join(lines + self._health(org)) + "\n"

    def _info(self, device: str, labels: str) -> str:
        health = self.shard["health"].get(device)
        listed = "" if health is None else f',compliance="{health[0]}",os_version="{health[1]}"'
        return f'applivery_windows_device_info{{{labels},name="pc-{device}"{listed}}} 1'

    def _health(self, org: str) -> list[str]:
        """The fleet health gauges: every compliance value (zeros included), the versions,
        each listed device's compliance check."""
        verdicts = dict.fromkeys(("compliant", "non_compliant", "unknown"), 0)
        versions: dict[str, int] = {}
        lines = []
        unlisted = ("unknown", "unknown", None)
        for device in self.shard["devices"]:
            compliance, version, age = self.shard["health"].get(device, unlisted)
            verdicts[compliance] += 1
            versions[version] = versions.get(version, 0) + 1
            if age is not None:
                lines.append(
                    "applivery_windows_device_compliance_last_check_timestamp_seconds"
                    f'{{{org},device="{device}"}} {self.started - age}'
                )
        lines += [f'{COMPLIANCE}{{{org},compliance="{c}"}} {n}' for c, n in verdicts.items()]
        lines += [f'{OS_VERSION}{{{org},os_version="{v}"}} {n}' for v, n in versions.items()]
        return lines

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.render(), content_type="text/plain")

    def app(self) -> web.Application:
        application = web.Application()
        application.router.add_get("/metrics", self.metrics)
        return application


def _fleet_query(
    dashboard: Mapping[str, Any], title: str, ref: str = "A", values: Mapping[str, str] = ACME
) -> str:
    (target,) = [t for t in _panel(dashboard, title)["targets"] if t["refId"] == ref]
    return substitute(target["expr"], {**DEFAULT_VARIABLES, **values})


def _values(result: list[dict[str, Any]]) -> list[float]:
    return [float(series["value"][1]) for series in result]


def _rows(result: list[dict[str, Any]], *labels: str) -> dict[tuple[str, ...], float]:
    return {
        tuple(series["metric"].get(label, "") for label in labels): float(series["value"][1])
        for series in result
    }


async def test_fleet_views_sum_two_shards_in_prometheus(
    aiohttp_server: Any, dashboard: dict[str, Any]
) -> None:
    """The fleet panels' queries against two shards, each exporting the part of its own
    devices: rollouts and settings are summed over both, every device falls in one check-in
    bucket, and the silent table lists the silent devices that hold pending actions."""
    shards = [FleetShard(shard) for shard in FLEET_SHARDS]
    servers = [await aiohttp_server(shard.app()) for shard in shards]
    targets = [ScrapeTarget(f"127.0.0.1:{server.port}") for server in servers]
    async with running_prometheus(targets, rule_files=[RECORDING_RULES]) as prometheus:

        async def query(title: str, ref: str = "A") -> list[dict[str, Any]]:
            return await prometheus.query(_fleet_query(dashboard, title, ref))

        async def settings_ranked() -> list[dict[str, Any]]:
            """Once every failing setting has grown between two scrapes of its shards (the
            other organization's too: its errors must not reach acme's ranking)."""
            result = await query("Top failing settings")
            other = await prometheus.query(
                _fleet_query(dashboard, "Top failing settings", values={"organization": "globex"})
            )
            grown = len(result) == 2 and all(float(s["value"][1]) > 0 for s in result + other)
            return result if grown and other else []

        await eventually(
            lambda: prometheus.query("count(up == 1) == 3"), what="every shard scraped"
        )
        ranked = await eventually(settings_ranked, what="setting error increases")

        # Rollouts: one row per rollout, the devices of both shards in each state.
        rollouts = {ref: _rows(await query("Rollouts", ref), "rollout") for ref in "ABCDEFG"}
        assert rollouts["A"] == {("Enforce BitLocker",): 5, ("Security baseline",): 0}
        assert rollouts["B"][("Enforce BitLocker",)] == 1
        assert rollouts["D"][("Enforce BitLocker",)] == 1
        assert rollouts["E"] == {("Enforce BitLocker",): 13, ("Security baseline",): 4}
        assert rollouts["F"] == {("Enforce BitLocker",): 13 / 20, ("Security baseline",): 1}
        assert rollouts["G"] == {("Enforce BitLocker",): 7, ("Security baseline",): 0}

        # Settings: the one failing on both shards first, one bar each, no success counted.
        ranked.sort(key=lambda series: -float(series["value"][1]))
        assert [series["metric"]["setting"] for series in ranked] == [
            "Policy/Config/Security/RequireDeviceEncryption",
            "Policy/Config/Update/ActiveHoursStart",
        ]
        assert all(set(s["metric"]) == {"setting", "operation"} for s in ranked)

        # Check-in ages: a1 and b2 recent, a2 within the day, a3 and b3 days ago, b1 a month.
        buckets = [_values(await query("Check-in age", ref)) for ref in "ABCD"]
        assert buckets == [[2.0], [1.0], [2.0], [1.0]]

        # Silent with pending work: a3 and b1 (b3 is silent with nothing pending, a2 pending
        # but not silent), with their names, time since check-in and oldest pending.
        silent = _rows(await query("Silent devices with pending actions"), "device", "name")
        assert set(silent) == {("a3", "pc-a3"), ("b1", "pc-b1")}
        assert silent[("a3", "pc-a3")] == pytest.approx(3 * DAY, abs=120)
        assert silent[("b1", "pc-b1")] == pytest.approx(30 * DAY, abs=120)
        pending = _rows(await query("Silent devices with pending actions", "B"), "device")
        assert pending == {
            ("a3",): pytest.approx(4 * DAY, abs=120),
            ("b1",): pytest.approx(4 * DAY, abs=120),
        }

        states = _rows(await query("Devices by state"), "state")
        assert states == {("ACTIVE",): 5, ("not_listed",): 1, ("DELETE_REQUESTED",): 1}


def grafana_regex(values: list[str]) -> str:
    """Several values of a variable in a PromQL regex matcher, as Grafana's Prometheus data
    source writes them: each regex-escaped, the escapes escaped for the string literal."""
    return "(" + "|".join(re.escape(v).replace("\\", "\\\\") for v in values) + ")"


async def test_fleet_health_and_exporters_per_organization_in_prometheus(
    aiohttp_server: Any, dashboard: dict[str, Any]
) -> None:
    """The fleet health panels and the exporters table against three shards of two
    organizations, as Grafana would query them: the instance variable offers only the
    selected organization's shards, and every panel counts that organization alone."""
    shards = [FleetShard(shard) for shard in FLEET_SHARDS]
    servers = [await aiohttp_server(shard.app()) for shard in shards]
    addresses = [f"127.0.0.1:{server.port}" for server in servers]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    async with running_prometheus([ScrapeTarget(a) for a in addresses]) as prometheus:
        await eventually(
            lambda: prometheus.query("count(up == 1) == 3"), what="every shard scraped"
        )

        async def offered(name: str, values: Mapping[str, str]) -> list[str]:
            selector, label = _label_values(variables[name])
            return await prometheus.label_values(label, substitute(selector, values))

        job = {"job": DEFAULT_VARIABLES["job"]}
        assert await offered("organization", job) == ["acme", "globex"]
        acme_shards = await offered("instance", {**job, **ACME})
        assert acme_shards == sorted(addresses[:2])
        # "All" instances: the values offered, as Grafana writes them in a regex.
        acme = {**ACME, "instance": grafana_regex(acme_shards)}
        globex = {"organization": "globex", "instance": grafana_regex(addresses[2:])}

        async def query(title: str, ref: str = "A", values: Mapping[str, str] = acme) -> Any:
            return await prometheus.query(_fleet_query(dashboard, title, ref, values))

        compliance = _rows(await query("Compliance"), "compliance")
        assert compliance == {("compliant",): 3, ("non_compliant",): 3, ("unknown",): 1}
        other = _rows(await query("Compliance", values=globex), "compliance")
        assert other == {("compliant",): 1, ("non_compliant",): 1, ("unknown",): 0}
        share = _rows(await query("Non-compliant share"), "organization")
        assert share == {("acme",): pytest.approx(3 / 7)}

        versions = _rows(await query("OS versions"), "os_version")
        assert versions == {(W11,): 3, (W10,): 2, (W11_23H2,): 1, ("unknown",): 1}
        shares = _rows(await query("OS versions", "B"), "os_version")
        assert shares == {key: pytest.approx(n / 7) for key, n in versions.items()}

        devices = _rows(await query("Non-compliant devices"), "device", "name", "os_version")
        assert devices == {
            ("a2", "pc-a2", W11): pytest.approx(2 * HOUR, abs=120),
            ("a3", "pc-a3", W10): math.inf,  # no compliance check listed
            ("b2", "pc-b2", W11_23H2): 0.0,  # just now, not in ten minutes
        }

        # One row per exporter of the organization, each column joined on the same labels.
        columns = [
            _rows(await query("Exporters", ref), "instance", "organization", "version")
            for ref in "ABCD"
        ]
        rows = {(a, "acme", "9.8.7") for a in acme_shards}
        assert all(set(column) == rows for column in columns)
        scraped, watched, up, written = columns
        assert set(scraped.values()) == {1.0}
        assert sorted(watched.values()) == [3.0, 4.0] and watched == up
        assert all(0 <= age < 120 for age in written.values())
        (row,) = _rows(await query("Exporters", values=globex), "instance", "organization")
        assert row == (addresses[2], "globex")
