"""A client reading one list from an upstream that ignores ``limit``, measured: run as
``python3 tests/fatpages.py BASE_URL actions|devices``; prints one JSON line (how the read
ended, the peak RSS in MiB, the seconds it took, the schema problems counted).

A watchdog thread ends the process (exit 3) as soon as its RSS passes ``WATCHDOG_MIB``: a
read without a bound would otherwise take gigabytes of a machine shared with other tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import threading
import time
from typing import Any

from clientrig import ORG

from exporter.client import ApiClient, TokenSource
from exporter.selfmetrics import SelfMetrics

TOKEN = "fat-pages-token"
DEVICE, BATCH = "65f0c0ffee65f0c0ffee0001", "65f0c0ffee65f0c0ffee1001"
WATCHDOG_MIB = 600


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_mib() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: ru_maxrss survives execve, so a child
    of a large test runner would report the runner's size."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def watchdog() -> None:
    # A thread, not a task: a decode that holds the event loop must not blind it.
    while True:
        if rss_mib() > WATCHDOG_MIB:
            print(json.dumps({"outcome": "watchdog", "peak_mib": peak_mib()}), flush=True)
            os._exit(3)
        time.sleep(0.02)


async def read(base_url: str, endpoint: str) -> dict[str, Any]:
    metrics = SelfMetrics()
    client = ApiClient(base_url=base_url, organization=ORG, token=TokenSource(value=TOKEN),
                       metrics=metrics, requests_per_hour=1_000_000, max_attempts=1)
    started = time.monotonic()
    try:
        if endpoint == "actions":
            await client.list_actions(DEVICE, BATCH)
        else:
            await client.list_devices()
        outcome, reason = "read", ""
    except Exception as exc:  # how the read ended is the report
        outcome, reason = type(exc).__name__, str(exc)
    finally:
        await client.close()
    return {"outcome": outcome, "reason": reason, "peak_mib": peak_mib(),
            "seconds": round(time.monotonic() - started, 2),
            "schema_problems": metrics.parse_problems["schema"]}


if __name__ == "__main__":
    threading.Thread(target=watchdog, daemon=True).start()
    print(json.dumps(asyncio.run(read(sys.argv[1], sys.argv[2]))), flush=True)
