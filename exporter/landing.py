"""The landing page (``GET /``), rendered off the request path.

A render walks every watched device; at 5,000 devices of 20 batches that was 561 ms of the
event loop per request, and a dozen clients reloading the page kept scrapes waiting for
seconds. So a render here runs in steps of a bounded number of devices with the loop free
between them, one render at a time: requests arriving meanwhile wait for that render, and
its page is reused for ``max_age`` seconds. The device table is capped, failing devices
first, with a line saying how many were left out.
"""

from __future__ import annotations

import asyncio
import html
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from exporter.devicehealth import OTHER, UNKNOWN
from exporter.fleetview import DeviceView
from exporter.rollouts import STATES, Rollout
from exporter.selfmetrics import SORTED_LIST, SelfMetrics
from exporter.state import FleetState

if TYPE_CHECKING:
    from exporter.server import Hooks

CLASSES = ("pending", "success", "canceled", "error", "unknown")


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


def page(hooks: Hooks, device_rows: str, more: str) -> str:
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
<div class="wide"><table><thead><tr><th>device</th><th>name</th><th>compliance</th>
<th>OS version</th><th>state</th><th>last check-in</th><th>last success</th><th>result</th>{head}
</tr></thead><tbody>
{device_rows}
</tbody></table></div>{more}</section>
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


async def _failing_first(state: FleetState, bounds: Bounds) -> tuple[list[str], int]:
    """The devices the table shows, failing first, and how many are watched."""
    order: list[tuple[bool, str]] = []
    watched = state.watched()
    for chunk in _chunks(watched, bounds.step_looks):
        for device in chunk:
            try:
                order.append((state.device_view(device, with_batches=False).up, device))
            except KeyError:  # unwatched while the loop was free
                continue
        await asyncio.sleep(0)
    order.sort()
    return [device for _, device in order[: bounds.max_device_rows]], len(order)


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


async def render(hooks: Hooks, bounds: Bounds) -> bytes:
    devices, watched = await _failing_first(hooks.state, bounds)
    rows = await _device_rows(hooks.state, devices, bounds)
    return encode(page(hooks, rows, left_out(len(devices), watched)))


class LandingPage:
    """The page as last rendered; at most one render in flight, shared by every request
    that arrives while it runs."""

    def __init__(
        self,
        hooks: Hooks,
        bounds: Bounds = DEFAULT_BOUNDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._hooks = hooks
        self._bounds = bounds
        self._clock = clock
        self._page: tuple[float, bytes] | None = None  # (rendered at, body)
        self._render: asyncio.Task[bytes] | None = None

    @property
    def rendering(self) -> bool:
        return self._render is not None

    async def body(self) -> bytes:
        if self._page is not None and self._clock() - self._page[0] < self._bounds.max_age_seconds:
            return self._page[1]
        if self._render is None:
            self._render = asyncio.create_task(self._render_page())
        # A client that goes away leaves the render to those still waiting for it.
        return await asyncio.shield(self._render)

    async def _render_page(self) -> bytes:
        try:
            body = await render(self._hooks, self._bounds)
            self._page = (self._clock(), body)
            return body
        finally:
            self._render = None

    async def close(self) -> None:
        """Stop a render in flight (on shutdown)."""
        if self._render is not None:
            self._render.cancel()
            await asyncio.gather(self._render, return_exceptions=True)
