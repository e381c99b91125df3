"""What administrators send: batch commands and rollouts (exporter/simulator/workload.py)."""

from __future__ import annotations

import random

from exporter.simulator import catalog
from exporter.simulator.model import Device, ObjectIds
from exporter.simulator.profiles import new_device, user_sid
from exporter.simulator.workload import (
    ROLLOUT_REACH,
    ROLLOUT_SPREAD,
    compose,
    default_name,
    random_commands,
    roll_out,
)

START = 1_770_717_600.0


def _devices(count: int) -> list[Device]:
    rng = random.Random("workload")
    ids = ObjectIds(rng)
    return [
        new_device(rng, ids, i, START, None, taken=(), checkin_seconds=None) for i in range(count)
    ]


def test_a_batch_has_a_drawn_size_the_policys_own_commands_first() -> None:
    rng = random.Random(3)
    for policy in catalog.POLICIES:
        for sizes in ((1, 1), (2, 5), (20, 30)):
            configs, name = compose(rng, policy, sizes)
            assert name == policy.name and sizes[0] <= len(configs) <= sizes[1]
            if len(configs) >= len(policy.configs):
                assert configs[: len(policy.configs)] == list(policy.configs)
            else:
                assert set(configs) <= set(policy.configs)


def test_single_batches_come_from_the_policies_and_now_and_then_for_the_devices_user() -> None:
    rng = random.Random(5)
    device = next(d for d in _devices(20) if d.user is not None)
    user_id, email, _ = device.user
    names = {random_commands(rng, device, (3, 12))[1] for _ in range(400)}
    known = {policy.name for policy in catalog.POLICIES}
    personal = names - known
    theirs = {policy.name for policy in catalog.user_policies(user_sid(user_id), email)}
    assert names & known and personal and personal <= theirs


def test_a_rollout_reaches_its_share_of_the_enrolled_devices_within_the_spread() -> None:
    devices = _devices(200)
    when = START
    (configs, name), creations = roll_out(random.Random(9), devices, when, (3, 12))
    targets = [device for _, device in creations]
    low, high = ROLLOUT_REACH
    assert name in {policy.name for policy in catalog.ROLLOUTS} and configs
    assert len(set(targets)) == len(targets) and low <= len(targets) / len(devices) <= high
    assert all(when <= moment <= when + ROLLOUT_SPREAD for moment, _ in creations)


def test_a_rollout_before_any_device_enrolled_creates_nothing() -> None:
    devices = _devices(20)
    before = min(device.enrolled for device in devices)
    _, creations = roll_out(random.Random(9), devices, before, (3, 12))
    assert creations == []


def test_a_batch_without_a_name_is_named_after_its_first_setting() -> None:
    path = "./Device/Vendor/MSFT/Policy/Config/Camera/AllowCamera"
    one = (path, "Replace", "0", "int")
    assert default_name([one]) == "Replace AllowCamera"
    assert default_name([one, one, one]) == "Replace AllowCamera (+2 more)"
