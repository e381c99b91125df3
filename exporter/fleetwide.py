"""The fleet-wide families: one section each, bounded whatever the fleet's size.

The transition counter (one series per status ever seen), the latency histogram (per status
class), the setting results (at most 501 settings), the rollout gauges (at most
``MAX_ROLLOUTS`` rollouts), the devices per state, and, at the guard's last level, the action
gauges summed over the fleet. Each is rendered by a small function of its own, again only
when what it is made from moved.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from exporter.devicestore import DeviceStore
from exporter.families import (
    ACTIONS,
    DEVICES,
    DEVICES_COMPLIANCE,
    DEVICES_OS_VERSION,
    LATENCY,
    ROLLOUT_ACTIONS,
    ROLLOUT_DEVICES,
    SETTING_RESULTS,
    TRANSITIONS,
    Family,
    escape_label_value,
    histogram_lines,
    join_labels,
    sample_lines,
)
from exporter.rollouts import STATES, Rollout
from exporter.state import CLASSES, FleetState


def _org(organization: str) -> str:
    return join_labels((("organization", organization),))


def transition_lines(organization: str, state: FleetState) -> bytes:
    org = _org(organization)
    return "".join(
        f'{TRANSITIONS.name}_total{{{org},status="{escape_label_value(status)}",'
        f'status_class="{status_class}"}} {count}\n'
        for status, status_class, count in state.transitions()
    ).encode(errors="replace")


def latency_lines(organization: str, state: FleetState) -> bytes:
    org = _org(organization)
    lines: list[str] = []
    for status_class, histogram in sorted(state.latency().items()):
        lines += histogram_lines(LATENCY.name, f'{org},status_class="{status_class}"', histogram)
    return "".join(lines).encode(errors="replace")


def setting_lines(organization: str, state: FleetState) -> bytes:
    org = _org(organization)
    return "".join(
        f'{SETTING_RESULTS.name}_total{{{org},setting="{escape_label_value(setting)}",'
        f'operation="{escape_label_value(operation)}",status_class="{status_class}"}} {count}\n'
        for setting, operation, status_class, count in state.setting_results()
    ).encode(errors="replace")


def _rollout_lines(
    organization: str, rollouts: Sequence[Rollout], family: Family, label: str,
    values: Sequence[str], counts: Callable[[Rollout], Sequence[int]],
) -> bytes:
    """Every ``label`` value of each rollout, zeros too: a share of failed devices needs
    its denominator."""
    org = _org(organization)
    return "".join(
        f'{family.name}{{{org},rollout="{escape_label_value(rollout.name)}",'
        f'{label}="{value}"}} {count}\n'
        for rollout in rollouts
        for value, count in zip(values, counts(rollout), strict=True)
    ).encode(errors="replace")


def rollout_device_lines(organization: str, rollouts: Sequence[Rollout]) -> bytes:
    return _rollout_lines(organization, rollouts, ROLLOUT_DEVICES, "state", STATES,
                          lambda rollout: rollout.devices)


def rollout_action_lines(organization: str, rollouts: Sequence[Rollout]) -> bytes:
    return _rollout_lines(organization, rollouts, ROLLOUT_ACTIONS, "status_class", CLASSES,
                          lambda rollout: rollout.actions)


def count_lines(family: Family, label: str, organization: str, counts: Mapping[str, int]) -> bytes:
    """One line per ``label`` value of a count of watched devices, sorted by value."""
    org = _org(organization)
    return "".join(
        f'{family.name}{{{org},{label}="{escape_label_value(value)}"}} {count}\n'
        for value, count in sorted(counts.items())
    ).encode(errors="replace")


def device_state_lines(organization: str, states: Mapping[str, int]) -> bytes:
    return count_lines(DEVICES, "state", organization, states)


def device_health_lines(
    organization: str, health: tuple[Mapping[str, int], Mapping[str, int]]
) -> tuple[bytes, bytes]:
    """Watched devices per compliance and per OS version."""
    compliance, versions = health
    return (
        count_lines(DEVICES_COMPLIANCE, "compliance", organization, compliance),
        count_lines(DEVICES_OS_VERSION, "os_version", organization, versions),
    )


def fleet_class_lines(organization: str, totals: Mapping[str, int]) -> bytes:
    """The action gauges summed over device too: one series per status_class."""
    org = _org(organization)
    return "".join(
        f'{ACTIONS.name}{{{org},status_class="{status_class}"}} {totals[status_class]}\n'
        for status_class in CLASSES
        if totals.get(status_class)
    ).encode(errors="replace")


class FleetWide:
    """The fleet-wide sections, each kept with the generation it was rendered at.

    A section rendered again to equal bytes keeps its old object: sections are compared by
    identity downstream (an unchanged one is neither compressed nor checksummed again)."""

    def __init__(self) -> None:
        self._sections: dict[Family, tuple[object, bytes]] = {}
        self.fleet_classes = b""  # what the guard's last level keeps of the action gauges

    def section(self, family: Family) -> bytes:
        return self._sections.get(family, (None, b""))[1]

    def refresh(self, state: FleetState, store: DeviceStore) -> None:
        organization = state.organization
        counters = state.counters_generation
        self._keep(TRANSITIONS, counters, lambda: transition_lines(organization, state))
        self._keep(LATENCY, counters, lambda: latency_lines(organization, state))
        self._keep(SETTING_RESULTS, counters, lambda: setting_lines(organization, state))
        rollouts = store.rollouts
        if self._moved(ROLLOUT_DEVICES, rollouts.generation):
            top = rollouts.top()
            self._keep(ROLLOUT_DEVICES, rollouts.generation,
                       lambda: rollout_device_lines(organization, top))
            self._keep(ROLLOUT_ACTIONS, rollouts.generation,
                       lambda: rollout_action_lines(organization, top))
        self._keep(DEVICES, state.generation,
                   lambda: device_state_lines(organization, state.device_states()))
        if self._moved(DEVICES_COMPLIANCE, state.generation):
            compliance, versions = device_health_lines(organization, state.device_health())
            self._keep(DEVICES_COMPLIANCE, state.generation, lambda: compliance)
            self._keep(DEVICES_OS_VERSION, state.generation, lambda: versions)
        classes = fleet_class_lines(organization, store.series.classes) if store.coarse else b""
        if classes != self.fleet_classes:
            self.fleet_classes = classes

    def sample_lines(self) -> int:
        """Series of every section but the guard's: what no guard level touches."""
        return sum(sample_lines(section) for _, section in self._sections.values())

    def _moved(self, family: Family, generation: object) -> bool:
        return family not in self._sections or self._sections[family][0] != generation

    def _keep(self, family: Family, generation: object, render: Callable[[], bytes]) -> None:
        if not self._moved(family, generation):
            return
        section = render()
        old = self.section(family)
        self._sections[family] = (generation, old if old == section else section)
