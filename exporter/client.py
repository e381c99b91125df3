"""The upstream API as typed records: what the scheduler and the cli call.

``ApiClient`` is a facade over two layers:

- :class:`exporter.transport.Transport`: session, token, request budget
  (:class:`exporter.tokenbucket.TokenBucket`), retries, throttling, typed errors, paging;
  it knows HTTP and nothing of what a query parameter means;
- :class:`exporter.dialect.Dialect`: what upstream does with ``sort``, ``tags`` and
  ``segmentId``, how each read checks it, and which parameters to send.

The names callers import from here (errors, ``TokenSource``, ``TokenBucket``, ``Listing``,
``parse_retry_after``, the retry constants) live in those modules.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from operator import attrgetter
from typing import Any
from urllib.parse import quote

import aiohttp

from exporter.actionpages import decode_actions_body
from exporter.apierrors import (
    ApiError,
    AuthError,
    NotFoundError,
    TokenUnavailable,
    UpstreamError,
)
from exporter.dialect import DeviceQuery, Dialect, Listing, Query, SortRejected, Verdicts
from exporter.memo import MEMO_RECORDS
from exporter.records import (
    Action,
    Batch,
    Device,
    InvalidBody,
    decode_batch,
    decode_json,
    envelope_data,
)
from exporter.selfmetrics import SelfMetrics
from exporter.token import TokenSource
from exporter.tokenbucket import TokenBucket
from exporter.transport import Limits, Transport, segment

__all__ = [
    "ApiClient",
    "ApiError",
    "AuthError",
    "Listing",
    "NotFoundError",
    "SortRejected",
    "TokenBucket",
    "TokenSource",
    "TokenUnavailable",
    "UpstreamError",
]

BASE_PATH = "/organizations/{org}/mdm/windows/enterprise"


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
        root = base_url.rstrip("/") + BASE_PATH.format(org=quote(organization, safe=""))
        limits = Limits(timeout_seconds, max(1, max_concurrency), max(1, page_size),
                        max(1, max_pages), max_body_bytes)
        budget = TokenBucket(requests_per_hour, monotonic=monotonic, sleep=sleep)
        self._metrics = metrics
        self._transport = Transport(
            root, token, metrics, limits=limits, budget=budget, max_attempts=max_attempts,
            memo_records=memo_records, session=session, sleep=sleep, monotonic=monotonic,
            seed=seed,
        )
        self._dialect = Dialect(self._transport, monotonic, published=self._publish_verdict)

    def __repr__(self) -> str:
        return f"ApiClient(root={self._transport.root!r})"

    @property
    def budget(self) -> TokenBucket:
        """The request budget every attempt spends from (tests may swap it)."""
        return self._transport.budget

    @budget.setter
    def budget(self, bucket: TokenBucket) -> None:
        self._transport.budget = bucket

    @property
    def max_attempts(self) -> int:
        return self._transport.max_attempts

    @max_attempts.setter
    def max_attempts(self, attempts: int) -> None:
        self._transport.max_attempts = max(1, attempts)

    def use_token(self, token: TokenSource) -> None:
        """Switch the token source (a reload that points ``api.token_file`` elsewhere)."""
        self._transport.use_token(token)

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._transport.close()

    # --- what upstream does with query parameters ------------------------------------------

    @property
    def verdicts(self) -> Verdicts:
        """The verdicts themselves (the store saves and restores them)."""
        return self._dialect.verdicts

    @property
    def query_verdicts(self) -> dict[Query, str]:
        """How upstream reads each query parameter the client sent whose reading the docs
        leave open, by (api_endpoint, parameter): ``honoured``, ``ignored``, ``rejected`` or
        ``unchecked`` (see :class:`exporter.dialect.Verdicts`). A copy, read-only."""
        return self._dialect.verdicts.snapshot()

    def _publish_verdict(self, query: Query, verdict: str) -> None:
        """Each verdict, as it changes, where the exposition reads it."""
        self._metrics.query_verdicts[query] = verdict
        self._metrics.touch()

    def worth_sorting_devices(self) -> bool:
        """Whether a sorted device list is worth asking for now: not while upstream is known
        to ignore that sort, but once per re-probe interval all the same (a refused sort
        is held back by ``list_devices`` itself)."""
        return self._dialect.worth_sorting_devices()

    # --- endpoints ---------------------------------------------------------------------------

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
        return await self._dialect.list_devices(DeviceQuery(tuple(tags), segment, sort, stop))

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
        return await self._dialect.list_batches(device, max_items, since)

    async def get_batch(self, device: str, batch: str) -> Batch:
        path = f"/devices/{segment(device)}/commands/{segment(batch)}"
        return await self._transport.fetch("command", path, (), _decode_batch_strict)

    async def list_actions(self, device: str, batch: str) -> list[Action]:
        path = f"/devices/{segment(device)}/commands/{segment(batch)}/actions"
        read = await self._transport.collect("actions", path, decode_actions_body, _action_key, ())
        return read.values()


def _decode_batch_strict(body: bytes) -> Batch:
    batch = decode_batch(envelope_data(decode_json(body)))
    if batch is None:
        raise InvalidBody("command has no id")
    return batch


_action_key: Callable[[Action], str] = attrgetter("cmd_id")
