"""The landing page's pieces, as pure functions: ages, the left-out line, the encoding."""

from __future__ import annotations

from exporter.landing import ago, encode, left_out


def test_ages_read_in_the_unit_that_fits() -> None:
    assert ago(None) == "never"
    assert ago(100.0, now=130.0) == "30s ago"
    assert ago(0.0, now=600.0) == "10m ago"
    assert ago(0.0, now=3 * 86400.0) == "3d ago"
    assert ago(200.0, now=100.0) == "0s ago"  # a clock skewed ahead is not a negative age


def test_the_left_out_line_says_how_many_and_why() -> None:
    assert left_out(6, 6) == ""
    assert "And 1500 more devices" in left_out(500, 2000)
    assert "failing devices first" in left_out(500, 2000)


def test_encoding_replaces_what_utf8_cannot_carry() -> None:
    assert encode("a\ud800b\udfff") == b"a?b?"
    assert encode("caf\u00e9") == "caf\u00e9".encode()
