"""Real processes and ports for the tests that run the exporter as a user would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_own_store(args: tuple[str, ...], directory: str) -> list[str]:
    """The exporter's arguments with a store directory of its own unless one is given: each
    process needs one (a second one on a directory exits 1), and none may write the repo."""
    exporter = args[:2] == ("-m", "exporter")
    given = any(a.startswith("--storage.path") for a in args)
    return [*args, f"--storage.path={directory}"] if exporter and not given else list(args)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="exporter-store-") as store:
        return _run([sys.executable, *with_own_store(("-m", "exporter", *args), store)], env)


def _run(argv: list[str], env: dict[str, str] | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def fetch(
    url: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def process(*args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    with tempfile.TemporaryDirectory(prefix="exporter-store-") as store:
        yield from _process(with_own_store(args, store), env)


def _process(args: list[str], env: dict[str, str] | None) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def valid_config(tmp_path: Path, base_url: str = "http://127.0.0.1:1/v1") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"organization: demo\napi:\n  base_url: {base_url}\npoll:\n  interval_seconds: 2\n"
        "discovery:\n  devices: {refresh_seconds: 60}\n"
    )
    return path
