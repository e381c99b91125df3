"""What the exporter assumes of upstream's query parameters, and how it checks each one.

The docs (docs/upstream-api.md §4.1, §5.1, §6, §15) name ``sort``, ``tags`` and ``segmentId``
but leave open how upstream reads them. Nothing here is taken on trust:

- ``sort`` on a command history (``createdAt:desc``): each read is checked against the
  ``createdAt`` order it brings back. Ignored or refused (400), the history is read without
  it, to its end, and the newest batches are kept here (``paging.newest_first``).
- ``sort`` on the device list (the check-in look, ``lastStatusReportTime:desc``): checked the
  same way; the caller learns what each read showed (``Listing.sort_verdict``) and chooses
  what to spend instead. A refused sort raises :class:`SortRejected`.
- ``tags`` (sent as ``tags=a&tags=b``): every device is checked against its own ``tags``
  whatever upstream did with the filter; a tagged read that comes back empty is checked once
  against the unfiltered list (upstream may read another spelling and match nothing).
- ``segmentId``: sent as asked, never checkable (device documents do not carry it).

Each verdict (``honoured``, ``ignored``, ``rejected``, ``unchecked``) is kept per
(api_endpoint, parameter) by :class:`Verdicts`, logged once per change, published as the
``api_query_verdict`` metric, and re-probed hourly once given up on.

:class:`Dialect` does the reads that check: it chooses the parameters, reads through the
:class:`exporter.transport.Transport`, and notes what came back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, TypeVar

import structlog

from exporter.apierrors import ApiError, UpstreamError, is_bad_request
from exporter.paging import Order, Read, every_page, newest_first
from exporter.records import (
    Batch,
    Device,
    Page,
    decode_batch,
    decode_device,
    decode_json,
    decode_page,
    envelope_data,
)
from exporter.transport import Params, Transport, segment

log = structlog.get_logger()

T = TypeVar("T")

# --- verdicts on query parameters -------------------------------------------------------------

HONOURED, IGNORED, REJECTED, UNCHECKED = "honoured", "ignored", "rejected", "unchecked"
REPROBE_SECONDS = 3600.0  # a parameter given up on is tried again this often

Query = tuple[str, str]  # (api_endpoint, parameter)


class Verdicts:
    """How upstream reads the query parameters the client relies on but the docs leave open.

    Per (api_endpoint, parameter): ``honoured``; ``ignored`` (what came back disregards
    it); ``rejected`` (refused with a 400, or read so that it matches nothing); ``unchecked``
    (sent, no evidence either way yet, or not checkable). A parameter appears once it is
    sent; each change is logged once.

    A verdict that a parameter is not honoured holds for ``REPROBE_SECONDS`` after its last
    evidence: a read that merely looks right (a short page in order by chance, a fleet where
    every device carries the tag) does not overturn it before; and where the client stops
    sending the parameter, ``ask`` lets one read try it again that often, so an upstream
    that mends is noticed.
    """

    __slots__ = ("_entries", "_monotonic", "_published")

    def __init__(
        self,
        monotonic: Callable[[], float],
        published: Callable[[Query, str], None] | None = None,
    ) -> None:
        """``published`` hears each verdict as it is first given or changes."""
        self._monotonic = monotonic
        self._published = published
        # verdict, when last evidenced, when last probed
        self._entries: dict[Query, tuple[str, float, float]] = {}

    def __getitem__(self, query: Query) -> str:
        entry = self._entries.get(query)
        return UNCHECKED if entry is None else entry[0]

    def ask(self, query: Query, avoid: Iterable[str] = (REJECTED,), *, probe: bool = True) -> bool:
        """Whether to send the parameter now: not while its verdict is one of ``avoid``,
        but once per re-probe interval all the same (this caller probes, others wait until
        it notes evidence, or says it has none: :meth:`told_nothing`). A read that cannot
        tell by its nature (cut short on purpose) passes ``probe=False``: sending a refused
        parameter would cost it its result for nothing."""
        now = self._monotonic()
        if query not in self._entries:
            self._entries[query] = (UNCHECKED, now, now)
            self._publish(query, UNCHECKED)
        verdict, evidenced, probed = self._entries[query]
        if verdict not in avoid:
            return True
        if not probe or now - max(evidenced, probed) < REPROBE_SECONDS:
            return False
        self._entries[query] = (verdict, evidenced, now)
        return True

    def told_nothing(self, *queries: Query) -> None:
        """A read that sent these parameters showed no evidence either way (it failed, was
        cut short, or too short to show an order): a probe it took goes to the next read
        instead of waiting another interval."""
        for query in queries:
            if (entry := self._entries.get(query)) is not None:
                verdict, evidenced, _ = entry
                self._entries[query] = (verdict, evidenced, evidenced)

    def note(self, query: Query, verdict: str, **detail: Any) -> None:
        """Evidence for ``verdict`` now; logged when it changes the verdict."""
        now = self._monotonic()
        previous, evidenced, probed = self._entries.get(query, (UNCHECKED, now, now))
        if (verdict == HONOURED and previous in (IGNORED, REJECTED)
                and now - evidenced < REPROBE_SECONDS):
            return  # looks right, but the contrary was seen too recently
        fresh = query not in self._entries
        self._entries[query] = (verdict, now, probed)
        if fresh or verdict != previous:
            self._publish(query, verdict)
        if verdict == previous:
            return
        endpoint, parameter = query
        level = log.warning if verdict in (IGNORED, REJECTED) else log.info
        level("api_query_verdict", endpoint=endpoint, parameter=parameter, verdict=verdict,
              previous=previous, **detail)

    def _publish(self, query: Query, verdict: str) -> None:
        if self._published is not None:
            self._published(query, verdict)

    def snapshot(self) -> dict[Query, str]:
        return {query: entry[0] for query, entry in self._entries.items()}

    def saved(self, wall_now: float) -> list[tuple[str, str, str, float, float]]:
        """Every verdict with its moments on the wall clock (monotonic ones mean nothing to
        another process): (api_endpoint, parameter, verdict, evidenced, probed)."""
        offset = wall_now - self._monotonic()
        return [
            (endpoint, parameter, verdict, evidenced + offset, probed + offset)
            for (endpoint, parameter), (verdict, evidenced, probed) in self._entries.items()
        ]

    def restore(self, saved: Iterable[tuple[str, str, str, float, float]], wall_now: float) -> None:
        """What a previous process knew (``saved()``): a parameter it found ignored or
        refused is not sent again before its re-probe is due."""
        offset = self._monotonic() - wall_now
        for endpoint, parameter, verdict, evidenced, probed in saved:
            query = (str(endpoint), str(parameter))
            self._entries[query] = (str(verdict), evidenced + offset, probed + offset)
            self._publish(query, str(verdict))


# --- the parameters relied upon ---------------------------------------------------------------

# Keys of the verdicts (and of ``ApiClient.query_verdicts``).
HISTORY_SORT: Query = ("commands", "sort")
HISTORY_ORDER = "createdAt:desc"
DEVICE_SORT: Query = ("devices", "sort")
DEVICE_TAGS: Query = ("devices", "tags")
DEVICE_SEGMENT: Query = ("devices", "segmentId")

DEVICES = "/devices"


class SortRejected(UpstreamError):
    """A list refused its ``sort`` (400 on the sorted read, an answer without it)."""

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(endpoint, reason, 400)


class Listing(list[T]):
    """A list as read; ``sort_verdict`` says what the read showed of its ``sort``: ``honoured``
    (it came in that order), ``ignored`` (it did not) or ``unchecked`` (no sort, or nothing
    to tell)."""

    sort_verdict: str = UNCHECKED


@dataclass(frozen=True, slots=True)
class DeviceQuery:
    """A device list as the caller wants it; which of its parameters are sent is the
    dialect's choice."""

    tags: tuple[str, ...] = ()
    segment: int | None = None
    sort: str | None = None
    stop: Callable[[Device], bool] | None = None

    def params(self, *, tags: bool, sort: bool = True) -> list[tuple[str, str]]:
        """Query parameters, tags as repeated parameters (one spelling of an array)."""
        params = [("tags", tag) for tag in self.tags] if tags else []
        if self.segment is not None:
            params.append(("segmentId", str(self.segment)))
        if sort and self.sort is not None:
            params.append(("sort", self.sort))
        return params

    def sent(self, *, tags: bool) -> tuple[Query, ...]:
        """The checked parameters a read sends."""
        return (*((DEVICE_SORT,) if self.sort is not None else ()),
                *((DEVICE_TAGS,) if tags else ()))


# --- the reads that check them ----------------------------------------------------------------


class Dialect:
    """Reads whose parameters upstream may read otherwise than asked, checked as they come."""

    def __init__(
        self,
        transport: Transport,
        monotonic: Callable[[], float],
        published: Callable[[Query, str], None] | None = None,
    ) -> None:
        self.verdicts = Verdicts(monotonic, published)
        self._transport = transport
        self._monotonic = monotonic
        self._tags_checked: dict[frozenset[str], float] = {}  # tag set -> last unfiltered check

    async def list_devices(self, query: DeviceQuery) -> Listing[Device]:
        """See :meth:`exporter.client.ApiClient.list_devices`."""
        # A read cut by ``stop`` proves nothing of the filter (see _only_tagged): no probe.
        send_tags = bool(query.tags) and self.verdicts.ask(DEVICE_TAGS, probe=query.stop is None)
        if query.segment is not None:
            self.verdicts.ask(DEVICE_SEGMENT)  # sent; device documents do not say it back
        if query.sort is not None and not self.verdicts.ask(DEVICE_SORT):
            raise SortRejected("devices", f"sort {query.sort} refused upstream (remembered)")
        read, send_tags = await self._first_read(query, send_tags)
        devices = Listing(read.values())
        if query.sort is not None:
            devices.sort_verdict = self._sort_verdict(DEVICE_SORT, query.sort, read.order)
        if not query.tags:
            return devices
        return await self._only_tagged(query, devices, filtered=send_tags)

    def worth_sorting_devices(self) -> bool:
        """Whether a sorted device list is worth asking for now: not while upstream is known
        to ignore that sort, but once per re-probe interval all the same (a refused sort
        is held back by ``list_devices`` itself)."""
        return self.verdicts.ask(DEVICE_SORT, avoid=(IGNORED,))

    async def list_batches(self, device: str, max_items: int, since: float | None) -> list[Batch]:
        """See :meth:`exporter.client.ApiClient.list_batches`."""
        if max_items <= 0:
            return []
        path = f"/devices/{segment(device)}/commands"
        walk = newest_first(max_items, _created, None if since is None else _older_than(since))

        def read(params: Params) -> Awaitable[Read[Batch]]:
            return self._transport.collect(
                "commands", path, _decode_batches, _batch_key, params, walk
            )

        if not self.verdicts.ask(HISTORY_SORT, avoid=(IGNORED, REJECTED)):
            return _newest(await read(()), max_items, since)
        try:
            found = await read((("sort", HISTORY_ORDER),))
        except ApiError as exc:
            if not is_bad_request(exc):
                self.verdicts.told_nothing(HISTORY_SORT)
                raise
            found = await read(())  # refused again without it: not the sort's doing
            self.verdicts.note(HISTORY_SORT, REJECTED, sort=HISTORY_ORDER, reason=exc.reason)
        else:
            self._sort_verdict(HISTORY_SORT, HISTORY_ORDER, found.order)
        return _newest(found, max_items, since)

    # --- the device list ----------------------------------------------------------------------

    async def _first_read(self, query: DeviceQuery, send_tags: bool) -> tuple[Read[Device], bool]:
        """The read as chosen, and whether it sent the tags filter. After a 400, one request
        tells what upstream refused: the sort (:class:`SortRejected`) or the filter (read
        again without it)."""
        try:
            return await self._read(query, tags=send_tags), send_tags
        except ApiError as exc:
            if not is_bad_request(exc):
                self.verdicts.told_nothing(*query.sent(tags=send_tags))
                raise
            if query.sort is not None and await self._answers_unsorted(query, tags=send_tags):
                self.verdicts.note(DEVICE_SORT, REJECTED, sort=query.sort, reason=exc.reason)
                raise SortRejected("devices", f"sort {query.sort} refused ({exc.reason})") from None
            if not send_tags:
                raise
            read = await self._read(query, tags=False)  # fails too: not the tags
            self.verdicts.note(DEVICE_TAGS, REJECTED, tags=list(query.tags), reason=exc.reason)
            return read, False

    async def _only_tagged(
        self, query: DeviceQuery, devices: Listing[Device], *, filtered: bool
    ) -> Listing[Device]:
        """The devices carrying the tags, and what this read showed of the filter."""
        tagged = _tagged(devices, query.tags)
        if not filtered:
            return tagged  # the whole list, filtered here
        if len(tagged) < len(devices):
            self.verdicts.note(DEVICE_TAGS, IGNORED, tags=list(query.tags),
                               outside=len(devices) - len(tagged), listed=len(devices))
            return tagged
        if query.stop is not None:
            return tagged  # part of the list: neither its being short nor matching proves much
        if tagged:
            self.verdicts.note(DEVICE_TAGS, HONOURED, tags=list(query.tags))
            return tagged
        if not self._tags_worth_checking(query.tags):
            return tagged
        # Nothing at all: upstream may read the array in another spelling and match nothing.
        # One unfiltered read tells; when it shows such devices, they are the answer, and the
        # filter is no longer sent until a re-probe.
        everything = await self._read(query, tags=False, whole=True)
        tagged = _tagged(Listing(everything.values()), query.tags)
        tagged.sort_verdict = devices.sort_verdict
        if tagged:
            self.verdicts.note(DEVICE_TAGS, REJECTED, tags=list(query.tags),
                               reason="matched nothing", tagged=len(tagged))
        return tagged

    async def _read(self, query: DeviceQuery, *, tags: bool, whole: bool = False
                    ) -> Read[Device]:
        """The device list with the tags filter or without, up to ``query.stop`` unless
        ``whole``; the order noted when the sort is on a field the documents carry."""
        when = None if query.sort is None else _DEVICE_MOMENTS.get(_sort_field(query.sort)[0])
        walk = every_page(None if whole else query.stop, when)
        return await self._transport.collect(
            "devices", DEVICES, _decode_devices, _device_key, query.params(tags=tags), walk
        )

    async def _answers_unsorted(self, query: DeviceQuery, *, tags: bool) -> bool:
        """Whether the device list answers without ``sort`` (one small page): after a 400 on
        a sorted read, True puts it on the sort."""
        fetch = self._transport.pager(
            "devices", DEVICES, _decode_devices, query.params(tags=tags, sort=False)
        )
        try:
            await fetch(1, 1)
        except UpstreamError as exc:
            if exc.status == 400:
                return False
            raise
        return True

    def _tags_worth_checking(self, tags: Sequence[str]) -> bool:
        """Whether an empty tagged list is worth an unfiltered read: once per tag set and
        re-probe interval (a fleet may simply carry none of them)."""
        key = frozenset(tags)
        now = self._monotonic()
        last = self._tags_checked.get(key)
        if last is not None and now - last < REPROBE_SECONDS:
            return False
        self._tags_checked[key] = now
        return True

    # --- sorts --------------------------------------------------------------------------------

    def _sort_verdict(self, query: Query, sort: str, order: Order | None) -> str:
        """Note what a read with ``sort`` showed. Returns what holds for this read: its own
        evidence, else what the client knows of the sort."""
        descending = _sort_field(sort)[1]
        if order is None:  # a field whose values the documents do not carry
            self.verdicts.told_nothing(query)
            return UNCHECKED
        if order.confirms(descending):
            self.verdicts.note(query, HONOURED, sort=sort)
            return HONOURED
        if order.contradicts(descending):
            self.verdicts.note(query, IGNORED, sort=sort, seen=order.seen)
            return IGNORED
        if self.verdicts[query] == REJECTED:  # accepted again, order not known yet
            self.verdicts.note(query, UNCHECKED, sort=sort)
        else:  # too short to show an order
            self.verdicts.told_nothing(query)
        return self.verdicts[query]


# --- helpers ----------------------------------------------------------------------------------


def _page_decoder(decode_item: Callable[[Any], T | None]) -> Callable[[bytes, int], Page[T]]:
    def decode(body: bytes, limit: int) -> Page[T]:
        return decode_page(envelope_data(decode_json(body)), decode_item, limit)

    return decode


_decode_devices = _page_decoder(decode_device)
_decode_batches = _page_decoder(decode_batch)


def _sort_field(sort: str) -> tuple[str, bool]:
    """(field, descending) of a ``field[:asc|:desc]`` sort."""
    field, _, direction = sort.partition(":")
    return field, direction.lower() == "desc"


def _tagged(devices: Listing[Device], tags: Iterable[str]) -> Listing[Device]:
    """The devices carrying one of ``tags`` (as upstream's filter selects)."""
    wanted = frozenset(tags)
    kept = Listing(d for d in devices if not wanted.isdisjoint(d.tags))
    kept.sort_verdict = devices.sort_verdict
    return kept


def _older_than(since: float) -> Callable[[Batch], bool]:
    def older(batch: Batch) -> bool:
        return batch.created_at is not None and batch.created_at < since

    return older


def _newest(read: Read[Batch], max_items: int, since: float | None) -> list[Batch]:
    """The ``max_items`` most recently created batches of a read, none before ``since``;
    batches without a creation time last, ties in the order upstream gave."""
    batches = list(read.items.values())
    if since is not None:
        batches = [b for b in batches if b.created_at is None or b.created_at >= since]
    batches.sort(key=_creation_rank)
    return batches[:max_items]


def _creation_rank(batch: Batch) -> tuple[bool, float]:
    created = batch.created_at
    return (created is None, 0.0 if created is None else -created)


_created: Callable[[Batch], float | None] = attrgetter("created_at")
# Device fields a device-list sort can be checked on, by sort field.
_DEVICE_MOMENTS: dict[str, Callable[[Device], float | None]] = {
    "lastStatusReportTime": attrgetter("last_status_report"),
}
_device_key: Callable[[Device], str] = attrgetter("id")
_batch_key: Callable[[Batch], str] = attrgetter("id")
