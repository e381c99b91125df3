"""The fleet-wide device counts of the view, whatever the order of watches, unwatches,
device lists (lagging replicas among them) and restarts from the store.

Each count is compared, after every step, with a plain model that keeps one record per
watched device: devices per upstream state, per compliance verdict and per OS version always
add up to the devices watched, and each equals the number of watched devices showing it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import msgspec
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from exporter.devicehealth import COMPLIANCE_VALUES, NO_HEALTH, UNKNOWN, DeviceHealth
from exporter.fleetview import DEVICE_STATES, NOT_LISTED, FleetView
from exporter.snapshot import DeviceRow, device_row, restored_device
from exporter.statuses import StatusTable

DEVICES = st.sampled_from([f"d{n}" for n in range(6)])
MOMENTS = st.none() | st.integers(1, 40).map(float)
HEALTH = st.builds(
    DeviceHealth,
    st.sampled_from(COMPLIANCE_VALUES),
    MOMENTS,
    st.none() | st.sampled_from(["10.0.26100.7623", "10.0.22631.6491", "10.0.19045.6809"]),
)
# Documented states, and ones upstream may send that the contract does not name.
STATES = st.none() | st.sampled_from([*DEVICE_STATES[:3], "RETIRED", "WIPING"])


@dataclass(frozen=True)
class Shown:
    """What the model keeps of a watched device."""

    state: str = NOT_LISTED
    check_in: float | None = None
    health: DeviceHealth = NO_HEALTH

    def listed(self, state: str | None, check_in: float | None, health: DeviceHealth) -> Shown:
        """The contract (design.md, "Check-ins", "Fleet health"): the newest check-in seen is
        kept, and a compliance check older than the one known does not undo it."""
        newest = self.check_in if check_in is None else max(check_in, self.check_in or check_in)
        known = self.health.last_check
        older = known is not None and health.last_check is not None and health.last_check < known
        return replace(
            self,
            state=NOT_LISTED if state is None else state,
            check_in=newest,
            health=self.health if older else health,
        )


class FleetCounts(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.view = FleetView(StatusTable(), lambda: 0.0)
        self.model: dict[str, Shown] = {}

    @rule(device=DEVICES)
    def watch(self, device: str) -> None:
        self.view.watch(device, 0.0, name=None, labels={}, info={})
        self.model.setdefault(device, Shown())

    @rule(device=DEVICES)
    def unwatch(self, device: str) -> None:
        self.view.unwatch(device)
        self.model.pop(device, None)

    @rule(device=DEVICES, state=STATES, check_in=MOMENTS, health=HEALTH)
    def listed(
        self, device: str, state: str | None, check_in: float | None, health: DeviceHealth
    ) -> None:
        # A device the list does not show has no health to show either.
        shown = NO_HEALTH if state is None else health
        self.view.listed(device, state=state, check_in=check_in, health=shown)
        if device in self.model:
            self.model[device] = self.model[device].listed(state, check_in, shown)

    @rule(configured=st.sets(DEVICES))
    def restart(self, configured: set[str]) -> None:
        """A new process: the config's devices are watched first, then every stored row
        is read into the view, over the device the config watched when it is one."""
        restored = FleetView(StatusTable(), lambda: 0.0)
        for device in sorted(configured):
            restored.watch(device, 0.0, name=None, labels={}, info={})
        for device, dev in self.view.devices.items():
            row = msgspec.msgpack.decode(device_row(dev, []), type=DeviceRow)
            restored.add(device, restored_device(row, lambda status: 0))
        self.view = restored
        for device in configured:
            self.model.setdefault(device, Shown())

    @invariant()
    def states_are_the_watched_devices_states(self) -> None:
        expected = Counter(dict.fromkeys(DEVICE_STATES, 0))
        expected.update(shown.state for shown in self.model.values())
        assert self.view.device_states() == dict(expected)

    @invariant()
    def compliance_counts_every_watched_device_once(self) -> None:
        expected = Counter(dict.fromkeys(COMPLIANCE_VALUES, 0))
        expected.update(shown.health.compliance for shown in self.model.values())
        assert self.view.compliance() == dict(expected)

    @invariant()
    def os_versions_count_every_watched_device_once(self) -> None:
        expected = Counter(shown.health.os_version or UNKNOWN for shown in self.model.values())
        assert self.view.os_versions() == dict(expected)

    @invariant()
    def each_device_shows_what_the_model_kept(self) -> None:
        assert set(self.view.devices) == set(self.model)
        for device, shown in self.model.items():
            dev = self.view.devices[device]
            assert (dev.state, dev.check_in, dev.health) == (
                shown.state, shown.check_in, shown.health
            )


FleetCounts.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_fleet_counts_follow_the_watched_devices = FleetCounts.TestCase
