"""Fault soak, CI length: every fault kind for a while under fleet changes, then convergence.

The harness is ``bench/soak.py`` (the long run prints RSS and scrape latency over time); here
it runs for seconds. Expected values come from the simulator's ground truth.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from soak import TRANSPORT, SoakOptions, run_soak

# Prometheus' default scrape timeout is 10 s; a scrape must stay far inside it.
SCRAPE_BUDGET_MS = 2000.0
RSS_GROWTH_MB = 64.0


async def test_the_exporter_survives_every_fault_and_converges_to_the_truth() -> None:
    report = await run_soak(SoakOptions(seconds=15, devices=8, sample_period=3.0))
    assert report.crashed is None
    # Serving never stopped.
    assert report.scrapes > 100
    assert report.scrape_failures == []
    assert report.scrape_max_ms < SCRAPE_BUDGET_MS
    # The upstream misbehaved in every way while the fleet changed underneath.
    assert set(report.fault_kinds) == set(TRANSPORT)
    assert {"invalid_body", "500", "503", "429"} <= set(report.api_codes)
    assert report.events > 0 and report.batches_created > 0
    # After the faults: every gauge, counter and histogram equals the simulator's truth.
    assert report.converged, report
    assert report.gauge_mismatches == []
    assert report.transition_mismatches == {}
    assert report.latency_exported == report.latency_expected
    assert report.targets_down == []
    rss = [row.rss_mb for row in report.rows]
    assert rss and max(rss) - rss[0] < RSS_GROWTH_MB
