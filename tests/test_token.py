"""exporter/token.py: the token, read from a file when it changes, decoded one way, never
shown; a refusal logged once per change."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from clientrig import ORG, TOKEN, simulated
from samples import Samples
from servedexporter import Served, sample, served_exporter
from structlog.testing import capture_logs

from exporter.apierrors import AuthError, TokenInvalid, TokenUnavailable
from exporter.config import ApiConfig, Config, ConfigError, parse_config, resolve_token
from exporter.token import Bearer, TokenSource, decode_token

# --- the token source -------------------------------------------------------------------------


def test_token_from_value_is_stripped() -> None:
    assert TokenSource(value=f"  {TOKEN}\n").get() == TOKEN


def test_token_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\n")
    source = TokenSource(path=str(path))
    assert source.get() == TOKEN
    # An atomic swap, as secret mounts rotate.
    fresh = tmp_path / "token.new"
    fresh.write_text("rotated-token\n")
    os.replace(fresh, path)
    assert source.get() == "rotated-token"


def test_token_file_rewritten_in_place_is_reread(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first")
    source = TokenSource(path=str(path))
    assert source.get() == "first"
    path.write_text("second-token")
    assert source.get() == "second-token"


@pytest.mark.parametrize("content", [None, "", "  \n"])
def test_missing_or_empty_token_file_is_unavailable(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TokenUnavailable) as caught:
        TokenSource(path=str(path)).get()
    assert isinstance(caught.value, AuthError)


def test_vanished_token_file_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    source = TokenSource(path=str(path))
    source.get()
    path.unlink()
    with pytest.raises(TokenUnavailable):
        source.get()


def test_token_source_repr_hides_the_value(tmp_path: Path) -> None:
    assert TOKEN not in repr(TokenSource(value=TOKEN))
    path = tmp_path / "token"
    path.write_text(TOKEN)
    source = TokenSource(path=str(path))
    source.get()
    assert TOKEN not in repr(source)


def test_token_source_needs_a_path_or_a_value() -> None:
    with pytest.raises(ValueError):
        TokenSource()


# --- the header ----------------------------------------------------------------------------------


def test_the_header_is_built_again_only_when_the_token_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    bearer = Bearer(TokenSource(path=str(path)))
    headers, sent = bearer.headers("devices")
    assert headers == {"Authorization": f"Bearer {TOKEN}"} and sent == TOKEN
    assert bearer.headers("devices")[0] is headers
    path.write_text("rotated-token")
    assert bearer.headers("devices") == ({"Authorization": "Bearer rotated-token"},
                                         "rotated-token")
    assert TOKEN not in repr(bearer)


def test_a_401_says_whether_the_token_changed_since_it_was_sent(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    bearer = Bearer(TokenSource(path=str(path)))
    _, sent = bearer.headers("devices")
    assert not bearer.refused(sent)
    path.write_text("rotated-token")
    assert bearer.refused(sent)
    assert not bearer.refused(None)  # no retry wanted: not looked at
    path.unlink()
    assert not bearer.refused(sent)  # gone: nothing new to try


def test_an_unavailable_token_names_the_endpoint_that_needed_it(tmp_path: Path) -> None:
    bearer = Bearer(TokenSource(path=str(tmp_path / "missing")))
    with pytest.raises(TokenUnavailable) as caught:
        bearer.headers("actions")
    assert caught.value.endpoint == "actions"


# --- one decoding, at check time and on every re-read ------------------------------------------


@pytest.mark.parametrize(("data", "token"), [
    (TOKEN.encode(), TOKEN),
    (f"\ufeff{TOKEN}\r\n".encode(), TOKEN),  # a BOM, as some editors write one
    (f"  {TOKEN}\n\n".encode(), TOKEN),
])
def test_a_token_file_decodes_to_its_one_word(data: bytes, token: str) -> None:
    assert decode_token(data) == token


@pytest.mark.parametrize(("data", "reason"), [
    (f"{TOKEN}\n{TOKEN}\n".encode(), "one word on one line"),
    (f"{TOKEN} second".encode(), "one word on one line"),
    (f"{TOKEN}\x00".encode(), "an HTTP header cannot carry"),
    (f"{TOKEN}\x7f".encode(), "an HTTP header cannot carry"),
    (f"{TOKEN}\u00e9".encode(), "an HTTP header cannot carry"),
    (b"\xff\xfe" + TOKEN.encode(), "not a UTF-8 text file"),
])
def test_a_token_that_cannot_be_a_header_value_is_invalid_and_not_shown(
    data: bytes, reason: str
) -> None:
    with pytest.raises(TokenInvalid) as caught:
        decode_token(data)
    assert reason in caught.value.reason
    assert TOKEN not in str(caught.value)
    assert isinstance(caught.value, AuthError)


def test_the_config_check_and_the_re_read_decode_alike(tmp_path: Path) -> None:
    path = tmp_path / "token"
    for data in (f"\ufeff{TOKEN}\n".encode(), f"{TOKEN}\nsecond\n".encode(), b"\xc3(", b"\n"):
        path.write_bytes(data)
        checked: object
        try:
            resolve_token(ApiConfig(token_file=str(path)), {})
            checked = decode_token(data)
        except ConfigError:
            checked = ConfigError
        try:
            read: object = TokenSource(path=str(path)).get()
        except TokenUnavailable:
            read = ConfigError
        assert checked == read


# --- over HTTP, against the simulator -----------------------------------------------------------


def exporter_config(url: str, devices: list[str], token_file: Path) -> Config:
    return parse_config(yaml.safe_dump({
        "organization": ORG,
        "api": {"base_url": url, "requests_per_hour": 1_000_000, "token_file": str(token_file)},
        "devices": [{"id": device} for device in devices],
        "discovery": {"batches": {"max_age": "3650d"}},
        "poll": {"strategy": "round_robin"},  # every device read every round
    }))


@pytest.fixture
async def served(
    make_simulator_server: Any, aiohttp_client: Any, tmp_path: Path
) -> AsyncIterator[tuple[Served, Path]]:
    sim = await simulated(make_simulator_server, devices=2)
    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\n")
    config = exporter_config(sim.base_url, sim.sim.fleet.device_ids(), path)
    exporter = await served_exporter(
        aiohttp_client, config, TokenSource(path=str(path)), sim.sim.clock.now
    )
    yield exporter, path
    await exporter.close()


def ups(found: Samples) -> set[float]:
    return {v for (n, _), v in found.items() if n == "applivery_exporter_target_up"}


def loud(logs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["event"], e["log_level"]) for e in logs if e["log_level"] in ("warning", "error")]


async def test_a_token_file_with_a_bom_is_sent_without_it(
    served: tuple[Served, Path],
) -> None:
    exporter, path = served
    path.write_bytes(f"\ufeff{TOKEN}\n".encode())
    resolve_token(exporter.exporter.config.api, {})  # passes the check
    await exporter.poll()
    found = await exporter.scrape()
    assert ups(found) == {1.0}
    assert sample(found, "applivery_exporter_api_requests_total", code="401") == 0
    assert await exporter.status("/-/ready") == 200


@pytest.mark.parametrize("rotated", [
    f"{TOKEN}\n{TOKEN}-2\n", f"{TOKEN}\x01", f"{TOKEN[:4]}\u2028{TOKEN[4:]}",
], ids=["two lines", "control character", "unicode line separator"])
async def test_a_token_rotated_to_an_invalid_one_is_one_clear_error_that_marks_targets_down(
    served: tuple[Served, Path], rotated: str
) -> None:
    exporter, path = served
    await exporter.poll()
    path.write_text(rotated)
    with capture_logs() as logs:
        for _ in range(3):
            await exporter.poll()  # never raises: no round crashes
    found = await exporter.scrape()
    assert ups(found) == {0.0}
    assert loud(logs) == [("api_token_invalid", "error")]
    assert TOKEN not in repr(logs)
    assert sample(found, "applivery_exporter_poll_failures_total") == 0
    path.write_text(TOKEN)
    with capture_logs() as logs:
        await exporter.poll()
    assert ups(await exporter.scrape()) == {1.0}
    assert [e["event"] for e in logs if e["event"].startswith("api_")] == ["api_auth_recovered"]


async def test_a_persistent_401_is_logged_once_when_it_begins_and_once_when_it_ends(
    served: tuple[Served, Path],
) -> None:
    exporter, path = served
    await exporter.poll()
    path.write_text("revoked-token")
    with capture_logs() as logs:
        for _ in range(4):
            await exporter.poll()
    found = await exporter.scrape()
    assert ups(found) == {0.0}
    assert loud(logs) == [("api_unauthorized", "error")]
    # The requests in between are counted, not logged.
    assert sample(found, "applivery_exporter_api_requests_total", code="401") >= 8
    path.write_text(TOKEN)
    with capture_logs() as logs:
        await exporter.poll()
        await exporter.poll()
    assert ups(await exporter.scrape()) == {1.0}
    assert [(e["event"], e["log_level"]) for e in logs if e["event"].startswith("api_")] == [
        ("api_auth_recovered", "info")
    ]
