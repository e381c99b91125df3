"""HTTP to upstream: session, token, request budget, retries, throttling, typed errors, paging.

The transport knows HTTP and paged lists, and nothing of what a query parameter means (that
is :mod:`exporter.dialect`). Every attempt goes through the same gate, in this order: a
concurrency slot, then the shared :class:`TokenBucket` (which also holds the client-wide
"not before" pause set by 429/503), then the HTTP request. Decoding is the caller's function;
a request that brings back the very bytes it brought last time reuses that decoding
(:class:`exporter.memo.Memo`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import structlog

from exporter.apierrors import AuthError, NotFoundError, UpstreamError
from exporter.memo import MEMO_RECORDS, Memo
from exporter.paging import FetchPage, Listed, Read, Walk, every_page, settle
from exporter.records import SCHEMA, InvalidBody, Page, decode_json, error_code
from exporter.selfmetrics import SelfMetrics
from exporter.token import Bearer, TokenSource
from exporter.tokenbucket import TokenBucket

log = structlog.get_logger()

T = TypeVar("T")
R = TypeVar("R")

RETRY_AFTER_CAP = 300.0  # an absurd Retry-After must not stall the exporter for hours
BACKOFF_BASE = 0.5
BACKOFF_CAP = 60.0
CHUNK_BYTES = 64 * 1024
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

Params = Sequence[tuple[str, str]]
# A page's decoding: (body, the limit asked) -> the page, items past the limit cut unread.
PageDecoder = Callable[[bytes, int], Page[T]]


@dataclass(frozen=True, slots=True)
class Limits:
    """What one transport allows itself, fixed for its life."""

    timeout_seconds: float = 10
    max_concurrency: int = 8
    page_size: int = 100
    max_pages: int = 1000
    max_body_bytes: int = 32 * 2**20


def segment(value: str) -> str:
    """An id as one path segment (upstream ids are opaque: escape everything)."""
    return quote(value, safe="")


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
class _Answer:
    """What an attempt brought back, read to the end."""

    status: int
    body: bytes
    retry_after: str | None
    date: str | None


@dataclass(frozen=True, slots=True)
class _Failure:
    code: str  # the metrics code
    reason: str
    status: int | None = None
    retry_after: float | None = None
    sent_at: float | None = None  # when the request went out (after its budget wait)

    @property
    def throttles(self) -> bool:
        """Upstream asks everyone to slow down (429, or 503 with a Retry-After)."""
        return self.status == 429 or (self.status == 503 and self.retry_after is not None)


class Transport:
    """One session to upstream, shared by every poller of the process."""

    def __init__(
        self,
        root: str,
        token: TokenSource,
        metrics: SelfMetrics,
        *,
        limits: Limits,
        budget: TokenBucket,
        max_attempts: int = 4,
        memo_records: int = MEMO_RECORDS,
        session: aiohttp.ClientSession | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ) -> None:
        self.root = root
        self.limits = limits
        self.budget = budget
        self.max_attempts = max(1, max_attempts)
        self._bearer = Bearer(token)
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=limits.timeout_seconds)
        self._slots = asyncio.Semaphore(limits.max_concurrency)
        self._session = session
        self._owns_session = session is None
        self._sleep = sleep
        self._monotonic = monotonic
        self._rng = random.Random(seed)
        self._memo = Memo(memo_records)

    def __repr__(self) -> str:
        return f"Transport(root={self.root!r})"

    def use_token(self, token: TokenSource) -> None:
        self._bearer.source = token

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    # --- lists --------------------------------------------------------------------------------

    def pager(
        self, endpoint: str, path: str, decode: PageDecoder[T], params: Params
    ) -> FetchPage[T]:
        """One page of a list: a logical request with its retries, through the budget."""

        async def fetch(number: int, limit: int) -> Page[T]:
            query = [*params, ("page", str(number)), ("limit", str(limit))]
            return await self.fetch(endpoint, path, query, lambda body: decode(body, limit))

        return fetch

    async def collect(
        self, endpoint: str, path: str, decode: PageDecoder[T],
        key: Callable[[T], str], params: Params, walk: Walk[T] | None = None,
    ) -> Read[T]:
        """A paged list read by ``walk`` (default: every item once), read again if its
        pages shifted (``paging.settle``)."""
        where = {"endpoint": endpoint, "path": path}
        listed = Listed(self.pager(endpoint, path, decode, params), self.limits.max_pages, where)
        one_pass = walk or every_page()

        async def once() -> Read[T]:
            read = Read(key, self.limits.page_size)
            await one_pass(read, listed)
            return read

        return await settle(once, **where)

    # --- requests -----------------------------------------------------------------------------

    async def fetch(
        self, endpoint: str, path: str, params: Params, decode: Callable[[bytes], R]
    ) -> R:
        """One logical request: attempts with retries until decoded or failed for good. A
        failure on the token is noted (``Bearer.failed``: logged once per change)."""
        try:
            return await self._fetch(endpoint, self.root + path, params, decode)
        except AuthError as exc:
            self._bearer.failed(exc)
            raise

    async def _fetch(
        self, endpoint: str, url: str, params: Params, decode: Callable[[bytes], R]
    ) -> R:
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
            if failure.throttles:
                self._throttle(endpoint, failure, delay)
                continue  # the bucket holds every caller until the pause ends
            log.debug("api_retry", endpoint=endpoint, attempt=attempt, code=failure.code,
                      reason=failure.reason, delay_seconds=round(delay, 3))
            await self._sleep(delay)
        assert failure is not None
        raise UpstreamError(
            endpoint, f"{failure.reason} after {self.max_attempts} attempts", failure.status
        )

    def _backoff(self, attempt: int) -> float:
        # Full jitter: callers that failed together do not retry together.
        return self._rng.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1)))

    def _throttle(self, endpoint: str, failure: _Failure, delay: float) -> None:
        """Slow the whole client: Retry-After (capped) or the backoff, and a lower rate."""
        retry_after = failure.retry_after
        pause = delay if retry_after is None else min(retry_after, RETRY_AFTER_CAP)
        self.budget.throttle(pause, sent_at=failure.sent_at)
        self._metrics.budget_requests_per_hour = self.budget.effective_rate_per_hour
        log.warning("api_throttled", endpoint=endpoint, status=failure.status,
                    pause_seconds=round(pause, 3),
                    rate_per_hour=round(self._metrics.budget_requests_per_hour, 1))

    async def _attempt(
        self, endpoint: str, url: str, params: Params, decode: Callable[[bytes], R], *,
        auth_retry: bool = True,
    ) -> R | _Failure:
        headers, token_sent = self._bearer.headers(endpoint)
        async with self._slots:
            await self.budget.acquire()
            started = self._monotonic()
            try:
                answer = await self._get(url, params, headers)
            except TimeoutError:
                return self._failed(endpoint, started, _Failure("timeout", "timeout"))
            except _BodyTooLarge:
                # Deterministic for a given resource: not retried.
                self._observe(endpoint, "invalid_body", started)
                raise UpstreamError(endpoint, "body too large") from None
            except (aiohttp.ClientError, OSError) as exc:
                reason = f"connection error ({type(exc).__name__})"
                return self._failed(endpoint, started, _Failure("connection", reason))
        if 200 <= answer.status < 300:
            self._bearer.accepted()
            return self._decoded(endpoint, (url, *params), answer, decode, started)
        self._observe(endpoint, str(answer.status), started)
        if answer.status == 401:
            raise self._auth_failure(endpoint, answer.body, token_sent if auth_retry else None)
        return _http_failure(endpoint, answer, started)

    async def _get(self, url: str, params: Params, headers: dict[str, str]) -> _Answer:
        session = self._session or self._new_session()
        async with session.get(
            url, params=params, headers=headers, timeout=self._timeout
        ) as response:
            body = await self._read(response)
            return _Answer(response.status, body, response.headers.get("Retry-After"),
                           response.headers.get("Date"))

    def _decoded(
        self, endpoint: str, key: tuple[str, ...], answer: _Answer,
        decode: Callable[[bytes], R], started: float,
    ) -> R | _Failure:
        result = self._memo.get(key, answer.body)
        if result is None:
            try:
                result = decode(answer.body)
            except InvalidBody as exc:
                return self._failed(
                    endpoint, started, _Failure("invalid_body", f"invalid body: {exc}")
                )
            self._memo.put(key, answer.body, result)
            if isinstance(result, Page) and result.schema_problems:
                # Once per response: a re-poll that brings the same bytes is not news.
                self._metrics.parse_problem(SCHEMA, result.schema_problems)
        self._observe(endpoint, str(answer.status), started)
        return result

    def _auth_failure(self, endpoint: str, body: bytes, token_sent: str | None) -> AuthError:
        """A 401; ``token_changed`` when the token source now holds another token than
        ``token_sent`` (None: no retry wanted)."""
        code = _upstream_code(body)
        changed = self._bearer.refused(token_sent)
        return AuthError(endpoint, _reason(401, code), code, token_changed=changed)

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        cap = self.limits.max_body_bytes
        length = response.content_length
        # A declared length of an uncompressed body is checked up front and read in one go;
        # anything else is counted as it arrives (a compressed length says nothing of the
        # decoded size).
        if length is not None and not response.headers.get("Content-Encoding"):
            if length > cap:
                raise _BodyTooLarge
            return await response.read()
        chunks = []
        size = 0
        async for chunk in response.content.iter_chunked(CHUNK_BYTES):
            size += len(chunk)
            if size > cap:
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

    def _new_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self.limits.max_concurrency)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session


def _http_failure(endpoint: str, answer: _Answer, sent_at: float) -> _Failure:
    """Classify a non-2xx answer: raise for the final ones, describe the retryable ones."""
    status = answer.status
    upstream_code = _upstream_code(answer.body)
    reason = _reason(status, upstream_code)
    if status == 404:
        raise NotFoundError(endpoint, reason, upstream_code)
    if status not in RETRYABLE_STATUSES and not 500 <= status < 600:
        raise UpstreamError(endpoint, reason, status)
    retry_after = None
    if status in (429, 503) and answer.retry_after is not None:
        retry_after = parse_retry_after(answer.retry_after, now=_response_now(answer.date))
    return _Failure(str(status), reason, status, retry_after, sent_at)


def _upstream_code(body: bytes) -> int | None:
    try:
        return error_code(decode_json(body))
    except InvalidBody:
        return None


def _reason(status: int, upstream_code: int | None) -> str:
    return f"HTTP {status}" + (f" (code {upstream_code})" if upstream_code is not None else "")
