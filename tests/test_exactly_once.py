"""Counts you can page on: each upstream misbehaviour that once double counted, or killed a
poll round in silence, replayed over HTTP against the exporter.

The upstream is an aiohttp app of this module whose documents the test rewrites between
rounds, so every read is the test's story: transient 404s, a batch leaving and re-entering
the history window, a list that is briefly short, a lagging replica, odd digits and endless
unknown status names. The exporter is scraped over HTTP; expectations are written from the
story (how many actions entered which status after the watermark), never read back from
the exporter.
"""

from __future__ import annotations

from typing import Any

import pytest
from scripted import (
    DEVICE,
    ORG,
    START,
    Upstream,
    actions,
    batch_id,
    device_id,
    iso,
    run_until_rounds,
)

from exporter.state import MAX_UNKNOWN_STATUSES
from exporter.targets import Shard

# --- the ledger ---------------------------------------------------------------------------------


async def test_a_batch_that_answers_404_once_is_not_counted_again(make_rig) -> None:
    upstream = Upstream()
    upstream.add(DEVICE, batch_id(1), actions(40, "Pending"))
    rig = await make_rig(upstream)
    await rig.poll()
    half = actions(20, "Acknowledged") + actions(40, "Pending")[20:]
    upstream.actions[batch_id(1)] = half
    await rig.poll()
    assert await rig.transitions() == {"Pending": 40, "Awaiting": 20, "Acknowledged": 20}
    upstream.missing_once[batch_id(1)] = 1
    await rig.poll()
    assert await rig.gauges() == {}  # the batch left /metrics
    await rig.poll()  # back, its answers unchanged
    assert (await rig.gauges())[(batch_id(1), "Acknowledged")] == 20
    assert await rig.transitions() == {"Pending": 40, "Awaiting": 20, "Acknowledged": 20}
    upstream.actions[batch_id(1)] = actions(40, "Acknowledged")
    await rig.poll()
    assert await rig.transitions() == {"Pending": 40, "Awaiting": 40, "Acknowledged": 40}
    assert await rig.latencies() == 40


async def test_a_batch_that_leaves_the_history_window_and_returns_is_not_counted_again(
    make_rig,
) -> None:
    upstream = Upstream()
    upstream.add(DEVICE, batch_id(1), actions(5, "Pending"))
    rig = await make_rig(upstream)
    await rig.poll()
    upstream.actions[batch_id(1)] = actions(5, "Acknowledged")
    await rig.poll()
    for n in (2, 3, 4):  # three newer batches push it out of max_per_device = 3
        upstream.add(DEVICE, batch_id(n), actions(1, "Acknowledged", prefix=f"b{n}"))
    await rig.poll()
    assert {c for c, _ in await rig.gauges()} == {batch_id(2), batch_id(3), batch_id(4)}
    for n in (2, 3, 4):  # deleted upstream: the old batch is back in the window
        upstream.batches[DEVICE].remove(batch_id(n))
    await rig.poll()
    assert {c for c, _ in await rig.gauges()} == {batch_id(1)}
    assert await rig.transitions() == {"Pending": 8, "Awaiting": 8, "Acknowledged": 8}


async def test_a_list_briefly_short_does_not_count_the_rest_again(make_rig) -> None:
    upstream = Upstream()
    upstream.add(DEVICE, batch_id(1), actions(100, "Pending"))
    rig = await make_rig(upstream)
    await rig.poll()
    answered = actions(100, "Acknowledged")
    upstream.actions[batch_id(1)] = answered
    await rig.poll()
    upstream.actions[batch_id(1)] = answered[:1]
    await rig.poll()
    assert (await rig.gauges())[(batch_id(1), "Acknowledged")] == 1  # the latest list
    upstream.actions[batch_id(1)] = answered
    await rig.poll()
    assert (await rig.gauges())[(batch_id(1), "Acknowledged")] == 100
    assert await rig.transitions() == {"Pending": 100, "Awaiting": 100, "Acknowledged": 100}


async def test_a_stale_read_counts_nothing_and_neither_does_the_truth_after_it(make_rig) -> None:
    upstream = Upstream()
    upstream.add(DEVICE, batch_id(1), actions(4, "Pending"))
    rig = await make_rig(upstream)
    await rig.poll()
    truth = actions(2, "Awaiting") + actions(2, "CommandNotFound", prefix="e")
    truth = [{**d, "cmdId": f"a-{i}"} for i, d in enumerate(truth)]
    upstream.actions[batch_id(1)] = truth
    await rig.poll()
    expected = {"Pending": 4, "Awaiting": 4, "CommandNotFound": 2}
    assert await rig.transitions() == expected
    upstream.actions[batch_id(1)] = actions(4, "Pending")  # a lagging replica
    await rig.poll()
    assert await rig.transitions() == expected
    upstream.actions[batch_id(1)] = truth
    await rig.poll()
    assert await rig.transitions() == expected
    assert await rig.latencies() == 2


async def test_a_configured_batch_that_answered_404_is_asked_again_and_comes_back(
    make_rig,
) -> None:
    upstream = Upstream()
    upstream.add(DEVICE, batch_id(1), actions(3, "Acknowledged"))
    upstream.missing.add(batch_id(1))
    rig = await make_rig(upstream, devices=[{"id": DEVICE, "commands": [batch_id(1)]}])
    await rig.poll()
    assert await rig.gauges() == {}
    asked = upstream.requests["command"]
    await rig.poll(5)
    assert upstream.requests["command"] == asked  # not asked every round
    upstream.missing.clear()
    await rig.poll(5)  # ten intervals after the 404
    assert (await rig.gauges())[(batch_id(1), "Acknowledged")] == 3


# --- no poll fails in silence --------------------------------------------------------------------


async def test_a_non_ascii_digit_is_a_schema_problem_not_a_dead_round(make_rig) -> None:
    upstream = Upstream()
    docs = actions(3, "Acknowledged")
    docs[0]["statusCode"] = "²"
    upstream.add(DEVICE, batch_id(1), docs)
    rig = await make_rig(upstream)
    await rig.poll()
    found = await rig.scrape()
    assert found[("applivery_exporter_parse_problems_total", frozenset({("kind", "schema")}))] == 1
    assert found[("applivery_exporter_target_up",
                  frozenset({("device", DEVICE), ("organization", ORG)}))] == 1
    assert (await rig.gauges())[(batch_id(1), "Acknowledged")] == 3
    assert found[("applivery_exporter_poll_failures_total", frozenset({("kind", "round")}))] == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("receivedAt", 1e400), ("receivedAt", "9999-12-31T00:00:00Z"), ("sentAt", "NaN")],
)
async def test_timestamps_that_are_not_moments_are_problems_treated_as_missing(
    make_rig, field: str, value: Any
) -> None:
    upstream = Upstream()
    docs = actions(2, "Acknowledged")
    docs[0][field] = value
    upstream.add(DEVICE, batch_id(1), docs)
    rig = await make_rig(upstream)
    await rig.poll()
    found = await rig.scrape()
    assert found[("applivery_exporter_parse_problems_total",
                  frozenset({("kind", "timestamp")}))] == 1
    sums = [v for (n, _), v in found.items()
            if n == "applivery_windows_command_ack_latency_seconds_sum"]
    assert all(v < 3600 for v in sums)  # never +Inf, never a millennium
    assert await rig.latencies() == 1  # the other action's


async def test_check_in_times_from_the_far_future_or_nan_do_not_pin_the_mark(make_rig) -> None:
    upstream = Upstream()
    upstream.devices = [
        {"id": DEVICE, "lastStatusReportTime": "9999-12-31T00:00:00Z"},
        {"id": device_id(9), "lastStatusReportTime": float("nan")},
    ]
    rig = await make_rig(upstream, devices=[], discovery={"devices": {}})
    await rig.poll()
    scheduler = rig.exporter.scheduler
    assert all(t.checkin is None for t in scheduler.tracking.values())
    found = await rig.scrape()
    assert found[("applivery_exporter_parse_problems_total",
                  frozenset({("kind", "timestamp")}))] == 2


async def test_a_device_poll_that_raises_is_that_devices_failure(make_rig, monkeypatch) -> None:
    upstream = Upstream()
    other = device_id(9)
    upstream.add(DEVICE, batch_id(1), actions(2, "Acknowledged"))
    upstream.add(other, batch_id(2), actions(2, "Acknowledged", prefix="o"))
    rig = await make_rig(upstream, devices=[{"id": DEVICE}, {"id": other}])
    state = rig.exporter.state
    apply = state.apply_actions

    def broken(device: str, *args: Any) -> None:
        if device == DEVICE:
            raise KeyError("a bug")
        apply(device, *args)

    monkeypatch.setattr(state, "apply_actions", broken)
    await rig.poll()
    found = await rig.scrape()
    up = {dict(k)["device"]: v for (n, k), v in found.items()
          if n == "applivery_exporter_target_up"}
    assert up == {DEVICE: 0, other: 1}
    assert found[("applivery_exporter_poll_failures_total", frozenset({("kind", "device")}))] == 1
    assert "internal error (KeyError)" in state.device_view(DEVICE).last_error
    async with rig.session.get(rig.url + "/") as response:
        assert "internal error (KeyError)" in await response.text()


async def test_a_round_that_raises_is_counted_and_polling_goes_on(make_rig, monkeypatch) -> None:
    upstream = Upstream()
    upstream.add(DEVICE, batch_id(1), actions(2, "Acknowledged"))
    rig = await make_rig(upstream, poll={"interval_seconds": 0.05, "jitter": 0})
    scheduler = rig.exporter.scheduler
    crashes = [1]
    real = scheduler.run_round

    async def flaky() -> Any:
        if crashes[0]:
            crashes[0] -= 1
            raise RuntimeError("a bug")
        return await real()

    monkeypatch.setattr(scheduler, "run_round", flaky)
    await run_until_rounds(scheduler, 2, within=4.0)
    rig.exporter.exposition.refresh()
    found = await rig.scrape()
    assert found[("applivery_exporter_poll_failures_total", frozenset({("kind", "round")}))] == 1
    assert found[("applivery_exporter_poll_rounds_total", frozenset())] >= 3
    assert scheduler.rounds >= 2


async def test_a_reload_during_a_round_wakes_the_next_one(make_rig, monkeypatch) -> None:
    upstream = Upstream()
    upstream.add(DEVICE, batch_id(1), actions(2, "Acknowledged"))
    rig = await make_rig(upstream, poll={"interval_seconds": 3600, "jitter": 0})
    scheduler = rig.exporter.scheduler
    real = scheduler.run_round

    async def reloaded_meanwhile() -> Any:
        if scheduler.rounds == 0:
            scheduler.reload(scheduler.config)
        return await real()

    monkeypatch.setattr(scheduler, "run_round", reloaded_meanwhile)
    await run_until_rounds(scheduler, 2, within=2.0)
    assert scheduler.rounds >= 2  # not an hour later


# --- bounds and shards ------------------------------------------------------------------------


async def test_unknown_status_names_are_bounded(make_rig) -> None:
    upstream = Upstream()
    docs = [{"cmdId": f"u-{i}", "status": f"Invented{i}", "sentAt": iso(START + 60),
             "receivedAt": iso(START + 65)} for i in range(3000)]
    upstream.add(DEVICE, batch_id(1), docs)
    rig = await make_rig(upstream)
    await rig.poll()
    found = await rig.scrape()
    statuses = {dict(k)["status"] for (n, k), _ in found.items()
                if n == "applivery_windows_command_action_transitions_total"}
    gauges = {s for _, s in await rig.gauges()}
    assert len(statuses - {"other"}) <= 65 + MAX_UNKNOWN_STATUSES
    assert len(gauges) == MAX_UNKNOWN_STATUSES + 1
    transitions = await rig.transitions()
    assert transitions["other"] == 3000 - MAX_UNKNOWN_STATUSES
    assert sum(v for s, v in transitions.items() if s.startswith("Invented")) == 100
    assert found[("applivery_exporter_parse_problems_total",
                  frozenset({("kind", "unknown_status")}))] == 3000 + 1  # and the summary


async def test_shards_watch_a_device_configured_by_serial_and_discovered_exactly_once(
    make_rig,
) -> None:
    upstream = Upstream()
    fleet = [device_id(i) for i in range(12)]
    upstream.devices = [
        {"id": d, "summary": {"serialNumber": f"SER{i}"}, "tags": ["kiosk"]}
        for i, d in enumerate(fleet)
    ]
    for i, device in enumerate(fleet):
        upstream.add(device, batch_id(i + 1), actions(2, "Acknowledged", prefix=f"d{i}"))
    configured = [{"id": f"SER{i}", "name": f"by-serial-{i}"} for i in range(6)]
    for i in range(6):  # the API takes the serial in the path too
        upstream.batches[f"SER{i}"] = upstream.batches[fleet[i]]
    watched: list[str] = []
    exported = 0.0
    for index in range(2):
        rig = await make_rig(upstream, shard=Shard(index, 2), devices=configured,
                             discovery={"devices": {"tags": ["kiosk"]}})
        await rig.poll(2)
        watched += rig.exporter.state.watched()
        exported += sum((await rig.gauges()).values())
    canonical = [w if w in fleet else fleet[int(w.removeprefix("SER"))] for w in watched]
    assert sorted(canonical) == sorted(fleet)  # every device once, none lost
    assert exported == 24

