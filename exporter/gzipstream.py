"""One gzip member strung together from sections deflated on their own.

A body is a tuple of sections (bytes) that changes a few sections at a time. Compressing it
whole after every change would cost the whole body; instead each section is deflated once,
into a **piece**: raw deflate that ends in a sync flush (byte-aligned, not final) and refers
to nothing before it, so any deflate stream may continue with it and one piece serves every
body the section is part of. A gzip body (RFC 1952) is then a fixed header, the pieces in
order, an empty final block and the trailer (CRC-32 and size of the whole body). The CRC is
continued from the last section a body shares with the previous one of its stream, so
sections that rarely change belong at the front.

One member rather than one per section: Go's reader (Prometheus) and Python's read every
member of a stream, but curl stops after the first.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Hashable
from dataclasses import dataclass

GZIP_HEADER = b"\x1f\x8b\x08\x00" + b"\x00\x00\x00\x00" + b"\x04\xff"  # no mtime; fast
LAST_BLOCK = b"\x03\x00"  # an empty final block (fixed codes): the end of the deflate stream

Sections = tuple[bytes, ...]


def deflate_piece(section: bytes, level: int) -> bytes:
    """``section`` as raw deflate blocks that any deflate stream may continue with."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(section) + compressor.flush(zlib.Z_SYNC_FLUSH)


def gzip_trailer(crc: int, size: int) -> bytes:
    """The end of the member: the final block, then CRC-32 and size of the whole body."""
    return LAST_BLOCK + struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF)


@dataclass(frozen=True, slots=True)
class Member:
    """The last member made for one stream: the body it compresses, each section's piece,
    the CRC-32 after each section, and the member as bytes to write one after the other."""

    sections: Sections
    pieces: Sections
    crcs: tuple[int, ...]
    out: Sections


def _shared_prefix(old: Sections, new: Sections) -> int:
    """How many leading sections two bodies share (compared by identity)."""
    same = 0
    for a, b in zip(old, new, strict=False):
        if a is not b:
            break
        same += 1
    return same


class GzipStreams:
    """The gzip member of the current body of each stream (a stream per format).

    Sections are recognised by identity: whoever builds bodies keeps an unchanged section's
    object, and a section seen in any stream's last body is not deflated again. Safe from any
    thread: the work runs under a lock and a result is published in one assignment."""

    def __init__(self, level: int) -> None:
        self._level = level
        self._lock = threading.Lock()
        self._members: dict[Hashable, Member] = {}

    def member(self, stream: Hashable, sections: Sections) -> Sections:
        """``sections`` as one gzip member, in parts to write one after the other."""
        last = self._members.get(stream)
        if last is not None and last.sections is sections:
            return last.out
        with self._lock:
            last = self._members.get(stream)
            if last is not None and last.sections is sections:
                return last.out
            made = self._make(sections, last)
            self._members[stream] = made
            return made.out

    def _make(self, sections: Sections, last: Member | None) -> Member:
        known = {
            id(section): piece
            for member in self._members.values()
            for section, piece in zip(member.sections, member.pieces, strict=True)
        }
        # An id is only a key while its section is alive: every known one is, held by a
        # member; a new section cannot share the id of one still held.
        pieces = tuple(
            known.get(id(section)) or deflate_piece(section, self._level) for section in sections
        )
        crcs = _continued_crcs(last, sections)
        size = sum(map(len, sections))
        out = (GZIP_HEADER, *pieces, gzip_trailer(crcs[-1] if crcs else 0, size))
        return Member(sections, pieces, crcs, out)


def _continued_crcs(last: Member | None, sections: Sections) -> tuple[int, ...]:
    """CRC-32 after each section, continued from the sections shared with ``last``."""
    same = _shared_prefix(last.sections, sections) if last is not None else 0
    crcs = list(last.crcs[:same]) if last is not None else []
    crc = crcs[-1] if crcs else 0
    for section in sections[same:]:
        crc = zlib.crc32(section, crc)
        crcs.append(crc)
    return tuple(crcs)

