"""exporter/client.py: the API as typed records, each endpoint against the simulator's fleet."""

from __future__ import annotations

from typing import Any

import pytest
from clientrig import Simulated, counts, simulated

from exporter.client import NotFoundError
from exporter.records import Device

# --- against the simulator --------------------------------------------------------------------


async def test_lists_every_device(sim: Simulated) -> None:
    async with sim.client(page_size=4) as client:
        devices = await client.list_devices()
    assert [d.id for d in devices] == sim.sim.fleet.device_ids()
    model = sim.sim.fleet.device(devices[0].id)
    assert devices[0].name == model.name
    assert devices[0].serial == model.serial


async def test_lists_devices_by_tag_and_segment(sim: Simulated) -> None:
    models = [sim.sim.fleet.device(d) for d in sim.sim.fleet.device_ids()]
    tag = next(tag for model in models for tag in model.tags)
    segment = models[0].segment
    async with sim.client() as client:
        tagged = await client.list_devices(tags=[tag])
        in_segment = await client.list_devices(segment=segment)
    assert {d.id for d in tagged} == {m.id for m in models if tag in m.tags}
    assert {d.id for d in in_segment} == {m.id for m in models if m.segment == segment}


async def test_lists_recent_checkins_newest_first_and_stops_at_older_ones(
    sim: Simulated,
) -> None:
    models = [sim.sim.fleet.device(d) for d in sim.sim.fleet.device_ids()]
    reports = sorted((m.last_report for m in models if m.last_report), reverse=True)
    horizon = reports[len(reports) // 2]

    def older(device: Device) -> bool:
        return device.last_status_report is None or device.last_status_report < horizon

    async with sim.client(page_size=2) as client:
        recent = await client.list_devices(sort="lastStatusReportTime:desc", stop=older)
    expected = sorted(
        (m for m in models if m.last_report and m.last_report >= horizon),
        key=lambda m: m.last_report,
        reverse=True,
    )
    assert [d.id for d in recent] == [m.id for m in expected]
    assert 0 < len(recent) < len(models)


async def test_batch_history_is_newest_first_with_summaries(sim: Simulated) -> None:
    device = sim.sim.fleet.device_ids()[0]
    async with sim.client(page_size=2) as client:
        batches = await client.list_batches(device, max_items=100)
    assert {b.id for b in batches} == set(sim.sim.fleet.batch_ids(device))
    created = [b.created_at for b in batches]
    assert created == sorted(created, reverse=True)
    for batch in batches:
        assert dict(batch.summary or ()) == sim.sim.fleet.grouped_counts(device, batch.id)
        assert batch.device_id == device


async def test_batch_history_stops_at_max_items_and_since(sim: Simulated) -> None:
    device = sim.sim.fleet.device_ids()[0]
    async with sim.client(page_size=2) as client:
        everything = await client.list_batches(device, max_items=100)
        first_two = await client.list_batches(device, max_items=2)
        cutoff = everything[2].created_at
        assert cutoff is not None
        recent = await client.list_batches(device, max_items=100, since=cutoff)
    assert first_two == everything[:2]
    assert recent == [b for b in everything if b.created_at is not None and b.created_at >= cutoff]
    assert len(recent) < len(everything)


async def test_history_by_serial_number(sim: Simulated) -> None:
    device = sim.sim.fleet.device_ids()[1]
    serial = sim.sim.fleet.device(device).serial
    async with sim.client() as client:
        batches = await client.list_batches(serial, max_items=100)
    assert {b.id for b in batches} == set(sim.sim.fleet.batch_ids(device))


async def test_batch_details_match_the_fleet(sim: Simulated) -> None:
    device, batch_id = sim.batch_with_actions()
    async with sim.client() as client:
        batch = await client.get_batch(device, batch_id)
    assert batch.id == batch_id
    assert dict(batch.summary or ()) == sim.sim.fleet.grouped_counts(device, batch_id)


async def test_actions_match_the_fleet(sim: Simulated) -> None:
    device, batch_id = sim.batch_with_actions(3)
    async with sim.client() as client:
        actions = await client.list_actions(device, batch_id)
    assert counts(actions) == sim.sim.fleet.grouped_counts(device, batch_id)
    assert len({a.cmd_id for a in actions}) == len(actions)
    for action in actions:
        assert not action.problems
        if action.received_at is not None and action.sent_at is not None:
            assert action.received_at >= action.sent_at


async def test_pages_to_the_end_when_upstream_caps_the_limit(make_simulator_server: Any) -> None:
    sim = await simulated(make_simulator_server, max_limit=4, actions_per_batch=(17, 17))
    device, batch_id = sim.batch_with_actions(17)
    async with sim.client(page_size=100) as client:
        actions = await client.list_actions(device, batch_id)
    assert counts(actions) == sim.sim.fleet.grouped_counts(device, batch_id)
    assert len({a.cmd_id for a in actions}) == 17
    assert sim.served("actions", 200) == 5  # 4+4+4+4+1, no extra read


@pytest.mark.parametrize("probability", [1.0, 0.5])
async def test_shifting_pages_lose_and_duplicate_nothing(
    make_simulator_server: Any, probability: float
) -> None:
    sim = await simulated(make_simulator_server, max_limit=3, actions_per_batch=(14, 14))
    device, batch_id = sim.batch_with_actions(14)
    expected = sim.sim.fleet.grouped_counts(device, batch_id)
    sim.sim.faults.set(f"shifting_pages={probability}")
    async with sim.client(page_size=3) as client:
        for _ in range(3):
            actions = await client.list_actions(device, batch_id)
            assert len({a.cmd_id for a in actions}) == len(actions) == 14
            assert counts(actions) == expected


async def test_metrics_count_every_attempt_per_endpoint_and_code(sim: Simulated) -> None:
    device, batch_id = sim.batch_with_actions()
    async with sim.client(page_size=2) as client:
        await client.list_devices()
        await client.list_batches(device, max_items=100)
        await client.get_batch(device, batch_id)
        await client.list_actions(device, batch_id)
        with pytest.raises(NotFoundError):
            await client.get_batch(device, "0" * 24)
    observed = sim.metrics.api_requests
    for endpoint in ("devices", "commands", "command", "actions"):
        assert observed[(endpoint, "200")] == sim.served(endpoint, 200) > 0
        assert sim.metrics.api_durations[endpoint].count == sim.sim.stats.total(endpoint)
    assert observed[("command", "404")] == sim.served("command", 404) == 1
    assert sum(observed.values()) == sim.sim.stats.total()
