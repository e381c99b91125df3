"""What administrators send: the commands of each new batch, and rollouts.

Batches come one device at a time, or as *rollouts*: an administrator pushes one policy to
a share of the fleet, which makes one batch per device under one name within a couple of
minutes. About half of the new batches, and some of the history, belong to rollouts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from exporter.simulator import catalog
from exporter.simulator.catalog import Config, Policy
from exporter.simulator.model import Device, millis
from exporter.simulator.profiles import user_sid

ROLLOUT_SHARE = 0.5  # of the new batches, those that belong to a rollout
ROLLOUT_REACH = (0.3, 0.7)  # share of the fleet one rollout targets
ROLLOUT_SPREAD = 120.0  # seconds from a rollout's first batch to its last
MEAN_REACH = sum(ROLLOUT_REACH) / 2
USER_POLICY_SHARE = 0.1  # single batches for the device's user, where it has one

Commands = tuple[list[Config], str]  # a batch's configs and its name


def random_commands(
    rng: random.Random, device: Device, sizes: tuple[int, int]
) -> Commands:
    """A single batch: any policy, now and then one for the device's user."""
    user = device.profile.user
    if user is not None and rng.random() < USER_POLICY_SHARE:
        user_id, email, _ = user
        policies = catalog.user_policies(user_sid(user_id), email)
    else:
        policies = catalog.POLICIES
    return compose(rng, rng.choice(policies), sizes)


def compose(rng: random.Random, policy: Policy, sizes: tuple[int, int]) -> Commands:
    """The policy's commands, cut or filled up with settings to a drawn batch size."""
    low, high = sizes
    count = rng.randint(low, high)
    core = policy.configs
    if count <= len(core):
        return [core[i] for i in sorted(rng.sample(range(len(core)), count))], policy.name
    pool = catalog.FILL.get(policy.name, catalog.COMMANDS)
    extra = count - len(core)
    if extra <= len(pool):
        fill = rng.sample(pool, extra)
    else:
        fill = [rng.choice(pool) for _ in range(extra)]
    return [*core, *fill], policy.name


def roll_out(
    rng: random.Random, devices: Sequence[Device], when: float, sizes: tuple[int, int]
) -> tuple[Commands, list[tuple[float, Device]]]:
    """One policy pushed at ``when`` to a share of the enrolled devices: its commands, and
    when each target's batch is created (none if nobody is enrolled yet)."""
    planned = compose(rng, rng.choice(catalog.ROLLOUTS), sizes)
    enrolled = [device for device in devices if device.profile.enrolled < when]
    if not enrolled:
        return planned, []
    reach = max(1, round(rng.uniform(*ROLLOUT_REACH) * len(enrolled)))
    targets = rng.sample(enrolled, reach)
    # As the console or a script works through the devices.
    return planned, [(millis(when + rng.uniform(0.0, ROLLOUT_SPREAD)), d) for d in targets]


def default_name(configs: Sequence[Config]) -> str:
    """A batch's name where its creator gave none."""
    path, action, _, _ = configs[0]
    leaf = path.rstrip("/").rsplit("/", 1)[-1]
    more = f" (+{len(configs) - 1} more)" if len(configs) > 1 else ""
    return f"{action} {leaf}{more}"
