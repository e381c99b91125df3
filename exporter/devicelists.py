"""The device lists a round reads, and when each is due.

The watched list is the device list discovery filters (``discovery.devices``: tags,
segment). One read of it tells membership (who is discovered), states and check-ins alike;
it comes in two forms:

- the **full list**: read to its end. Membership needs it every ``refresh_seconds``; where
  upstream does not honour the sort by check-in it brings the check-ins too, as often as
  ``FULL_LIST_SHARE`` of the budget allows, paced by what its last read cost (the whole
  organization's list where upstream also ignores the tags filter). Either read counts for
  the other: the same list is never read twice in a row;
- the **sorted list**: sorted by ``lastStatusReportTime``, read down to the check-in mark
  (the newest check-in any read showed) less ``CHECKIN_OVERLAP_SECONDS``: usually one page
  names every device that checked in since the last look.

Configured devices the watched list does not show are looked up in the organization's
whole list at membership's pace; those check-ins, a refresh old, do not feed the plan.

:class:`DeviceLists` reads and keeps the marks; the scheduler applies what each read shows
(:class:`Listed`) to its targets, the plan and the state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from exporter.client import ApiClient, ApiError, AuthError, SortRejected
from exporter.config import Config, DeviceDiscovery
from exporter.dialect import IGNORED
from exporter.records import Device, until
from exporter.selfmetrics import FULL_LIST, SORTED_LIST, SelfMetrics

log = structlog.get_logger("exporter.scheduler")

# lastStatusReportTime is written by upstream when a session ends, maybe a little out of
# order: the sorted list is read this far behind the newest check-in seen.
CHECKIN_OVERLAP_SECONDS = 120.0
CHECKIN_SORT = "lastStatusReportTime:desc"
# Where upstream does not honour that sort, the full list brings the check-ins, read as
# often as this share of the budget allows (every round on a small fleet); the client lets
# the sorted list be tried again hourly.
FULL_LIST_SHARE = 0.2


@dataclass(frozen=True, slots=True)
class Listed:
    """What one read of the watched list showed, its timestamps from the future dropped."""

    devices: tuple[Device, ...]
    full: bool  # read to its end: membership too, not only check-ins and states
    unfiltered: bool  # the organization's whole list: a device it lacks is in no list
    refresh: bool  # read because membership was due (not for check-ins)


class DeviceLists:
    """Reads of the device lists, each when it is due, and the marks that say so."""

    def __init__(
        self,
        config: Config,
        client: ApiClient,
        metrics: SelfMetrics,
        *,
        clock: Callable[[], float],
        future_limit: Callable[[], float],
    ) -> None:
        self._config = config
        self._client = client
        self._metrics = metrics
        self._clock = clock
        self._future_limit = future_limit
        self._refreshed_at: float | None = None  # upstream's clock: the full list last read
        self._looked_up_at: float | None = None  # the same, for the configured look-up
        self._checkin_mark: float | None = None  # newest check-in the watched list showed
        # The last read of the full list, on the budget's clock (it paces the next by what
        # this one cost), failed ones too.
        self._full_list_began: float | None = None
        self._full_list_cost = 1

    @property
    def ready(self) -> bool:
        """Discovery's membership was read once (always true without discovery)."""
        return self._config.discovery.devices is None or self._refreshed_at is not None

    def reconfigure(self, config: Config) -> None:
        """A new discovery filter reads membership and check-ins afresh; configured
        devices may have changed: they are looked up at once."""
        if config.discovery.devices != self._config.discovery.devices:
            self._refreshed_at = self._checkin_mark = None
        self._looked_up_at = None
        self._config = config

    async def refresh(self) -> Listed | None:
        """The full list when membership is due for a refresh; None if not due or failed."""
        spec = self._config.discovery.devices
        if spec is None:
            return None
        now = self._clock()
        if self._refreshed_at is not None and now - self._refreshed_at < spec.refresh_seconds:
            return None
        return await self._full_list(spec, now, refresh=True)

    async def look_up(self, unlisted: set[str]) -> list[Device] | None:
        """The organization's whole list (⌈N / page_size⌉ requests) for the configured
        devices ``unlisted`` by discovery, at membership's pace; None if not due or failed."""
        spec = self._config.discovery.devices
        if spec is not None and spec.whole_list:
            return None  # the full list already is that list
        refresh = (spec or DeviceDiscovery()).refresh_seconds
        now = self._clock()
        if not unlisted or (
            self._looked_up_at is not None and now - self._looked_up_at < refresh
        ):
            return None
        devices = await self._read("device_list_failed")
        if devices is None:
            return None
        self._looked_up_at = now
        limit = self._future_limit()
        return [until(device, limit) for device in devices]

    async def checkins(self) -> list[Listed]:
        """Who checked in since the mark: the sorted list while upstream honours that sort,
        else (after it, when it came out of order) the full list when its pace allows."""
        spec = self._config.discovery.devices
        if spec is None or self._checkin_mark is None:
            return []
        reads: list[Listed] = []
        if self._client.worth_sorting_devices():
            try:
                listed, in_order = await self._sorted_list(spec, self._checkin_mark)
            except SortRejected:
                pass
            except ApiError as exc:
                _said(exc, "warning")("checkins_unavailable", endpoint="devices", reason=str(exc))
                return []
            else:
                # Out of order, the list was cut at an arbitrary place: what it showed is
                # true, but not all there is.
                reads.append(listed)
                if in_order:
                    self._say_source(SORTED_LIST)
                    return reads
        self._say_source(FULL_LIST)
        return reads + await self._paced_full_list(spec)

    async def _paced_full_list(self, spec: DeviceDiscovery) -> list[Listed]:
        """The full list for check-ins, when its pace allows since the last one began."""
        began = self._full_list_began
        if began is not None and self._client.budget.now() - began < self._full_list_every():
            return []
        listed = await self._full_list(spec, self._clock(), refresh=False)
        return [] if listed is None else [listed]

    async def _sorted_list(self, spec: DeviceDiscovery, mark: float) -> tuple[Listed, bool]:
        """The watched devices that checked in since ``mark`` (less the overlap), newest
        first, and whether upstream honoured the sort."""
        horizon = mark - CHECKIN_OVERLAP_SECONDS

        def older(device: Device) -> bool:
            return device.last_status_report is None or device.last_status_report < horizon

        listing = await self._client.list_devices(
            tags=spec.tags, segment=spec.segment, sort=CHECKIN_SORT, stop=older
        )
        listed = self._listed(listing, full=False, unfiltered=False, refresh=False)
        return listed, listing.sort_verdict != IGNORED

    async def _full_list(
        self, spec: DeviceDiscovery, now: float, *, refresh: bool
    ) -> Listed | None:
        """The watched list to its end, for membership (``refresh``) or check-ins; either
        read paces the next by what it cost."""
        budget = self._client.budget
        spent, self._full_list_began = budget.spent, budget.now()
        devices = await self._read(
            "discovery_failed" if refresh else "checkins_unavailable",
            tags=spec.tags, segment=spec.segment, level="error" if refresh else "warning",
        )
        self._full_list_cost = max(1, budget.spent - spent)
        if devices is None:
            return None
        self._refreshed_at = now
        return self._listed(devices, full=True, unfiltered=spec.whole_list, refresh=refresh)

    def _listed(
        self, devices: Sequence[Device], *, full: bool, unfiltered: bool, refresh: bool
    ) -> Listed:
        """A read of the watched list as :class:`Listed`; its newest check-in moves the mark."""
        limit = self._future_limit()
        shown = tuple(until(device, limit) for device in devices)
        moments = [d.last_status_report for d in shown if d.last_status_report is not None]
        if moments and (self._checkin_mark is None or max(moments) > self._checkin_mark):
            self._checkin_mark = max(moments)
        return Listed(shown, full=full, unfiltered=unfiltered, refresh=refresh)

    async def _read(
        self,
        failure: str,
        *,
        tags: Sequence[str] = (),
        segment: int | None = None,
        level: str = "warning",
    ) -> list[Device] | None:
        """A device list to its end; None (and ``failure`` logged at ``level``) when it
        could not be read."""
        try:
            return await self._client.list_devices(tags=tags, segment=segment)
        except ApiError as exc:
            _said(exc, level)(failure, endpoint="devices", reason=str(exc))
            return None

    def _full_list_every(self) -> float:
        """Seconds between two reads of the full list for check-ins: what the last one
        cost, within FULL_LIST_SHARE of the budget, never more often than every round."""
        rate = max(1e-9, self._client.budget.effective_rate_per_hour)
        return max(
            self._config.poll.interval_seconds,
            self._full_list_cost * 3600 / (FULL_LIST_SHARE * rate),
        )

    def _say_source(self, source: str) -> None:
        """Switch the source of check-ins, saying so once per change."""
        if source == self._metrics.checkin_source:
            return
        (log.info if source == SORTED_LIST else log.warning)(
            "checkin_source", source=source,
            every_seconds=None if source == SORTED_LIST else round(self._full_list_every()),
        )
        self._metrics.checkin_source = source
        self._metrics.touch()


def _said(exc: ApiError, level: str) -> Callable[..., object]:
    """The log method for a failed read: at ``level``, or debug for a refused token (the
    client says that once when it begins and once when it ends, not every round)."""
    # Looked up now: a logger method bound at import would keep structlog's defaults and
    # miss the configured format and level.
    return getattr(log, "debug" if isinstance(exc, AuthError) else level)
