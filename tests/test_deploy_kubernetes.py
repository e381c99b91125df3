"""The Kubernetes manifests: what the kustomize tree renders, the optional components, what
the pods may do and how they are reached, the sharded StatefulSet and the durable state.

The tree is rendered by kubectl's kustomize when it is installed, otherwise by a small
renderer of the same subset (tests/deploy_artefacts.py), and the two are compared.
"""

from __future__ import annotations

import json
import posixpath
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_artefacts import (
    BASE,
    CLUSTER_SCOPED,
    COMPONENT_KINDS,
    COMPONENTS,
    CUSTOM_KINDS,
    DASHBOARD_CONFIG_MAP,
    DASHBOARD_FILE,
    EXAMPLE,
    EXPORTER_PORT,
    HEALTHY,
    KUBE,
    OPERATOR_GROUP,
    OVERLAYS,
    READY,
    ROOT,
    SHARDED,
    STATE_PATH,
    TOKEN_KEY,
    TOKEN_SECRET,
    VERSION,
    api_group,
    containers_of,
    exporter_container,
    final,
    flag,
    identity,
    kustomization,
    listen_port,
    one,
    pod_spec,
    render_in_python,
    render_with_kubectl,
    rendered,
    sharded_with_components,
    workload,
)

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
    assert [p.name for p in directories] == [
        "grafana-dashboard", "networkpolicy", "persistence", "prometheus-operator",
    ]
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
    stateless = COMPONENT_KINDS - {"PersistentVolumeClaim"}
    assert {d["kind"] for d in documents} >= stateless | {"StatefulSet"}
    assert not [d for d in documents if d["kind"] == "PersistentVolumeClaim"]
    assert not [d for d in documents if d["kind"] == "Deployment"]


@pytest.mark.parametrize("directory", OVERLAYS)
def test_every_namespaced_resource_lives_in_the_shipped_namespace(directory: Path) -> None:
    documents = rendered(directory)
    namespace = one(documents, "Namespace")["metadata"]["name"]
    for document in documents:
        if document["kind"] not in CLUSTER_SCOPED:
            assert document["metadata"].get("namespace") == namespace, identity(document)


# ---------------------------------------------------------------------------------------------
# Kubernetes: what the pods may do and how they are reached
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", [BASE, EXAMPLE], ids=["base", "example"])
def test_base_runs_exactly_one_poller_replaced_without_overlap(directory: Path) -> None:
    documents = rendered(directory)
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
    sources = {"configMap", "secret", "emptyDir", "persistentVolumeClaim"}
    assert all(set(v) - {"name"} <= sources for v in volumes.values())
    container = exporter_container(document)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    # Written to: the scratch space and the state (tests below), nothing else.
    writable = {"/tmp", flag(container["args"], "storage.path")}
    assert all(m.get("readOnly") for path, m in mounts.items() if path not in writable)


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
    # The sharded state is a claim template, not a pod volume: it holds neither.
    by_path = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]
               if m["name"] in volumes}

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
    # Each shard's state is its claim (volumeClaimTemplates), not a volume of the pod.
    deployment["spec"]["volumes"] = [v for v in deployment["spec"]["volumes"]
                                     if v["name"] != STATE_VOLUME]
    template = one(rendered(SHARDED), "StatefulSet")["spec"]["template"]
    container = exporter_container({"spec": {"template": template}})
    container["env"].remove(SHARD_ENV)
    if not container["env"]:
        del container["env"]
    container["args"] = [a for a in container["args"] if not a.startswith("--shard=")]
    assert template == deployment


# ---------------------------------------------------------------------------------------------
# Kubernetes: durable state
# ---------------------------------------------------------------------------------------------

STATE_VOLUME = "state"


def state_mount(document: dict[str, Any]) -> dict[str, Any]:
    container = exporter_container(document)
    path = flag(container["args"], "storage.path")
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == path]
    return mount


def pod_volume(document: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((v for v in pod_spec(document)["volumes"] if v["name"] == name), None)


@pytest.mark.parametrize("directory", OVERLAYS)
def test_the_state_is_mounted_where_storage_path_points(directory: Path) -> None:
    document = workload(directory)
    assert flag(exporter_container(document)["args"], "storage.path") == STATE_PATH
    mount = state_mount(document)
    assert mount["name"] == STATE_VOLUME
    assert not mount.get("readOnly") and "subPath" not in mount
    claims = {c["metadata"]["name"] for c in document["spec"].get("volumeClaimTemplates", [])}
    in_pod = pod_volume(document, mount["name"]) is not None
    assert in_pod != (mount["name"] in claims), "a pod volume or a claim template, not both"


def test_base_keeps_the_state_across_container_restarts() -> None:
    """An emptyDir lives as long as the pod: a crashed or killed container finds its store."""
    volume = pod_volume(workload(BASE), STATE_VOLUME)
    assert volume is not None and set(volume) == {"name", "emptyDir"}
    # On the node's disk: a tmpfs would count the store against the container's memory limit.
    assert "medium" not in volume["emptyDir"]


def test_persistence_component_puts_the_state_on_a_claim() -> None:
    """With components/persistence the store outlives rescheduling; nothing else changes."""
    documents = rendered(EXAMPLE)
    claim = one(documents, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    deployment = one(documents, "Deployment")
    volume = pod_volume(deployment, STATE_VOLUME)
    assert volume == {"name": STATE_VOLUME,
                      "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
    base = one(rendered(BASE), "Deployment")
    for pods in (base, deployment):
        pod_spec(pods)["volumes"].sort(key=lambda v: v["name"])
        pod_spec(pods)["volumes"] = [v for v in pod_spec(pods)["volumes"]
                                     if v["name"] != STATE_VOLUME]
    assert deployment["spec"] == base["spec"]


def test_sharded_statefulset_has_one_claim_per_replica() -> None:
    """One claim template: the controller makes one claim per ordinal, so each shard keeps its
    own store, and a rescheduled shard finds its own again."""
    statefulset = one(rendered(SHARDED), "StatefulSet")
    (template,) = statefulset["spec"]["volumeClaimTemplates"]
    assert template["metadata"]["name"] == state_mount(statefulset)["name"]
    assert template["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pod_volume(statefulset, template["metadata"]["name"]) is None
    shared = [v for v in pod_spec(statefulset)["volumes"] if "persistentVolumeClaim" in v]
    assert not shared, "a claim in the pod template would be one store for every shard"


def test_docs_name_where_each_variant_keeps_its_state() -> None:
    section = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8").split(
        "## Durable state", 1)[1]
    assert STATE_PATH in section
    assert one(rendered(EXAMPLE), "PersistentVolumeClaim")["metadata"]["name"] in section
    statefulset = one(rendered(SHARDED), "StatefulSet")
    (template,) = statefulset["spec"]["volumeClaimTemplates"]
    # The controller names a shard's claim <template>-<statefulset>-<ordinal>.
    claims = f"{template['metadata']['name']}-{statefulset['metadata']['name']}-<ordinal>"
    assert claims in section


# ---------------------------------------------------------------------------------------------
# Kubernetes: the Grafana dashboard
# ---------------------------------------------------------------------------------------------

# The API server refuses an object whose annotations add up to more than this many bytes, and
# client-side `kubectl apply` copies the whole object into one of them.
ANNOTATIONS_LIMIT = 262_144
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


@pytest.fixture(scope="module")
def dashboard_config_map(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    documents = rendered(sharded_with_components(tmp_path_factory.mktemp("overlay")))
    (config_map,) = [d for d in documents if identity(d) == ("ConfigMap", DASHBOARD_CONFIG_MAP)]
    return config_map


def test_dashboard_config_map_holds_the_dashboard_file(
    dashboard_config_map: dict[str, Any],
) -> None:
    """Byte for byte what grafana/build_dashboard.py wrote, under the file's own name."""
    text = DASHBOARD_FILE.read_text(encoding="utf-8")
    assert dashboard_config_map["data"] == {DASHBOARD_FILE.name: text}
    uid = json.loads(text)["uid"]
    assert uid and json.loads(dashboard_config_map["data"][DASHBOARD_FILE.name])["uid"] == uid


def test_grafana_sidecar_finds_the_dashboard(dashboard_config_map: dict[str, Any]) -> None:
    """kube-prometheus-stack's sidecar: its default label and value, the folder annotation its
    folderAnnotation names; in the exporter's namespace (the sidecar searches all of them)."""
    metadata = dashboard_config_map["metadata"]
    assert metadata["labels"]["grafana_dashboard"] == "1"
    assert metadata["annotations"] == {"grafana_folder": "Applivery MDM"}
    assert metadata["namespace"] == one(rendered(BASE), "Namespace")["metadata"]["name"]


def last_applied_size(document: dict[str, Any]) -> int:
    """The bytes of the annotation `kubectl apply` adds: the object as compact JSON, where
    Go's encoder writes each <, > and & as a 6-byte escape."""
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    return len(LAST_APPLIED) + len(text.encode()) + 5 * sum(map(text.count, "<>&"))


def test_dashboard_config_map_fits_client_side_apply(
    dashboard_config_map: dict[str, Any],
) -> None:
    annotations = dashboard_config_map["metadata"].get("annotations", {})
    size = last_applied_size(dashboard_config_map) + sum(
        len(key) + len(value.encode()) for key, value in annotations.items()
    )
    assert size < ANNOTATIONS_LIMIT, (
        f"{size} bytes of annotations after `kubectl apply`: split the dashboard, or document "
        "`kubectl apply --server-side`"
    )
