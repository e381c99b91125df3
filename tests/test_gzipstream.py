"""gzipstream: a body of sections compressed as one gzip member, section by section.

Every member decompresses whole with gzip and zlib, and is exactly one member (curl stops
after the first); a section is deflated once whatever bodies and streams share it; the CRC
continues from the sections a body shares with the previous one of its stream."""

from __future__ import annotations

import gzip
import random
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from exporter.gzipstream import GZIP_HEADER, GzipStreams, deflate_piece, gzip_trailer


def one_member(packed: bytes) -> bytes:
    """The plain body of a stream that must be exactly one gzip member."""
    decompressor = zlib.decompressobj(wbits=31)
    plain = decompressor.decompress(packed) + decompressor.flush()
    assert decompressor.eof and decompressor.unused_data == b""
    return plain


def sections_of(rng: random.Random, count: int) -> tuple[bytes, ...]:
    return tuple(
        b"".join(b"metric{device=\"%d\"} %d\n" % (rng.randrange(10**6), i)
                 for i in range(rng.randrange(0, 300)))
        for _ in range(count)
    )


def test_a_member_is_one_gzip_member_of_the_whole_body() -> None:
    sections = sections_of(random.Random(1), 12)
    packed = b"".join(GzipStreams(level=1).member("text", sections))
    assert packed.startswith(GZIP_HEADER)
    assert one_member(packed) == b"".join(sections)
    assert gzip.decompress(packed) == b"".join(sections)


def test_an_empty_body_is_an_empty_member() -> None:
    packed = b"".join(GzipStreams(level=1).member("text", ()))
    assert one_member(packed) == b""


def test_pieces_continue_any_deflate_stream() -> None:
    # Each piece ends byte-aligned and refers to nothing before it: any order strings.
    a, b = b"first section\n" * 50, b"second\n" * 70
    for order in ((a, b), (b, a), (a, a, b)):
        packed = (
            GZIP_HEADER
            + b"".join(deflate_piece(section, 1) for section in order)
            + gzip_trailer(zlib.crc32(b"".join(order)), len(b"".join(order)))
        )
        assert one_member(packed) == b"".join(order)


def test_the_same_body_gives_the_same_parts() -> None:
    streams = GzipStreams(level=1)
    sections = sections_of(random.Random(2), 4)
    assert streams.member("text", sections) is streams.member("text", sections)


def test_a_section_is_deflated_once_whatever_shares_it(monkeypatch: pytest.MonkeyPatch) -> None:
    deflated: list[int] = []
    real = zlib.compressobj

    class Counting:
        def __init__(self, *args: Any) -> None:
            self._inner = real(*args)

        def compress(self, data: bytes) -> bytes:
            deflated.append(len(data))
            return self._inner.compress(data)

        def flush(self, mode: int) -> bytes:
            return self._inner.flush(mode)

    monkeypatch.setattr(zlib, "compressobj", Counting)
    streams = GzipStreams(level=1)
    shared = sections_of(random.Random(3), 5)
    text = (b"# text header\n", *shared, b"text self part\n")
    openmetrics = (b"# om header\n", *shared, b"om self part\n# EOF\n")
    streams.member("text", text)
    streams.member("openmetrics", openmetrics)
    assert len(deflated) == len(text) + 2  # the shared sections once, for both streams
    deflated.clear()
    changed = (*text[:-1], b"text self part, later\n")
    assert one_member(b"".join(streams.member("text", changed))) == b"".join(changed)
    assert len(deflated) == 1


def test_the_crc_runs_from_the_first_changed_section(monkeypatch: pytest.MonkeyPatch) -> None:
    summed: list[int] = []
    real = zlib.crc32
    monkeypatch.setattr(
        zlib, "crc32", lambda data, crc=0: summed.append(len(data)) or real(data, crc)
    )
    streams = GzipStreams(level=1)
    sections = sections_of(random.Random(4), 6)
    streams.member("text", sections)
    summed.clear()
    later = (*sections[:4], b"moved\n", sections[5])
    assert one_member(b"".join(streams.member("text", later))) == b"".join(later)
    assert summed == [len(b"moved\n"), len(sections[5])]


def test_equal_bytes_in_another_object_are_a_new_section() -> None:
    # Identity, not equality, tells sections apart: equal bytes are deflated again, and the
    # member is right either way.
    streams = GzipStreams(level=1)
    first = (b"a\n" * 100, b"b\n" * 100)
    streams.member("text", first)
    again = (bytes(bytearray(first[0])), first[1])
    assert one_member(b"".join(streams.member("text", again))) == b"".join(again)


def test_members_from_threads_while_bodies_change() -> None:
    streams = GzipStreams(level=1)
    rng = random.Random(5)
    base = list(sections_of(rng, 8))
    bodies = []
    for step in range(40):
        base[rng.randrange(len(base))] = b"step %d\n" % step * rng.randrange(1, 50)
        bodies.append(tuple(base))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(
            lambda i: (bodies[i], streams.member(i % 2, bodies[i])), range(len(bodies))
        ))
    for body, parts in results:
        assert one_member(b"".join(parts)) == b"".join(body)
