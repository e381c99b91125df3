"""The Kubernetes manifests against their schemas: every built-in kind against Kubernetes'
own (kubernetes-validate), the Prometheus operator's kinds against the parts of its CRDs they
use, the PrometheusRule against the project's rule files (promtool loads it), and the
dashboard's ConfigMap against the dashboard file (deploy/kubernetes/generate.py writes both).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_artefacts import (
    CUSTOM_KINDS,
    DASHBOARD_FILE,
    DASHBOARD_MANIFEST,
    EXAMPLE,
    IN_CI,
    KUBE,
    OVERLAYS,
    ROOT,
    RULE_FILES,
    RULE_MANIFEST,
    identity,
    one,
    rendered,
    require_tool,
    sharded_with_components,
)
from scripts import load_script

# ---------------------------------------------------------------------------------------------
# Kubernetes: schemas
# ---------------------------------------------------------------------------------------------

OLDEST_KUBERNETES = "1.28"  # the apps.kubernetes.io/pod-index label needs 1.28
# The shipped overlays, and the one that uses the components the example leaves out.
VALIDATED = [*OVERLAYS, pytest.param(None, id="sharded+components")]

# The parts of the Prometheus operator's CRDs that these manifests use, closed to typos.
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                   "labels": _LABELS, "annotations": _LABELS},
    "additionalProperties": False,
}
_DURATION = {"type": "string", "pattern": r"^(\d+(ms|s|m|h|d|w|y))+$"}


def _custom_resource(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
        "additionalProperties": False,
    }


CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": _custom_resource("ServiceMonitor", {
        "type": "object",
        "required": ["selector", "endpoints"],
        "additionalProperties": False,
        "properties": {
            "jobLabel": {"type": "string"},
            "selector": {
                "type": "object",
                "properties": {"matchLabels": _LABELS},
                "required": ["matchLabels"],
                "additionalProperties": False,
            },
            "namespaceSelector": {"type": "object"},
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["port"],
                    "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"},
                        "path": {"type": "string", "pattern": "^/"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": _DURATION,
                        "scrapeTimeout": _DURATION,
                        "honorLabels": {"type": "boolean"},
                    },
                },
            },
        },
    }),
    "PrometheusRule": _custom_resource("PrometheusRule", {
        "type": "object",
        "required": ["groups"],
        "additionalProperties": False,
        "properties": {
            "groups": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["name", "rules"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": _DURATION,
                        "rules": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["expr"],
                                "oneOf": [{"required": ["record"]},
                                          {"required": ["alert"]}],
                                "properties": {
                                    "record": {"type": "string"},
                                    "alert": {"type": "string"},
                                    "expr": {"type": ["string", "integer"]},
                                    "for": _DURATION,
                                    "keep_firing_for": _DURATION,
                                    "labels": _LABELS,
                                    "annotations": _LABELS,
                                },
                                "additionalProperties": False,
                            },
                        },
                    },
                    "additionalProperties": False,
                },
            },
        },
    }),
}


@pytest.mark.parametrize("directory", VALIDATED)
@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, "latest"])
def test_manifests_validate_against_kubernetes_schemas(
    directory: Path | None, version: str, tmp_path: Path
) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        if IN_CI:
            pytest.fail("kubernetes-validate is not installed, and CI must run this check")
        pytest.skip("kubernetes-validate is not installed")
    if version == "latest":
        version = kubernetes_validate.utils.latest_version()
    directory = directory or sharded_with_components(tmp_path)
    builtin = [d for d in rendered(directory) if d["kind"] not in CUSTOM_KINDS]
    assert builtin
    for document in builtin:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(map(str, exc.path))
            pytest.fail(f"{identity(document)} at {where}: {exc.message}")


@pytest.mark.parametrize("directory", VALIDATED)
def test_rendered_output_passes_the_kubernetes_validate_cli(
    directory: Path | None, tmp_path: Path
) -> None:
    """`kubectl kustomize DIR | kubernetes-validate --strict`, as a user would check it: every
    built-in kind passes, and the only kinds without a schema are the operator's (checked
    against CRD_SCHEMAS below)."""
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        if IN_CI:
            pytest.fail("kubernetes-validate is not installed, and CI must run this check")
        pytest.skip("kubernetes-validate is not installed")
    documents = rendered(directory or sharded_with_components(tmp_path))
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(documents), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet",
         "--kubernetes-version", OLDEST_KUBERNETES, str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    unknown = set(re.findall(r"Couldn't find schema for kind (\w+)", output))
    assert unknown == {d["kind"] for d in documents if d["kind"] in CUSTOM_KINDS}, output


@pytest.mark.parametrize("directory", [EXAMPLE], ids=["example"])
def test_custom_resources_are_structurally_sound(directory: Path) -> None:
    import jsonschema

    documents = rendered(directory)
    custom = [d for d in documents if d["kind"] in CUSTOM_KINDS]
    assert {d["kind"] for d in custom} == CUSTOM_KINDS
    for document in custom:
        jsonschema.validate(document, CRD_SCHEMAS[document["kind"]])


def test_crd_schemas_reject_what_the_operator_would() -> None:
    import jsonschema

    monitor = one(rendered(EXAMPLE), "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, CRD_SCHEMAS["ServiceMonitor"])
    rule = one(rendered(EXAMPLE), "PrometheusRule")
    rule["spec"]["groups"][0]["rules"][0] = {"record": "a", "alert": "b", "expr": "1"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rule, CRD_SCHEMAS["PrometheusRule"])


def test_service_monitor_scrapes_the_metrics_port_of_the_service() -> None:
    documents = rendered(EXAMPLE)
    monitor, service = one(documents, "ServiceMonitor"), one(documents, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}


def test_alert_rules_select_the_job_the_service_monitor_produces() -> None:
    documents = rendered(EXAMPLE)
    monitor, service = one(documents, "ServiceMonitor"), one(documents, "Service")
    job_label = monitor["spec"].get("jobLabel")
    # The operator names the job after the Service, or after the value of its jobLabel label.
    job = service["metadata"]["labels"][job_label] if job_label else service["metadata"]["name"]
    exprs = [
        str(rule["expr"])
        for group in one(documents, "PrometheusRule")["spec"]["groups"]
        for rule in group["rules"]
    ]
    selected = set(re.findall(r'job\s*=~?\s*"([^"]*)"', " ".join(exprs)))
    assert selected <= {job}


# ---------------------------------------------------------------------------------------------
# Kubernetes: the PrometheusRule carries the project's rule files
# ---------------------------------------------------------------------------------------------


def load_generator() -> Any:
    return load_script(KUBE / "generate.py", "deploy_generate")


def test_prometheus_rule_is_generated_from_the_rule_files() -> None:
    missing = [str(p.relative_to(ROOT)) for p in RULE_FILES if not p.exists()]
    if missing:
        pytest.skip(f"rule files not written yet: {', '.join(missing)}")
    generator = load_generator()
    assert generator.RULE_OUTPUT == RULE_MANIFEST
    committed = RULE_MANIFEST.read_text(encoding="utf-8")
    assert committed == generator.render_rules(generator.load_groups()), (
        f"{RULE_MANIFEST.relative_to(ROOT)} is stale: run python3 deploy/kubernetes/generate.py"
    )
    groups = one(rendered(EXAMPLE), "PrometheusRule")["spec"]["groups"]
    expected = [g for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"]]
    assert groups == expected


def test_prometheus_rule_groups_load_in_promtool(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    rules = tmp_path / "rules.yml"
    spec = one(rendered(EXAMPLE), "PrometheusRule")["spec"]
    rules.write_text(yaml.safe_dump({"groups": spec["groups"]}), encoding="utf-8")
    result = subprocess.run(
        [promtool, "check", "rules", str(rules)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generator_refuses_duplicate_group_names(tmp_path: Path) -> None:
    generator = load_generator()
    first, second = tmp_path / "a.yml", tmp_path / "b.yml"
    first.write_text("groups: [{name: g, rules: []}]\n", encoding="utf-8")
    second.write_text("groups: [{name: g, rules: []}]\n", encoding="utf-8")
    with pytest.raises(ValueError, match="duplicate"):
        generator.load_groups([first, second])


# ---------------------------------------------------------------------------------------------
# Kubernetes: the dashboard's ConfigMap carries the dashboard file
# ---------------------------------------------------------------------------------------------


def test_dashboard_config_map_is_generated_from_the_dashboard_file() -> None:
    generator = load_generator()
    assert (generator.DASHBOARD, generator.DASHBOARD_OUTPUT) == (DASHBOARD_FILE, DASHBOARD_MANIFEST)
    committed = DASHBOARD_MANIFEST.read_text(encoding="utf-8")
    expected = generator.render_dashboard(DASHBOARD_FILE.read_text(encoding="utf-8"))
    stale = f"{DASHBOARD_MANIFEST.relative_to(ROOT)} is stale"
    assert committed == expected, f"{stale}: run python3 deploy/kubernetes/generate.py"
    assert committed.startswith("# Generated by deploy/kubernetes/generate.py")
    # A literal block: the JSON reads, and diffs, line by line in the manifest.
    assert f"  {DASHBOARD_FILE.name}: |\n" in committed


def run_generator(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script), *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_check_fails_when_the_dashboard_changes_without_regenerating(tmp_path: Path) -> None:
    """On a copy of the sources and the manifests: a rebuilt dashboard makes --check fail,
    naming the ConfigMap only, until the generator has run."""
    sources = [KUBE / "generate.py", *RULE_FILES, DASHBOARD_FILE, RULE_MANIFEST, DASHBOARD_MANIFEST]
    for source in sources:
        copy = tmp_path / source.relative_to(ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, copy)
    script = tmp_path / (KUBE / "generate.py").relative_to(ROOT)
    dashboard = tmp_path / DASHBOARD_FILE.relative_to(ROOT)
    manifest = tmp_path / DASHBOARD_MANIFEST.relative_to(ROOT)
    assert run_generator(script, "--check").returncode == 0

    edited = json.loads(dashboard.read_text(encoding="utf-8"))
    edited["title"] += " (edited)"
    text = json.dumps(edited, indent=2) + "\n"
    dashboard.write_text(text, encoding="utf-8")
    result = run_generator(script, "--check")
    assert result.returncode == 1
    stale = re.findall(r"^(\S+) is stale", result.stderr, flags=re.MULTILINE)
    assert stale == [str(DASHBOARD_MANIFEST.relative_to(ROOT))], result.stderr

    assert run_generator(script).returncode == 0
    assert run_generator(script, "--check").returncode == 0
    name = DASHBOARD_FILE.name
    assert yaml.safe_load(manifest.read_text(encoding="utf-8"))["data"] == {name: text}


def test_generator_refuses_a_dashboard_without_uid() -> None:
    generator = load_generator()
    with pytest.raises(ValueError, match="uid"):
        generator.render_dashboard('{"title": "no uid"}\n')
