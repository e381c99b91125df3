"""The decoded answer to each recent request, kept with a digest of its body.

Most pending batches do not change between two polls: when a request brings back the very
same bytes, the earlier decoding is reused and JSON parsing is skipped.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from exporter.records import Action, Page
from exporter.statuses import is_pending

MEMO_RECORDS = 50_000  # decoded records kept for re-polls that bring the same bytes


class Memo:
    """Decodings by request, reused while the body is the same.

    Entries are immutable records and tuples, so sharing them is safe. Bounded by the
    records held (a page weighs its items), so its memory does not depend on page sizes;
    least recently used go first.
    """

    __slots__ = ("_entries", "_held", "_size")

    def __init__(self, size: int = MEMO_RECORDS) -> None:
        self._entries: dict[Hashable, tuple[int, int, Any, int]] = {}
        self._held = 0
        self._size = size

    def get(self, key: Hashable, body: bytes) -> Any | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        length, digest, result, _ = entry
        # bytes cache their hash, so put() after a miss does not hash twice.
        if length != len(body) or digest != hash(body):
            self._held -= entry[3]
            return None
        self._entries[key] = entry
        return result

    def put(self, key: Hashable, body: bytes, result: Any) -> None:
        entries = self._entries
        previous = entries.pop(key, None)  # out of date either way
        if previous is not None:
            self._held -= previous[3]
        # An empty page weighs one: every entry must count towards the bound.
        weight = max(1, len(result.items)) if isinstance(result, Page) else 1
        if weight > self._size or not _may_be_read_again(result):
            return
        while entries and self._held + weight > self._size:
            self._held -= entries.pop(next(iter(entries)))[3]
        entries[key] = (len(body), hash(body), result, weight)
        self._held += weight

    def __len__(self) -> int:
        return len(self._entries)


def _may_be_read_again(result: Any) -> bool:
    # A page of finished actions is not read again (the state knows they cannot change):
    # remembering it would only push out pages that are.
    if isinstance(result, Page) and result.items and isinstance(result.items[0], Action):
        return any(is_pending(action.status) for action in result.items)
    return True
