"""A reload is all or nothing: the config file and the web config file are both validated
before either is applied, over HTTP against a running exporter."""

from __future__ import annotations

import base64
import re
import signal
from pathlib import Path

import bcrypt
from processes import fetch, free_port, process, wait_for

TOKEN = "reload-test-token"
DEVICE = "5f0c2d1e9b1a4c0012345678"
CONFIG = """organization: demo
api:
  base_url: http://127.0.0.1:1/v1
poll:
  interval_seconds: 2
devices:
  - id: {device}
    name: reception-pc
    labels: {{site: {site}}}
"""


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def web_config(password: str) -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return f"basic_auth_users:\n  prometheus: {hashed}\n"


def site_label(url: str, headers: dict[str, str]) -> str:
    status, _, body = fetch(f"{url}/metrics", headers)
    assert status == 200
    found = re.search(rb'applivery_windows_device_info\{[^}]*site="([^"]*)"', body)
    assert found is not None
    return found.group(1).decode()


def reload_successful(url: str, headers: dict[str, str]) -> bytes:
    body = fetch(f"{url}/metrics", headers)[2]
    found = re.search(rb"\napplivery_exporter_config_last_reload_successful (\S+)", body)
    assert found is not None
    return found.group(1)


def test_a_broken_web_config_keeps_the_old_main_config_too(tmp_path: Path):
    config, web = tmp_path / "config.yaml", tmp_path / "web.yml"
    config.write_text(CONFIG.format(device=DEVICE, site="madrid"))
    web.write_text(web_config("old-secret"))
    port = free_port()
    url, old, new = f"http://127.0.0.1:{port}", basic("prometheus", "old-secret"), basic(
        "prometheus", "new-secret")
    with process("-m", "exporter", "--config.file", str(config), "--web.config.file", str(web),
                 "--web.listen-address", f"127.0.0.1:{port}", "--web.enable-lifecycle",
                 env={"APPLIVERY_API_TOKEN": TOKEN}) as exporter:
        wait_for(lambda: fetch(f"{url}/-/healthy", old)[0] == 200, what="healthy")
        assert site_label(url, old) == "madrid"

        config.write_text(CONFIG.format(device=DEVICE, site="lisbon"))
        web.write_text("basic_auth_users:\n  prometheus: not-a-hash\n")
        status, _, body = fetch(f"{url}/-/reload", old, method="POST")
        assert status == 500 and b"basic_auth_users.prometheus" in body
        assert site_label(url, old) == "madrid"  # the new main config is not in force
        assert reload_successful(url, old) == b"0"

        web.write_text(web_config("new-secret"))
        status, _, _ = fetch(f"{url}/-/reload", old, method="POST")
        assert status == 200
        assert fetch(f"{url}/-/healthy", old)[0] == 401  # both new
        assert site_label(url, new) == "lisbon"
        assert reload_successful(url, new) == b"1"

        exporter.send_signal(signal.SIGTERM)
        assert exporter.wait(timeout=10) == 0
