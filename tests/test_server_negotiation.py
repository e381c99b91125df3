"""Content negotiation never fails on the Accept header: whatever it cannot read gets the
text format, never a 500, never a traceback in the log."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st
from server_rig import fleet, hooks

from exporter.exposition import CONTENT_TYPE_TEXT, wants_openmetrics
from exporter.server import make_app

OPENMETRICS = "application/openmetrics-text"
HOSTILE_ACCEPTS = [
    f"{OPENMETRICS}; version=\u00b2",  # a superscript two: isdigit() says yes, int() says no
    f"{OPENMETRICS}; version=" + "9" * 5000,  # past Python's limit on integer strings
    f"{OPENMETRICS}; version=1." + "0" * 5000,
    f"{OPENMETRICS}; version=",
    f"{OPENMETRICS}; version=1..0",
    f"{OPENMETRICS}; version=-1",
    f"{OPENMETRICS}; version=1e3",
    "text/plain; version=\u00b9.0.0",
    "text/plain; version=" + "1" * 5000,
    ";;;;=,,,=;",
    "garbage" * 1000,
    "\u00ff\u00fe; version=\u00bd",
]


@pytest.mark.parametrize("accept", HOSTILE_ACCEPTS, ids=range(len(HOSTILE_ACCEPTS)))
async def test_a_hostile_accept_header_gets_the_text_format(
    aiohttp_client, caplog: pytest.LogCaptureFixture, accept: str
) -> None:
    client = await aiohttp_client(make_app(hooks(fleet(2))))
    with caplog.at_level(logging.DEBUG):
        response = await client.get("/metrics", headers={"Accept": accept})
        body = await response.read()
    assert response.status == 200
    assert response.headers["Content-Type"] == CONTENT_TYPE_TEXT
    assert b"applivery_exporter_target_up" in body
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_a_readable_version_still_chooses(aiohttp_client) -> None:
    client = await aiohttp_client(make_app(hooks(fleet(1))))
    for accept, wanted in ((f"{OPENMETRICS}; version=1.0.0", OPENMETRICS),
                           (f"{OPENMETRICS}; version=0.0.1", "text/plain")):
        response = await client.get("/metrics", headers={"Accept": accept})
        assert response.content_type == wanted


@given(st.text(max_size=300))
def test_any_text_is_an_answer(accept: str) -> None:
    assert wants_openmetrics(accept) in (True, False)


@given(st.text(max_size=60), st.text(max_size=60))
def test_any_version_is_an_answer(version: str, media: str) -> None:
    assert wants_openmetrics(f"{OPENMETRICS}; version={version}, {media}") in (True, False)
    assert wants_openmetrics(f"text/plain; version={version}") in (True, False)
