"""The YAML loader both config files use: numbers as written, no silent duplicates."""

from __future__ import annotations

import pytest

from exporter.problems import ConfigError, spelling
from exporter.yamlload import load_document


def test_numbers_keep_how_they_were_written() -> None:
    document = load_document("imei: 356938035643809\nzone: 010\nratio: 1.50\nn: 7\n", "f")
    assert document == {"imei": 356938035643809, "zone": 8, "ratio": 1.5, "n": 7}
    assert [spelling(document[key]) for key in document] == ["356938035643809", "010", "1.50", "7"]


def test_dates_stay_text_and_bytes_may_carry_a_byte_order_mark() -> None:
    assert load_document(b"\xef\xbb\xbfname: 2024-01-31\n", "f") == {"name": "2024-01-31"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a: 1\nb:\n  c: 2\n  c: 3\n", "f:4:3: duplicate key 'c' (first at line 3)"),
        ("a: [1\n", "f:2:1: expected ',' or ']', but got '<stream end>'"),
        (b"a: \x00", "f: not a text file (it contains NUL bytes)"),
        ("a: \x00", "f: not a text file (it contains NUL characters)"),
        (b"a: caf\xe9", "f: not a UTF-8 text file (invalid byte at offset 6)"),
        ("a: \x07", "f:1:4: character #x0007 is not allowed in YAML"),
    ],
)
def test_a_file_that_is_not_yaml_stops_at_its_first_problem(
    text: str | bytes, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_document(text, "f")
    assert caught.value.problems[0].startswith(problem)
    assert len(caught.value.problems) == 1
