"""Durable state end to end: the exporter with --storage.path against the simulator served
by a real aiohttp server, stopped, killed and started again as a deployment would.

Expected values come from the simulator's ground truth (the events it applied since the
first exporter began watching), never from the exporter itself.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from processes import fetch, free_port, process, wait_for
from samples import Samples
from samples import parse as parse_samples
from test_exporter_e2e import (
    NEW_COMMAND,
    assert_exports_the_fleet,
    command_gauges,
    config_yaml,
    exported_transitions,
    poll,
    samples,
    simulator,
    truth_gauges,
)

from exporter.cli import Exporter, _restore, build_exporter
from exporter.client import TokenSource
from exporter.config import parse_config
from exporter.simulator import Simulator
from exporter.store import DATABASE, DirectoryLock

__all__ = ["simulator"]  # the fixture, shared with the other end-to-end tests

TOKEN = "tok-7f3a9c-never-in-the-store"
# Families whose samples may never go down while the store holds them.
MONOTONIC_SUFFIXES = ("_total", "_count", "_bucket")


def exporter_on(sim: Simulator, url: str, directory: Path, **overrides: object) -> Exporter:
    config = parse_config(config_yaml(url, **overrides))
    return build_exporter(config, TokenSource(value=sim.token), config_path=None,
                          clock=sim.clock.now, storage=DirectoryLock(directory))


async def stop(exporter: Exporter) -> None:
    """As SIGTERM does: the last changes committed, the store closed, the lock dropped."""
    persistence = exporter.persistence
    assert persistence is not None
    assert await persistence.commit(persistence.collect())
    await persistence.close()
    await exporter.client.close()


async def test_a_restart_serves_the_fleet_at_once_and_counts_the_gap_once(
    simulator, tmp_path: Path
) -> None:
    sim, url = simulator
    watermark = sim.clock.now()
    first = exporter_on(sim, url, tmp_path)
    await _restore(first)
    await poll(first)
    sim.advance(3600)
    await poll(first)
    before = samples(first)
    await stop(first)

    # While it is down the fleet moves on: answers arrive, and a new batch is sent.
    sim.fleet.create_batch(sim.fleet.device_ids()[0], NEW_COMMAND)
    sim.advance(3600)

    second = exporter_on(sim, url, tmp_path)
    try:
        assert await _restore(second) == len(sim.fleet.device_ids())
        served = samples(second)  # before upstream answers anything
        assert command_gauges(served) == command_gauges(before)
        assert exported_transitions(served) == exported_transitions(before)
        ups = {k: v for (n, k), v in served.items() if n == "applivery_exporter_target_up"}
        assert ups and not any(ups.values())  # not up until read again
        await poll(second)
        # Every change since the FIRST process began watching, counted once: the gap too.
        assert_exports_the_fleet(second, sim, watermark)
    finally:
        await stop(second)


async def test_a_restart_with_upstream_down_serves_the_last_known_fleet(
    simulator, tmp_path: Path
) -> None:
    sim, url = simulator
    first = exporter_on(sim, url, tmp_path)
    await _restore(first)
    await poll(first)
    known = command_gauges(samples(first))
    await stop(first)

    sim.faults.set("error503=1.0")
    second = exporter_on(sim, url, tmp_path)
    try:
        await _restore(second)
        await poll(second)
        assert command_gauges(samples(second)) == known == truth_gauges(sim)
    finally:
        sim.faults.clear()
        await stop(second)


async def test_a_device_the_new_config_drops_leaves_and_the_others_keep_their_watermark(
    simulator, tmp_path: Path
) -> None:
    sim, url = simulator
    kept, dropped = sim.fleet.device_ids()[:2]
    first = exporter_on(sim, url, tmp_path, discovery={},
                        devices=[{"id": kept, "name": "old-name"}, {"id": dropped}])
    await _restore(first)
    await poll(first)
    watermark = first.state.device_view(kept).watermark
    await stop(first)

    sim.advance(600)
    second = exporter_on(sim, url, tmp_path, discovery={},
                         devices=[{"id": kept, "name": "new-name"}])
    try:
        await _restore(second)
        assert second.state.watched() == [kept]
        view = second.state.device_view(kept)
        assert (view.name, view.watermark) == ("new-name", watermark)
        assert sum(second.state.device_states().values()) == 1
        found = samples(second)
        assert not [k for (n, k), _ in found.items() if ("device", dropped) in k]
    finally:
        await stop(second)


# --- as a deployment runs it: processes, SIGKILL, a scraper ------------------------------------


class Scraper(threading.Thread):
    """Reads /metrics every 50 ms and remembers the highest value of each monotonic series;
    a value below it is a counter that went back."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.highest: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.went_back: list[str] = []
        self.scrapes = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.05):
            try:
                status, _, body = fetch(f"{self.url}/metrics")
            except OSError:
                continue  # down between a kill and the restart
            if status == 200:
                self.saw(parse_samples(body.decode()))

    def saw(self, found: Samples) -> None:
        self.scrapes += 1
        for key, value in found.items():
            # process_* are the process's own (a new one has a new process_start_time).
            if not key[0].endswith(MONOTONIC_SUFFIXES) or key[0].startswith("process_"):
                continue
            if value < self.highest.get(key, 0.0):
                self.went_back.append(f"{key[0]}{dict(key[1])}: {self.highest[key]} -> {value}")
            self.highest[key] = max(value, self.highest.get(key, 0.0))

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)


@contextmanager
def exporter_process(config: Path, port: int, store: Path) -> Iterator[subprocess.Popen[str]]:
    with process("-m", "exporter", f"--config.file={config}",
                 f"--web.listen-address=127.0.0.1:{port}", f"--storage.path={store}",
                 "--log.format=json", env={"APPLIVERY_API_TOKEN": TOKEN}) as proc:
        yield proc


async def test_sigkill_mid_round_loses_nothing_a_scraper_saw_and_ends_exact(
    make_simulator_server, tmp_path: Path
) -> None:
    # The simulator's clock is manual and starts at the exporter's wall clock: every change
    # the test makes happens after the first process began watching.
    sim, url = await make_simulator_server(seed=5, devices=6, start=time.time(), max_limit=7,
                                           new_batches_per_device_hour=20.0, token=TOKEN)
    watermark = sim.clock.now()
    config = tmp_path / "config.yaml"
    token = tmp_path / "token"
    token.write_text(sim.token)
    config.write_text(config_yaml(url, api={
        "base_url": url, "requests_per_hour": 1_000_000, "page_size": 100,
        "token_file": str(token),
    }, poll={"interval_seconds": 1}))
    store, port = tmp_path / "store", free_port()
    scraper = Scraper(f"http://127.0.0.1:{port}")
    scraper.start()
    rng = random.Random(7)
    try:
        for life in range(4):
            with exporter_process(config, port, store) as proc:
                await _wait(lambda: fetch(f"{scraper.url}/-/ready")[0] == 200, "ready")
                deadline = time.monotonic() + rng.uniform(1.0, 3.0)
                scraped = scraper.scrapes
                while time.monotonic() < deadline:
                    sim.advance(300)  # answers and new batches, while rounds run
                    await asyncio.sleep(0.1)
                # The scraper saw this life (however slow a loaded machine makes it).
                await _wait(lambda s=scraped: scraper.scrapes >= s + 2, "scrapes of this life")
                if life < 3:
                    proc.send_signal(signal.SIGKILL)  # anywhere: mid-round, mid-commit
                    proc.wait(timeout=10)
                    sim.advance(600)  # the fleet moves while it is down
                    continue
                # The last life: the fleet rests, and the exporter must end exact.
                await _wait(lambda: _exact(scraper.url, sim, watermark), "exact counts", 60)
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=10) == 0
    finally:
        scraper.stop()
    assert scraper.went_back == []
    counted = [v for (name, _), v in scraper.highest.items()
               if name == "applivery_windows_command_action_transitions_total"]
    assert sum(counted) > 0  # the kills landed while things were being counted
    for path in store.iterdir():  # the store never holds the token
        assert TOKEN.encode() not in path.read_bytes(), path


def _exact(url: str, sim: Simulator, watermark: float) -> bool:
    found = parse_samples(fetch(f"{url}/metrics")[2].decode())
    events = sim.fleet.events_since(watermark)
    return exported_transitions(found) == Counter(e.status for e in events) and (
        command_gauges(found) == truth_gauges(sim)
    )


async def _wait(predicate, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if await asyncio.to_thread(predicate):
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_second_process_on_the_store_exits_1_naming_it_and_the_holder(tmp_path: Path) -> None:
    from processes import valid_config

    config = valid_config(tmp_path)
    store = tmp_path / "store"
    port, other = free_port(), free_port()
    with exporter_process(config, port, store) as first:
        wait_for(lambda: fetch(f"http://127.0.0.1:{port}/-/healthy")[0] == 200, what="healthy")
        second = subprocess.run(
            [sys.executable, "-m", "exporter", f"--config.file={config}",
             f"--web.listen-address=127.0.0.1:{other}", f"--storage.path={store}"],
            capture_output=True, text=True, timeout=30, check=False,
            env={**os.environ, "APPLIVERY_API_TOKEN": TOKEN},
        )
        assert second.returncode == 1
        assert str(store) in second.stderr and f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr


def test_a_corrupt_store_is_moved_aside_and_the_exporter_starts(tmp_path: Path) -> None:
    from processes import valid_config

    config = valid_config(tmp_path)
    store = tmp_path / "store"
    store.mkdir()
    (store / DATABASE).write_bytes(b"\x00garbage" * 512)
    port = free_port()
    with exporter_process(config, port, store) as proc:
        wait_for(lambda: fetch(f"http://127.0.0.1:{port}/-/healthy")[0] == 200, what="healthy")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        logs = proc.stderr.read() if proc.stderr else ""
    assert "store_moved_aside" in logs
    kept = [p.name for p in store.iterdir() if p.name.startswith(f"{DATABASE}.unreadable-")]
    assert kept and (store / DATABASE).exists()


def test_a_file_where_the_store_should_be_is_a_storage_failure_not_a_crash(
    tmp_path: Path,
) -> None:
    from processes import valid_config

    config = valid_config(tmp_path)
    store = tmp_path / "store"
    store.write_text("not a directory")
    port = free_port()
    with exporter_process(config, port, store) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: fetch(f"{url}/-/healthy")[0] == 200, what="healthy")
        wait_for(lambda: _value(url, FAILURES) >= 1, what="the failure counted")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


async def test_a_read_only_store_directory_is_counted_and_used_once_writable(
    make_simulator_server, tmp_path: Path
) -> None:
    _, url = await make_simulator_server(devices=4, start=time.time() - 60, token=TOKEN)
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml(url, poll={"interval_seconds": 1}))
    port = free_port()
    metrics_url = f"http://127.0.0.1:{port}"
    with small_disk(tmp_path / "store", "16m") as resize:
        subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "store")], check=True)
        with exporter_process(config, port, tmp_path / "store") as proc:
            await _wait(lambda: fetch(f"{metrics_url}/-/ready")[0] == 200, "ready")
            await _wait(lambda: _value(metrics_url, FAILURES) >= 1, "the failure counted")
            assert _value(metrics_url, LAST_WRITE) == 0  # nothing written
            resize("16m,rw")
            await _wait(lambda: _value(metrics_url, LAST_WRITE) > 0, "written once writable")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        assert (tmp_path / "store" / DATABASE).exists()


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Callable[[str], None]]:
    """A tmpfs of ``size`` at ``path`` (root only); yields a function that resizes it."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")

    def resize(new: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new}", str(path)], check=True)

    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _value(url: str, name: str) -> float:
    found = parse_samples(fetch(f"{url}/metrics")[2].decode())
    return sum(v for (n, _), v in found.items() if n == name)


async def test_a_full_disk_never_stops_polling_and_the_store_is_whole_once_it_has_room(
    make_simulator_server, tmp_path: Path
) -> None:
    sim, url = await make_simulator_server(seed=3, devices=30, start=time.time() - 60,
                                           batches_per_device=6, token=TOKEN)
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml(url, poll={"interval_seconds": 1}))
    port = free_port()
    metrics_url = f"http://127.0.0.1:{port}"
    # Room to open the store, not for the fleet's ledger: the disk fills in the first rounds.
    with small_disk(tmp_path / "store", "192k") as resize:
        store = tmp_path / "store"
        with exporter_process(config, port, store) as proc:
            await _wait(lambda: fetch(f"{metrics_url}/-/ready")[0] == 200, "ready")
            await _wait(lambda: _value(metrics_url, FAILURES) > 0, "a failed write")
            assert fetch(f"{metrics_url}/metrics")[0] == 200  # serving through it
            sim.fleet.create_batch(sim.fleet.device_ids()[0], NEW_COMMAND)
            sim.advance(600)  # answers arrive while the disk is full: still counted
            await _wait(lambda: _value(metrics_url, TRANSITIONS) > 0, "counting goes on")
            resize("64m")
            room_at = time.time()
            await _wait(lambda: _value(metrics_url, LAST_WRITE) > room_at, "a write again")
            seen = parse_samples(fetch(f"{metrics_url}/metrics")[2].decode())
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            logs = proc.stderr.read() if proc.stderr else ""
        # Opened, then out of room while running: one line when it began, one when it ended.
        assert logs.count('"storage_write_failed"') == 1, logs[-2000:]
        assert logs.count('"storage_write_recovered"') == 1
        with exporter_process(config, port, store) as proc:
            await _wait(lambda: fetch(f"{metrics_url}/-/healthy")[0] == 200, "restarted")
            again = parse_samples(fetch(f"{metrics_url}/metrics")[2].decode())
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
    # The store was whole again: nothing counted while the disk was full is lost.
    assert exported_transitions(again) == exported_transitions(seen) != Counter()
    assert command_gauges(again) == command_gauges(seen)


FAILURES = "applivery_exporter_storage_write_failures_total"
LAST_WRITE = "applivery_exporter_storage_last_write_timestamp_seconds"
TRANSITIONS = "applivery_windows_command_action_transitions_total"
