"""The simulated fleet's entities and identifiers (exporter/simulator/model.py)."""

from __future__ import annotations

import random
import re

from exporter.simulator import catalog
from exporter.simulator.model import (
    ACTIVE,
    PENDING,
    Action,
    Batch,
    Device,
    ObjectIds,
    Profile,
    millis,
)

PROFILE = Profile(
    enrolled=1_700_000_000.0,
    name="MAD-LT-0001",
    tags=("madrid", "laptop"),
    segment=1,
    serial="5CG1234567",
    model="HP EliteBook 840 G10",
    imei=None,
    win_id="0F6A1B2C-3D4E-5F60-7182-93A4B5C6D7E8",
    os=("10.0.26100.2314", "Windows 11 24H2"),
    user=("0123456789abcdef01234567", "ana.garcia@example.com", "Ana Garcia"),
)


def _device(offline_since: float | None = None) -> Device:
    return Device(
        "65c6f2a0" + "0" * 16, PROFILE, state=ACTIVE, mean_interval=900.0,
        offline_since=offline_since, error_share=0.05,
    )


def test_a_device_reads_its_profile_fields_as_its_own() -> None:
    device = _device()
    for field in ("enrolled", "name", "tags", "segment", "serial", "model", "imei", "win_id",
                  "os", "user"):
        assert getattr(device, field) == getattr(PROFILE, field)


def test_a_device_is_online_until_its_silence_begins() -> None:
    assert _device().online and _device().online_at(2e9)
    quiet = _device(offline_since=1_770_000_000.0)
    assert not quiet.online
    assert quiet.online_at(1_769_999_999.999) and not quiet.online_at(1_770_000_000.0)


def test_an_action_starts_pending_with_an_id_fixed_by_its_batch_and_position() -> None:
    batch = Batch("65c6f2a0" + "1" * 16, _device(), "policy", 1_770_000_000.0)
    first, second = (Action(batch, i, catalog.COMMANDS[i]) for i in range(2))
    assert first.status == PENDING and not first.final
    assert re.fullmatch(r"cmd-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}", first.cmd_id)
    assert first.cmd_id == Action(batch, 0, catalog.COMMANDS[5]).cmd_id != second.cmd_id
    assert first.key == f"{batch.id}/0"


def test_touching_a_batch_moves_updated_only_forward_and_drops_its_cached_json() -> None:
    batch = Batch("65c6f2a0" + "2" * 16, _device(), "policy", 100.0)
    batch.json = b"{}"
    batch.touch(150.0)
    batch.touch(120.0)
    assert (batch.updated, batch.json) == (150.0, None)


def test_object_ids_carry_their_creation_second_and_never_repeat() -> None:
    ids = ObjectIds(random.Random(1))
    made = [ids.make(1_770_717_600.9) for _ in range(1000)]
    assert len(set(made)) == len(made)
    assert all(re.fullmatch(r"[0-9a-f]{24}", oid) for oid in made)
    assert {int(oid[:8], 16) for oid in made} == {1_770_717_600}


def test_millis_truncates_to_whole_milliseconds() -> None:
    assert millis(1.23456) == 1.234
    assert millis(1.9999) == 1.999
    assert millis(2.0) == 2.0
