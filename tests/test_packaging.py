"""Packaging: one version everywhere, the licence, the project's URLs, the changelog, and the
lock of runtime dependencies the image installs."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from scripts import load_script

from exporter import __version__

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
LOCK = ROOT / "requirements.lock"
CHANGELOG = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")

SEMVER = r"\d+\.\d+\.\d+(?:[-.+][0-9A-Za-z.-]+)?"


# --- the version ---------------------------------------------------------------------------


def test_the_package_is_the_single_source_of_the_version() -> None:
    assert "version" not in PROJECT, "pyproject reads the version, it does not write it"
    assert "version" in PROJECT["dynamic"]
    dynamic = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "exporter.__version__"}
    Version(__version__)  # a valid PEP 440 version


def version_mentions() -> list[tuple[str, str]]:
    """(where, version) for every place outside exporter/__init__.py that names a release."""
    found: list[tuple[str, str]] = []
    # The image: the VERSION build argument (its label) and the example build command.
    found += [("Dockerfile ARG", v) for v in re.findall(rf"^ARG VERSION=({SEMVER})$",
                                                        DOCKERFILE, re.MULTILINE)]
    texts = {
        "Dockerfile": DOCKERFILE,
        **{str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
           for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
                     *sorted((ROOT / "deploy").rglob("*.yaml")),
                     *sorted((ROOT / "deploy").rglob("*.service")),
                     *sorted((ROOT / "deploy").rglob("*.env"))]},
    }
    patterns = (
        rf"newTag:\s*\"?({SEMVER})\"?",                    # kustomize images
        rf"applivery-mdm-exporter:({SEMVER})\b",          # image references
        rf"VERSION=({SEMVER})\b",                         # --build-arg examples
        rf"applivery_mdm_exporter-({SEMVER})-py3",        # wheel file names
    )
    for where, text in texts.items():
        for pattern in patterns:
            found += [(where, v) for v in re.findall(pattern, text)]
    return found


def test_every_place_that_names_the_version_names_the_package_version() -> None:
    mentions = version_mentions()
    wheres = {where for where, _ in mentions}
    # The places that must name it: the image's build argument and every kustomize image.
    kustomizations = {str(p.relative_to(ROOT)) for p in (ROOT / "deploy").rglob("*.yaml")
                      if "newTag" in p.read_text(encoding="utf-8")}
    assert {"Dockerfile ARG", "deploy/kubernetes/base/kustomization.yaml"} <= wheres
    assert kustomizations <= wheres
    wrong = [(where, v) for where, v in mentions if v != __version__]
    assert not wrong, f"exporter.__version__ is {__version__}; stale mentions: {wrong}"


def test_the_image_label_carries_the_build_argument() -> None:
    assert 'org.opencontainers.image.version="${VERSION}"' in DOCKERFILE


def test_the_changelog_has_unreleased_and_the_current_release() -> None:
    headings = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?$", CHANGELOG,
                          re.MULTILINE)
    names = [name for name, _ in headings]
    assert names[0] == "Unreleased"
    released = [(name, date) for name, date in headings[1:]]
    assert released and all(date for _, date in released), "released sections carry a date"
    versions = [Version(name) for name, _ in released]
    assert versions == sorted(versions, reverse=True), "newest first"
    assert released[0][0] == __version__, "the package version is the latest release"
    for name in names:  # every heading has its link reference
        assert re.search(rf"^\[{re.escape(name)}\]: https://", CHANGELOG, re.MULTILINE), name


# --- licence and URLs -----------------------------------------------------------------------


def test_licence_is_apache_2_as_an_spdx_expression_with_its_text() -> None:
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in DOCKERFILE
    # PEP 639 metadata (SPDX `license`, `license-files`) needs setuptools 77 or later.
    (setuptools,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]
                     if canonicalize_name(Requirement(r).name) == "setuptools"]
    assert not setuptools.specifier.contains("76.99") and setuptools.specifier.contains("77")


def test_project_urls_point_at_the_repository_the_rules_link_to() -> None:
    urls = PROJECT["urls"]
    assert set(urls) >= {"Homepage", "Documentation", "Changelog", "Issues"}
    homepage = urls["Homepage"].rstrip("/")
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", homepage), homepage
    assert all(url.startswith(homepage) for url in urls.values()), urls
    assert urls["Changelog"].endswith("/CHANGELOG.md")
    # The alert rules' runbook links name the same repository.
    alerts = (ROOT / "prometheus" / "alerts.yml").read_text(encoding="utf-8")
    runbooks = set(re.findall(r"runbook_url:\s*(https://github\.com/[\w.-]+/[\w.-]+)/", alerts))
    assert runbooks <= {homepage}


# --- the lock of runtime dependencies -------------------------------------------------------


def image_python() -> str:
    """The base image's Python minor version, as deploy/lock.py resolves the lock with."""
    return load_script(ROOT / "deploy" / "lock.py", "deploy_lock").image_python()


def lock_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in LOCK.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9A-Za-z.+!-]+)", line)
        assert match, f"requirements.lock: {line!r} is not an exact NAME==VERSION pin"
        name = canonicalize_name(match[1])
        assert name not in pins, f"requirements.lock pins {name} twice"
        pins[name] = match[2]
    return pins


def applies_in_the_image(requirement: Requirement) -> bool:
    if requirement.marker is None:
        return True
    python = image_python()
    environment = {"python_version": python, "python_full_version": f"{python}.0",
                   "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
                   "implementation_name": "cpython", "platform_python_implementation": "CPython",
                   "extra": ""}
    return Marker(str(requirement.marker)).evaluate(environment)


RUNTIME = [Requirement(r) for r in PROJECT["dependencies"]]


def test_lock_pins_every_runtime_dependency_within_its_range() -> None:
    pins = lock_pins()
    for requirement in RUNTIME:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"requirements.lock misses {name}: run python3 deploy/lock.py"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside {requirement.specifier}"
        )


def test_lock_holds_the_runtime_closure_and_nothing_else() -> None:
    """What the locked runtime dependencies require is pinned too (followed through the
    packages installed here at the locked version), and nothing the tests alone need
    (pytest, ruff, ...) reaches the image."""
    pins = lock_pins()
    closure: set[str] = set()
    todo = [r for r in RUNTIME if applies_in_the_image(r)]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in closure:
            continue
        closure.add(name)
        assert name in pins, f"{name} (needed at run time) is not pinned: run deploy/lock.py"
        try:
            installed = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            continue
        if Version(installed.version) != Version(pins[name]):
            continue  # another version here: its requirements may differ from the locked one's
        todo += [r for r in map(Requirement, installed.requires or ()) if applies_in_the_image(r)]
    assert len(closure) > len(RUNTIME), "the lock's transitive part was followed"
    test_only = {canonicalize_name(Requirement(r).name)
                 for r in PROJECT["optional-dependencies"]["test"]}
    assert not (pins.keys() & test_only) - closure, "the lock holds runtime dependencies only"


def test_the_image_builds_its_wheels_against_the_lock() -> None:
    copied = " ".join(re.findall(r"^COPY (?!--from)(.*)$", DOCKERFILE, re.MULTILINE))
    assert "requirements.lock" in copied.split()
    assert re.search(r"pip wheel .*--constraint requirements\.lock", DOCKERFILE)
    assert "!requirements.lock" in (ROOT / ".dockerignore").read_text(encoding="utf-8")
