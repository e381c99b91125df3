"""exporter/memo.py: decodings reused while a request brings the same bytes, bounded by the
records held."""

from __future__ import annotations

from exporter.memo import Memo
from exporter.records import Action, Page


def pending(count: int) -> Page[Action]:
    return Page(tuple(Action(f"c{n}", "Pending") for n in range(count)))


def test_the_same_bytes_bring_back_the_same_decoding() -> None:
    memo = Memo(10)
    decoded = pending(2)
    memo.put("a", b"body", decoded)
    assert memo.get("a", b"body") is decoded
    assert memo.get("b", b"body") is None  # another request


def test_other_bytes_miss_and_forget_the_entry() -> None:
    memo = Memo(10)
    memo.put("a", b"body", pending(2))
    assert memo.get("a", b"other") is None
    assert memo.get("a", b"body") is None
    assert len(memo) == 0


def test_the_least_recently_used_go_first_past_the_bound() -> None:
    memo = Memo(4)
    memo.put("a", b"a", pending(2))
    memo.put("b", b"b", pending(2))
    assert memo.get("a", b"a") is not None  # a is now the most recent
    memo.put("c", b"c", pending(1))  # five records: b goes
    assert memo.get("b", b"b") is None
    assert memo.get("a", b"a") is not None and memo.get("c", b"c") is not None


def test_a_page_larger_than_the_bound_or_of_finished_actions_is_not_kept() -> None:
    memo = Memo(4)
    memo.put("big", b"big", pending(5))
    memo.put("done", b"done", Page((Action("c1", "Success"),)))
    memo.put("empty", b"empty", Page(()))  # weighs one: it counts
    assert len(memo) == 1
    assert memo.get("empty", b"empty") is not None
