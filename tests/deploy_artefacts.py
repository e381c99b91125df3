"""What the deployment tests read: the Dockerfile's instructions, the kustomize tree rendered
(by kubectl, or by a small renderer of the same subset), and the systemd unit's settings."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter import __version__

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
KUBE = ROOT / "deploy" / "kubernetes"
BASE = KUBE / "base"
SHARDED = KUBE / "overlays" / "sharded"
EXAMPLE = KUBE / "overlays" / "example"
COMPONENTS = KUBE / "components"
OPERATOR = COMPONENTS / "prometheus-operator"
RULE_MANIFEST = OPERATOR / "prometheusrule.yaml"
GRAFANA_DASHBOARD = COMPONENTS / "grafana-dashboard"
DASHBOARD_MANIFEST = GRAFANA_DASHBOARD / "configmap.yaml"
DASHBOARD_FILE = ROOT / "grafana" / "dashboards" / "applivery-mdm-exporter.json"
DASHBOARD_CONFIG_MAP = "applivery-mdm-exporter-dashboard"
# The Secret the workload mounts; the user creates it (docs/deploy.md), the base ships none.
TOKEN_SECRET, TOKEN_KEY = "applivery-mdm-exporter-token", "token"
SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "applivery-mdm-exporter.service"
PERSISTENCE = COMPONENTS / "persistence"
RULE_FILES = (ROOT / "prometheus" / "recording.yml", ROOT / "prometheus" / "alerts.yml")
IN_CI = bool(os.environ.get("CI"))

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
VERSION: str = __version__  # the single source; pyproject reads it (tests/test_packaging.py)
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]

# The exporter's own endpoints (design: HTTP endpoints); probes must use these.
HEALTHY, READY = "/-/healthy", "/-/ready"
EXPORTER_PORT = 10190
# Where every artefact keeps the durable state (--storage.path): the image's volume, the
# pods' mount, the unit's StateDirectory.
STATE_PATH = "/var/lib/applivery-mdm-exporter"


def require_tool(name: str) -> str:
    """The tool's path; skipped when missing on a workstation, a failure in CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed"
        if IN_CI:
            pytest.fail(f"{message}, and CI must run this check")
        pytest.skip(message)
    return path



# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instruction:
    stage: int
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and parser directives dropped."""
    instructions: list[Instruction] = []
    stage, pending = -1, ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        keyword = keyword.upper()
        stage += keyword == "FROM"
        instructions.append(Instruction(stage, keyword, " ".join(args.split())))
    return instructions


INSTRUCTIONS = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
FINAL_STAGE = max(i.stage for i in INSTRUCTIONS)


def final(keyword: str) -> list[Instruction]:
    return [i for i in INSTRUCTIONS if i.stage == FINAL_STAGE and i.keyword == keyword]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env_of_final_stage() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in final("ENV"):
        for word in shlex.split(instruction.args):
            key, sep, value = word.partition("=")
            assert sep, f"ENV without '=' is ambiguous: {instruction.args}"
            env[key] = value
    return env


def split_flags(args: str) -> tuple[dict[str, str], list[str]]:
    """`--flag=value` options, then the remaining words."""
    words = shlex.split(args)
    flags: dict[str, str] = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    return flags, words


def listen_port(args: list[str]) -> int:
    (address,) = [a.split("=", 1)[1] for a in args if a.startswith("--web.listen-address=")]
    return int(address.rsplit(":", 1)[1])


# ---------------------------------------------------------------------------------------------
# Kubernetes: rendering
# ---------------------------------------------------------------------------------------------

KUSTOMIZE_FIELDS = {
    "apiVersion", "kind", "namespace", "resources", "components", "patches", "images",
}
CLUSTER_SCOPED = {"Namespace"}


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def kustomization(directory: Path) -> dict[str, Any]:
    return yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))


def merge(target: Any, patch: Any) -> Any:
    """Strategic merge for what these manifests use: maps merge (a null removes the key), lists
    of named maps merge by name, other values are replaced."""
    if isinstance(target, dict) and isinstance(patch, dict):
        merged = dict(target)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = merge(target[key], value) if key in target else value
        return merged
    named = isinstance(target, list) and isinstance(patch, list) and all(
        isinstance(item, dict) and "name" in item for item in [*target, *patch]
    )
    if named:
        # kustomize puts the patch's items first, in its order, then the others in theirs.
        by_name = {item["name"]: item for item in target}
        patched = [merge(by_name.pop(item["name"], {}), item) for item in patch]
        return patched + list(by_name.values())
    return patch


def identity(document: dict[str, Any]) -> tuple[str, str]:
    return document["kind"], document["metadata"]["name"]


def render_in_python(directory: Path) -> list[dict[str, Any]]:
    """The subset of kustomize these manifests use; anything else fails instead of guessing."""
    spec = kustomization(directory)
    assert spec["kind"] == "Kustomization", f"{directory}: a {spec['kind']} is not buildable"
    return build_in_python(directory, spec, [])


def build_in_python(
    directory: Path, spec: dict[str, Any], accumulated: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """kustomize's order: the resources add to what was accumulated, each component then
    works on all of it (its resources added, its transformers applied to everything so far),
    and this kustomization's own transformers come last."""
    unsupported = set(spec) - KUSTOMIZE_FIELDS
    assert not unsupported, f"the fallback renderer does not know {unsupported}"
    documents = list(accumulated)
    for entry in spec.get("resources", []):
        path = directory / entry
        documents += render_in_python(path) if path.is_dir() else load_documents(path)
    for entry in spec.get("components", []):
        component = kustomization(directory / entry)
        assert component["kind"] == "Component", f"{directory / entry} is not a Component"
        documents = build_in_python(directory / entry, component, documents)
    for entry in spec.get("patches", []):
        assert set(entry) == {"path"}, f"only file patches are supported: {entry}"
        (patch,) = load_documents(directory / entry["path"])
        index = [identity(d) for d in documents].index(identity(patch))
        if patch.get("$patch") == "delete":
            del documents[index]
        else:
            documents[index] = merge(documents[index], patch)
    for image in spec.get("images", []):
        for container in containers_of(documents):
            if container["image"].partition(":")[0] == image["name"]:
                name = image.get("newName", image["name"])
                container["image"] = f"{name}:{image['newTag']}"
    if "namespace" in spec:
        for document in documents:
            if document["kind"] not in CLUSTER_SCOPED:
                document["metadata"]["namespace"] = spec["namespace"]
    return documents


def render_with_kubectl(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@cache
def _rendered(directory: Path) -> list[dict[str, Any]]:
    if shutil.which("kubectl"):
        return render_with_kubectl(directory)
    return render_in_python(directory)


def rendered(directory: Path) -> list[dict[str, Any]]:
    return deepcopy(_rendered(directory))


def one(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (document,) = [d for d in documents if d["kind"] == kind]
    return document


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers_of(documents: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for document in documents:
        if document["kind"] in {"Deployment", "StatefulSet"}:
            spec = pod_spec(document)
            yield from spec.get("initContainers", [])
            yield from spec["containers"]


def workload(directory: Path) -> dict[str, Any]:
    (found,) = [d for d in rendered(directory) if d["kind"] in {"Deployment", "StatefulSet"}]
    return found


def exporter_container(document: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec(document)["containers"]
    return container


def flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return value


OVERLAYS = [
    pytest.param(BASE, id="base"),
    pytest.param(SHARDED, id="sharded"),
    pytest.param(EXAMPLE, id="example"),
]

# components/persistence swaps the Deployment's volume: the StatefulSet has claims of its own.
SHARDED_COMPONENTS = [p for p in sorted(COMPONENTS.iterdir()) if p != PERSISTENCE]


def sharded_with_components(directory: Path) -> Path:
    """A user's overlay: the sharded one with the components that apply to it (kustomize
    needs relative paths). The one overlay that uses every other component."""
    def relative(path: Path) -> str:
        return os.path.relpath(path, directory)

    spec = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [relative(SHARDED)],
        "components": [relative(p) for p in SHARDED_COMPONENTS],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    return directory

OPERATOR_GROUP = "monitoring.coreos.com"
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}
# What the optional components add; components/persistence also swaps a volume of the base.
COMPONENT_KINDS = {*CUSTOM_KINDS, "NetworkPolicy", "PersistentVolumeClaim"}


def api_group(document: dict[str, Any]) -> str:
    return document["apiVersion"].rpartition("/")[0]

# ---------------------------------------------------------------------------------------------
# systemd
# ---------------------------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections of key -> every value given (systemd allows repeats), continuations joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(" ".join(value.split()))
    return sections


UNIT_TEXT = UNIT.read_text(encoding="utf-8")
SERVICE = parse_unit(UNIT_TEXT)["Service"]


def setting(key: str) -> str:
    (value,) = SERVICE[key]
    return value



def env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = " ".join(shlex.split(value))
    return pairs
