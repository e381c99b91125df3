"""The durable store at scale: disk per tracked action, the time to load it, and the longest
event-loop step a commit takes (collecting rows from the state; the write runs on the
store's own thread).

A fleet of DEVICES x 20 batches x 10 actions is applied to a FleetState through its public
methods (the actions half answered, so records differ), committed into a fresh store, and
loaded into a second FleetState, as a restarted process would. Then one device's read is
applied and committed, the steady case.

Usage: python bench/store.py [--smoke] [--devices 5000]
Prints a table and writes bench/results/store.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporter.records import decode_action, decode_batch
from exporter.selfmetrics import SelfMetrics
from exporter.snapshot import Persistence
from exporter.state import FleetState
from exporter.store import Store

RESULTS = Path(__file__).resolve().parent / "results" / "store.json"
START = 1_770_717_600.0
BATCHES, ACTIONS = 20, 10
TARGET_BYTES_PER_ACTION = 300
TARGET_LOAD_SECONDS_PER_MILLION = 15.0
TARGET_STEP_SECONDS = 0.05


def iso(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


def fleet(devices: int) -> tuple[FleetState, SelfMetrics]:
    metrics = SelfMetrics()
    state = FleetState(organization="bench", latency_buckets=(1, 10, 60), metrics=metrics,
                       clock=lambda: START + 3600)
    for d in range(devices):
        device = f"{d:024x}"
        state.watch(device, name=f"pc-{d}")
        for b in range(BATCHES):
            read_batch(state, device, b, answered=b % 2 == 0)
    return state, metrics


def read_batch(state: FleetState, device: str, b: int, *, answered: bool) -> None:
    batch_id = f"{b:08x}{device[8:]}"
    status = "Acknowledged" if answered else "Awaiting"
    body = {"id": batch_id, "name": f"policy {b % 5}", "createdAt": iso(START + 10),
            "summary": [{"status": status, "count": ACTIONS}]}
    batch = decode_batch(body)
    actions = [
        decode_action({"cmdId": f"{batch_id[:16]}-{a:04d}", "status": status,
                       "sentAt": iso(START + 20),
                       "receivedAt": iso(START + 30 + a) if answered else None})
        for a in range(ACTIONS)
    ]
    assert batch is not None and all(actions)
    state.apply_actions(device, batch, actions)  # type: ignore[arg-type]


def keeper(directory: str, state: FleetState, metrics: SelfMetrics) -> Persistence:
    persistence = Persistence(lambda: Store.open(directory, "bench"), state, metrics)
    assert persistence.open()
    return persistence


async def measure(devices: int) -> dict[str, float]:
    state, metrics = fleet(devices)
    actions = state.tracked_actions()
    with tempfile.TemporaryDirectory() as directory:
        first = keeper(directory, state, metrics)
        started = time.perf_counter()
        delta = first.collect()
        first_collect = time.perf_counter() - started
        started = time.perf_counter()
        assert await first.commit(delta)
        first_write = time.perf_counter() - started
        # The steady case: one device read again (its answers arrive), then a commit.
        read_batch(state, f"{0:024x}", 1, answered=True)
        started = time.perf_counter()
        steady = first.collect()
        steady_collect = time.perf_counter() - started
        assert await first.commit(steady)
        disk = first.store.disk_bytes() if first.store else 0
        await first.close()

        again = FleetState(organization="bench", latency_buckets=(1, 10, 60),
                           metrics=SelfMetrics(), clock=lambda: START + 3600)
        second = keeper(directory, again, SelfMetrics())
        started = time.perf_counter()
        restored = second.load()
        load = time.perf_counter() - started
        await second.close()
    assert restored == devices and again.tracked_actions() == actions
    assert again.transitions() == state.transitions()
    return {
        "devices": devices,
        "tracked_actions": actions,
        "disk_bytes_per_action": disk / actions,
        "load_seconds": load,
        "load_seconds_per_million": load / actions * 1e6,
        "first_collect_seconds": first_collect,
        "first_write_seconds": first_write,
        "steady_collect_seconds": steady_collect,
        "steady_rows": len(steady.devices) + len(steady.ledger),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a small fleet, for CI")
    parser.add_argument("--devices", type=int, default=5000)
    args = parser.parse_args()
    devices = 100 if args.smoke else args.devices
    row = asyncio.run(measure(devices))
    print(f"{'devices':>8} {'actions':>9} {'disk B/action':>14} {'load s':>8} "
          f"{'load s/1M':>10} {'1st collect s':>14} {'1st write s':>12} {'steady collect ms':>18}")
    print(f"{row['devices']:>8} {row['tracked_actions']:>9} {row['disk_bytes_per_action']:>14.1f} "
          f"{row['load_seconds']:>8.2f} {row['load_seconds_per_million']:>10.2f} "
          f"{row['first_collect_seconds']:>14.3f} {row['first_write_seconds']:>12.3f} "
          f"{row['steady_collect_seconds'] * 1000:>18.2f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(row, indent=2) + "\n")
    ok = (row["disk_bytes_per_action"] <= TARGET_BYTES_PER_ACTION
          and row["load_seconds_per_million"] <= TARGET_LOAD_SECONDS_PER_MILLION
          and row["steady_collect_seconds"] <= TARGET_STEP_SECONDS)
    print("targets: disk <= 300 B/action, load <= 15 s per 1M actions, a steady commit's "
          f"step <= 50 ms: {'met' if ok else 'MISSED'}")
    return 0 if ok or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
