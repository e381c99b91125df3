"""Deployment artefacts: the Dockerfile, the Kubernetes manifests and the systemd unit.

No container engine or cluster runs here, so each artefact is checked with what does run: the
Dockerfile by hadolint and by reading it (sources, user, health check), the manifests by the
Kubernetes JSON schemas, kustomize (or a small renderer of the same subset), promtool and
structural checks, the unit by systemd-analyze. Where an artefact hands arguments, a config or
a health probe to the exporter, the real exporter answers.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml
from scripts import load_script

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
# The Secret the workload mounts; the user creates it (docs/deploy.md), the base ships none.
TOKEN_SECRET, TOKEN_KEY = "applivery-mdm-exporter-token", "token"
SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "applivery-mdm-exporter.service"
RULE_FILES = (ROOT / "prometheus" / "recording.yml", ROOT / "prometheus" / "alerts.yml")
IN_CI = bool(os.environ.get("CI"))

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
VERSION: str = __version__  # the single source; pyproject reads it (tests/test_packaging.py)
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]

# The exporter's own endpoints (design: HTTP endpoints); probes must use these.
HEALTHY, READY = "/-/healthy", "/-/ready"
EXPORTER_PORT = 10190


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


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip().lstrip("/"))
        rules.append((negated, re.compile(glob_regex(pattern))))
    return rules


def glob_regex(pattern: str) -> str:
    """Docker's .dockerignore syntax: Go's filepath.Match plus `**` for any depth."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            body = pattern[i + 1 : end]
            out += "[" + ("^" + body[1:] if body.startswith(("!", "^")) else body) + "]"
            i = end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def excluded_from_context(path: str) -> bool:
    """Whether `docker build` leaves this path out: the last rule matching it or a parent wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(len(parts), 0, -1)]
    result = False
    for negated, regex in dockerignore_rules():
        if any(regex.fullmatch(candidate) for candidate in candidates):
            result = not negated
    return result


def context_files(source: str) -> list[str]:
    path = ROOT / source
    if path.is_file():
        return [source.rstrip("/")]
    return sorted(
        str(p.relative_to(ROOT))
        for p in path.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )


def test_dockerignore_keeps_bytecode_and_unlisted_files_out_of_the_context() -> None:
    assert excluded_from_context("exporter/__pycache__/cli.cpython-312.pyc")
    assert excluded_from_context("tests/test_deploy.py")
    assert excluded_from_context(".git/HEAD")
    assert not excluded_from_context("exporter/cli.py")


def test_every_copy_source_exists_in_the_build_context() -> None:
    copies = [i for i in INSTRUCTIONS if i.keyword in {"COPY", "ADD"}]
    assert copies, "the build stage copies the project in"
    copied: set[str] = set()
    for instruction in copies:
        flags, words = split_flags(instruction.args)
        if "from" in flags:
            continue
        for source in words[:-1]:
            files = context_files(source)
            assert files, f"COPY source {source!r} does not exist"
            dropped = [f for f in files if excluded_from_context(f)]
            assert not dropped, f"COPY {source}: .dockerignore leaves out {dropped}"
            copied.add(source.rstrip("/"))
    # The package build reads the readme and the package directories named in pyproject.
    assert PYPROJECT["project"]["readme"] in copied
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied


def test_entrypoint_is_the_exporter_console_script() -> None:
    (entrypoint,) = final("ENTRYPOINT")
    command = exec_form(entrypoint.args)
    assert command == ["applivery-mdm-exporter"]
    assert command[0] in SCRIPTS
    assert SCRIPTS[command[0]] == "exporter.cli:main"
    (cmd,) = final("CMD")
    assert "--config.file=/etc/applivery-mdm-exporter/config.yaml" in exec_form(cmd.args)


def listen_port(args: list[str]) -> int:
    (address,) = [a.split("=", 1)[1] for a in args if a.startswith("--web.listen-address=")]
    return int(address.rsplit(":", 1)[1])


def test_healthcheck_asks_the_healthy_endpoint_on_the_exposed_port() -> None:
    (healthcheck,) = final("HEALTHCHECK")
    _, words = split_flags(healthcheck.args)
    assert words[0] == "CMD"
    command = exec_form(healthcheck.args.split("CMD", 1)[1].strip())
    assert command[:2] == ["python3", "-c"], "the image has no curl: use Python's urllib"
    assert "urllib.request" in command[2]
    url = urlsplit(env_of_final_stage()["HEALTHCHECK_URL"])
    (expose,) = final("EXPOSE")
    (cmd,) = final("CMD")
    assert url.path == HEALTHY
    assert url.port == int(expose.args) == listen_port(exec_form(cmd.args)) == EXPORTER_PORT


def test_runtime_stage_runs_as_a_numeric_non_root_user() -> None:
    (user,) = final("USER")
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit() and gid.isdigit(), "numeric, so runAsNonRoot can verify it"
    assert int(uid) > 0 and int(gid) > 0
    assert env_of_final_stage()["PYTHONDONTWRITEBYTECODE"] == "1"


def test_runtime_stage_installs_prebuilt_wheels_without_compilers() -> None:
    build_runs = " ".join(i.args for i in INSTRUCTIONS if i.stage < FINAL_STAGE)
    assert "pip wheel" in build_runs
    runs = " ".join(i.args for i in final("RUN"))
    assert "pip install" in runs and "--no-index" in runs
    for compiler in ("gcc", "build-essential", "clang", "apt-get install"):
        assert compiler not in runs
    assert not final("COPY") or all("--from" in i.args for i in final("COPY"))


def test_base_images_are_pinned_to_a_patch_release() -> None:
    images = [i.args.split()[0] for i in INSTRUCTIONS if i.keyword == "FROM"]
    assert len(images) >= 2, "multi-stage: build and runtime"
    # Wheels built for one Python (cp312, say) install only into the same Python.
    assert len(set(images)) == 1, "build and runtime stages share one base image"
    for image in images:
        name, _, tag = image.partition(":")
        assert name == "python" and re.fullmatch(r"3\.1[1-9]\.\d+-slim-[a-z]+", tag), image


def test_image_labels_follow_oci_and_carry_the_package_version() -> None:
    labels: dict[str, str] = {}
    for instruction in final("LABEL"):
        for word in shlex.split(instruction.args):
            key, _, value = word.partition("=")
            labels[key] = value
    for key in ("title", "description", "version", "licenses"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    (arg,) = [i for i in final("ARG") if i.args.startswith("VERSION=")]
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert arg.args == f"VERSION={VERSION}"
    license_ = PYPROJECT["project"]["license"]
    assert labels["org.opencontainers.image.licenses"] == (
        license_["text"] if isinstance(license_, dict) else license_
    )
    (base,) = {i.args.split()[0] for i in INSTRUCTIONS if i.keyword == "FROM"}
    assert labels["org.opencontainers.image.base.name"] == base


def run_hadolint(source: str) -> subprocess.CompletedProcess[str]:
    hadolint = require_tool("hadolint")
    return subprocess.run(
        [hadolint, "--config", str(ROOT / ".hadolint.yaml"), "--no-color", "-"],
        input=source, capture_output=True, text=True, timeout=60, check=False,
    )


def test_hadolint_reports_nothing_at_warning_level() -> None:
    result = run_hadolint(DOCKERFILE.read_text(encoding="utf-8"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_config_fails_on_warnings() -> None:
    result = run_hadolint("FROM python:latest\nRUN pip install aiohttp\n")
    assert result.returncode != 0
    assert "DL3007" in result.stdout


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
    """Strategic merge for what these manifests use: maps merge, lists of named maps merge
    by name, other values are replaced."""
    if isinstance(target, dict) and isinstance(patch, dict):
        merged = dict(target)
        for key, value in patch.items():
            merged[key] = merge(target[key], value) if key in target else value
        return merged
    named = isinstance(target, list) and isinstance(patch, list) and all(
        isinstance(item, dict) and "name" in item for item in [*target, *patch]
    )
    if named:
        by_name = {item["name"]: item for item in target}
        for item in patch:
            by_name[item["name"]] = merge(by_name.get(item["name"], {}), item)
        return list(by_name.values())
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
KUSTOMIZATIONS = sorted(KUBE.glob("**/kustomization.yaml"))


def listed_paths(spec: dict[str, Any]) -> list[str]:
    return [*spec.get("resources", []), *spec.get("components", []),
            *(p["path"] for p in spec.get("patches", []))]


def test_every_path_a_kustomization_lists_exists() -> None:
    assert KUSTOMIZATIONS
    for path in KUSTOMIZATIONS:
        for entry in listed_paths(kustomization(path.parent)):
            assert (path.parent / entry).exists(), f"{path}: {entry} does not exist"


def test_every_manifest_file_is_used_by_a_kustomization() -> None:
    used: set[Path] = set()
    for path in KUSTOMIZATIONS:
        listed = listed_paths(kustomization(path.parent))
        used |= {(path.parent / entry).resolve() for entry in listed}
    manifests = {p.resolve() for p in KUBE.glob("**/*.yaml") if p.name != "kustomization.yaml"}
    assert manifests - used == set()


@pytest.mark.parametrize("directory", [*OVERLAYS, pytest.param(None, id="sharded+components")])
def test_python_renderer_agrees_with_kustomize(directory: Path | None, tmp_path: Path) -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    directory = directory or sharded_with_components(tmp_path)
    ours = sorted(render_in_python(directory), key=identity)
    theirs = sorted(render_with_kubectl(directory), key=identity)
    assert ours == theirs


# ---------------------------------------------------------------------------------------------
# Kubernetes: a plain base, optional components
# ---------------------------------------------------------------------------------------------

OPERATOR_GROUP = "monitoring.coreos.com"
COMPONENT_KINDS = {"ServiceMonitor", "PrometheusRule", "NetworkPolicy"}


def api_group(document: dict[str, Any]) -> str:
    return document["apiVersion"].rpartition("/")[0]


def sharded_with_components(directory: Path) -> Path:
    """A user's overlay: the sharded one with both components (kustomize needs relative
    paths)."""
    def relative(path: Path) -> str:
        return os.path.relpath(path, directory)

    spec = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [relative(SHARDED)],
        "components": [relative(p) for p in sorted(COMPONENTS.iterdir())],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    return directory


@pytest.mark.parametrize("directory", [BASE, SHARDED], ids=["base", "sharded"])
def test_base_and_sharded_are_plain_kubernetes(directory: Path) -> None:
    documents = rendered(directory)
    assert not [identity(d) for d in documents if api_group(d) == OPERATOR_GROUP], (
        "the Prometheus operator's kinds belong in components/prometheus-operator"
    )
    assert not [identity(d) for d in documents if d["kind"] in COMPONENT_KINDS | {"Secret"}]
    assert all(api_group(d) in {"", "apps"} for d in documents), "core and apps kinds only"


def test_components_are_kustomize_components() -> None:
    directories = sorted(p for p in COMPONENTS.iterdir() if p.is_dir())
    assert [p.name for p in directories] == ["networkpolicy", "prometheus-operator"]
    for directory in directories:
        spec = kustomization(directory)
        assert spec["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
        assert spec["kind"] == "Component"


def test_example_overlay_is_the_base_plus_the_components() -> None:
    base = {identity(d) for d in rendered(BASE)}
    example = rendered(EXAMPLE)
    added = {identity(d) for d in example} - base
    assert {kind for kind, _ in added} == COMPONENT_KINDS
    operator = {d["kind"] for d in example if api_group(d) == OPERATOR_GROUP}
    assert operator == CUSTOM_KINDS


def test_components_compose_with_the_sharded_overlay(tmp_path: Path) -> None:
    documents = rendered(sharded_with_components(tmp_path))
    assert {d["kind"] for d in documents} >= COMPONENT_KINDS | {"StatefulSet"}
    assert not [d for d in documents if d["kind"] == "Deployment"]


@pytest.mark.parametrize("directory", OVERLAYS)
def test_every_namespaced_resource_lives_in_the_shipped_namespace(directory: Path) -> None:
    documents = rendered(directory)
    namespace = one(documents, "Namespace")["metadata"]["name"]
    for document in documents:
        if document["kind"] not in CLUSTER_SCOPED:
            assert document["metadata"].get("namespace") == namespace, identity(document)


# ---------------------------------------------------------------------------------------------
# Kubernetes: schemas
# ---------------------------------------------------------------------------------------------

OLDEST_KUBERNETES = "1.28"  # the apps.kubernetes.io/pod-index label needs 1.28
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}

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
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": _METADATA,
            "spec": {
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
            },
        },
        "additionalProperties": False,
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {
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
            },
        },
        "additionalProperties": False,
    },
}


@pytest.mark.parametrize("directory", OVERLAYS)
@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, "latest"])
def test_manifests_validate_against_kubernetes_schemas(directory: Path, version: str) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        if IN_CI:
            pytest.fail("kubernetes-validate is not installed, and CI must run this check")
        pytest.skip("kubernetes-validate is not installed")
    if version == "latest":
        version = kubernetes_validate.utils.latest_version()
    builtin = [d for d in rendered(directory) if d["kind"] not in CUSTOM_KINDS]
    assert builtin
    for document in builtin:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(map(str, exc.path))
            pytest.fail(f"{identity(document)} at {where}: {exc.message}")


@pytest.mark.parametrize("directory", OVERLAYS)
def test_rendered_output_passes_the_kubernetes_validate_cli(
    directory: Path, tmp_path: Path
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
    documents = rendered(directory)
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
    assert generator.OUTPUT == RULE_MANIFEST
    committed = RULE_MANIFEST.read_text(encoding="utf-8")
    assert committed == generator.render(generator.load_groups()), (
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
# Kubernetes: what the pods may do and how they are reached
# ---------------------------------------------------------------------------------------------


def test_base_runs_exactly_one_poller_replaced_without_overlap() -> None:
    documents = rendered(BASE)
    assert not [d for d in documents if d["kind"] in {"StatefulSet", "DaemonSet"}]
    deployment = one(documents, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def quantity(text: str | int) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match and (not match[2] or match[2] in units), text
    return float(match[1]) * units.get(match[2], 1)


@pytest.mark.parametrize("directory", OVERLAYS)
def test_pods_run_restricted(directory: Path) -> None:
    document = workload(directory)
    spec = pod_spec(document)
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    (user,) = final("USER")
    assert pod["runAsUser"] == int(user.args.split(":")[0]), "same uid as the image"
    for container in containers_of([document]):
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True
        assert isinstance(context["runAsUser"], int) and context["runAsUser"] > 0
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        resources = container["resources"]
        for resource in ("cpu", "memory"):
            request = quantity(resources["requests"][resource])
            limit = quantity(resources["limits"][resource])
            assert 0 < request <= limit, resource
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert all(set(v) - {"name"} <= {"configMap", "secret", "emptyDir"} for v in volumes.values())
    mounts = {m["mountPath"]: m for m in exporter_container(document)["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert all(m.get("readOnly") for path, m in mounts.items() if path != "/tmp")


@pytest.mark.parametrize("directory", OVERLAYS)
def test_probes_and_ports_point_at_the_exporter(directory: Path) -> None:
    container = exporter_container(workload(directory))
    (port,) = container["ports"]
    assert port["containerPort"] == EXPORTER_PORT == listen_port(container["args"])
    for probe, path in (("readinessProbe", READY), ("livenessProbe", HEALTHY)):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] == port["name"]
    service = one(rendered(directory), "Service")
    (service_port,) = service["spec"]["ports"]
    assert service_port == {"name": "metrics", "port": EXPORTER_PORT,
                            "targetPort": port["name"], "protocol": "TCP"}


@pytest.mark.parametrize("directory", OVERLAYS)
def test_config_and_token_are_mounted_where_the_config_says(directory: Path) -> None:
    documents = rendered(directory)
    document = workload(directory)
    container = exporter_container(document)
    volumes = {v["name"]: v for v in pod_spec(document)["volumes"]}
    by_path = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}

    config_path = flag(container["args"], "config.file")
    config_map = one(documents, "ConfigMap")
    config_volume = by_path[posixpath.dirname(config_path)]
    assert config_volume["configMap"]["name"] == config_map["metadata"]["name"]
    config = yaml.safe_load(config_map["data"][posixpath.basename(config_path)])

    token_path = config["api"]["token_file"]
    secret_volume = by_path[posixpath.dirname(token_path)]["secret"]
    assert secret_volume["secretName"] == TOKEN_SECRET
    assert not secret_volume.get("optional"), "without its token the pod must not start"
    (item,) = [i for i in secret_volume["items"] if i["path"] == posixpath.basename(token_path)]
    assert item["key"] == TOKEN_KEY
    assert not [d for d in documents if d["kind"] == "Secret"], (
        "no placeholder Secret: applying it would overwrite the user's token"
    )


def test_docs_create_the_secret_the_workload_mounts() -> None:
    """Every `kubectl create secret` in the deploy guide makes the Secret the pods mount."""
    namespace = one(rendered(BASE), "Namespace")["metadata"]["name"]
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    commands = re.findall(
        r"kubectl -n (\S+) create secret generic (\S+)\s+(?:\\\s+)?--from-file=([\w.-]+)=", text
    )
    assert commands, "docs/deploy.md explains how to create the token Secret"
    assert set(commands) == {(namespace, TOKEN_SECRET, TOKEN_KEY)}


def test_workload_labels_select_its_pods_for_service_and_network_policy() -> None:
    documents = rendered(BASE)
    deployment = one(documents, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one(documents, "Service")["spec"]["selector"].items() <= labels.items()
    policy = one(rendered(EXAMPLE), "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()


def test_network_policy_admits_only_monitoring_and_dns_plus_https_out() -> None:
    documents = rendered(EXAMPLE)
    policy = one(documents, "NetworkPolicy")["spec"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    (ingress,) = policy["ingress"]
    assert ingress["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    (port,) = exporter_container(one(documents, "Deployment"))["ports"]
    assert ingress["ports"] == [{"port": port["name"], "protocol": "TCP"}]
    egress = {(p["port"], p["protocol"]) for rule in policy["egress"] for p in rule["ports"]}
    assert egress == {(53, "UDP"), (53, "TCP"), (443, "TCP")}


@pytest.mark.parametrize("directory", OVERLAYS)
def test_images_carry_the_package_version(directory: Path) -> None:
    images = [c["image"] for c in containers_of(rendered(directory))]
    assert images == [f"applivery-mdm-exporter:{VERSION}"]


def test_pod_security_admission_enforces_restricted() -> None:
    namespace = one(rendered(BASE), "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# ---------------------------------------------------------------------------------------------
# Kubernetes: the sharded StatefulSet
# ---------------------------------------------------------------------------------------------

SHARD_ENV = {
    "name": "SHARD_INDEX",
    "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}},
}


def test_sharded_overlay_replaces_the_deployment_with_a_statefulset() -> None:
    documents = rendered(SHARDED)
    assert not [d for d in documents if d["kind"] == "Deployment"]
    statefulset = one(documents, "StatefulSet")
    service = one(documents, "Service")
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None", "a StatefulSet's governing service is headless"


def test_each_shard_derives_its_index_from_the_pod_ordinal() -> None:
    statefulset = one(rendered(SHARDED), "StatefulSet")
    container = exporter_container(statefulset)
    replicas = statefulset["spec"]["replicas"]
    assert replicas > 1
    assert SHARD_ENV in container["env"]
    assert flag(container["args"], "shard") == f"$(SHARD_INDEX)/{replicas}"


def test_statefulset_pods_equal_the_deployment_pods_but_for_the_shard() -> None:
    deployment = one(rendered(BASE), "Deployment")["spec"]["template"]
    template = one(rendered(SHARDED), "StatefulSet")["spec"]["template"]
    container = exporter_container({"spec": {"template": template}})
    container["env"].remove(SHARD_ENV)
    if not container["env"]:
        del container["env"]
    container["args"] = [a for a in container["args"] if not a.startswith("--shard=")]
    assert template == deployment


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


def test_unit_sandboxes_the_service() -> None:
    expected = {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "",
        "MemoryDenyWriteExecute": "yes",
        "Restart": "on-failure",
        "ExecReload": "/bin/kill -HUP $MAINPID",
    }
    assert {key: setting(key) for key in expected} == expected
    assert "@system-service" in SERVICE["SystemCallFilter"]


def test_unit_starts_the_console_script_with_defined_arguments() -> None:
    command = shlex.split(setting("ExecStart"))
    assert posixpath.basename(command[0]) in SCRIPTS
    assert flag(command, "config.file") == "/etc/applivery-mdm-exporter/config.yaml"
    example = env_file(SYSTEMD / "applivery-mdm-exporter.env")
    referenced = {word[1:] for word in command if word.startswith("$")}
    assert referenced <= example.keys(), "every variable has an example value"
    assert setting("EnvironmentFile").startswith("-"), "the environment file is optional"


def env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = " ".join(shlex.split(value))
    return pairs


def test_token_reaches_the_exporter_as_a_credential() -> None:
    name, _, source = setting("LoadCredential").partition(":")
    assert source.startswith("/etc/")
    config = yaml.safe_load((SYSTEMD / "config.yaml").read_text(encoding="utf-8"))
    # $CREDENTIALS_DIRECTORY of a system service is /run/credentials/<unit name>.
    assert config["api"]["token_file"] == f"/run/credentials/{UNIT.name}/{name}"
    assert "APPLIVERY_API_TOKEN" not in (SYSTEMD / "applivery-mdm-exporter.env").read_text()


def checkable_unit(directory: Path) -> Path:
    """The unit with its install-specific binary swapped for one that exists here."""
    command = shlex.split(setting("ExecStart"))
    text = UNIT_TEXT.replace(f"ExecStart={command[0]}", "ExecStart=/bin/true", 1)
    assert text != UNIT_TEXT
    path = directory / UNIT.name
    path.write_text(text, encoding="utf-8")
    return path


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the settings are asserted above)")
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(checkable_unit(tmp_path))],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_unit_exposure_is_rated_ok(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(checkable_unit(tmp_path))],
        capture_output=True, text=True, timeout=60, check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", result.stdout)
    if match is None:
        pytest.skip(f"this systemd-analyze cannot rate units offline: {result.stderr.strip()}")
    # 0 is fully locked down, 10 is unprotected; below 2 is what systemd calls OK or better.
    assert float(match[1]) < 2.0, result.stdout


# ---------------------------------------------------------------------------------------------
# The artefacts against the real exporter
# ---------------------------------------------------------------------------------------------


def exporter_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "exporter", *args]


def with_local_paths(args: list[str], config: Path) -> list[str]:
    return [f"--config.file={config}" if a.startswith("--config.file=") else a for a in args]


def local_config(text: str, directory: Path) -> Path:
    """The shipped config with its token file moved to a temporary one."""
    token = directory / "token"
    token.write_text("test-token\n", encoding="utf-8")
    config = yaml.safe_load(text)
    config["api"]["token_file"] = str(token)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def shipped_invocations() -> dict[str, tuple[list[str], str]]:
    """Each artefact's exporter arguments and the config it ships with."""
    config_map = one(rendered(BASE), "ConfigMap")["data"]["config.yaml"]
    (cmd,) = final("CMD")
    statefulset = one(rendered(SHARDED), "StatefulSet")
    last_shard = str(statefulset["spec"]["replicas"] - 1)
    sharded_args = [a.replace("$(SHARD_INDEX)", last_shard)
                    for a in exporter_container(statefulset)["args"]]
    env = env_file(SYSTEMD / "applivery-mdm-exporter.env")
    systemd_args = [
        expanded
        for word in shlex.split(setting("ExecStart"))[1:]
        for expanded in (shlex.split(env[word[1:]]) if word.startswith("$") else [word])
    ]
    return {
        "docker": (exec_form(cmd.args), config_map),
        "deployment": (exporter_container(one(rendered(BASE), "Deployment"))["args"],
                       config_map),
        "statefulset": (sharded_args, config_map),
        "systemd": (systemd_args, (SYSTEMD / "config.yaml").read_text(encoding="utf-8")),
    }


@pytest.mark.parametrize("artefact", ["docker", "deployment", "statefulset", "systemd"])
def test_shipped_arguments_and_config_pass_the_exporters_check(
    artefact: str, tmp_path: Path
) -> None:
    args, config_text = shipped_invocations()[artefact]
    config = local_config(config_text, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "APPLIVERY_API_TOKEN"}
    result = subprocess.run(
        exporter_command(*with_local_paths(args, config), "--config.check"),
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def wait_for_status(url: str, process: subprocess.Popen[str], deadline: float) -> int | None:
    """Poll until the URL answers 200 or a client error (no such route), the process dies,
    or the deadline passes."""
    status = None
    while time.monotonic() < deadline and process.poll() is None:
        status = http_status(url)
        if status is not None and (status == 200 or 400 <= status < 500):
            break
        time.sleep(0.2)
    return status


def healthcheck(url: str) -> int:
    """Run the image's HEALTHCHECK command as Docker would, aimed at `url`."""
    (instruction,) = final("HEALTHCHECK")
    command = exec_form(instruction.args.split("CMD", 1)[1].strip())
    command[0] = sys.executable
    env = {**os.environ, **env_of_final_stage(), "HEALTHCHECK_URL": url}
    return subprocess.run(command, env=env, capture_output=True, timeout=30, check=False).returncode


def test_healthcheck_and_probes_against_a_running_exporter() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    deployment = one(rendered(BASE), "Deployment")
    container = exporter_container(deployment)
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    process = subprocess.Popen(
        exporter_command("--demo", f"--web.listen-address=127.0.0.1:{port}"),
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        liveness = container["livenessProbe"]["httpGet"]["path"]
        readiness = container["readinessProbe"]["httpGet"]["path"]
        # Bounded waits for a process starting on a shared machine, not timing assertions.
        assert wait_for_status(base + liveness, process, time.monotonic() + 60) == 200
        assert wait_for_status(base + readiness, process, time.monotonic() + 120) == 200
        image_url = urlsplit(env_of_final_stage()["HEALTHCHECK_URL"])
        local_url = urlunsplit(image_url._replace(netloc=f"127.0.0.1:{port}"))
        assert healthcheck(local_url) == 0
        process.send_signal(signal.SIGTERM)
        # The kubelet kills what has not exited after the grace period.
        assert process.wait(timeout=grace) == 0
        assert healthcheck(local_url) != 0, "a stopped exporter must turn the container unhealthy"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
