"""Deployment artefacts: the container image and the systemd unit, and what every artefact
hands the exporter (tests/test_deploy_kubernetes*.py check the manifests).

No container engine runs here, so each artefact is checked with what does run: the Dockerfile
by hadolint and by reading it (sources, user, state volume, health check), the unit by
systemd-analyze. Where an artefact hands arguments, a config or a health probe to the
exporter, the real exporter answers.
"""

from __future__ import annotations

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
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml
from deploy_artefacts import (
    BASE,
    DOCKERFILE,
    EXPORTER_PORT,
    FINAL_STAGE,
    HEALTHY,
    INSTRUCTIONS,
    PYPROJECT,
    ROOT,
    SCRIPTS,
    SERVICE,
    SHARDED,
    STATE_PATH,
    SYSTEMD,
    UNIT,
    UNIT_TEXT,
    VERSION,
    env_file,
    env_of_final_stage,
    exec_form,
    exporter_container,
    final,
    flag,
    listen_port,
    one,
    pod_spec,
    rendered,
    require_tool,
    setting,
    split_flags,
)

# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------


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


def test_state_volume_is_where_the_default_command_keeps_the_state() -> None:
    (volume,) = final("VOLUME")
    (cmd,) = final("CMD")
    assert exec_form(volume.args) == [STATE_PATH]
    assert flag(exec_form(cmd.args), "storage.path") == STATE_PATH


def test_state_directory_belongs_to_the_runtime_user_before_it_becomes_a_volume() -> None:
    """A new named volume takes the directory's owner and mode from the image: left to root,
    the non-root user could not write its store; created after VOLUME, the change is lost."""
    commands = [
        (INSTRUCTIONS.index(run), shlex.split(command))
        for run in final("RUN")
        for command in run.args.split("&&")
        if STATE_PATH in command
    ]
    ((position, words),) = commands
    assert words[:2] == ["install", "-d"] and words[-1] == STATE_PATH
    options = dict(zip(words[2:-1:2], words[3:-1:2], strict=True))
    (user,) = final("USER")
    assert f"{options['-o']}:{options['-g']}" == user.args
    assert int(options["-m"], 8) & 0o707 == 0o700, "the user's own, nobody else's"
    (volume,) = final("VOLUME")
    assert position < INSTRUCTIONS.index(volume)



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
# systemd
# ---------------------------------------------------------------------------------------------


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


def test_token_reaches_the_exporter_as_a_credential() -> None:
    name, _, source = setting("LoadCredential").partition(":")
    assert source.startswith("/etc/")
    config = yaml.safe_load((SYSTEMD / "config.yaml").read_text(encoding="utf-8"))
    # $CREDENTIALS_DIRECTORY of a system service is /run/credentials/<unit name>.
    assert config["api"]["token_file"] == f"/run/credentials/{UNIT.name}/{name}"
    assert "APPLIVERY_API_TOKEN" not in (SYSTEMD / "applivery-mdm-exporter.env").read_text()


def test_state_lives_in_the_units_state_directory() -> None:
    """StateDirectory= is created for the dynamic user and stays writable under
    ProtectSystem=strict; systemd passes its path as $STATE_DIRECTORY."""
    command = shlex.split(setting("ExecStart"))
    assert flag(command, "storage.path") == "${STATE_DIRECTORY}"
    assert state_directory() == STATE_PATH
    assert setting("StateDirectoryMode") == "0700"


def state_directory() -> str:
    """$STATE_DIRECTORY of a system service: /var/lib/ and the unit's StateDirectory."""
    return posixpath.join("/var/lib", setting("StateDirectory"))



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


def with_local_paths(args: list[str], config: Path, state: Path) -> list[str]:
    """The arguments with the install-specific config and state moved to temporary ones."""
    local = {"--config.file": config, "--storage.path": state}
    moved = []
    for arg in args:
        name, sep, _ = arg.partition("=")
        moved.append(f"{name}={local[name]}" if sep and name in local else arg)
    return moved


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
    # systemd's expansion: $VAR splits into words, ${VAR} inside a word stays one word.
    systemd_args = [
        expanded.replace("${STATE_DIRECTORY}", state_directory())
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


ARTEFACTS = ["docker", "deployment", "statefulset", "systemd"]


@pytest.mark.parametrize("artefact", ARTEFACTS)
def test_shipped_arguments_and_config_pass_the_exporters_check(
    artefact: str, tmp_path: Path
) -> None:
    args, config_text = shipped_invocations()[artefact]
    config = local_config(config_text, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "APPLIVERY_API_TOKEN"}
    local_args = with_local_paths(args, config, tmp_path / "state")
    result = subprocess.run(
        exporter_command(*local_args, "--config.check"),
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("artefact", ARTEFACTS)
def test_every_artefact_keeps_the_state_in_one_place(artefact: str) -> None:
    """The image's volume, the pods' mount and the unit's state directory are one path, so
    the docs' backup and restore steps read the same everywhere."""
    args, _ = shipped_invocations()[artefact]
    assert flag(args, "storage.path") == STATE_PATH


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
