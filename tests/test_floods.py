"""The server under a connection flood: probes and scrapes keep their file descriptors.

The exporter runs as a process under ``ulimit -n 256``; the test holds 400 connections that
never finish their request line, on 127.0.0.1 only, for a few seconds.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from processes import free_port, valid_config, wait_for

FD_LIMIT = 256
HALF_OPEN = 400
PARTIAL = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "  # never ends
MAX_STDERR_BYTES = 100_000
HOLD_SECONDS = 8.0  # past the header-read timeout, so evictions and timeouts both happen


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@contextlib.contextmanager
def limited_exporter(config: Path, port: int, stderr: Path) -> Iterator[subprocess.Popen[bytes]]:
    with (
        tempfile.TemporaryDirectory(prefix="exporter-store-") as store,
        stderr.open("wb") as errors,
    ):
        proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", "--config.file", str(config),
             "--web.listen-address", f"127.0.0.1:{port}", f"--storage.path={store}"],
            stdout=subprocess.DEVNULL, stderr=errors, preexec_fn=_limit_fds,
            env={**os.environ, "APPLIVERY_API_TOKEN": "flood-test-token"},
        )
        try:
            yield proc
        finally:
            proc.kill()
            proc.wait(timeout=10)


def healthy_within(url: str, seconds: float) -> float:
    """How long ``/-/healthy`` took to answer 200 (raises past ``seconds``)."""
    began = time.monotonic()
    with urllib.request.urlopen(f"{url}/-/healthy", timeout=seconds) as response:
        assert response.status == 200
    return time.monotonic() - began


def open_half_open(port: int, count: int) -> list[socket.socket]:
    """``count`` connections, each sent part of a request line and nothing more."""
    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        sockets.append(sock)
    time.sleep(0.3)
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.send(PARTIAL)
    return sockets


def test_healthy_answers_within_2s_while_400_half_open_connections_are_held(tmp_path):
    port, stderr = free_port(), tmp_path / "stderr"
    url = f"http://127.0.0.1:{port}"
    with limited_exporter(valid_config(tmp_path), port, stderr) as proc:
        wait_for(lambda: healthy_within(url, 2) < 2, what="the exporter")
        sockets = open_half_open(port, HALF_OPEN)
        try:
            waits = []
            held_until = time.monotonic() + HOLD_SECONDS
            while time.monotonic() < held_until:
                waits.append(healthy_within(url, 2.0))
                time.sleep(0.5)
        finally:
            for sock in sockets:
                sock.close()
        assert proc.poll() is None, "the exporter died under the flood"
        assert max(waits) < 2.0, waits
    assert stderr.stat().st_size < MAX_STDERR_BYTES, stderr.read_bytes()[-2000:]
