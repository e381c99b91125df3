"""What the exposition tests share: a small fleet in a FleetState, its scenario, a parser of
bodies, and the fixtures (test modules load them with ``pytest_plugins``, after importing
the helpers: hence PYTEST_DONT_REWRITE, which keeps pytest from warning about it)."""

from __future__ import annotations

import random
import zlib
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from exporter.exposition import BLOCK_DEVICES, Exposition
from exporter.records import Action, Batch
from exporter.selfmetrics import SelfMetrics
from exporter.state import FleetState

START = 1_760_000_000.0
DEV_A = "65f0c0ffee65f0c0ffee0001"
DEV_B = "SERIAL-0042"
BATCH_1 = "65f0c0ffee65f0c0ffee1001"
BATCH_2 = "65f0c0ffee65f0c0ffee1002"
BUCKETS = (1.0, 5.0, 60.0)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def samples(body: bytes, *, openmetrics: bool) -> Samples:
    parse = parse_openmetrics if openmetrics else parse_text
    out: Samples = {}
    for family in parse(body.decode()):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = sample.value
    return out


def key(metric: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return metric, frozenset(labels.items())


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
def metrics() -> SelfMetrics:
    return SelfMetrics()


@pytest.fixture
def state(clock: Clock, metrics: SelfMetrics) -> FleetState:
    fleet = FleetState(organization="acme", latency_buckets=BUCKETS, metrics=metrics, clock=clock)
    fleet.watch(DEV_A, name="reception-pc", labels={"site": "madrid"}, info={"serial": "S-1"})
    fleet.watch(DEV_B)
    clock.now = START + 60
    return fleet


def scenario(state: FleetState, clock: Clock, metrics: SelfMetrics) -> None:
    """Device A: batch 1 answered between polls (3 actions), batch 2 still waiting; B down."""
    state.apply_actions(
        DEV_A,
        Batch(id=BATCH_1, name="Store policy", created_at=START + 10),
        [
            Action("1", "Acknowledged", sent_at=START + 20, received_at=START + 23),
            Action("2", "Acknowledged", sent_at=START + 20, received_at=START + 30),
            Action("3", "NotSupported", sent_at=START + 20, received_at=START + 80),
        ],
    )
    state.apply_actions(
        DEV_A,
        Batch(id=BATCH_2, created_at=START - 500),
        [Action("1", "Awaiting", sent_at=START - 400), Action("2", "Pending")],
    )
    state.poll_succeeded(DEV_A)
    state.poll_failed(DEV_B, "timeout")
    metrics.observe_request("actions", "200", 0.2)
    metrics.observe_request("commands", "timeout", 10.0)
    metrics.budget_requests_per_hour = 9000
    metrics.touch()


def make(state: FleetState, metrics: SelfMetrics, **kw: Any) -> Exposition:
    kw.setdefault("registry", CollectorRegistry())  # deterministic: no process metrics
    return Exposition(state, metrics, version="1.2.3", **kw)


STATUSES = ["Pending", "Awaiting", "Acknowledged", "NotSupported", "Cancel", "Mystery"]


def random_step(rng: random.Random, state: FleetState, clock: Clock, metrics: SelfMetrics) -> None:
    clock.now += rng.uniform(0, 30)
    device = rng.choice([DEV_A, DEV_B, "65f0c0ffee65f0c0ffee0003"])
    roll = rng.random()
    if roll < 0.5:
        if device not in state.watched():
            state.watch(device, name=rng.choice([None, "kiosk", 'q"uote']))
        batch_id = rng.choice([BATCH_1, BATCH_2])
        listed = [
            Action(
                str(i),
                rng.choice(STATUSES),
                sent_at=clock.now - rng.uniform(0, 100),
                received_at=clock.now if rng.random() < 0.5 else None,
            )
            for i in range(rng.randint(0, 5))
        ]
        name = rng.choice([None, "Policy"])
        state.apply_actions(device, Batch(id=batch_id, name=name, created_at=START), listed)
    elif roll < 0.6:
        state.poll_succeeded(device)
    elif roll < 0.7:
        state.poll_failed(device, "timeout")
    elif roll < 0.75:
        state.expire(60)
    elif roll < 0.8:
        state.drop_batch(device, BATCH_2)
    elif roll < 0.85:
        state.unwatch(device)
    elif roll < 0.9:
        state.watch(device, name="renamed", labels={"site": rng.choice(["a", "b"])})
    else:
        metrics.observe_request("actions", rng.choice(["200", "503"]), rng.uniform(0, 2))


FLEET_SIZE = BLOCK_DEVICES * 2 + 17  # three blocks per per-device family


def fleet_of(state: FleetState, count: int = FLEET_SIZE) -> list[str]:
    """``count`` more watched devices, each with a named batch of four actions, polled."""
    devices = [f"65f0c0ffee65f0c0ff{i:06d}" for i in range(count)]
    for i, device in enumerate(devices):
        state.watch(device, name=f"pc-{i:04d}", labels={"site": f"site-{i % 5}"})
        state.apply_actions(
            device,
            Batch(id=BATCH_1, name="Baseline", created_at=START + 10),
            [
                Action(str(a), STATUSES[(i + a) % 4], sent_at=START + 20, received_at=START + 40)
                for a in range(4)
            ],
        )
        state.poll_succeeded(device)
    return devices


def single_member(packed: bytes) -> bytes:
    """The body of a gzip stream that must be exactly one member (curl stops reading after
    the first one)."""
    decompressor = zlib.decompressobj(wbits=31)
    plain = decompressor.decompress(packed) + decompressor.flush()
    assert decompressor.eof and decompressor.unused_data == b""
    return plain


def changed_samples(before: Samples, after: Samples) -> set[str]:
    """Names of the samples whose value moved, appeared or went."""
    return {k[0] for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
