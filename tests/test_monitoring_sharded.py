"""Four shards of the exporter scraped the way the Prometheus Operator scrapes them, under a
real Prometheus with the project's rules.

The simulator serves its API on a real aiohttp server in accelerated time (600x); four
exporters run in this process, each polling its ``--shard i/4`` share of the devices, on free
ports. Prometheus scrapes them every second with the relabeling a ServiceMonitor generates:
``namespace``, ``service``, ``pod`` and ``container`` from Kubernetes meta labels, ``job`` from
the Service name, ``endpoint`` from the port name, and ``honor_labels`` off, so an exporter
label of the same name would come out renamed ``exported_*``. Prometheus loads the recording
rules, the alerts as written and a copy of the alerts without ``for``, whose conditions show
as firing alerts within seconds.

What it shows: every rule evaluates without error and every recorded series has data under
those labels; 48 errored actions spread over the four shards, 12 each and so below every
per-shard volume guard, raise the error-ratio alert, once, for the deployment; two 429s among
thousands of requests raise nothing. (rate() cannot see the first value of a new series, so
the route's 429 series is started by one earlier 429, as in an exporter that has run for a
while.) Expected values come from the simulator's ground truth
and from prometheus/params.yml, never from the exporters.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from promstack import (
    PROMETHEUS_BIN,
    Prometheus,
    ScrapeTarget,
    eventually,
    immediate_alerts,
    require_binaries,
    running_prometheus,
)
from test_monitoring_live import (
    ALERTS,
    JOB,
    RECORDING,
    SPEED,
    Interference,
    alert_states,
    error_answers,
    running_exporter,
    scalar,
    serve_simulator,
    until_all_have_data,
    values,
)
from test_rules import level_labels

from exporter.simulator import Simulator
from exporter.statuses import StatusClass, classify
from exporter.targets import Shard

ROOT = Path(__file__).resolve().parent.parent
PARAMS = yaml.safe_load((ROOT / "prometheus" / "params.yml").read_text())

SHARDS = 4
# A fleet of 32 in which every shard owns a device that checks in at least every 30
# simulated minutes (every 3 real seconds at 600x), so each shard's part of the burst is
# answered and polled within seconds. Device ids carry the simulator's start (real time), so
# the split differs from run to run: the first seed from SEED on whose fleet it holds.
SEED = 3
DEVICES = 32
CHATTY_INTERVAL = 30 * 60.0
# No history and no organic batches: the burst is all that finishes, as on the quiet night the
# per-instance guards missed it.
POLL_SECONDS = 0.5  # four shards at two rounds a second: thousands of requests in seconds
BURST_PER_SHARD = 12
REQUESTS_BEFORE_429 = 1000
REQUESTS_AT_LEAST = 2000
THROTTLED = 2
DATA_TIMEOUT = 40.0

NAMESPACE = "mdm"
CONTAINER = "exporter"
OPERATOR_LABELS = frozenset({"namespace", "service", "pod", "container", "endpoint"})
DEPLOYMENT = frozenset(PARAMS["group_labels"])  # namespace, job
# What a ServiceMonitor endpoint (port "metrics") turns into, for targets found through
# Kubernetes service discovery; static targets carry the same meta labels here.
OPERATOR_RELABELING = (
    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
    {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
    {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
    {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
    {"target_label": "endpoint", "replacement": "metrics"},
)
SCRAPE_JOB = f"serviceMonitor/{NAMESPACE}/{JOB}/0"

ERROR_RATIO_HIGH = "AppliveryCommandErrorRatioHigh"
THROTTLED_ALERT = "AppliveryApiThrottled"


def operator_target(address: str, index: int) -> ScrapeTarget:
    return ScrapeTarget(
        address,
        job=SCRAPE_JOB,
        labels={
            "__meta_kubernetes_namespace": NAMESPACE,
            "__meta_kubernetes_service_name": JOB,
            "__meta_kubernetes_pod_name": f"{JOB}-{index}",
            "__meta_kubernetes_pod_container_name": CONTAINER,
        },
    )


def burst_devices(sim: Simulator) -> list[str] | None:
    """For each shard, the online device it owns that checks in most often; None when a
    shard owns no device that checks in often."""
    chosen = []
    for index in range(SHARDS):
        shard = Shard(index, SHARDS)
        owned = [
            d
            for d in sim.fleet.devices
            if shard.owns(d.id) and d.online and d.mean_interval <= CHATTY_INTERVAL
        ]
        if not owned:
            return None
        chosen.append(min(owned, key=lambda d: d.mean_interval).id)
    return chosen


def fleet_for_the_burst() -> tuple[Simulator, list[str]]:
    """A quiet simulated fleet whose every shard owns a chatty device, and those devices."""
    for seed in range(SEED, SEED + 100):
        sim = Simulator(
            seed=seed,
            devices=DEVICES,
            speed=SPEED,
            start=None,
            batches_per_device=0,
            new_batches_per_device_hour=0.0,
        )
        devices = burst_devices(sim)
        if devices is not None:
            return sim, devices
    raise AssertionError(f"no seed gives each of {SHARDS} shards a device that checks in often")


def failing_commands(count: int) -> list[dict[str, Any]]:
    config = {"action": "Replace", "format": "int", "value": "1"}
    return [{"config": {"path": f"./Vendor/MSFT/Policy/Test/n{i}", **config}} for i in range(count)]


async def _resolved(sim: Simulator, created: list[tuple[str, str]]) -> bool:
    return not any(
        n and classify(status) is StatusClass.PENDING
        for device, batch in created
        for status, n in sim.fleet.grouped_counts(device, batch).items()
    )


async def _at_least(prometheus: Prometheus, expr: str, minimum: float) -> bool:
    value = await scalar(prometheus, expr)
    return not math.isnan(value) and value >= minimum


async def _rules_evaluated(prometheus: Prometheus) -> list[dict[str, Any]]:
    """Every rule of every group, once each has been evaluated at least once."""
    rules = [rule for group in await prometheus.rules() for rule in group["rules"]]
    if any(rule.get("lastEvaluation", "").startswith("0001") for rule in rules):
        return []
    return rules


async def _firing(prometheus: Prometheus, name: str) -> list[dict[str, Any]]:
    return [
        alert
        for alert in await prometheus.alerts()
        if alert["labels"]["alertname"] == name and alert["state"] == "firing"
    ]


@pytest.mark.integration
async def test_four_shards_behind_operator_labels(aiohttp_server: Any, tmp_path: Path) -> None:
    require_binaries(PROMETHEUS_BIN)
    began = time.monotonic()
    sim, chatty = fleet_for_the_burst()
    interference = Interference()
    base_url = await serve_simulator(aiohttp_server, sim, interference)
    immediate = immediate_alerts(ALERTS, tmp_path)
    high = PARAMS["alerts"][ERROR_RATIO_HIGH]

    async with contextlib.AsyncExitStack() as stack:
        addresses = [
            await stack.enter_async_context(
                running_exporter(
                    sim, base_url, shard=Shard(index, SHARDS), poll_seconds=POLL_SECONDS
                )
            )
            for index in range(SHARDS)
        ]
        prometheus = await stack.enter_async_context(
            running_prometheus(
                [operator_target(address, i) for i, address in enumerate(addresses)],
                rule_files=[RECORDING, ALERTS, immediate],
                relabel_configs=OPERATOR_RELABELING,
            )
        )
        await eventually(
            lambda: _at_least(prometheus, f'count(up{{job="{JOB}"}} == 1)', SHARDS),
            what="four shards scraped",
        )

        # The burst: one batch of 12 actions on a device of each shard, all failing.
        commands = failing_commands(BURST_PER_SHARD)
        created = [
            (device, sim.fleet.create_batch(device, commands, error_ratio=1.0))
            for device in chatty
        ]
        assert len({device for device, _ in created}) == SHARDS

        # One 429 on a device's route starts the series; two more once the shards have sent
        # a thousand requests.
        interference.throttle_path = f"/devices/{created[0][0]}/"
        interference.throttle_next = 1
        throttled = f'sum(applivery_exporter_api_requests_total{{code="429", job="{JOB}"}})'
        await eventually(
            lambda: _at_least(prometheus, throttled, 1), what="the first 429 scraped"
        )
        requests = f'sum(applivery_exporter_api_requests_total{{job="{JOB}"}})'
        await eventually(
            lambda: _at_least(prometheus, requests, REQUESTS_BEFORE_429),
            timeout=DATA_TIMEOUT,
            what=f"{REQUESTS_BEFORE_429} requests",
        )
        interference.throttle_next = THROTTLED

        # --- the burst raises the error-ratio alert, once, for the deployment ---------------
        (alert,) = await eventually(
            lambda: _firing(prometheus, ERROR_RATIO_HIGH),
            timeout=DATA_TIMEOUT,
            what=f"{ERROR_RATIO_HIGH} firing (its condition, without `for`)",
        )
        assert set(alert["labels"]) == {"alertname", "severity", "organization"} | DEPLOYMENT
        assert alert["labels"]["namespace"] == NAMESPACE
        assert alert["labels"]["job"] == JOB
        assert alert["labels"]["organization"] == sim.organization
        assert await alert_states(prometheus, ALERTS, ERROR_RATIO_HIGH) == {"pending"}

        # The burst is what fired it: by the simulator's count, 48 actions failed ...
        await eventually(lambda: _resolved(sim, created), what="burst answered")
        assert error_answers(sim, created) == SHARDS * BURST_PER_SHARD
        errors = 'applivery_windows_command_action_transitions_total{status_class="error"}'
        await eventually(
            lambda: _at_least(prometheus, f"sum({errors})", SHARDS * BURST_PER_SHARD),
            what="the burst's errors in Prometheus",
        )
        # ... and no shard alone finished enough actions to pass the volume guard, which is
        # why guards per instance stayed silent.
        finished = 'applivery_windows_command_action_transitions_total{status_class!="pending"}'
        per_shard = values(await prometheus.query(f"sum by (instance) ({finished})"))
        assert per_shard == [BURST_PER_SHARD] * SHARDS, per_shard
        assert BURST_PER_SHARD < high["min_finished"] <= SHARDS * BURST_PER_SHARD

        # --- two 429s among thousands of requests raise nothing ------------------------------
        await eventually(
            lambda: _at_least(prometheus, throttled, 1 + THROTTLED),
            timeout=DATA_TIMEOUT,
            what="the two 429s scraped",
        )
        assert interference.throttled == 1 + THROTTLED
        await eventually(
            lambda: _at_least(prometheus, requests, REQUESTS_AT_LEAST),
            timeout=DATA_TIMEOUT,
            what=f"{REQUESTS_AT_LEAST} requests",
        )
        throttled_ratio = "job:applivery_exporter_api_requests_throttled:ratio_rate5m"
        ratio = await scalar(prometheus, throttled_ratio)
        assert 0 < ratio < 0.01, ratio
        await asyncio.sleep(3)  # a few more evaluations with the 429s in every window
        assert await alert_states(prometheus, immediate, THROTTLED_ALERT) == {"inactive"}
        history = await prometheus.query(f'ALERTS{{alertname="{THROTTLED_ALERT}"}}[10m]')
        assert history == [], "the throttling alert was pending or firing at some point"

        # --- every rule under the operator's labels -----------------------------------------
        rules = await eventually(
            lambda: _rules_evaluated(prometheus), what="every rule evaluated once"
        )
        unhealthy = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        assert unhealthy == []
        recorded = sorted({r["name"] for r in rules if r["type"] == "recording"})
        await until_all_have_data(prometheus, recorded, DATA_TIMEOUT)
        for record in recorded:
            for series in await prometheus.query(record):
                labels = set(series["metric"]) - {"__name__", "organization"}
                if record.startswith("instance"):
                    # Per instance: every target label kept, so the pod is named.
                    assert labels >= OPERATOR_LABELS | {"job", "instance"}, (record, labels)
                else:
                    # Per deployment: summed over the shards.
                    assert labels == DEPLOYMENT | level_labels(record), (record, labels)
        budget = await prometheus.query("instance:applivery_exporter_api_budget_used:ratio_rate1h")
        assert {s["metric"]["pod"] for s in budget} == {f"{JOB}-{i}" for i in range(SHARDS)}
        renamed = await prometheus.query('{__name__=~"applivery_.+", exported_endpoint!=""}')
        assert renamed == []

    assert time.monotonic() - began < 100
