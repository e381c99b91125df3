"""The exporter end to end against the simulator served by a real aiohttp server.

Expected values always come from the simulator's ground truth (its grouped counts, the
events it applied), never from the exporter itself.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
import yaml
from processes import free_port
from samples import Samples
from samples import parse as parse_samples

from exporter.cli import Exporter, build_exporter, serve
from exporter.client import TokenSource
from exporter.config import parse_config
from exporter.reloading import reload_configs
from exporter.simulator import Simulator


def config_yaml(base_url: str, **overrides: object) -> str:
    document: dict[str, object] = {
        "organization": "demo",
        "api": {"base_url": base_url, "requests_per_hour": 1_000_000, "page_size": 100},
        "poll": {"interval_seconds": 60},
        "discovery": {
            "devices": {"refresh_seconds": 1},
            "batches": {"max_age": "3650d", "max_per_device": 1000},
        },
    }
    document.update(overrides)
    return yaml.safe_dump(document)


def make_exporter(
    sim: Simulator,
    base_url: str,
    *,
    path: Path | None = None,
    token: TokenSource | None = None,
    **overrides: object,
) -> Exporter:
    text = config_yaml(base_url, **overrides)
    if path is not None:
        path.write_text(text)
    config = parse_config(text)
    return build_exporter(
        config,
        token or TokenSource(value=sim.token),
        config_path=str(path) if path else None,
        clock=sim.clock.now,
    )


def samples(exporter: Exporter) -> Samples:
    exporter.exposition.refresh()
    return parse_samples(exporter.exposition.body(openmetrics=False).decode())


def select(found: Samples, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    wanted = set(labels.items())
    return {key: value for (n, key), value in found.items() if n == name and wanted <= key}


def command_gauges(found: Samples) -> dict[tuple[str, str], dict[str, int]]:
    """(device, command) -> {status: count} as exported."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    for key, value in select(found, "applivery_windows_command_actions").items():
        labels = dict(key)
        if value:
            out.setdefault((labels["device"], labels["command"]), {})[labels["status"]] = int(value)
    return out


def truth_gauges(sim: Simulator) -> dict[tuple[str, str], dict[str, int]]:
    out = {}
    for device in sim.fleet.device_ids():
        for batch in sim.fleet.batch_ids(device):
            counts = {s: n for s, n in sim.fleet.grouped_counts(device, batch).items() if n}
            if counts:
                out[(device, batch)] = counts
    return out


# A batch a test creates upstream: one setting read.
NEW_COMMAND = [{"config": {"path": "./Vendor/MSFT/Policy/Config/A/B", "action": "Get",
                           "format": "int"}}]


def assert_exports_the_fleet(exporter: Exporter, sim: Simulator, watermark: float) -> Samples:
    """Every change since ``watermark`` counted once, and every gauge as upstream has it;
    returns the samples."""
    found = samples(exporter)
    events = sim.fleet.events_since(watermark)
    assert events, "the simulated fleet should have changed"
    assert exported_transitions(found) == Counter(e.status for e in events)
    assert command_gauges(found) == truth_gauges(sim)
    return found


def exported_transitions(found: Samples) -> Counter[str]:
    counts: Counter[str] = Counter()
    for key, value in select(found, "applivery_windows_command_action_transitions_total").items():
        if value:
            counts[dict(key)["status"]] += int(value)
    return counts


def exported_latency_count(found: Samples) -> int:
    return int(sum(select(found, "applivery_windows_command_ack_latency_seconds_count").values()))


@pytest.fixture
async def simulator(aiohttp_server):
    sim = Simulator(seed=11, devices=6, speed=0, max_limit=7, batches_per_device=4)
    server = await aiohttp_server(sim.app())
    return sim, str(server.make_url("/v1"))


async def poll(exporter: Exporter, rounds: int = 1) -> None:
    for _ in range(rounds):
        await exporter.scheduler.run_round()


async def test_gauges_equal_simulator_counts_after_first_round(simulator):
    sim, url = simulator
    exporter = make_exporter(sim, url)
    try:
        await poll(exporter)
        assert exporter.scheduler.ready
        assert command_gauges(samples(exporter)) == truth_gauges(sim)
    finally:
        await exporter.client.close()


async def test_explicit_devices_and_commands_by_serial(simulator):
    sim, url = simulator
    device = sim.fleet.device_ids()[0]
    serial = sim.fleet.device(device).serial
    chosen = sim.fleet.batch_ids(device)[:2]
    exporter = make_exporter(
        sim, url, devices=[{"id": serial, "name": "front-desk", "commands": chosen}], discovery={}
    )
    try:
        await poll(exporter)
        found = samples(exporter)
        expected = {
            (serial, b): {s: n for s, n in sim.fleet.grouped_counts(device, b).items() if n}
            for b in chosen
        }
        assert command_gauges(found) == expected
        info = select(found, "applivery_windows_device_info", device=serial)
        assert [dict(k)["name"] for k in info] == ["front-desk"]
    finally:
        await exporter.client.close()


async def test_transitions_and_latency_count_each_change_once(simulator):
    sim, url = simulator
    watermark = sim.clock.now()
    exporter = make_exporter(sim, url)
    try:
        await poll(exporter)
        assert exported_transitions(samples(exporter)) == Counter()  # history is not counted
        for step in range(14):
            sim.advance(900)
            if step == 4:
                sim.faults.set("error500=0.3,throttle=0.1:0,shifting_pages=0.5,doc_timestamps")
            if step == 9:
                sim.faults.clear()
            await poll(exporter, rounds=2 if step % 3 == 0 else 1)  # re-polls change nothing
        await poll(exporter)
        found = assert_exports_the_fleet(exporter, sim, watermark)
        assert exported_latency_count(found) == len(sim.fleet.acks_since(watermark))
    finally:
        await exporter.client.close()


async def test_restart_counts_only_what_happens_after_it(simulator):
    sim, url = simulator
    first = make_exporter(sim, url)
    await poll(first)
    sim.advance(3600)
    await poll(first)
    await first.client.close()

    restarted_at = sim.clock.now()
    second = make_exporter(sim, url)
    try:
        await poll(second)
        assert exported_transitions(samples(second)) == Counter()  # no spike after restart
        sim.fleet.create_batch(sim.fleet.device_ids()[0], NEW_COMMAND)  # something happens
        sim.advance(3600)
        await poll(second)
        assert_exports_the_fleet(second, sim, restarted_at)
    finally:
        await second.client.close()


async def test_reload_keeps_counters_of_unchanged_devices(simulator, tmp_path, monkeypatch):
    sim, url = simulator
    monkeypatch.setenv("APPLIVERY_API_TOKEN", sim.token)
    watermark = sim.clock.now()
    path = tmp_path / "config.yaml"
    exporter = make_exporter(sim, url, path=path)
    try:
        await poll(exporter)
        sim.advance(1800)
        await poll(exporter)
        # The same watch list, reworded: counters and watermarks must survive.
        path.write_text(config_yaml(url, poll={"interval_seconds": 30}))
        assert await reload_configs(exporter) is None
        sim.advance(1800)
        await poll(exporter)
        found = assert_exports_the_fleet(exporter, sim, watermark)
        assert select(found, "applivery_exporter_config_last_reload_successful") == {
            frozenset(): 1.0
        }

        path.write_text("organization: [not, valid\n")
        problem = await reload_configs(exporter)
        assert problem and "config.yaml" in problem
        found = samples(exporter)
        assert select(found, "applivery_exporter_config_last_reload_successful") == {
            frozenset(): 0.0
        }
        assert command_gauges(found) == truth_gauges(sim)  # still running on the old config
    finally:
        await exporter.client.close()


async def test_batch_deleted_upstream_leaves_metrics(simulator):
    sim, url = simulator
    device = sim.fleet.device_ids()[1]
    gone = sim.fleet.batch_ids(device)[0]
    kept = sim.fleet.batch_ids(device)[1]
    exporter = make_exporter(
        sim, url, devices=[{"id": device, "commands": [gone, kept]}], discovery={}
    )
    try:
        await poll(exporter)
        assert (device, gone) in command_gauges(samples(exporter))
        sim.fleet.delete_batch(device, gone)
        await poll(exporter)
        found = samples(exporter)
        assert (device, gone) not in command_gauges(found)
        assert (device, kept) in command_gauges(found)
        # A missing batch does not mark its device down.
        assert select(found, "applivery_exporter_target_up", device=device) == {
            frozenset({("organization", sim.organization), ("device", device)}): 1.0
        }
    finally:
        await exporter.client.close()


async def test_revoked_token_turns_targets_down_and_recovery_needs_no_restart(
    simulator, tmp_path
):
    sim, url = simulator
    token_file = tmp_path / "token"
    token_file.write_text(sim.token + "\n")
    exporter = make_exporter(sim, url, token=TokenSource(path=str(token_file)))
    try:
        await poll(exporter)
        sim.token = "rotated-token"  # the old one is revoked upstream
        await poll(exporter)
        ups = select(samples(exporter), "applivery_exporter_target_up")
        assert ups and set(ups.values()) == {0.0}
        gauges_while_down = command_gauges(samples(exporter))
        assert gauges_while_down == truth_gauges(sim)  # last values stay until stale_after

        token_file.write_text("rotated-token\n")
        await poll(exporter)
        ups = select(samples(exporter), "applivery_exporter_target_up")
        assert set(ups.values()) == {1.0}
        assert sim.stats.counts[("commands", 401)] > 0
    finally:
        await exporter.client.close()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="Debian promtool not installed")
async def test_promtool_check_metrics_is_clean_on_a_real_scrape(simulator):
    sim, url = simulator
    exporter = make_exporter(sim, url)
    try:
        await poll(exporter)
        sim.advance(3600)
        await poll(exporter)
        exporter.exposition.refresh()
        body = exporter.exposition.body(openmetrics=False)
        result = subprocess.run(
            ["promtool", "check", "metrics"], input=body, capture_output=True, check=False
        )
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    finally:
        await exporter.client.close()


async def test_a_crashing_round_is_logged_and_polling_goes_on(simulator, monkeypatch):
    sim, url = simulator
    exporter = make_exporter(sim, url)
    scheduler = exporter.scheduler
    real_round = scheduler.run_round
    calls = 0

    async def flaky_round():
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in one round")
        return await real_round()

    monkeypatch.setattr(scheduler, "run_round", flaky_round)
    monkeypatch.setattr(scheduler, "_next_delay", lambda elapsed: 0.0)
    rounds = []
    task = asyncio.create_task(scheduler.run(on_round=rounds.append))
    try:
        for _ in range(100):
            if rounds:
                break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await exporter.client.close()
    assert calls >= 2 and rounds, "polling stopped after the crashing round"
    assert command_gauges(samples(exporter)) == truth_gauges(sim)


async def test_reload_to_another_token_file_takes_the_new_token(simulator, tmp_path):
    sim, url = simulator
    old, new = tmp_path / "old-token", tmp_path / "new-token"
    old.write_text(sim.token)
    new.write_text("second-token")
    path = tmp_path / "config.yaml"
    api = {"base_url": url, "requests_per_hour": 1_000_000, "token_file": str(old)}
    exporter = make_exporter(sim, url, path=path, token=TokenSource(path=str(old)), api=api)
    try:
        await poll(exporter)
        sim.token = "second-token"
        await poll(exporter)
        assert set(select(samples(exporter), "applivery_exporter_target_up").values()) == {0.0}
        path.write_text(config_yaml(url, api={**api, "token_file": str(new)}))
        assert await reload_configs(exporter) is None
        await poll(exporter)
        assert set(select(samples(exporter), "applivery_exporter_target_up").values()) == {1.0}
    finally:
        await exporter.client.close()


async def test_serve_reports_a_dead_render_loop_as_a_failure(simulator, monkeypatch):
    sim, url = simulator
    exporter = make_exporter(sim, url)

    steps = exporter.exposition.refresh_steps
    calls = 0

    def steps_that_break_later():
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError("render bug")
        return (yield from steps())

    monkeypatch.setattr(exporter.exposition, "refresh_steps", steps_that_break_later)
    monkeypatch.setattr("exporter.cli.REFRESH_SECONDS", 0.05)
    stop = asyncio.Event()
    code = await asyncio.wait_for(
        serve(exporter, f"127.0.0.1:{free_port()}", stop=stop, signals=False), timeout=10
    )
    assert code == 1


async def test_a_reload_is_rendered_by_the_render_loop_and_shows_on_the_next_scrape(
    simulator, tmp_path, monkeypatch
):
    # A render proceeds in steps with pauses; a reload that rendered on its own could publish
    # a body assembled half before and half after it. Only the loop may render.
    sim, url = simulator
    monkeypatch.setenv("APPLIVERY_API_TOKEN", sim.token)
    path = tmp_path / "config.yaml"
    exporter = make_exporter(sim, url, path=path)
    direct = []
    started = asyncio.Event()
    real_refresh = exporter.exposition.refresh

    def refresh() -> bool:
        if started.is_set():
            direct.append(1)
        return real_refresh()

    monkeypatch.setattr(exporter.exposition, "refresh", refresh)
    stop = asyncio.Event()
    address: list[str] = []

    def on_start(base: str) -> None:
        address.append(base)
        started.set()

    server = asyncio.create_task(serve(
        exporter, f"127.0.0.1:{free_port()}", stop=stop, signals=False, started=on_start,
        lifecycle=True,
    ))
    try:
        await asyncio.wait_for(started.wait(), timeout=10)
        path.write_text("organization: [not, valid\n")
        async with aiohttp.ClientSession() as session:
            async with session.post(address[0] + "/-/reload") as response:
                assert response.status != 200
            async with session.get(address[0] + "/metrics") as response:
                text = await response.text()
        assert "\napplivery_exporter_config_last_reload_successful 0" in text
        assert direct == []
    finally:
        stop.set()
        assert await asyncio.wait_for(server, timeout=10) == 0
