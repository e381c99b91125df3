"""The release workflow, which cannot run here: linted with actionlint, and its version
check and image tags proven against the package's version.

.github/workflows/release.yml builds the wheel and sdist, a multi-arch image with OCI
labels and an SBOM, signs it with keyless cosign and pushes it to the GitHub container
registry, on a version tag. What can be checked without GitHub is checked here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter import __version__

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
VERSION_SCRIPT = ROOT / ".github" / "release_version.py"


def workflow() -> dict[str, Any]:
    return yaml.safe_load(WORKFLOW.read_text())


def step(job: str, uses: str) -> dict[str, Any]:
    steps = [s for s in workflow()["jobs"][job]["steps"] if s.get("uses", "").startswith(uses)]
    assert len(steps) == 1, (job, uses)
    return steps[0]


def release_version(tag: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(VERSION_SCRIPT), tag], capture_output=True,
                          text=True, timeout=30, check=False)


def test_actionlint_finds_nothing() -> None:
    binary = shutil.which("actionlint")
    if binary is None:
        pytest.fail("actionlint is not installed (pip install -e '.[test]')")
    result = subprocess.run([binary, "-no-color", *map(str, (ROOT / ".github").rglob("*.yml"))],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_tag_must_be_the_package_version() -> None:
    good = release_version(f"v{__version__}")
    assert (good.returncode, good.stdout.strip()) == (0, __version__)
    for wrong in (__version__, f"v{__version__}.1", "v0.0.0-rc1", "latest"):
        refused = release_version(wrong)
        assert refused.returncode == 1 and __version__ in refused.stderr, wrong


def test_the_version_is_checked_before_anything_is_built() -> None:
    jobs = workflow()["jobs"]
    check = jobs["version"]["steps"][-1]
    assert ".github/release_version.py" in check["run"] and "$GITHUB_REF_NAME" in check["run"]
    assert {name for name, job in jobs.items() if job.get("needs") == "version"} == {
        "dist", "image"}


def test_every_image_tag_is_the_checked_version() -> None:
    meta = step("image", "docker/metadata-action")["with"]
    tags = [line for line in meta["tags"].splitlines() if line.strip()]
    assert tags and all("value=${{ needs.version.outputs.version }}" in t for t in tags)
    # What docker/metadata-action makes of them, for this package's version.
    major, minor = __version__.split(".")[:2]
    made = {"{{version}}": __version__, "{{major}}.{{minor}}": f"{major}.{minor}"}
    patterns = {re.search(r"pattern=([^,]+)", t)[1] for t in tags}  # type: ignore[index]
    assert {made[p] for p in patterns} == {__version__, f"{major}.{minor}"}
    assert meta["images"] == "${{ env.IMAGE }}"
    assert workflow()["env"]["IMAGE"] == "ghcr.io/${{ github.repository }}"


def test_the_image_is_multi_arch_labelled_with_an_sbom_and_signed() -> None:
    build = step("image", "docker/build-push-action")["with"]
    assert set(build["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert build["push"] is True and build["sbom"] is True
    labels = step("image", "docker/metadata-action")["with"]["labels"]
    assert "org.opencontainers.image.source=" in labels
    assert "org.opencontainers.image.revision=${{ github.sha }}" in labels
    permissions = workflow()["jobs"]["image"]["permissions"]
    assert permissions["id-token"] == "write" and permissions["packages"] == "write"
    sign = [s for s in workflow()["jobs"]["image"]["steps"] if "cosign sign" in s.get("run", "")]
    assert len(sign) == 1 and "--key" not in sign[0]["run"]  # keyless
    assert step("image", "anchore/sbom-action")["with"]["format"] == "spdx-json"


def test_the_dockerfile_takes_the_revision_the_workflow_passes() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    passed = step("image", "docker/build-push-action")["with"]["build-args"]
    for arg in re.findall(r"^\s*(\w+)=", passed, re.MULTILINE):
        assert re.search(rf"^ARG {arg}=", dockerfile, re.MULTILINE), arg
    assert 'org.opencontainers.image.revision="${REVISION}"' in dockerfile
