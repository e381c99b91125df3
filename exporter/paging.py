"""Paged lists: the pages of one read, what it brought, and one policy for pages that shift.

Upstream pages with ``page`` (1-based) and ``limit`` and answers with ``totalDocs``, often
``limit`` and ``hasNextPage`` (docs/upstream-api.md §6). A list is no snapshot: a batch
created or a device checking in between two requests moves items across page boundaries.

- ``Read.pages`` is an async generator of the pages of one read; the caller takes what it
  wants of each page (``Read.take``) and leaves the loop when it has enough (``stop``,
  ``max_items`` and sort checks are the caller's business).
- ``Read`` keeps the items by key: the one way duplicates are removed (a key seen again
  keeps its first place and takes the later copy).
- ``Read.moved`` and ``settle`` are the one policy for pages that shift: a read that may
  have missed an item (``totalDocs`` moved, the count does not add up, a key came twice in
  a read cut short) is read again; one re-read settles the common case, and when it moved
  too, the reads together are kept (``Read.union``), read on only while they still lack
  items ``totalDocs`` announces.
- ``Order`` tells which way a list came back, for lists read with a ``sort``.
- A read holds at most ``MAX_ITEMS_PER_READ`` items: past it, it fails
  (:class:`ReadTooLarge`) instead of growing with whatever upstream serves.
- A walk is one pass of a read over the pages: ``every_page`` (up to a ``stop``), or
  ``newest_first`` (the newest items whatever order upstream serves them in).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog

from exporter.apierrors import ReadTooLarge
from exporter.records import Page

log = structlog.get_logger()

T = TypeVar("T")

# Reads of one list while its pages keep shifting: one re-read in the common case, more only
# while the reads together still lack items (see ``settle``).
MAX_READS = 4

# What one read may be served, in items (kept, undecodable or cut past the limit asked):
# 1,000 pages of 100 (the default max_pages x page_size), a 100,000-device organization,
# some 27 times the largest fleet one exporter's budget polls (docs/sizing.md: ~3,700 devices
# at 10,000 requests/h), and a batch far beyond any profile's actions. Held, that is some
# 50 MB of device records; an upstream that ignores ``limit`` reaches it in a page or two
# instead of growing the process by a page's worth per request (27 MiB per 100,000 actions).
# Pages that shift keep the union of at most MAX_READS reads (``settle``), each so bounded.
MAX_ITEMS_PER_READ = 100_000

FetchPage = Callable[[int, int], Awaitable[Page[T]]]  # (page number, limit) -> the page


class Read(Generic[T]):
    """What one read of a paged list brought: items by key, ``totalDocs``, problems."""

    def __init__(self, key: Callable[[T], str], limit: int) -> None:
        self.key = key
        self.items: dict[str, T] = {}
        self.problems = 0  # undecodable items
        self.total: int | None = None  # the last totalDocs seen
        self.totals_moved = False  # totalDocs changed between two pages
        self.repeated = False  # a key came twice
        self.limit = limit  # the page size to ask for next (the one upstream serves, once known)
        self.next = 1  # the page that follows the last one read
        self.gapped = False  # pages were skipped (a jump to the tail)
        self.ended = False  # the last page was reached (not left by the caller, not capped)
        self.order: Order | None = None  # set by callers that check a sort
        self.served = 0  # items the pages carried, cut ones too (MAX_ITEMS_PER_READ)

    async def pages(
        self, fetch: FetchPage[T], *, max_pages: int, first: int = 1, **where: str
    ) -> AsyncIterator[Page[T]]:
        """Pages from ``first`` on, until the list's last page or ``max_pages`` of them
        (``where`` names the list in the log).

        When the pages slid back under the read (a key came twice, ``totalDocs`` moved) and
        items are still missing at the announced end, it reads on past it while each page
        brings some of them: items inserted at the head push the tail there. (A short list
        that did not move is upstream's count to answer for.)
        """
        self.gapped = self.gapped or first != self.next
        self.ended = False
        fetched = (first - 1) * self.limit
        lacking: int | None = None
        for number in range(first, first + max_pages):
            page = await fetch(number, self.limit)
            self._count(page, where)
            self.next = number + 1
            yield page
            count = len(page.items) + len(page.problems)
            fetched += count
            more, self.limit = next_page(page, number, count, fetched, self.limit)
            if not more and count and (self.repeated or self.totals_moved):
                left = self._unread()
                more = left > 0 and (lacking is None or left < lacking)
                lacking = left
            if not more:
                self.ended = True
                return
        log.warning("api_page_cap", pages=max_pages, **where)

    def _count(self, page: Page[T], where: dict[str, str]) -> None:
        self.served += page.served
        if self.served > MAX_ITEMS_PER_READ:
            raise ReadTooLarge(
                where.get("endpoint", "list"),
                f"read served over {MAX_ITEMS_PER_READ} items (upstream ignores limit?)",
            )

    def take(self, page: Page[T], items: Sequence[T] | None = None) -> None:
        """Note what ``page`` says of the list and keep ``items`` (default: all of its own)."""
        self.problems += len(page.problems)
        if page.total_docs is not None:
            self.totals_moved |= self.total is not None and page.total_docs != self.total
            self.total = page.total_docs
        kept = page.items if items is None else items
        keyed = dict(zip(map(self.key, kept), kept, strict=True))
        if len(keyed) != len(kept) or not self.items.keys().isdisjoint(keyed):
            self.repeated = True
        self.items.update(keyed)

    def unseen(self, items: Iterable[T]) -> list[T]:
        """``items`` whose key this read has not kept yet, in their order."""
        return [item for item in items if self.key(item) not in self.items]

    def _unread(self) -> int:
        """Items ``totalDocs`` announces that the read does not hold (0 without a total)."""
        if self.total is None:
            return 0
        return max(0, self.total - len(self.items) - self.problems)

    @property
    def moved(self) -> bool:
        """Whether the read may have missed an item, so it is worth one more: ``totalDocs``
        moved between its pages; or it read every page and holds other than ``totalDocs``
        items; or, cut short or without ``totalDocs``, a key came twice (pages slid back,
        items arrived in front). A key that came twice in a whole read whose count adds up
        lost nothing: its later copy is kept."""
        if self.totals_moved:
            return True
        if self.ended and not self.gapped and self.total is not None:
            return len(self.items) + self.problems != self.total
        return self.repeated

    @property
    def missing(self) -> int:
        """``_unread`` of a read of every page (0 for a read cut short or skipping pages)."""
        return self._unread() if self.ended and not self.gapped else 0

    def union(self, later: Read[T]) -> Read[T]:
        """Both reads: every key either kept, the later copy where both did."""
        both: Read[T] = Read(self.key, later.limit)
        both.items = {**self.items, **later.items}
        both.problems, both.total, both.order = later.problems, later.total, later.order
        both.ended, both.gapped = later.ended, later.gapped
        return both

    def values(self) -> list[T]:
        return list(self.items.values())


async def settle(read: Callable[[], Awaitable[Read[T]]], **where: Any) -> Read[T]:
    """One read, and the policy for pages that shift: a read that moved is read again; the
    first that did not move is the answer. When the second moved too, the answer is the
    union of the reads (an item seen in any is kept rather than lost), read on — up to
    ``MAX_READS`` in all — only while it lacks items ``totalDocs`` announces. ``where``
    names the list in the log."""
    found = await read()
    if not found.moved:
        return found
    for number in range(2, MAX_READS + 1):
        log.debug("api_pages_shifted", reads=number - 1, **where)
        again = await read()
        if not again.moved:
            return again
        found = found.union(again)
        if not found.missing:
            return found
    log.warning("api_pages_unstable", reads=MAX_READS, missing=found.missing, **where)
    return found


def next_page(page: Page[Any], number: int, count: int, fetched: int, limit: int
              ) -> tuple[bool, int]:
    """Whether another page follows, and the ``limit`` to ask for it.

    ``hasNextPage`` decides when present; else ``totalDocs`` against the effective page size
    (the response's ``limit``, else what has been fetched); else a short page ends the list.
    When upstream serves fewer items than asked, later pages ask for that many, so both
    sides compute the same offsets.
    """
    if count == 0:
        return False, limit
    served = page.limit if page.limit is not None and page.limit > 0 else None
    if page.has_next_page is not None:
        more = page.has_next_page
    elif page.total_docs is not None:
        more = number * served < page.total_docs if served else fetched < page.total_docs
    else:
        more = count >= (served or limit)
    if served is not None and served < limit:
        limit = served
    elif served is None and more and count < limit:
        limit = count
    return more, limit


def tail_start(read: Read[Any], wanted: int) -> int:
    """The first page that holds the ``wanted`` last items of the list (or the next page
    when the total is unknown): where a list that comes oldest first keeps its newest."""
    if read.total is None:
        return read.next
    return max(read.next, (read.total - wanted) // read.limit + 1)


# --- order ------------------------------------------------------------------------------------

ASCENDING, DESCENDING, MIXED, UNKNOWN = "ascending", "descending", "mixed", "unknown"
CONFIRMING_STEPS = 2


class Order:
    """Which way items came back, by one timestamp of theirs (items without it are skipped).

    Fed the items in the order first seen (``Read.unseen``): a page that slid back repeats
    items of the one before and says nothing of the order.
    """

    __slots__ = ("down", "last", "up", "when")

    def __init__(self, when: Callable[[Any], float | None]) -> None:
        self.when = when
        self.last: float | None = None
        self.up = 0  # steps to a later moment
        self.down = 0  # steps to an earlier moment

    def see(self, items: Iterable[Any]) -> None:
        last = self.last
        for item in items:
            moment = self.when(item)
            if moment is None:
                continue
            if last is not None:
                if moment < last:
                    self.down += 1
                elif moment > last:
                    self.up += 1
            last = moment
        self.last = last

    @property
    def seen(self) -> str:
        if self.up and self.down:
            return MIXED
        if self.up:
            return ASCENDING
        return DESCENDING if self.down else UNKNOWN

    def contradicts(self, descending: bool) -> bool:
        """True once an item came out of the order asked for."""
        return bool(self.up if descending else self.down)

    def confirms(self, descending: bool) -> bool:
        """True when items came in the order asked for, in two steps at least (two items
        in order prove little), and in no other."""
        with_it, against = (self.down, self.up) if descending else (self.up, self.down)
        return with_it >= CONFIRMING_STEPS and not against


# --- walks: how one read goes through the pages -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Listed(Generic[T]):
    """A paged list as one endpoint serves it: a page on demand, how many pages at most, and
    how the log names the list."""

    fetch: FetchPage[T]
    max_pages: int
    where: dict[str, str]

    def pages(self, read: Read[T], first: int = 1) -> AsyncIterator[Page[T]]:
        return read.pages(self.fetch, max_pages=self.max_pages, first=first, **self.where)


Walk = Callable[[Read[T], Listed[T]], Awaitable[None]]  # one pass of a read over a list


def every_page(
    stop: Callable[[T], bool] | None = None, when: Callable[[T], float | None] | None = None
) -> Walk[T]:
    """Every item once, up to the first ``stop`` accepts; ``when`` notes the order items
    came in (``Read.order``)."""

    async def walk(read: Read[T], listed: Listed[T]) -> None:
        order = read.order = None if when is None else Order(when)
        pages = listed.pages(read)
        async with contextlib.aclosing(pages):
            async for page in pages:
                if order is not None:
                    order.see(read.unseen(page.items))
                end = cut(page.items, stop)
                read.take(page, page.items[:end])
                if end is not None:
                    return

    return walk


def newest_first(
    max_items: int, when: Callable[[T], float | None], older: Callable[[T], bool] | None = None
) -> Walk[T]:
    """The ``max_items`` newest by ``when``, whatever order the list comes in: while it comes
    newest first, up to them (or the first item ``older`` accepts); else every page to the
    end, from the pages that hold the newest when it comes oldest first. The caller keeps
    the newest of what was read."""

    async def walk(read: Read[T], listed: Listed[T]) -> None:
        order = read.order = Order(when)
        jump = None
        pages = listed.pages(read)
        async with contextlib.aclosing(pages):
            async for page in pages:
                order.see(read.unseen(page.items))
                if order.contradicts(descending=True):
                    read.take(page)
                    start = tail_start(read, max_items) if order.seen == ASCENDING else read.next
                    if start > read.next:
                        jump = start
                        break
                    continue
                end = cut(page.items, older)
                read.take(page, page.items[:end])
                if end is not None or len(read.items) >= max_items:
                    return
        if jump is not None:
            async for page in listed.pages(read, jump):
                order.see(read.unseen(page.items))
                read.take(page)

    return walk


def cut(items: Sequence[T], stop: Callable[[T], bool] | None) -> int | None:
    """Index of the first item ``stop`` accepts (None: none does)."""
    if stop is not None:
        for index, item in enumerate(items):
            if stop(item):
                return index
    return None


# The verdicts on query parameters moved to exporter.dialect; imports of their names from
# here still work.
_MOVED_TO_DIALECT = frozenset({"HONOURED", "IGNORED", "REJECTED", "UNCHECKED",
                               "REPROBE_SECONDS", "Query", "Verdicts"})


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_DIALECT:
        return getattr(importlib.import_module("exporter.dialect"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
