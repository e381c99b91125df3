"""What users of Prometheus exporters expect: --web.telemetry-path, several
--web.listen-address, and build_info's version, revision and python_version."""

from __future__ import annotations

import platform
import signal
import socket

import pytest
from processes import fetch, process, valid_config, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_cli import log_events, next_event

from exporter.cli import EXIT_USAGE, main
from exporter.selfexposition import build_labels

TOKEN = "conventions-test-token"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def _addresses(events, count: int) -> list[str]:
    return [next_event(events, "listening")["address"] for _ in range(count)]


def _stop(exporter) -> None:
    exporter.send_signal(signal.SIGTERM)
    assert exporter.wait(timeout=10) == 0


def test_the_telemetry_path_serves_metrics_and_metrics_answers_404(tmp_path):
    with process("-m", "exporter", "--config.file", str(valid_config(tmp_path)),
                 "--web.listen-address", "127.0.0.1:0", "--web.telemetry-path", "/prom/m",
                 "--log.format", "json", env={"APPLIVERY_API_TOKEN": TOKEN}) as exporter:
        (address,) = _addresses(log_events(exporter.stderr), 1)
        url = f"http://{address}"
        wait_for(lambda: fetch(f"{url}/-/healthy")[0] == 200, what="healthy")
        status, _, body = fetch(f"{url}/prom/m")
        assert status == 200 and b"applivery_exporter_build_info{" in body
        assert fetch(f"{url}/metrics")[0] == 404
        assert b'<a href="/prom/m">Metrics</a>' in fetch(f"{url}/")[2]
        _stop(exporter)


def test_every_listen_address_is_bound_and_logged(tmp_path):
    wanted = ["127.0.0.1:0", "[::1]:0"] if _ipv6_loopback() else ["127.0.0.1:0", "127.0.0.2:0"]
    flags = [f"--web.listen-address={address}" for address in wanted]
    with process("-m", "exporter", "--config.file", str(valid_config(tmp_path)), *flags,
                 "--log.format", "json", env={"APPLIVERY_API_TOKEN": TOKEN}) as exporter:
        addresses = _addresses(log_events(exporter.stderr), 2)
        hosts = [address.rpartition(":")[0] for address in addresses]
        assert hosts == [address.rpartition(":")[0] for address in wanted]
        assert all(int(address.rpartition(":")[2]) > 0 for address in addresses)
        for address in addresses:
            wait_for(lambda a=address: fetch(f"http://{a}/metrics")[0] == 200,
                     timeout=15, what=f"metrics on {address}")
        _stop(exporter)


def test_build_info_names_version_revision_and_python_version(tmp_path):
    env = {"APPLIVERY_API_TOKEN": TOKEN, "APPLIVERY_EXPORTER_REVISION": "0123abc"}
    with process("-m", "exporter", "--config.file", str(valid_config(tmp_path)),
                 "--web.listen-address", "127.0.0.1:0", "--log.format", "json",
                 env=env) as exporter:
        (address,) = _addresses(log_events(exporter.stderr), 1)
        wait_for(lambda: fetch(f"http://{address}/-/healthy")[0] == 200, what="healthy")
        body = fetch(f"http://{address}/metrics")[2].decode()
        _stop(exporter)
    (family,) = [f for f in text_string_to_metric_families(body)
                 if f.name == "applivery_exporter_build_info"]
    (sample,) = family.samples
    assert sample.value == 1
    assert set(sample.labels) == {"version", "revision", "python_version"}
    assert sample.labels["revision"] == "0123abc"
    assert sample.labels["python_version"] == platform.python_version()


def test_revision_is_unknown_unless_the_build_tells_it():
    assert build_labels({})["revision"] == "unknown"
    assert build_labels({"APPLIVERY_EXPORTER_REVISION": " "})["revision"] == "unknown"
    assert build_labels({"APPLIVERY_EXPORTER_REVISION": "f3185c6"})["revision"] == "f3185c6"


@pytest.mark.parametrize("path", ["metrics", "/", "/-/healthy"])
def test_a_telemetry_path_that_cannot_be_served_is_bad_usage(path, capsys):
    assert main(["--web.telemetry-path", path]) == EXIT_USAGE
    assert "--web.telemetry-path" in capsys.readouterr().err
