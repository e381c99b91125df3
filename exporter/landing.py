"""The landing page (``GET /``), rendered off the request path.

A render walks every watched device; at 5,000 devices of 20 batches that was 561 ms of the
event loop per request, and a dozen clients reloading the page kept scrapes waiting for
seconds. So a render here runs in steps of a bounded number of devices with the loop free
between them, one render at a time: requests arriving meanwhile wait for that render, and
its page is reused for ``max_age`` seconds. The device table is capped, failing devices
first, with a line saying how many were left out; ``/?device=TEXT`` finds any device by id or
name. Searches share that one render at a time, and the number waiting for it is bounded.
"""

from __future__ import annotations

import asyncio
import html
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from exporter.devicehealth import OTHER, UNKNOWN
from exporter.fleetview import DeviceView
from exporter.rollouts import STATES, Rollout
from exporter.selfmetrics import SORTED_LIST, SelfMetrics
from exporter.state import CLASSES, FleetState

if TYPE_CHECKING:
    from exporter.server import Hooks

MAX_SEARCH = 100  # characters of a search kept: an id is 24, a name rarely longer
KEPT_PAGES = 16  # distinct pages (searches) reused while fresh
MAX_WAITING = 16  # searches waiting for a render before more are refused


class Busy(Exception):
    """Too many searches wait for a render: the client is asked to come back."""


@dataclass(frozen=True, slots=True)
class Bounds:
    """What one page may cost: its age before a new render, the rows of its device table,
    and the devices rendered (or looked at) in one step of the loop."""

    max_age_seconds: float = 5.0
    max_device_rows: int = 500
    step_devices: int = 100  # ~11 ms at 20 batches a device
    step_looks: int = 2000  # a look without the batch tables costs a few microseconds


DEFAULT_BOUNDS = Bounds()


# --- pieces of the page (pure) ----------------------------------------------------------------


def ago(moment: float | None, now: float | None = None) -> str:
    """``moment`` as an age: seconds, then minutes, hours and days as they grow."""
    if moment is None:
        return "never"
    seconds = max(0.0, (time.time() if now is None else now) - moment)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def device_row(view: DeviceView, upstream_now: float) -> str:
    result = "up" if view.up else f"down: {view.last_error or 'not polled yet'}"
    counts = "".join(f"<td>{view.class_counts.get(c, 0)}</td>" for c in CLASSES)
    # What the device is (its compliance and build too) first: on a laptop's screen the
    # table scrolls sideways from the poll results on.
    return (
        f"<tr><td>{html.escape(view.device)}</td><td>{html.escape(view.name or '')}</td>"
        f"<td>{html.escape(view.health.compliance)}</td>"
        f"<td>{html.escape(view.health.os_label)}</td>"
        f"<td>{html.escape(view.state)}</td><td>{ago(view.check_in, upstream_now)}</td>"
        f"<td>{ago(view.last_success)}</td><td>{html.escape(result)}</td>{counts}</tr>"
    )


def upstream_notes(metrics: SelfMetrics | None) -> str:
    """Where check-ins come from and what upstream does with the query parameters the
    exporter relies on (docs/upstream-api.md: neither is documented)."""
    if metrics is None:
        return ""
    verdicts = ", ".join(
        f"{endpoint} {parameter}: {verdict}"
        for (endpoint, parameter), verdict in sorted(metrics.query_verdicts.items())
    )
    source = (
        "the device list sorted by check-in"
        if metrics.checkin_source == SORTED_LIST
        else "the whole device list (upstream does not honour the sort)"
    )
    return (f"<p>Check-ins from {html.escape(source)}. Query parameters: "
            f"{html.escape(verdicts or 'none checked yet')}.</p>")


def health_summary(compliance: Mapping[str, int], versions: Mapping[str, int]) -> str:
    """The fleet's compliance and how many OS versions it runs, above the device table."""
    verdicts = ", ".join(f"{count} {verdict}" for verdict, count in compliance.items())
    known = sum(1 for version in versions if version not in (UNKNOWN, OTHER))
    many = "more than " if OTHER in versions else ""
    return f"<p>Compliance: {html.escape(verdicts)}. OS versions: {many}{known}.</p>"


def rollout_rows(rollouts: Sequence[Rollout]) -> str:
    # Most failed devices first: the rollouts that need a look.
    ordered = sorted(rollouts, key=lambda r: (-r.devices[0], -sum(r.devices), r.name))
    return "\n".join(
        f"<tr><td>{html.escape(r.name)}</td>"
        + "".join(f"<td>{count}</td>" for count in r.devices)
        + f"<td>{sum(r.devices)}</td></tr>"
        for r in ordered
    )


def left_out(shown: int, watched: int) -> str:
    if shown >= watched:
        return ""
    return (f"<p>And {watched - shown} more devices, not shown: the table keeps the first "
            f"{shown}, failing devices first.</p>")


def matching(search: str, shown: int, matched: int, watched: int) -> str:
    """What a search found, and that the table keeps only the first rows of it."""
    text = html.escape(search)
    if not matched:
        return f"<p>No watched device has &ldquo;{text}&rdquo; in its id or name.</p>"
    kept = f" The table keeps the first {shown}, failing devices first." if shown < matched else ""
    return (f"<p>{matched} of {watched} watched devices match &ldquo;{text}&rdquo;.{kept} "
            '<a href="/">All devices</a></p>')


def search_form(search: str) -> str:
    return (f'<form method="get" action="/"><input type="search" name="device" '
            f'value="{html.escape(search)}" maxlength="{MAX_SEARCH}" '
            'placeholder="device id or name"> <button>Find</button></form>')


def search_text(raw: str | None) -> str:
    """What a request asks to find: its first MAX_SEARCH characters, trimmed."""
    return (raw or "")[:MAX_SEARCH].strip()


def page(hooks: Hooks, device_rows: str, more: str, search: str = "") -> str:
    head = "".join(f"<th>{c}</th>" for c in CLASSES)
    rollout_head = "".join(f"<th>{s}</th>" for s in STATES)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Applivery MDM exporter</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2em .5em;text-align:left;white-space:nowrap}}
section{{max-width:100%}}.wide{{overflow-x:auto}}
.views{{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}}</style></head>
<body><h1>Applivery MDM exporter</h1>
<p>Version {html.escape(hooks.version)} &middot; organization
{html.escape(hooks.organization())}</p>
<ul><li><a href="{html.escape(hooks.telemetry_path)}">Metrics</a></li>
<li><a href="/-/healthy">Health</a></li>
<li><a href="/-/ready">Readiness</a></li></ul>
<p>{html.escape(hooks.exposition.guard_summary)}</p>
{upstream_notes(hooks.metrics)}
<div class="views"><section id="devices"><h2>Watched devices</h2>
{health_summary(*hooks.state.device_health())}
{search_form(search)}
{more}
<div class="wide"><table><thead><tr><th>device</th><th>name</th><th>compliance</th>
<th>OS version</th><th>state</th><th>last check-in</th><th>last success</th><th>result</th>{head}
</tr></thead><tbody>
{device_rows}
</tbody></table></div></section>
<section id="rollouts"><h2>Rollouts</h2>
<p>Batches sharing a name: devices per state of their latest batch of that name.</p>
<table><thead><tr><th>rollout</th>{rollout_head}<th>devices</th></tr></thead><tbody>
{rollout_rows(hooks.exposition.rollouts())}
</tbody></table></section></div></body></html>
"""


def encode(text: str) -> bytes:
    """As /metrics does: a lone surrogate from upstream becomes '?', never an error."""
    return text.encode("utf-8", "replace")


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --- the render, in steps ---------------------------------------------------------------------


async def _failing_first(
    state: FleetState, bounds: Bounds, search: str = ""
) -> tuple[list[str], int, int]:
    """The devices the table shows (those matching ``search``), failing first; how many
    match and how many are watched."""
    order: list[tuple[bool, str]] = []
    watched = state.watched()
    wanted = search.casefold()
    for chunk in _chunks(watched, bounds.step_looks):
        for device in chunk:
            try:
                view = state.device_view(device, with_batches=False)
            except KeyError:  # unwatched while the loop was free
                continue
            if wanted in device.casefold() or wanted in (view.name or "").casefold():
                order.append((view.up, device))
        await asyncio.sleep(0)
    order.sort()
    return [device for _, device in order[: bounds.max_device_rows]], len(order), len(watched)


async def _device_rows(state: FleetState, devices: list[str], bounds: Bounds) -> str:
    rows = []
    upstream_now = state.now()  # check-ins are on upstream's clock
    for chunk in _chunks(devices, bounds.step_devices):
        for device in chunk:
            try:
                rows.append(device_row(state.device_view(device), upstream_now))
            except KeyError:
                continue
        await asyncio.sleep(0)  # scrapes go between steps
    return "\n".join(rows)


async def render(hooks: Hooks, bounds: Bounds, search: str = "") -> bytes:
    devices, matched, watched = await _failing_first(hooks.state, bounds, search)
    rows = await _device_rows(hooks.state, devices, bounds)
    found = (
        matching(search, len(devices), matched, watched)
        if search
        else left_out(len(devices), watched)
    )
    return encode(page(hooks, rows, found, search))


class LandingPage:
    """The pages (the whole fleet, and searches) as last rendered: one render at a time,
    shared by every request for the same page that arrives while it runs or waits."""

    def __init__(
        self,
        hooks: Hooks,
        bounds: Bounds = DEFAULT_BOUNDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._hooks = hooks
        self._bounds = bounds
        self._clock = clock
        # Per search ("" is the whole fleet): (rendered at, body), the oldest first.
        self._pages: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._renders: dict[str, asyncio.Task[bytes]] = {}
        self._one_at_a_time = asyncio.Lock()

    async def body(self, search: str = "") -> bytes:
        """The page for ``search`` (see search_text); Busy when too many searches wait."""
        kept = self._pages.get(search)
        if kept is not None and self._clock() - kept[0] < self._bounds.max_age_seconds:
            return kept[1]
        task = self._renders.get(search)
        if task is None:
            # A client that leaves does not stop its render (others may want it), so the
            # renders waiting are bounded here; the whole fleet's page is always rendered.
            if search and len(self._renders) >= MAX_WAITING:
                raise Busy
            task = self._renders[search] = asyncio.create_task(self._render_page(search))
        return await asyncio.shield(task)

    async def _render_page(self, search: str) -> bytes:
        try:
            async with self._one_at_a_time:
                body = await render(self._hooks, self._bounds, search)
            self._pages[search] = (self._clock(), body)
            self._pages.move_to_end(search)
            while len(self._pages) > KEPT_PAGES:
                self._pages.popitem(last=False)
            return body
        finally:
            del self._renders[search]

    async def close(self) -> None:
        """Stop the renders in flight or waiting (on shutdown)."""
        renders = list(self._renders.values())
        for task in renders:
            task.cancel()
        await asyncio.gather(*renders, return_exceptions=True)
