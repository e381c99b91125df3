"""exporter/token.py: the token, read from a file when it changes, never shown."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from clientrig import TOKEN

from exporter.apierrors import AuthError, TokenUnavailable
from exporter.token import Bearer, TokenSource

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
