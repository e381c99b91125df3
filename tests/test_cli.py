"""The exporter as a user runs it: real processes, real ports, real signals."""

from __future__ import annotations

import gzip
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
from processes import fetch, free_port, process, run_cli, valid_config, wait_for
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

TOKEN = "cli-test-token"


def test_config_check_accepts_a_valid_config(tmp_path):
    result = run_cli("--config.file", str(valid_config(tmp_path)), "--config.check",
                     env={"APPLIVERY_API_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout + result.stderr


def test_invalid_config_exits_2_with_key_paths_and_no_traceback(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("organization: x\napi:\n  timeout_seconds: -1\npoll:\n  intervall_seconds: 5\n")
    for extra in ([], ["--config.check"]):
        result = run_cli("--config.file", str(path), *extra, env={"APPLIVERY_API_TOKEN": TOKEN})
        assert result.returncode == 2
        assert "api.timeout_seconds" in result.stderr
        assert "poll.intervall_seconds" in result.stderr
        assert "Traceback" not in result.stderr


def test_missing_token_is_a_config_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "APPLIVERY_API_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--config.file", str(valid_config(tmp_path)),
         "--config.check"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert "APPLIVERY_API_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [["--no-such-flag"], ["--shard", "3/3"], ["--web.listen-address", "nowhere"],
     ["--web.listen-address", "127.0.0.1:65536"], ["--web.listen-address", "127.0.0.1:-1"]],
)
def test_bad_usage_exits_2(args):
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_runs_against_the_simulator_reloads_and_stops_cleanly(tmp_path):
    sim_port, port = free_port(), free_port()
    with process("-m", "exporter.simulator", "--port", str(sim_port), "--token", TOKEN,
                 "--devices", "5", "--speed", "60") as simulator:
        base_url = f"http://127.0.0.1:{sim_port}/v1"
        wait_for(lambda: fetch(f"{base_url}/organizations/demo/mdm/windows/enterprise/devices")[0]
                 == 401, what="simulator")
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        config = valid_config(tmp_path, base_url)
        config.write_text(
            config.read_text().replace("api:\n", f"api:\n  token_file: {token_file}\n")
        )
        with process("-m", "exporter", "--config.file", str(config), "--web.listen-address",
                     f"127.0.0.1:{port}", "--log.format", "json",
                     "--web.enable-lifecycle") as exporter:
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: fetch(f"{url}/-/healthy")[0] == 200, what="healthy")
            wait_for(lambda: fetch(f"{url}/-/ready")[0] == 200, what="ready")

            status, headers, body = fetch(
                f"{url}/metrics",
                {
                    "Accept": "application/openmetrics-text; version=1.0.0",
                    "Accept-Encoding": "gzip",
                },
            )
            assert status == 200
            assert headers["Content-Encoding"] == "gzip"
            assert headers["Content-Type"].startswith("application/openmetrics-text")
            text = gzip.decompress(body).decode()
            names = {f.name for f in openmetrics_families(text)}
            assert "applivery_windows_command_actions" in names
            assert "applivery_exporter_target_up" in names

            status, _, page = fetch(f"{url}/")
            assert status == 200 and b"Watched devices" in page

            os.kill(exporter.pid, signal.SIGHUP)
            status, _, _ = fetch(f"{url}/-/reload", method="POST")
            assert status == 200
            config.write_text("organization: [broken\n")
            status, _, body = fetch(f"{url}/-/reload", method="POST")
            assert status == 500 and b"config.yaml" in body
            _, _, metrics_text = fetch(f"{url}/metrics")
            assert b"\napplivery_exporter_config_last_reload_successful 0" in metrics_text

            exporter.send_signal(signal.SIGTERM)
            assert exporter.wait(timeout=10) == 0
            logs = exporter.stderr.read()
            assert TOKEN not in logs
            assert "poll_round" in logs
        simulator.send_signal(signal.SIGTERM)
        assert simulator.wait(timeout=10) == 0


def test_demo_serves_changing_metrics_and_stops_on_sigterm():
    port = free_port()
    with process("-m", "exporter", "--demo", "--web.listen-address", f"127.0.0.1:{port}") as demo:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: fetch(f"{url}/-/ready")[0] == 200, what="demo ready")
        _, _, first = fetch(f"{url}/metrics")
        assert b"applivery_windows_command_actions{" in first

        def transitions_counted() -> bool:
            body = fetch(f"{url}/metrics")[2]
            return b"applivery_windows_command_action_transitions_total{" in body

        wait_for(transitions_counted, timeout=40, what="status transitions in the demo")
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=10) == 0
        assert f"{url}/metrics" in demo.stdout.read()


def log_events(stream) -> queue.Queue:
    """JSON log events of a running process, read in the background (never blocks a test)."""
    events: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in stream:
            try:
                events.put(json.loads(line))
            except ValueError:
                events.put({"event": "not-json", "line": line})

    threading.Thread(target=pump, daemon=True).start()
    return events


def next_event(events: queue.Queue, name: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            event = events.get(timeout=left)
        except queue.Empty:
            break
        if event.get("event") == name:
            return event
    raise AssertionError(f"no {name!r} log event within {timeout} s")


def test_port_zero_binds_a_free_port_and_logs_it(tmp_path):
    with process("-m", "exporter", "--config.file", str(valid_config(tmp_path)),
                 "--web.listen-address", "127.0.0.1:0", "--log.format", "json",
                 env={"APPLIVERY_API_TOKEN": TOKEN}) as exporter:
        listening = next_event(log_events(exporter.stderr), "listening")
        host, _, port = listening["address"].rpartition(":")
        assert host == "127.0.0.1" and 0 < int(port) < 65536
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: fetch(f"{url}/-/healthy")[0] == 200, what="healthy on the logged port")
        exporter.send_signal(signal.SIGTERM)
        assert exporter.wait(timeout=10) == 0


def test_http_reload_needs_the_lifecycle_flag_and_sighup_works_without(tmp_path):
    config = valid_config(tmp_path)
    with process("-m", "exporter", "--config.file", str(config),
                 "--web.listen-address", "127.0.0.1:0", "--log.format", "json",
                 env={"APPLIVERY_API_TOKEN": TOKEN}) as exporter:
        events = log_events(exporter.stderr)
        port = next_event(events, "listening")["address"].rpartition(":")[2]
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: fetch(f"{url}/-/healthy")[0] == 200, what="healthy")
        config.write_text("organization: [broken\n")
        for method in ("POST", "PUT"):
            status, _, body = fetch(f"{url}/-/reload", method=method)
            assert status == 403 and b"Lifecycle API is not enabled" in body
        # The refused request read nothing: the broken file is still unread.
        assert b"\napplivery_exporter_config_last_reload_successful 1" in fetch(
            f"{url}/metrics")[2]
        os.kill(exporter.pid, signal.SIGHUP)
        next_event(events, "config_reload_failed")
        wait_for(lambda: b"\napplivery_exporter_config_last_reload_successful 0"
                 in fetch(f"{url}/metrics")[2], what="the SIGHUP reload's outcome")
        exporter.send_signal(signal.SIGTERM)
        assert exporter.wait(timeout=10) == 0
