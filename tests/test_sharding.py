"""Sharding: ``--shard INDEX/TOTAL`` gives every device exactly one poller among TOTAL replicas.

The split is a stable hash of the device id, so replicas agree without talking to each other;
together they export what one unsharded exporter does, each on its share of the API budget.
Expected values come from the simulator's ground truth or from the unsharded exporter, never
from the shard under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from promstack import ScrapeTarget, eventually, free_port, running_prometheus

from exporter.simulator import Simulator
from exporter.targets import Shard

ROOT = Path(__file__).resolve().parents[1]
SHARDED_OVERLAY = ROOT / "deploy" / "kubernetes" / "overlays" / "sharded"
TOKEN = "sharding-test-token"
SHARDS = 3
BUDGET = 360_000  # requests per hour: high enough that no replica waits for its share
UNSHARDED = "all"  # the shard label of the unsharded exporter

SimulatorFactory = Callable[..., Awaitable[tuple[Simulator, str]]]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args, "--storage.path="],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def owners(device: str, total: int) -> list[int]:
    return [index for index in range(total) if Shard(index, total).owns(device)]


# ---------------------------------------------------------------------------------------------
# INDEX/TOTAL
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "index", "total"), [("0/3", 0, 3), ("2/3", 2, 3), ("0/1", 0, 1)])
def test_an_index_below_the_total_is_a_shard(text: str, index: int, total: int) -> None:
    assert Shard.parse(text) == Shard(index, total)


REJECTED = ["3/3", "-1/3", "a/b", "1", "0/0", "1/", "/3", "1/3/5", " 1/3", "1.0/3"]


@pytest.mark.parametrize("text", REJECTED)
def test_anything_else_is_refused_naming_the_flag(text: str) -> None:
    with pytest.raises(ValueError, match="--shard") as caught:
        Shard.parse(text)
    assert repr(text) in str(caught.value)


@pytest.mark.parametrize("text", ["3/3", "-1/3", "a/b", "1", "0/0"])
def test_the_exporter_refuses_a_bad_shard_with_exit_2_and_a_clear_message(text: str) -> None:
    # The = form: "--shard -1/3" would already be refused by argparse as a missing value.
    result = run_cli(f"--shard={text}", "--config.file", "/nonexistent/config.yaml")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "--shard" in line and repr(text) in line
    assert "Traceback" not in result.stderr


def test_the_exporter_accepts_the_last_shard(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "organization: demo\napi: {base_url: 'http://127.0.0.1:1/v1'}\n"
        "discovery: {devices: {refresh_seconds: 60}}\n"
    )
    result = run_cli(f"--shard={SHARDS - 1}/{SHARDS}", "--config.file", str(config),
                     "--config.check", env={"APPLIVERY_API_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# The split
# ---------------------------------------------------------------------------------------------


@cache
def fleet_identifiers() -> dict[str, tuple[str, ...]]:
    """10,000 simulated devices by each identifier a config may name them by."""
    devices = Simulator(
        seed=11, devices=10_000, batches_per_device=0, record_events=False
    ).fleet.devices
    # win_id: upper-case GUIDs. Not every device has an IMEI.
    kinds = ("id", "serial", "imei", "win_id")
    return {kind: tuple(v for d in devices if (v := getattr(d, kind))) for kind in kinds}


@pytest.mark.parametrize("total", range(1, 6))
def test_every_device_lands_in_exactly_one_shard(total: int) -> None:
    for kind, identifiers in fleet_identifiers().items():
        misplaced = [d for d in identifiers if len(owners(d, total)) != 1]
        assert not misplaced, f"{kind}: {misplaced[:5]} ..."


@pytest.mark.parametrize("total", range(2, 6))
def test_the_split_is_even_within_a_fifth_of_the_mean(total: int) -> None:
    for kind, identifiers in fleet_identifiers().items():
        sizes = Counter(i for d in identifiers for i in owners(d, total))
        mean = len(identifiers) / total
        assert set(sizes) == set(range(total)), kind
        assert all(abs(size - mean) <= 0.2 * mean for size in sizes.values()), (kind, sizes)


def test_a_devices_shard_does_not_depend_on_how_its_id_is_capitalised() -> None:
    identifiers = fleet_identifiers()
    for device in identifiers["id"][:2000] + identifiers["win_id"][:2000]:
        assert owners(device, SHARDS) == owners(device.swapcase(), SHARDS), device


def test_every_process_computes_the_same_split() -> None:
    # Python's own hash() is salted per process: replicas using it would disagree.
    devices = fleet_identifiers()["id"][:2000]
    program = (
        "import sys; from exporter.targets import Shard\n"
        f"print(''.join(str([i for i in range({SHARDS}) if Shard(i, {SHARDS}).owns(d)][0])"
        " for d in sys.stdin.read().split()))"
    )
    here = "".join(str(owners(d, SHARDS)[0]) for d in devices)
    for seed in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "-c", program], input="\n".join(devices), capture_output=True,
            text=True, timeout=60, check=True, cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert result.stdout.strip() == here


# ---------------------------------------------------------------------------------------------
# Three replicas and one unsharded exporter, scraped by a real Prometheus
# ---------------------------------------------------------------------------------------------


def exporter_config(directory: Path, base_url: str) -> Path:
    token = directory / "token"
    token.write_text(TOKEN)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump({
        "organization": "demo",
        "api": {"base_url": base_url, "token_file": str(token), "requests_per_hour": BUDGET},
        "poll": {"interval_seconds": 5},
        # Every batch of the frozen fleet, however old: all exporters see the same history.
        "discovery": {
            "devices": {"refresh_seconds": 3600},
            "batches": {"max_age": "3650d", "max_per_device": 1000},
        },
    }))
    return path


@contextlib.asynccontextmanager
async def exporter_process(
    config: Path, port: int, shard: str | None, log_path: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m exporter`` on 127.0.0.1:port; terminated (and checked) when the block ends.
    Its durable state goes next to its log: each process needs a directory of its own."""
    state = log_path.with_name(f"{log_path.stem}-state")
    args = ["--config.file", str(config), "--web.listen-address", f"127.0.0.1:{port}",
            "--storage.path", str(state)]
    if shard is not None:
        args.append(f"--shard={shard}")
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "exporter", *args, "--log.format=json",
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def wait_ready(
    session: aiohttp.ClientSession, url: str, proc: asyncio.subprocess.Process, log_path: Path
) -> None:
    async def probe() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"exporter exited: {log_path.read_text()[-2000:]}")
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with session.get(f"{url}/-/ready") as resp:
                return resp.status == 200
        return False

    await eventually(probe, timeout=40, what=f"{url} ready")


def by_label(result: Iterable[dict[str, Any]], *labels: str) -> dict[Any, float]:
    """An instant vector as {label value (or tuple of them): sample value}."""
    keyed: dict[Any, float] = {}
    for sample in result:
        key = tuple(sample["metric"].get(label, "") for label in labels)
        keyed[key[0] if len(labels) == 1 else key] = float(sample["value"][1])
    return keyed


@pytest.mark.integration
async def test_three_shards_together_export_what_one_exporter_does(
    make_simulator_server: SimulatorFactory, tmp_path: Path
) -> None:
    # A frozen fleet (speed 0): every exporter reads the same actions, so gauges compare exactly.
    sim, base_url = await make_simulator_server(devices=30, seed=5, token=TOKEN)
    config = exporter_config(tmp_path, base_url)
    shards = {str(i): f"{i}/{SHARDS}" for i in range(SHARDS)}
    layout: dict[str, str | None] = {**shards, UNSHARDED: None}
    ports = {name: free_port() for name in layout}

    async with contextlib.AsyncExitStack() as stack:
        procs = {
            name: await stack.enter_async_context(
                exporter_process(config, ports[name], shard, tmp_path / f"exporter-{name}.log")
            )
            for name, shard in layout.items()
        }
        prom = await stack.enter_async_context(running_prometheus(
            [ScrapeTarget(f"127.0.0.1:{ports[name]}", labels={"shard": name}) for name in layout]
        ))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            await asyncio.gather(*(
                wait_ready(session, f"http://127.0.0.1:{ports[name]}", procs[name],
                           tmp_path / f"exporter-{name}.log")
                for name in layout
            ))
        # Compare only scrapes taken after every exporter finished its first full round. Ready
        # comes with the round's end, its render a moment later: the scrape must show it.
        settled = time.time()
        await eventually(
            lambda: prom.query(
                "count(count by (shard) "
                f"(timestamp(applivery_exporter_target_up) > {settled})) == {len(layout)}"
            ),
            what="a scrape of every exporter's first round after all were ready",
        )
        at = time.time()

        async def query(expr: str, *labels: str) -> dict[Any, float]:
            return by_label(await prom.query(expr, at=at), *labels)

        truth_devices = set(sim.fleet.device_ids())
        up = await query('applivery_exporter_target_up{shard!="all"}', "device", "shard")
        unsharded_up = await query('applivery_exporter_target_up{shard="all"}', "device")
        shard_count = await query(
            'count by (device) (applivery_exporter_target_up{shard!="all"})', "device"
        )
        assert len(truth_devices) == 30
        assert set(unsharded_up) == truth_devices
        assert shard_count == dict.fromkeys(truth_devices, 1.0)
        assert set(up.values()) == {1.0}
        # Each replica polls exactly the devices its INDEX/TOTAL owns, and none is idle.
        for name, spec in shards.items():
            polled = {device for device, shard in up if shard == name}
            assert polled == {d for d in truth_devices if Shard.parse(spec).owns(d)}
            assert polled

        truth = Counter[tuple[str, str, str]]()
        for device in truth_devices:
            for batch in sim.fleet.batch_ids(device):
                for status, count in sim.fleet.grouped_counts(device, batch).items():
                    truth[device, batch, status] += count
        series = ("device", "command", "status")
        sharded = await query('applivery_windows_command_actions{shard!="all"} > 0', *series)
        unsharded = await query('applivery_windows_command_actions{shard="all"} > 0', *series)
        assert sharded == unsharded == {key: float(n) for key, n in truth.items() if n}

        per_status = 'sum by (status) (applivery_windows_command_actions{{shard{}"all"}})'
        by_status = await query(per_status.format("!="), "status")
        assert by_status == await query(per_status.format("="), "status")
        assert sum(by_status.values()) == sum(truth.values()) > 0

        budgets = await query("applivery_exporter_api_budget_requests_per_hour", "shard")
        assert budgets[UNSHARDED] == BUDGET
        for name in shards:
            assert math.isclose(budgets[name], budgets[UNSHARDED] / SHARDS, rel_tol=1e-12)

        for name, proc in procs.items():
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 10) == 0, name


@pytest.mark.integration
async def test_a_shard_that_owns_no_device_is_still_ready(
    make_simulator_server: SimulatorFactory, tmp_path: Path
) -> None:
    sim, base_url = await make_simulator_server(devices=1, seed=5, token=TOKEN)
    (device,) = sim.fleet.device_ids()
    idle = next(i for i in range(SHARDS) if not Shard(i, SHARDS).owns(device))
    log_path = tmp_path / "exporter.log"
    config = exporter_config(tmp_path, base_url)
    port = free_port()
    async with (
        exporter_process(config, port, f"{idle}/{SHARDS}", log_path) as proc,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
    ):
        # Discovery ran and found nothing to poll: the replica is as ready as it will ever be.
        await eventually(lambda: discovered(log_path), timeout=20, what="device discovery")

        async def ready() -> bool:
            async with session.get(f"http://127.0.0.1:{port}/-/ready") as resp:
                return resp.status == 200

        await eventually(ready, timeout=5, what=f"readiness; {log_path.read_text()[-1000:]}")
        assert proc.returncode is None


async def discovered(log_path: Path) -> bool:
    return '"devices_discovered"' in log_path.read_text()


# ---------------------------------------------------------------------------------------------
# The StatefulSet overlay
# ---------------------------------------------------------------------------------------------


def sharded_statefulset() -> dict[str, Any]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but kubectl is missing")
        pytest.skip("needs kubectl (kustomize)")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(SHARDED_OVERLAY)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    (statefulset,) = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "StatefulSet"]
    return statefulset


def test_the_statefulset_runs_one_replica_per_shard() -> None:
    statefulset = sharded_statefulset()
    replicas = statefulset["spec"]["replicas"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    (shard_arg,) = [a for a in container["args"] if a.startswith("--shard=")]
    assert shard_arg == f"--shard=$(SHARD_INDEX)/{replicas}"
    (env,) = [e for e in container["env"] if e["name"] == "SHARD_INDEX"]
    assert env["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['apps.kubernetes.io/pod-index']"
    )
    # The pod ordinals 0..replicas-1 are exactly the valid indexes: every one parses, and
    # together they own every device once.
    flag = shard_arg.removeprefix("--shard=")
    specs = [Shard.parse(flag.replace("$(SHARD_INDEX)", str(o))) for o in range(replicas)]
    assert {s.total for s in specs} == {replicas}
    with pytest.raises(ValueError):
        Shard.parse(flag.replace("$(SHARD_INDEX)", str(replicas)))
    for device in fleet_identifiers()["id"][:1000]:
        assert sum(s.owns(device) for s in specs) == 1
