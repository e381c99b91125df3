"""exporter/paging.py: the pages of one read, the policy for pages that shift, order and the
walks, on pages made here (the HTTP side is in test_transport_pages.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from exporter.paging import (
    MAX_READS,
    Listed,
    Order,
    Read,
    every_page,
    newest_first,
    next_page,
    settle,
    tail_start,
)
from exporter.records import Page


def page(items: list[str], total: int | None = None, *, limit: int | None = None,
         has_next: bool | None = None, problems: int = 0) -> Page[str]:
    return Page(tuple(items), total, None, limit, has_next, ("schema",) * problems)


def identity(item: str) -> str:
    return item


class Listing:
    """Pages served from ``items`` (which a test may change between requests)."""

    def __init__(self, items: list[str], *, before: Callable[[int], None] | None = None
                 ) -> None:
        self.items = items
        self.before = before  # runs before each request, with the page number
        self.asked: list[tuple[int, int]] = []

    async def fetch(self, number: int, limit: int) -> Page[str]:
        self.asked.append((number, limit))
        if self.before is not None:
            self.before(number)
        chunk = self.items[(number - 1) * limit : number * limit]
        return page(chunk, len(self.items), limit=limit,
                    has_next=number * limit < len(self.items))


async def read_all(listing: Listing, limit: int = 3, max_pages: int = 100) -> Read[str]:
    read: Read[str] = Read(identity, limit)
    async for found in read.pages(listing.fetch, max_pages=max_pages):
        read.take(found)
    return read


# --- next_page ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("served", "number", "fetched", "limit", "expected"),
    [
        (page(["a"] * 5, has_next=True), 1, 5, 5, (True, 5)),  # hasNextPage decides
        (page(["a"] * 5, 20, has_next=False), 1, 5, 5, (False, 5)),
        (page(["a"] * 4, 10, limit=4), 1, 4, 10, (True, 4)),  # served limit below the asked
        (page(["a"] * 4, 8, limit=4), 2, 8, 4, (False, 4)),
        (page(["a"] * 5, 23), 1, 5, 10, (True, 5)),  # a silent cap: learnt from the count
        (page(["a"] * 3, 23), 5, 23, 5, (False, 5)),
        (page(["a"] * 10), 1, 10, 10, (True, 10)),  # bare: a full page may have a next
        (page(["a"] * 9), 2, 19, 10, (False, 10)),  # ... a short one ends it
        (page([]), 1, 0, 10, (False, 10)),  # nothing ends everything
    ],
)
def test_next_page(served: Page[str], number: int, fetched: int, limit: int,
                   expected: tuple[bool, int]) -> None:
    count = len(served.items) + len(served.problems)
    assert next_page(served, number, count, fetched, limit) == expected


# --- one read --------------------------------------------------------------------------------


async def test_a_read_takes_every_page_in_order() -> None:
    listing = Listing([f"i{n}" for n in range(10)])
    read = await read_all(listing)
    assert read.values() == listing.items
    assert [n for n, _ in listing.asked] == [1, 2, 3, 4]
    assert read.ended and not read.moved and read.total == 10


async def test_a_read_left_early_is_neither_ended_nor_moved() -> None:
    listing = Listing([f"i{n}" for n in range(10)])
    read: Read[str] = Read(identity, 3)
    async for found in read.pages(listing.fetch, max_pages=100):
        read.take(found, found.items[:2])
        break
    assert read.values() == ["i0", "i1"]
    assert not read.ended and not read.moved and read.missing == 0


async def test_the_page_cap_ends_a_read_without_ending_the_list() -> None:
    listing = Listing([f"i{n}" for n in range(10)])
    with capture_logs() as logs:
        read = await read_all(listing, max_pages=2)
    assert len(read.values()) == 6 and not read.ended and not read.moved
    assert [e["event"] for e in logs] == ["api_page_cap"]


@pytest.mark.parametrize(
    ("pages", "ended", "moved", "why"),
    [
        ([page(["a", "b"], 4), page(["c", "d"], 4)], True, False, "adds up"),
        ([page(["a", "b"], 4), page(["b", "c", "d"], 4)], True, False, "a repeat, nothing lost"),
        ([page(["a", "b"], 4), page(["b", "c"], 4)], True, True, "a repeat, one short"),
        ([page(["a", "b"], 4), page(["c", "d"], 5)], True, True, "totalDocs moved"),
        ([page(["a", "b"], 4), page(["c"], 4, problems=1)], True, False, "a bad item counts"),
        ([page(["a", "b"], 4), page(["b", "c"], 4)], False, True, "cut short, a repeat"),
        ([page(["a", "b"], 4), page(["c"], 4)], False, False, "cut short"),
        ([page(["a", "b"]), page(["b", "c"])], True, True, "no total, a repeat"),
    ],
)
def test_when_a_read_moved(pages: list[Page[str]], ended: bool, moved: bool, why: str) -> None:
    read: Read[str] = Read(identity, 2)
    for found in pages:
        read.take(found)
    read.ended = ended
    assert read.moved is moved, why


async def test_pages_that_slid_back_are_read_past_the_announced_end() -> None:
    # From page 3 on the window slides back two places (items inserted at the head, then
    # as many removed at the tail, as the simulator's shifting_pages does): page 3 repeats
    # two items, and the last two lie past the announced end.
    items = [f"i{n}" for n in range(9)]
    asked: list[int] = []

    async def fetch(number: int, limit: int) -> Page[str]:
        asked.append(number)
        offset = (number - 1) * limit - (2 if number >= 3 else 0)
        return page(items[offset : offset + limit], 9, limit=limit, has_next=number * limit < 9)

    read: Read[str] = Read(identity, 3)
    async for found in read.pages(fetch, max_pages=100):
        read.take(found)
    assert read.values() == items
    assert asked == [1, 2, 3, 4]
    assert read.repeated and not read.moved  # nothing lost: no second read needed


async def test_items_arriving_at_the_head_make_the_read_move() -> None:
    items = [f"i{n}" for n in range(9)]
    listing = Listing(items)

    def arrive(number: int) -> None:
        if number == 3 and len(items) == 9:
            items[:0] = ["new1", "new2"]

    listing.before = arrive
    read = await read_all(listing)
    assert set(read.values()) == {f"i{n}" for n in range(9)}
    # The new items are in front of what was read: one page past the end finds nothing,
    # and the read moved (a second one finds them).
    assert [n for n, _ in listing.asked] == [1, 2, 3, 4, 5]
    assert read.moved and read.missing == 2


async def test_a_read_does_not_go_past_the_end_of_a_list_that_did_not_move() -> None:
    # totalDocs promises more than is served, nothing shifted: upstream's count, not a shift.
    async def fetch(number: int, limit: int) -> Page[str]:
        return page(["a", "b", "c"] if number == 1 else [], 5, limit=3, has_next=False)

    read: Read[str] = Read(identity, 3)
    asked = 0
    async for found in read.pages(fetch, max_pages=10):
        asked += 1
        read.take(found)
    assert asked == 1 and read.missing == 2 and read.moved


async def test_a_jump_to_the_tail_reads_only_the_last_pages() -> None:
    listing = Listing([f"i{n:02d}" for n in range(95)])
    read: Read[str] = Read(identity, 10)
    async for found in read.pages(listing.fetch, max_pages=100):
        read.take(found)
        break
    start = tail_start(read, 20)
    assert start == 8
    async for found in read.pages(listing.fetch, max_pages=100, first=start):
        read.take(found)
    assert [n for n, _ in listing.asked] == [1, 8, 9, 10]
    assert set(read.values()) >= {f"i{n:02d}" for n in range(75, 95)}
    assert read.ended and read.gapped and read.missing == 0 and not read.moved


@pytest.mark.parametrize(
    ("total", "limit", "wanted", "start"),
    [(26, 10, 20, 2), (95, 10, 20, 8), (100, 10, 20, 9), (30, 10, 5, 3), (None, 10, 20, 2)],
)
def test_tail_start(total: int | None, limit: int, wanted: int, start: int) -> None:
    read: Read[str] = Read(identity, limit)
    read.take(page([f"i{n}" for n in range(limit)], total))
    read.next = 2
    assert tail_start(read, wanted) == start


# --- the policy for pages that shift --------------------------------------------------------


def scripted(*reads: Read[str]) -> tuple[Callable[[], Any], list[int]]:
    calls: list[int] = []

    async def again() -> Read[str]:
        calls.append(1)
        return reads[len(calls) - 1]

    return again, calls


def a_read(items: list[str], total: int, *, moved: bool) -> Read[str]:
    read: Read[str] = Read(identity, 10)
    read.take(page(items, total))
    read.totals_moved = moved
    read.ended = True
    return read


async def test_a_read_that_did_not_move_is_the_answer() -> None:
    again, calls = scripted(a_read(["a", "b"], 2, moved=False))
    assert (await settle(again)).values() == ["a", "b"]
    assert len(calls) == 1


async def test_a_read_that_moved_is_read_again_once() -> None:
    again, calls = scripted(a_read(["a"], 3, moved=True), a_read(["x", "a", "b"], 3, moved=False))
    with capture_logs() as logs:
        assert (await settle(again)).values() == ["x", "a", "b"]
    assert len(calls) == 2
    assert [e["event"] for e in logs] == ["api_pages_shifted"]


async def test_two_reads_that_moved_are_kept_together() -> None:
    again, calls = scripted(a_read(["a", "b"], 3, moved=True), a_read(["b", "c"], 3, moved=True))
    found = await settle(again)
    assert found.values() == ["a", "b", "c"]
    assert len(calls) == 2  # together they hold what totalDocs announces


async def test_reads_that_keep_moving_and_lacking_stop_at_the_bound() -> None:
    reads = [a_read(["a"], 5, moved=True) for _ in range(MAX_READS)]
    again, calls = scripted(*reads)
    with capture_logs() as logs:
        found = await settle(again)
    assert len(calls) == MAX_READS
    assert found.values() == ["a"]
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["api_pages_unstable"]


# --- order ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("moments", "seen", "confirms_desc", "contradicts_desc"),
    [
        ([3, 2, 1], "descending", True, False),
        ([3, 3, 2], "descending", False, False),  # one step proves little
        ([3, None, 2, 1], "descending", True, False),  # a missing moment is skipped
        ([1, 2, 3], "ascending", False, True),
        ([2, 3, 1], "mixed", False, True),
        ([5], "unknown", False, False),
        ([], "unknown", False, False),
    ],
)
def test_order(moments: list[float | None], seen: str, confirms_desc: bool,
               contradicts_desc: bool) -> None:
    order = Order(lambda moment: moment)
    order.see(moments[:2])
    order.see(moments[2:])  # across pages as within one
    assert order.seen == seen
    assert order.confirms(descending=True) is confirms_desc
    assert order.contradicts(descending=True) is contradicts_desc
    assert order.contradicts(descending=False) is (seen in ("descending", "mixed"))


# --- walks -----------------------------------------------------------------------------------


def moment(item: str) -> float:
    return float(item)


async def walked(listing: Listing, walk: Any, limit: int = 3) -> Read[str]:
    read: Read[str] = Read(identity, limit)
    await walk(read, Listed(listing.fetch, 100, {"endpoint": "test"}))
    return read


async def test_every_page_reads_every_item_once_and_notes_the_order() -> None:
    listing = Listing([str(n) for n in range(10, 0, -1)])
    read = await walked(listing, every_page(when=moment))
    assert read.values() == listing.items
    assert read.order is not None and read.order.confirms(descending=True)


async def test_every_page_ends_before_the_first_item_stop_accepts() -> None:
    listing = Listing([str(n) for n in range(10, 0, -1)])
    read = await walked(listing, every_page(stop=lambda item: moment(item) < 6))
    assert read.values() == ["10", "9", "8", "7", "6"]
    assert [number for number, _ in listing.asked] == [1, 2]


async def test_newest_first_stops_at_max_items_while_the_list_comes_newest_first() -> None:
    listing = Listing([str(n) for n in range(30, 0, -1)])
    read = await walked(listing, newest_first(4, moment))
    assert read.values() == ["30", "29", "28", "27", "26", "25"]  # whole pages: 4 asked
    assert [number for number, _ in listing.asked] == [1, 2]


async def test_newest_first_stops_at_the_first_older_item() -> None:
    listing = Listing([str(n) for n in range(30, 0, -1)])
    read = await walked(listing, newest_first(20, moment, older=lambda item: moment(item) < 28))
    assert read.values() == ["30", "29", "28"]
    assert [number for number, _ in listing.asked] == [1, 2]


async def test_newest_first_jumps_to_the_tail_of_a_list_that_comes_oldest_first() -> None:
    listing = Listing([str(n) for n in range(1, 31)])
    read = await walked(listing, newest_first(4, moment))
    assert {"27", "28", "29", "30"} <= set(read.items)
    # The first page shows the order; the newest four are on the last two pages.
    assert [number for number, _ in listing.asked] == [1, 9, 10]


async def test_newest_first_reads_a_list_in_no_order_to_its_end() -> None:
    listing = Listing(["5", "9", "1", "7", "3", "8", "2"])
    read = await walked(listing, newest_first(2, moment))
    assert set(read.items) == set(listing.items)


def test_the_verdict_names_still_import_from_paging() -> None:
    from exporter import dialect, paging

    assert paging.IGNORED is dialect.IGNORED
    assert paging.Verdicts is dialect.Verdicts
    with pytest.raises(AttributeError):
        _ = paging.NO_SUCH_NAME
