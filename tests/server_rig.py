"""What the server tests share: a small fleet's Hooks, for make_app behind a real socket."""

from __future__ import annotations

from exporter.exposition import Exposition
from exporter.records import Action, Batch
from exporter.selfmetrics import SelfMetrics
from exporter.server import Hooks
from exporter.state import FleetState

START = 1_760_000_000.0


async def _no_reload() -> str | None:
    return None


def fleet(devices: int, *, batch_names: tuple[str, ...] = ("Store policy",)) -> FleetState:
    """``devices`` watched devices, each with a batch per name and one pending action in it;
    every other device's last poll failed."""
    state = FleetState(organization="acme", latency_buckets=(1.0,), metrics=SelfMetrics(),
                       clock=lambda: START)
    for d in range(devices):
        device = f"65f0c0ffee{d:014x}"
        state.watch(device, name=f"pc-{d}")
        for b, name in enumerate(batch_names):
            batch = Batch(id=f"{d:012x}{b:012x}", name=name, created_at=START - 60)
            state.apply_actions(device, batch, [Action(f"{d}-{b}", "Pending")])
        if d % 2:
            state.poll_failed(device, "upstream 503")
        else:
            state.poll_succeeded(device)
    return state


def hooks(state: FleetState) -> Hooks:
    exposition = Exposition(state, SelfMetrics(), version="test")
    exposition.refresh()
    return Hooks(exposition=exposition, state=state, ready=lambda: True, reload=_no_reload,
                 version="test", organization=lambda: "acme")
