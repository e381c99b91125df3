"""Alert and recording rules: generated from prometheus/params.yml and up to date, promtool
checks and unit tests, the annotations every alert needs, the runbook anchors they point at,
and the rules running in a real Prometheus whose alerts reach a webhook through a real
Alertmanager."""

from __future__ import annotations

import re
import subprocess
import time
import tomllib
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as CounterMetric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from promstack import (
    AMTOOL_BIN,
    PROMTOOL_BIN,
    AlertSink,
    ScrapeTarget,
    eventually,
    immediate_alerts,
    require_binaries,
    running_alertmanager,
    running_prometheus,
)
from scripts import load_script
from test_dashboard import metric_names, promql_problems, recorded_names, sample_names

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "prometheus"
ALERTS = RULES_DIR / "alerts.yml"
RECORDING = RULES_DIR / "recording.yml"
RULE_TESTS = sorted((RULES_DIR / "tests").glob("*.yml"))
RUNBOOK = ROOT / "docs" / "runbook.md"
PARAMS = RULES_DIR / "params.yml"
GENERATOR = RULES_DIR / "build_rules.py"
SEVERITIES = {"critical", "warning", "info"}
JOB = "applivery-mdm-exporter"

# The contract's default latency buckets (design.md).
LATENCY_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400, 259200)


def _rules(path: Path) -> list[dict[str, Any]]:
    document = yaml.safe_load(path.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules(ALERTS) if "alert" in rule]


def _unit_tests() -> list[dict[str, Any]]:
    return [test for path in RULE_TESTS for test in yaml.safe_load(path.read_text())["tests"]]


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def runbook_anchors() -> set[str]:
    return {
        github_anchor(line.lstrip("#"))
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("#")
    }


def load_generator() -> ModuleType:
    return load_script(GENERATOR, "build_rules")


def _params() -> dict[str, Any]:
    return yaml.safe_load(PARAMS.read_text())


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    (promtool,) = require_binaries(PROMTOOL_BIN)
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=120, check=False
    )


# --- promtool --------------------------------------------------------------------------------


def test_rule_files_pass_promtool_check() -> None:
    result = _promtool("check", "rules", str(RECORDING), str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=[p.name for p in RULE_TESTS])
def test_promtool_unit_tests_pass(test_file: Path) -> None:
    result = _promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_prometheus_config_is_valid() -> None:
    result = _promtool("check", "config", str(RULES_DIR / "prometheus.example.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_prometheus_config_scrapes_the_exporter() -> None:
    config = yaml.safe_load((RULES_DIR / "prometheus.example.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    assert job["scrape_interval"] == "30s"
    assert job["scrape_timeout"] == "10s"
    assert job["static_configs"][0]["targets"] == ["localhost:10190"]
    assert set(config["rule_files"]) == {"alerts.yml", "recording.yml"}
    assert config["alerting"]["alertmanagers"]


def test_example_alertmanager_config_is_valid() -> None:
    (amtool,) = require_binaries(AMTOOL_BIN)
    result = subprocess.run(
        [amtool, "check-config", str(RULES_DIR / "alertmanager.example.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- generated from the parameter file ------------------------------------------------------------


def test_committed_rule_files_are_what_the_parameter_file_generates() -> None:
    generator = load_generator()
    for name, text in generator.render(generator.load_params()).items():
        assert (RULES_DIR / name).read_text() == text, (
            f"prometheus/{name} is stale against prometheus/params.yml: "
            "run python3 prometheus/build_rules.py"
        )


def test_generator_check_reports_stale_files(tmp_path: Path) -> None:
    generator = load_generator()
    args = ["--output-dir", str(tmp_path)]
    assert generator.main([*args, "--check"]) == 1
    assert generator.main(args) == 0
    assert generator.main([*args, "--check"]) == 0
    (tmp_path / "alerts.yml").write_text("groups: []\n")
    assert generator.main([*args, "--check"]) == 1


def test_every_threshold_of_the_parameter_file_reaches_the_rules(tmp_path: Path) -> None:
    """A site file changing the selector, the group labels, the runbook URL and every number
    and duration: each new value appears, no default survives, and promtool accepts it."""
    defaults = _params()
    site: dict[str, Any] = {
        "selector": 'job="mdm-prod", cluster="eu-1"',
        "group_labels": ["cluster", "namespace", "job"],
        "runbook_url_pattern": "https://wiki.example.org/mdm/{alert}",
        "alerts": {},
    }
    for alert, values in defaults["alerts"].items():
        changed: dict[str, Any] = {}
        for key in values:
            if key in {"for", "after"}:
                changed[key] = "7h" if key == "after" else "17m"
            elif key in {"ratio", "share"}:
                changed[key] = 0.375
            else:
                changed[key] = 33
        site["alerts"][alert] = changed
    params_file = tmp_path / "site.yml"
    params_file.write_text(yaml.safe_dump(site))
    out = tmp_path / "rules"
    assert load_generator().main(["--params", str(params_file), "--output-dir", str(out)]) == 0
    result = _promtool("check", "rules", str(out / "recording.yml"), str(out / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr

    text = (out / "recording.yml").read_text() + (out / "alerts.yml").read_text()
    assert "applivery-mdm-exporter\"" not in text  # the default job matcher is gone
    assert "by (namespace, job" not in text
    alerts = {r["alert"]: r for r in _rules(out / "alerts.yml") if "alert" in r}
    assert set(alerts) == set(defaults["alerts"])
    for name, rule in alerts.items():
        assert rule["for"] == "17m", name
        assert rule["annotations"]["runbook_url"] == f"https://wiki.example.org/mdm/{name}"
        assert "17 minutes" in rule["annotations"]["description"] or name not in {
            "AppliveryExporterDown", "AppliveryExporterAbsent", "AppliveryDeviceTargetsDown",
            "AppliveryExporterCardinalityGuardActive",
        }, name
        values = site["alerts"][name]
        if "ratio" in values or "share" in values:
            assert "0.375" in rule["expr"], name
        if {"min_finished", "min_devices", "per_hour"} & values.keys():
            assert "33" in rule["expr"], name
        if "after" in values:
            assert str(7 * 3600) in rule["expr"], name
    # Every selector of a raw exporter metric carries the site's matchers.
    for rule in _rules(out / "recording.yml") + list(alerts.values()):
        for match in re.finditer(r"(?<![\w:])(up|applivery_\w+)(\{[^}]*\})?", rule["expr"]):
            name, matchers = match.groups()
            if name in sample_names():
                assert matchers and 'job="mdm-prod", cluster="eu-1"' in matchers, rule["expr"]
        if "sum by" in rule["expr"] or "count by" in rule["expr"]:
            assert "by (cluster, namespace, job" in rule["expr"], rule["expr"]


@pytest.mark.parametrize(
    ("site", "problem"),
    [
        ({"selectr": "x"}, "unknown key 'selectr'"),
        ({"alerts": {"AppliveryExporterDown": {"for": "5 minutes"}}}, "not a duration"),
        ({"alerts": {"AppliveryApiThrottled": {"ratio": 10}}}, "share is below 1"),
        ({"alerts": {"AppliveryNoSuchAlert": {"for": "5m"}}}, "unknown key"),
        ({"runbook_url_pattern": "https://example.org/runbook"}, "{anchor} or {alert}"),
        ({"group_labels": ["instance"]}, "split a deployment"),
    ],
)
def test_a_broken_parameter_file_is_refused_naming_the_key(
    tmp_path: Path, site: dict[str, Any], problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    params_file = tmp_path / "site.yml"
    params_file.write_text(yaml.safe_dump(site))
    generator = load_generator()
    assert generator.main(["--params", str(params_file), "--output-dir", str(tmp_path)]) == 2
    assert problem in capsys.readouterr().err
    assert not (tmp_path / "alerts.yml").exists()


# --- alert conventions -----------------------------------------------------------------------


def test_alerts_are_camel_case_with_severity_and_annotations() -> None:
    alerts = _alerts()
    assert alerts
    for alert in alerts:
        name = alert["alert"]
        assert re.fullmatch(r"Applivery(?:[A-Z][a-z0-9]*)+", name), name
        assert alert["labels"]["severity"] in SEVERITIES, name
        for key in ("summary", "description", "runbook_url"):
            assert alert["annotations"].get(key, "").strip(), f"{name}: no {key}"


def test_the_default_runbook_url_is_the_runbook_in_the_projects_repository() -> None:
    """One place to change (params.yml); by default the repository the package names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    repository = project["urls"]["Homepage"].rstrip("/")
    pattern = _params()["runbook_url_pattern"]
    assert pattern == f"{repository}/blob/main/docs/runbook.md#{{anchor}}"


def test_every_runbook_url_is_built_from_the_pattern_and_its_anchor_exists() -> None:
    pattern = _params()["runbook_url_pattern"]
    assert pattern.startswith("https://") and pattern.endswith("docs/runbook.md#{anchor}")
    anchors = runbook_anchors()
    for alert in _alerts():
        name = alert["alert"]
        anchor = github_anchor(name)
        assert alert["annotations"]["runbook_url"] == pattern.format(alert=name, anchor=anchor)
        assert anchor in anchors, f"{name}: docs/runbook.md has no #{anchor}"


def test_runbook_sections_match_the_alerts() -> None:
    documented = {
        line.lstrip("#").strip()
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("## Applivery")
    }
    assert documented == {alert["alert"] for alert in _alerts()}


def test_monitoring_guide_lists_every_alert_with_its_severity() -> None:
    guide = (ROOT / "docs" / "monitoring.md").read_text()
    for alert in _alerts():
        name, severity = alert["alert"], alert["labels"]["severity"]
        row = f"| [{name}](runbook.md#{github_anchor(name)}) | {severity} |"
        assert row in guide, f"docs/monitoring.md: no row {row!r}"


def test_github_anchor_follows_githubs_rules() -> None:
    assert github_anchor(" AppliveryExporterDown") == "appliveryexporterdown"
    assert github_anchor("How MDM timing shapes the thresholds") == (
        "how-mdm-timing-shapes-the-thresholds"
    )
    assert github_anchor("Severity policy (read me)") == "severity-policy-read-me"


# --- rule expressions ------------------------------------------------------------------------


def test_rules_read_only_exporter_metrics_and_recorded_series() -> None:
    allowed = sample_names() | recorded_names(RECORDING)
    for rule in _rules(RECORDING) + _rules(ALERTS):
        expr = rule["expr"]
        assert promql_problems(expr) == [], expr
        unknown = metric_names(expr) - allowed
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: {sorted(unknown)}"


def test_recording_rules_follow_level_metric_operations() -> None:
    exporter = {name.removesuffix("_total") for name in sample_names()}
    for rule in _rules(RECORDING):
        level, metric, operations = rule["record"].split(":")
        assert re.fullmatch(r"[a-z_]+", level), rule["record"]
        assert re.fullmatch(r"[a-z0-9_]+", operations), rule["record"]
        assert metric.startswith("applivery_"), rule["record"]
        # The metric part names an exporter family, or a ratio or subset derived from one.
        assert any(metric.startswith(name) or name.startswith(metric) for name in exporter) or (
            metric.startswith(
                (
                    "applivery_windows_command_action_",
                    "applivery_exporter_api_",
                    "applivery_exporter_targets_",
                )
            )
        ), rule["record"]


LEVEL_LABELS = ("instance", "job", "device", "status_class", "code", "le", "quantile")


def level_labels(record: str) -> set[str]:
    """Labels a recorded name's level promises besides the deployment's group labels (job,
    namespace) and organization."""
    level = record.split(":")[0]
    pattern = "|".join(LEVEL_LABELS)
    assert re.fullmatch(rf"(?:{pattern})(?:_(?:{pattern}))*", level), record
    return set(re.findall(pattern, level)) - {"job"}


def test_recording_rule_levels_are_per_instance_or_per_deployment() -> None:
    for rule in _rules(RECORDING):
        record, expr = rule["record"], " ".join(rule["expr"].split())
        level = record.split(":")[0]
        assert level.split("_")[0] in {"instance", "job"}, record
        level_labels(record)
        if level.startswith("job"):
            # Summed over instances by the deployment's labels, or derived from such series.
            assert "by (namespace, job" in expr or "instance" not in expr, record
            assert re.search(r"\bjob(?:_\w+)?:", expr) or "by (namespace, job" in expr, record


def test_every_rule_is_covered_by_promtool_unit_tests() -> None:
    tests = _unit_tests()
    tested_alerts: dict[str, Counter[bool]] = {}
    tested_exprs: set[str] = set()
    for test in tests:
        for case in test.get("alert_rule_test", []):
            tested_alerts.setdefault(case["alertname"], Counter())[bool(case["exp_alerts"])] += 1
        for case in test.get("promql_expr_test", []):
            tested_exprs |= metric_names(case["expr"])
    for alert in _alerts():
        cases = tested_alerts.get(alert["alert"], Counter())
        assert cases[True], f"{alert['alert']}: no firing case"
        assert cases[False], f"{alert['alert']}: no not-firing case"
    for record in recorded_names(RECORDING):
        assert record in tested_exprs, f"{record}: no promql_expr_test"


def test_alerts_that_read_recorded_series_come_with_them() -> None:
    recorded = recorded_names(RECORDING)
    for test_file in RULE_TESTS:
        document = yaml.safe_load(test_file.read_text())
        if "../alerts.yml" in document["rule_files"]:
            assert "../recording.yml" in document["rule_files"], test_file.name
    assert any(metric_names(a["expr"]) & recorded for a in _alerts())


# --- in a real Prometheus and Alertmanager -------------------------------------------------------

ACTIONS = {
    # (device, command, status, status_class): actions
    ("pc-1", "c1", "Acknowledged", "success"): 3,
    ("pc-1", "c1", "CommandNotFound", "error"): 2,
    ("pc-2", "c2", "Awaiting", "pending"): 4,
    ("pc-2", "c2", "Acknowledged", "success"): 1,
}
DEVICES_UP = {"pc-1": 1, "pc-2": 0}
# Per scrape: 4 successes and 1 error enter; one success answered after 20 s.
TRANSITIONS_PER_SCRAPE = {("Acknowledged", "success"): 4, ("CommandNotFound", "error"): 1}
LATENCY_PER_SCRAPE = 20.0
# Fleet views of a healthy fleet: one device of ten failed the rollout, a fifth of a setting's
# results are errors, both devices checked in a minute ago.
ROLLOUT_DEVICES = {"failed": 1, "pending": 2, "unknown": 0, "canceled": 0, "succeeded": 7}
SETTING_RESULTS_PER_SCRAPE = {"success": 4, "error": 1}
SETTING = "Policy/Config/Security/RequireDeviceEncryption"


class FakeExporter:
    """A few of the exporter's metric names rendered with prometheus_client. Each scrape
    moves the counters on, as poll rounds would between scrapes."""

    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry()
        org = ["organization"]
        actions = Gauge(
            "applivery_windows_command_actions",
            "actions",
            [*org, "device", "command", "status", "status_class"],
            registry=registry,
        )
        for labels, count in ACTIONS.items():
            actions.labels("acme", *labels).set(count)
        up = Gauge("applivery_exporter_target_up", "up", [*org, "device"], registry=registry)
        for device, value in DEVICES_UP.items():
            up.labels("acme", device).set(value)
        self.last_success = Gauge(
            "applivery_exporter_last_success_timestamp_seconds",
            "last",
            [*org, "device"],
            registry=registry,
        )
        self.transitions = CounterMetric(
            "applivery_windows_command_action_transitions",
            "transitions",
            [*org, "status", "status_class"],
            registry=registry,
        )
        self.latency = Histogram(
            "applivery_windows_command_ack_latency_seconds",
            "latency",
            [*org, "status_class"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.requests = CounterMetric(
            "applivery_exporter_api_requests",
            "requests",
            ["api_endpoint", "code"],
            registry=registry,
        )
        budget = Gauge("applivery_exporter_api_budget_requests_per_hour", "b", registry=registry)
        budget.set(9000)
        rollout = Gauge(
            "applivery_windows_rollout_devices",
            "rollout devices",
            [*org, "rollout", "state"],
            registry=registry,
        )
        for state, count in ROLLOUT_DEVICES.items():
            rollout.labels("acme", "Enforce BitLocker", state).set(count)
        self.setting_results = CounterMetric(
            "applivery_windows_setting_results",
            "setting results",
            [*org, "setting", "operation", "status_class"],
            registry=registry,
        )
        self.last_check_in = Gauge(
            "applivery_windows_device_last_check_in_timestamp_seconds",
            "check-in",
            [*org, "device"],
            registry=registry,
        )
        devices = Gauge("applivery_windows_devices", "devices", [*org, "state"], registry=registry)
        devices.labels("acme", "ACTIVE").set(len(DEVICES_UP))
        Gauge("applivery_exporter_build_info", "build", ["version"], registry=registry).labels(
            "0.1.0"
        ).set(1)

    def _advance(self) -> None:
        for (status, status_class), count in TRANSITIONS_PER_SCRAPE.items():
            self.transitions.labels("acme", status, status_class).inc(count)
        self.latency.labels("acme", "success").observe(LATENCY_PER_SCRAPE)
        self.requests.labels("commands", "200").inc(2)
        self.last_success.labels("acme", "pc-1").set(time.time())
        for status_class, count in SETTING_RESULTS_PER_SCRAPE.items():
            self.setting_results.labels("acme", SETTING, "Replace", status_class).inc(count)
        for device in DEVICES_UP:
            self.last_check_in.labels("acme", device).set(time.time() - 60)

    async def metrics(self, request: web.Request) -> web.Response:
        self._advance()
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    def app(self) -> web.Application:
        application = web.Application()
        application.router.add_get("/metrics", self.metrics)
        return application


def _by(result: list[dict[str, Any]], label: str) -> dict[str, float]:
    return {series["metric"][label]: float(series["value"][1]) for series in result}


async def test_rules_run_in_prometheus_and_alerts_reach_the_webhook(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    """The project's recording rules and its alerts (without their ``for``) in a real
    Prometheus scraping a fake exporter; one device of two down must reach the webhook."""
    sink = AlertSink()
    sink_server = await aiohttp_server(sink.app())
    exporter_server = await aiohttp_server(FakeExporter().app())
    alerts = immediate_alerts(ALERTS, tmp_path)
    webhook = f"http://127.0.0.1:{sink_server.port}{sink.path}"
    target = ScrapeTarget(f"127.0.0.1:{exporter_server.port}")

    async with (
        running_alertmanager(webhook) as alertmanager,
        running_prometheus(
            [target], rule_files=[RECORDING, alerts], alertmanager=alertmanager.address
        ) as prometheus,
    ):
        targets = await eventually(
            lambda: _healthy_targets(prometheus), what="the fake exporter scraped"
        )
        assert targets[0]["labels"]["job"] == JOB

        expected_classes: Counter[str] = Counter()
        for (_, _, _, status_class), count in ACTIONS.items():
            expected_classes[status_class] += count
        per_class = await eventually(
            lambda: _query_by(
                prometheus,
                "instance_status_class:applivery_windows_command_actions:sum",
                "status_class",
            ),
            what="per-class action counts recorded",
        )
        assert per_class == {k: float(v) for k, v in expected_classes.items()}

        errors = TRANSITIONS_PER_SCRAPE[("CommandNotFound", "error")]
        ratio = await eventually(
            lambda: prometheus.query(
                "job:applivery_windows_command_action_errors_per_final:ratio_rate5m"
            ),
            what="error ratio recorded",
        )
        assert float(ratio[0]["value"][1]) == pytest.approx(
            errors / sum(TRANSITIONS_PER_SCRAPE.values())
        )

        # Every observation falls in the (15, 30] bucket: the median interpolates to 22.5.
        median = await eventually(
            lambda: prometheus.query(
                "instance_quantile:applivery_windows_command_ack_latency_seconds:"
                'histogram_quantile_rate1h{quantile="0.5"}'
            ),
            what="latency median recorded",
        )
        assert float(median[0]["value"][1]) == pytest.approx(15 + (30 - 15) * 0.5)

        now = time.time()
        history = await prometheus.query_range(f'up{{job="{JOB}"}}', now - 30, now, 1)
        assert history and len(history[0]["values"]) >= 2

        notified = await eventually(
            lambda: _firing_in(sink, "AppliveryDeviceTargetsDown"),
            what="AppliveryDeviceTargetsDown delivered to the webhook",
        )
        (alert,) = notified  # one alert for the deployment, not one per device
        assert alert["labels"]["organization"] == "acme"
        assert "device" not in alert["labels"] and "instance" not in alert["labels"]
        assert "(now 50%)" in alert["annotations"]["description"]
        assert alert["annotations"]["runbook_url"].endswith("#appliverydevicetargetsdown")
        assert alert["labels"]["severity"] == "warning"

        # With healthy data nothing else fires, even with every `for` removed.
        firing = [a for a in await prometheus.alerts() if a["state"] == "firing"]
        assert {a["labels"]["alertname"] for a in firing} == {"AppliveryDeviceTargetsDown"}
        assert any(
            a["labels"]["alertname"] == "AppliveryDeviceTargetsDown"
            for a in await alertmanager.alerts()
        )

        # Each recorded series carries exactly the labels its level names (plus job and,
        # for command data, organization).
        for record in sorted(recorded_names(RECORDING)):
            result = await eventually(lambda r=record: prometheus.query(r), what=record)
            for series in result:
                labels = set(series["metric"]) - {"__name__", "job", "organization"}
                assert labels == level_labels(record), (record, series["metric"])

        # Every rule evaluated without error against real series.
        unhealthy = [
            (rule["name"], rule.get("lastError"))
            for group in await prometheus.rules()
            for rule in group["rules"]
            if rule["health"] != "ok"
        ]
        assert unhealthy == []

    # Torn down: both processes gone, their temporary directories removed.
    for stopped in (prometheus, alertmanager):
        assert stopped.process.exited
        assert not stopped.directory.exists()


async def _healthy_targets(prometheus: Any) -> list[dict[str, Any]]:
    targets = await prometheus.targets()
    return [t for t in targets if t["health"] == "up"]


async def _query_by(prometheus: Any, expr: str, label: str) -> dict[str, float]:
    return _by(await prometheus.query(expr), label)


async def _firing_in(sink: AlertSink, name: str) -> list[dict[str, Any]]:
    return [a for a in sink.alerts("firing") if a["labels"]["alertname"] == name]


async def test_harness_reports_why_prometheus_could_not_start(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(
        yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "a:b:c", "expr": "sum("}]}]})
    )
    with pytest.raises(RuntimeError, match="prometheus exited at start"):
        async with running_prometheus(rule_files=[broken]):
            pytest.fail("a Prometheus with a broken rule file must not become ready")
