"""Async client of the upstream API: session, auth, paging, request budget, retries, throttling.

One ``ApiClient`` per process. Every attempt goes through the same gate, in this order: a
concurrency slot, then the shared :class:`TokenBucket` (which also holds the client-wide
"not before" pause set by 429/503), then the HTTP request. Decoding is delegated to the pure
functions of :mod:`exporter.records`; a request that brings back the very bytes it brought
last time reuses that decoding (pending batches mostly look the same poll after poll).

The API token is read from a :class:`TokenSource` on every attempt, so a rotated token file
takes effect without a restart. It is only ever placed in the ``Authorization`` header: error
messages, log events, reprs and metrics never carry it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from operator import attrgetter
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import structlog

from exporter.paging import (
    ASCENDING,
    HONOURED,
    IGNORED,
    REJECTED,
    REPROBE_SECONDS,
    UNCHECKED,
    FetchPage,
    Order,
    Query,
    Read,
    Verdicts,
    settle,
    tail_start,
)
from exporter.records import (
    SCHEMA,
    Action,
    Batch,
    Device,
    InvalidBody,
    Page,
    decode_actions_body,
    decode_batch,
    decode_device,
    decode_json,
    decode_page,
    envelope_data,
    error_code,
)
from exporter.selfmetrics import SelfMetrics
from exporter.statuses import is_pending
from exporter.tokenbucket import TokenBucket

log = structlog.get_logger()

T = TypeVar("T")
R = TypeVar("R")

RETRY_AFTER_CAP = 300.0  # an absurd Retry-After must not stall the exporter for hours
BACKOFF_BASE = 0.5
BACKOFF_CAP = 60.0
CHUNK_BYTES = 64 * 1024
MEMO_RECORDS = 50_000  # decoded records kept for re-polls that bring the same bytes
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

BASE_PATH = "/organizations/{org}/mdm/windows/enterprise"

# Query parameters whose reading upstream leaves undocumented (docs/upstream-api.md §6, §15),
# as keys of ``ApiClient.query_verdicts``.
HISTORY_SORT: Query = ("commands", "sort")
HISTORY_ORDER = "createdAt:desc"
DEVICE_SORT: Query = ("devices", "sort")
DEVICE_TAGS: Query = ("devices", "tags")
# Sent as asked but never checked: device documents do not carry their segment (§5.1).
DEVICE_SEGMENT: Query = ("devices", "segmentId")


# --- errors ----------------------------------------------------------------------------------


class ApiError(Exception):
    """A call that failed for good. ``reason`` is short and never contains the token."""

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(f"{endpoint}: {reason}")
        self.endpoint = endpoint
        self.reason = reason


class AuthError(ApiError):
    """401 (upstream codes 4002 no token, 4004 invalid token); retried only once, and only
    when the token file changed since the request was sent (``token_changed``)."""

    def __init__(
        self, endpoint: str, reason: str, code: int | None = None, *, token_changed: bool = False
    ) -> None:
        super().__init__(endpoint, reason)
        self.code = code
        self.token_changed = token_changed


class TokenUnavailable(AuthError):
    """The token file vanished, cannot be read, or is empty."""


class NotFoundError(ApiError):
    """404 (upstream code 3001, unknown organization, device or batch); not retried."""

    def __init__(self, endpoint: str, reason: str, code: int | None = None) -> None:
        super().__init__(endpoint, reason)
        self.code = code


class UpstreamError(ApiError):
    """Anything else: 5xx, timeouts, resets or bad bodies after retries, 400, 403, ..."""

    def __init__(self, endpoint: str, reason: str, status: int | None = None) -> None:
        super().__init__(endpoint, reason)
        self.status = status


class SortRejected(UpstreamError):
    """A list refused its ``sort`` (400 on the sorted read, an answer without it)."""

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(endpoint, reason, 400)


class Listing(list[T]):
    """A list as read; ``sort_verdict`` says what the read showed of its ``sort``: ``honoured``
    (it came in that order), ``ignored`` (it did not) or ``unchecked`` (no sort, or nothing
    to tell)."""

    sort_verdict: str = UNCHECKED


# --- the token ---------------------------------------------------------------------------------


class TokenSource:
    """The API token, from a file (re-read when it changes) or a fixed value."""

    __slots__ = ("_cached", "_path", "_stamp", "_value")

    def __init__(self, *, path: str | None = None, value: str | None = None) -> None:
        if path is None and value is None:
            raise ValueError("a token source needs a path or a value")
        self._path = path
        self._value = value
        self._stamp: tuple[int, int, int] | None = None
        self._cached = ""

    def __repr__(self) -> str:
        return f"TokenSource(path={self._path!r})" if self._path else "TokenSource(value=<hidden>)"

    def get(self) -> str:
        if self._path is None:
            token = (self._value or "").strip()
            if not token:
                raise TokenUnavailable("token", "token is empty")
            return token
        try:
            stat = os.stat(self._path)
        except OSError as exc:
            raise TokenUnavailable("token", f"token file unreadable ({exc.strerror})") from None
        # The inode catches an atomic swap (how Kubernetes rotates mounted secrets).
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp != self._stamp:
            self._cached = self._read()
            self._stamp = stamp
        return self._cached

    def invalidate(self) -> None:
        """Re-read the file on the next ``get`` even if it looks unchanged (after a 401)."""
        self._stamp = None

    def _read(self) -> str:
        assert self._path is not None
        try:
            with open(self._path, encoding="utf-8") as handle:
                token = handle.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            # The exception text could quote the file's bytes: name the class only.
            raise TokenUnavailable(
                "token", f"token file unreadable ({type(exc).__name__})"
            ) from None
        if not token:
            raise TokenUnavailable("token", "token file is empty")
        return token


# --- Retry-After ------------------------------------------------------------------------------


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta seconds or an HTTP date.

    ``now`` is the epoch moment the date is measured against. ``None`` when the header is
    absent or unreadable; never negative.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if moment.tzinfo is None:  # obsolete formats without a zone: HTTP dates are GMT
            return None
        seconds = moment.timestamp() - now
    if seconds != seconds or seconds == float("inf"):  # NaN or inf
        return None
    return max(0.0, seconds)


def _response_now(date_header: str | None) -> float:
    """The server's own clock from ``Date``, else ours: an HTTP-date Retry-After is then
    measured on the clock that wrote it."""
    if date_header:
        try:
            moment = parsedate_to_datetime(date_header)
        except (TypeError, ValueError, IndexError):
            moment = None
        if moment is not None and moment.tzinfo is not None:
            return moment.timestamp()
    return time.time()


# --- one attempt -----------------------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Failure:
    code: str  # the metrics code
    reason: str
    status: int | None = None
    retry_after: float | None = None
    sent_at: float | None = None  # when the request went out (after its budget wait)


class _Memo:
    """The decoded answer to each recent request, kept with a digest of its body.

    Most pending batches do not change between two polls: when a request brings back the
    very same bytes, the earlier decoding is reused and JSON parsing is skipped. Entries are
    immutable records and tuples, so sharing them is safe. Bounded by the records held (a
    page weighs its items), so its memory does not depend on page sizes; least recently
    used go first.
    """

    __slots__ = ("_entries", "_held", "_size")

    def __init__(self, size: int) -> None:
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


def _page_decoder(decode_item: Callable[[Any], T | None]) -> Callable[[bytes], Page[T]]:
    def decode(body: bytes) -> Page[T]:
        return decode_page(envelope_data(decode_json(body)), decode_item)

    return decode


_decode_devices = _page_decoder(decode_device)
_decode_batches = _page_decoder(decode_batch)


def _decode_batch_strict(body: bytes) -> Batch:
    batch = decode_batch(envelope_data(decode_json(body)))
    if batch is None:
        raise InvalidBody("command has no id")
    return batch


class ApiClient:
    """The upstream API as typed records. Shared by every poller of the process."""

    def __init__(
        self,
        *,
        base_url: str,
        organization: str,
        token: TokenSource,
        metrics: SelfMetrics,
        timeout_seconds: float = 10,
        max_concurrency: int = 8,
        requests_per_hour: float = 9000,
        page_size: int = 100,
        max_pages: int = 1000,
        max_attempts: int = 4,
        max_body_bytes: int = 32 * 2**20,
        memo_records: int = MEMO_RECORDS,
        session: aiohttp.ClientSession | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ) -> None:
        self._root = base_url.rstrip("/") + BASE_PATH.format(org=quote(organization, safe=""))
        self._token = token
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._max_concurrency = max(1, max_concurrency)
        self._slots = asyncio.Semaphore(self._max_concurrency)
        self.page_size = max(1, page_size)
        self.max_pages = max(1, max_pages)
        self.max_attempts = max(1, max_attempts)
        self.max_body_bytes = max_body_bytes
        self._session = session
        self._owns_session = session is None
        self._sleep = sleep
        self._monotonic = monotonic
        self._rng = random.Random(seed)
        self.budget = TokenBucket(requests_per_hour, monotonic=monotonic, sleep=sleep)
        self._memo = _Memo(memo_records)
        self._verdicts = Verdicts(monotonic, published=self._publish_verdict)
        self._tags_checked: dict[frozenset[str], float] = {}  # tag set -> last unfiltered check
        self._headers: dict[str, str] = {}
        self._headers_token = ""

    def __repr__(self) -> str:
        return f"ApiClient(root={self._root!r})"

    def use_token(self, token: TokenSource) -> None:
        """Switch the token source (a reload that points ``api.token_file`` elsewhere)."""
        self._token = token

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    # --- endpoints ----------------------------------------------------------------------------

    def _publish_verdict(self, query: tuple[str, str], verdict: str) -> None:
        """Each verdict, as it changes, where the exposition reads it."""
        self._metrics.query_verdicts[query] = verdict
        self._metrics.touch()

    @property
    def query_verdicts(self) -> dict[tuple[str, str], str]:
        """How upstream reads each query parameter the client sent whose reading the docs
        leave open, by (api_endpoint, parameter): ``honoured``, ``ignored``, ``rejected`` or
        ``unchecked`` (see :class:`exporter.paging.Verdicts`). A copy, read-only."""
        return self._verdicts.snapshot()

    async def list_devices(
        self,
        *,
        tags: Sequence[str] = (),
        segment: int | None = None,
        sort: str | None = None,
        stop: Callable[[Device], bool] | None = None,
    ) -> Listing[Device]:
        """Enrolled devices; with ``tags``, only those carrying one of them (checked on each
        device's own ``tags``, whatever upstream did with the filter); with ``stop``, the
        list ends before the first item it accepts (with ``sort``, e.g. the devices that
        checked in since a moment).

        ``sort`` (``field:asc|desc``) is checked against what comes back: the result's
        ``sort_verdict`` says whether this read came in that order (``honoured``) or did not
        (``ignored``: then ``stop`` cut it at an arbitrary place); when the read cannot
        tell (a short page), what the client knows of that sort (``query_verdicts``,
        ``unchecked`` at first). The client does not fall back on its own: reading the
        whole list instead is the caller's choice of budget. A sort upstream refuses raises
        :class:`SortRejected`, without a request until it is due for a re-probe.
        """
        wanted = tuple(tags)
        # A read cut by ``stop`` proves nothing of the filter (see below): it does not probe.
        send_tags = bool(wanted) and self._verdicts.ask(DEVICE_TAGS, probe=stop is None)
        if segment is not None:
            self._verdicts.ask(DEVICE_SEGMENT)  # sent; device documents do not say it back
        if sort is not None and not self._verdicts.ask(DEVICE_SORT):
            raise SortRejected("devices", f"sort {sort} refused upstream (remembered)")
        sent = wanted if send_tags else ()
        try:
            read = await self._device_read(sent, segment, sort, stop)
        except ApiError as exc:
            if not (isinstance(exc, UpstreamError) and exc.status == 400):
                self._verdicts.told_nothing(
                    *((DEVICE_SORT,) if sort is not None else ()),
                    *((DEVICE_TAGS,) if send_tags else ()),
                )
                raise
            if sort is not None and await self._devices_answer(sent, segment):
                self._verdicts.note(DEVICE_SORT, REJECTED, sort=sort, reason=exc.reason)
                raise SortRejected("devices", f"sort {sort} refused ({exc.reason})") from None
            if not send_tags:
                raise
            read = await self._device_read((), segment, sort, stop)  # fails too: not the tags
            self._verdicts.note(DEVICE_TAGS, REJECTED, tags=list(wanted), reason=exc.reason)
            send_tags = False
        devices = Listing(read.values())
        if sort is not None:
            devices.sort_verdict = self._sort_verdict(DEVICE_SORT, sort, read.order)
        if not wanted:
            return devices
        tagged = _tagged(devices, wanted)
        if not send_tags:
            return tagged  # the whole list, filtered here
        if len(tagged) < len(devices):
            self._verdicts.note(DEVICE_TAGS, IGNORED, tags=list(wanted),
                                outside=len(devices) - len(tagged), listed=len(devices))
            return tagged
        if stop is not None:
            return tagged  # part of the list: neither its being short nor matching proves much
        if tagged:
            self._verdicts.note(DEVICE_TAGS, HONOURED, tags=list(wanted))
        elif self._tags_worth_checking(wanted):
            # Nothing at all: upstream may read the array in another spelling and match
            # nothing. One unfiltered read tells; when it shows such devices, they are the
            # answer, and the filter is no longer sent until a re-probe.
            everything = await self._device_read((), segment, sort, None)
            tagged = _tagged(Listing(everything.values()), wanted)
            tagged.sort_verdict = devices.sort_verdict
            if tagged:
                self._verdicts.note(DEVICE_TAGS, REJECTED, tags=list(wanted),
                                    reason="matched nothing", tagged=len(tagged))
        return tagged

    def worth_sorting_devices(self) -> bool:
        """Whether a sorted device list is worth asking for now: not while upstream is known
        to ignore that sort, but once per re-probe interval all the same (a refused sort
        is held back by ``list_devices`` itself)."""
        return self._verdicts.ask(DEVICE_SORT, avoid=(IGNORED,))

    async def list_batches(
        self, device: str, *, max_items: int, since: float | None = None
    ) -> list[Batch]:
        """Command history, newest first: the ``max_items`` most recently created, none
        created before ``since``, whatever upstream does with ``sort``.

        The history is asked for ``createdAt:desc`` and read while it comes in that order
        (usually one page). Out of order, it is read to its end — from the pages that hold
        its newest when it comes oldest first — and the newest are kept here. A sort that
        is ignored or refused is no longer sent until a re-probe (``query_verdicts``).
        """
        if max_items <= 0:
            return []
        path = f"/devices/{_segment(device)}/commands"

        def read(params: Sequence[tuple[str, str]]) -> Awaitable[Read[Batch]]:
            return settle(lambda: self._recent(path, params, max_items, since),
                          endpoint="commands", path=path)

        if not self._verdicts.ask(HISTORY_SORT, avoid=(IGNORED, REJECTED)):
            return _newest(await read(()), max_items, since)
        try:
            found = await read((("sort", HISTORY_ORDER),))
        except ApiError as exc:
            if not (isinstance(exc, UpstreamError) and exc.status == 400):
                self._verdicts.told_nothing(HISTORY_SORT)
                raise
            found = await read(())  # refused again without it: not the sort's doing
            self._verdicts.note(HISTORY_SORT, REJECTED, sort=HISTORY_ORDER, reason=exc.reason)
        else:
            self._sort_verdict(HISTORY_SORT, HISTORY_ORDER, found.order)
        return _newest(found, max_items, since)

    async def get_batch(self, device: str, batch: str) -> Batch:
        path = f"/devices/{_segment(device)}/commands/{_segment(batch)}"
        return await self._fetch("command", path, (), _decode_batch_strict)

    async def list_actions(self, device: str, batch: str) -> list[Action]:
        path = f"/devices/{_segment(device)}/commands/{_segment(batch)}/actions"
        read = await self._collect("actions", path, decode_actions_body, _action_key, ())
        return read.values()

    # --- lists, as the pager reads them ----------------------------------------------------------

    async def _collect(
        self, endpoint: str, path: str, decode: Callable[[bytes], Page[T]],
        key: Callable[[T], str], params: Sequence[tuple[str, str]], *,
        stop: Callable[[T], bool] | None = None, when: Callable[[T], float | None] | None = None,
    ) -> Read[T]:
        """Every item of a paged list once (up to the first ``stop`` accepts), read again if
        its pages shifted (``paging.settle``); ``when`` notes the order items came in
        (``Read.order``)."""
        fetch = self._pager(endpoint, path, decode, params)

        async def once() -> Read[T]:
            read = Read(key, self.page_size)
            order = read.order = None if when is None else Order(when)
            pages = read.pages(fetch, max_pages=self.max_pages, endpoint=endpoint, path=path)
            async with contextlib.aclosing(pages):
                async for page in pages:
                    if order is not None:
                        order.see(read.unseen(page.items))
                    cut = _cut(page.items, stop)
                    read.take(page, page.items[:cut])
                    if cut is not None:
                        break
            return read

        return await settle(once, endpoint=endpoint, path=path)

    async def _recent(
        self, path: str, params: Sequence[tuple[str, str]], max_items: int, since: float | None
    ) -> Read[Batch]:
        """One read of a history for its ``max_items`` newest batches: while it comes newest
        first, up to them (or the first created before ``since``); else every page to the
        end, starting from the pages that hold the newest when it comes oldest first."""
        fetch = self._pager("commands", path, _decode_batches, params)
        read: Read[Batch] = Read(_batch_key, self.page_size)
        order = read.order = Order(_created)
        where = {"endpoint": "commands", "path": path}
        jump = None
        pages = read.pages(fetch, max_pages=self.max_pages, **where)
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
                cut = _cut(page.items, None if since is None else _older_than(since))
                read.take(page, page.items[:cut])
                if cut is not None or len(read.items) >= max_items:
                    return read
        if jump is not None:
            async for page in read.pages(fetch, max_pages=self.max_pages, first=jump, **where):
                order.see(read.unseen(page.items))
                read.take(page)
        return read

    def _pager(
        self, endpoint: str, path: str, decode: Callable[[bytes], Page[T]],
        params: Sequence[tuple[str, str]],
    ) -> FetchPage[T]:
        """One page of a list: a logical request with its retries, through the budget."""

        async def fetch(number: int, limit: int) -> Page[T]:
            query = [*params, ("page", str(number)), ("limit", str(limit))]
            return await self._fetch(endpoint, path, query, decode)

        return fetch

    async def _device_read(
        self,
        tags: Sequence[str],
        segment: int | None,
        sort: str | None,
        stop: Callable[[Device], bool] | None,
    ) -> Read[Device]:
        params = _device_params(tags, segment)
        when = None
        if sort is not None:
            params.append(("sort", sort))
            when = _DEVICE_MOMENTS.get(_sort_field(sort)[0])
        return await self._collect(
            "devices", "/devices", _decode_devices, _device_key, params, stop=stop, when=when
        )

    async def _devices_answer(self, tags: Sequence[str], segment: int | None) -> bool:
        """Whether the device list answers without ``sort`` (one small page): after a 400 on
        a sorted read, True puts it on the sort."""
        params = _device_params(tags, segment)
        try:
            await self._pager("devices", "/devices", _decode_devices, params)(1, 1)
        except UpstreamError as exc:
            if exc.status == 400:
                return False
            raise
        return True

    def _sort_verdict(self, query: Query, sort: str, order: Order | None) -> str:
        """Note what a read with ``sort`` showed. Returns what holds for this read: its own
        evidence, else what the client knows of the sort."""
        descending = _sort_field(sort)[1]
        if order is None:  # a field whose values the documents do not carry
            self._verdicts.told_nothing(query)
            return UNCHECKED
        if order.confirms(descending):
            self._verdicts.note(query, HONOURED, sort=sort)
            return HONOURED
        if order.contradicts(descending):
            self._verdicts.note(query, IGNORED, sort=sort, seen=order.seen)
            return IGNORED
        if self._verdicts[query] == REJECTED:  # accepted again, order not known yet
            self._verdicts.note(query, UNCHECKED, sort=sort)
        else:  # too short to show an order
            self._verdicts.told_nothing(query)
        return self._verdicts[query]

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

    # --- requests -----------------------------------------------------------------------------

    async def _fetch(
        self,
        endpoint: str,
        path: str,
        params: Sequence[tuple[str, str]],
        decode: Callable[[bytes], R],
    ) -> R:
        """One logical request: attempts with retries until decoded or failed for good."""
        url = self._root + path
        failure: _Failure | None = None
        for attempt in range(1, self.max_attempts + 1):
            try:
                outcome = await self._attempt(endpoint, url, params, decode)
            except AuthError as exc:
                if not exc.token_changed:
                    raise
                # Rotated while the request was on its way: one more try with the new token
                # (a second 401 cannot be a rotation again, so it is final).
                log.info("api_token_changed_retrying", endpoint=endpoint)
                outcome = await self._attempt(endpoint, url, params, decode, auth_retry=False)
            if not isinstance(outcome, _Failure):
                return outcome
            failure = outcome
            if attempt == self.max_attempts:
                break
            delay = self._backoff(attempt)
            if failure.status == 429 or (failure.status == 503 and failure.retry_after is not None):
                retry_after = failure.retry_after
                pause = delay if retry_after is None else min(retry_after, RETRY_AFTER_CAP)
                self.budget.throttle(pause, sent_at=failure.sent_at)
                self._metrics.budget_requests_per_hour = self.budget.effective_rate_per_hour
                log.warning(
                    "api_throttled",
                    endpoint=endpoint,
                    status=failure.status,
                    pause_seconds=round(pause, 3),
                    rate_per_hour=round(self._metrics.budget_requests_per_hour, 1),
                )
                continue  # the bucket holds every caller until the pause ends
            log.debug(
                "api_retry",
                endpoint=endpoint,
                attempt=attempt,
                code=failure.code,
                reason=failure.reason,
                delay_seconds=round(delay, 3),
            )
            await self._sleep(delay)
        assert failure is not None
        raise UpstreamError(
            endpoint, f"{failure.reason} after {self.max_attempts} attempts", failure.status
        )

    def _backoff(self, attempt: int) -> float:
        # Full jitter: callers that failed together do not retry together.
        return self._rng.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1)))

    async def _attempt(
        self,
        endpoint: str,
        url: str,
        params: Sequence[tuple[str, str]],
        decode: Callable[[bytes], R],
        *,
        auth_retry: bool = True,
    ) -> R | _Failure:
        headers = self._auth_headers(endpoint)
        token_sent = self._headers_token
        session = self._session or self._new_session()
        async with self._slots:
            await self.budget.acquire()
            started = self._monotonic()
            try:
                async with session.get(
                    url, params=params, headers=headers, timeout=self._timeout
                ) as response:
                    status = response.status
                    body = await self._read(response)
                    retry_header = response.headers.get("Retry-After")
                    date_header = response.headers.get("Date")
            except TimeoutError:
                return self._failed(endpoint, started, _Failure("timeout", "timeout"))
            except _BodyTooLarge:
                # Deterministic for a given resource: not retried.
                self._observe(endpoint, "invalid_body", started)
                raise UpstreamError(endpoint, "body too large") from None
            except (aiohttp.ClientError, OSError) as exc:
                reason = f"connection error ({type(exc).__name__})"
                return self._failed(endpoint, started, _Failure("connection", reason))
        if 200 <= status < 300:
            key = (url, *params)
            result = self._memo.get(key, body)
            if result is None:
                try:
                    result = decode(body)
                except InvalidBody as exc:
                    return self._failed(
                        endpoint, started, _Failure("invalid_body", f"invalid body: {exc}")
                    )
                self._memo.put(key, body, result)
                if isinstance(result, Page) and result.problems:
                    # Once per response: a re-poll that brings the same bytes is not news.
                    self._metrics.parse_problem(SCHEMA, len(result.problems))
            self._observe(endpoint, str(status), started)
            return result
        self._observe(endpoint, str(status), started)
        if status == 401:
            raise self._auth_failure(endpoint, body, token_sent if auth_retry else None)
        return self._http_failure(endpoint, status, body, retry_header, date_header, started)

    def _auth_failure(self, endpoint: str, body: bytes, token_sent: str | None) -> AuthError:
        """A 401; ``token_changed`` when the token file now holds another token than
        ``token_sent`` (None: no retry wanted)."""
        code = _upstream_code(body)
        self._token.invalidate()
        changed = False
        if token_sent is not None:
            with contextlib.suppress(TokenUnavailable):  # gone: nothing new to try
                changed = self._token.get() != token_sent
        return AuthError(endpoint, _reason(401, code), code, token_changed=changed)

    def _http_failure(
        self,
        endpoint: str,
        status: int,
        body: bytes,
        retry_header: str | None,
        date_header: str | None,
        sent_at: float,
    ) -> _Failure:
        """Classify a non-2xx answer: raise for the final ones, describe the retryable ones."""
        upstream_code = _upstream_code(body)
        reason = _reason(status, upstream_code)
        if status == 404:
            raise NotFoundError(endpoint, reason, upstream_code)
        if status not in RETRYABLE_STATUSES and not 500 <= status < 600:
            raise UpstreamError(endpoint, reason, status)
        retry_after = None
        if status in (429, 503) and retry_header is not None:
            retry_after = parse_retry_after(retry_header, now=_response_now(date_header))
        return _Failure(str(status), reason, status, retry_after, sent_at)

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        length = response.content_length
        # A declared length of an uncompressed body is checked up front and read in one go;
        # anything else is counted as it arrives (a compressed length says nothing of the
        # decoded size).
        if length is not None and not response.headers.get("Content-Encoding"):
            if length > self.max_body_bytes:
                raise _BodyTooLarge
            return await response.read()
        chunks = []
        size = 0
        async for chunk in response.content.iter_chunked(CHUNK_BYTES):
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    def _failed(self, endpoint: str, started: float, failure: _Failure) -> _Failure:
        self._observe(endpoint, failure.code, started)
        return failure

    def _observe(self, endpoint: str, code: str, started: float) -> None:
        self._metrics.observe_request(endpoint, code, max(0.0, self._monotonic() - started))
        if self.budget.recovering:
            self._metrics.budget_requests_per_hour = self.budget.effective_rate_per_hour

    def _auth_headers(self, endpoint: str) -> dict[str, str]:
        try:
            token = self._token.get()
        except TokenUnavailable as exc:
            raise TokenUnavailable(endpoint, exc.reason) from None
        if token != self._headers_token:
            self._headers = {"Authorization": f"Bearer {token}"}
            self._headers_token = token
        return self._headers

    def _new_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self._max_concurrency)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session


def _upstream_code(body: bytes) -> int | None:
    try:
        return error_code(decode_json(body))
    except InvalidBody:
        return None


def _reason(status: int, upstream_code: int | None) -> str:
    return f"HTTP {status}" + (f" (code {upstream_code})" if upstream_code is not None else "")


def _device_params(tags: Sequence[str], segment: int | None) -> list[tuple[str, str]]:
    """The device list's filters as query parameters (tags as repeated parameters)."""
    params = [("tags", tag) for tag in tags]
    if segment is not None:
        params.append(("segmentId", str(segment)))
    return params


def _segment(value: str) -> str:
    return quote(value, safe="")


def _cut(items: Sequence[T], stop: Callable[[T], bool] | None) -> int | None:
    """Index of the first item ``stop`` accepts (None: none does)."""
    if stop is not None:
        for index, item in enumerate(items):
            if stop(item):
                return index
    return None


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


def _sort_field(sort: str) -> tuple[str, bool]:
    """(field, descending) of a ``field[:asc|:desc]`` sort."""
    field, _, direction = sort.partition(":")
    return field, direction.lower() == "desc"


def _tagged(devices: Listing[Device], tags: Sequence[str]) -> Listing[Device]:
    """The devices carrying one of ``tags`` (as upstream's filter selects)."""
    wanted = frozenset(tags)
    kept = Listing(d for d in devices if not wanted.isdisjoint(d.tags))
    kept.sort_verdict = devices.sort_verdict
    return kept


_created: Callable[[Batch], float | None] = attrgetter("created_at")
# Device fields a device-list sort can be checked on, by sort field.
_DEVICE_MOMENTS: dict[str, Callable[[Device], float | None]] = {
    "lastStatusReportTime": attrgetter("last_status_report"),
}
_device_key: Callable[[Device], str] = attrgetter("id")
_batch_key: Callable[[Batch], str] = attrgetter("id")
_action_key: Callable[[Action], str] = attrgetter("cmd_id")
