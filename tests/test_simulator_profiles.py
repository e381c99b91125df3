"""Who the simulated devices are: profiles, habits and the quirky few
(exporter/simulator/profiles.py)."""

from __future__ import annotations

import random
import re

import pytest

from exporter.simulator.model import (
    ACTIVE,
    DAY,
    DELETE_REQUESTED,
    MINUTE,
    PROVISIONING,
    Device,
    ObjectIds,
)
from exporter.simulator.profiles import (
    GOING_SILENT,
    QUIRKS,
    QUIRKS_FROM,
    SILENT,
    choose_quirks,
    new_device,
    user_sid,
)

START = 1_770_717_600.0


def _devices(
    count: int, quirks: dict[int, str] | None = None, checkin_seconds: float | None = None
) -> list[Device]:
    rng = random.Random("profiles")
    ids = ObjectIds(rng)
    taken: set[str] = set()
    devices = []
    for index in range(count):
        device = new_device(
            rng, ids, index, START, (quirks or {}).get(index),
            taken=taken, checkin_seconds=checkin_seconds,
        )
        taken.update(key for key in (device.serial, device.imei) if key is not None)
        devices.append(device)
    return devices


def _luhn(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = int(char)
        if position % 2 == 1:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def test_a_fleet_of_quirks_from_devices_has_every_quirk_a_smaller_one_as_shares_round() -> None:
    rng = random.Random(1)
    chosen = choose_quirks(rng, QUIRKS_FROM)
    assert sorted(chosen.values()) == sorted(kind for kind, _ in QUIRKS)
    assert choose_quirks(rng, QUIRKS_FROM - 1) == {}
    large = choose_quirks(rng, 1000)
    assert {kind: list(large.values()).count(kind) for kind, _ in QUIRKS} == {
        kind: round(share * 1000) for kind, share in QUIRKS
    }


def test_serial_numbers_and_imeis_are_unique_and_imeis_pass_the_luhn_check() -> None:
    devices = _devices(400)
    serials = [device.serial for device in devices]
    imeis = [device.imei for device in devices if device.imei is not None]
    assert len(set(serials)) == len(serials) and len(set(imeis)) == len(imeis)
    assert imeis and all(len(imei) == 15 and _luhn(imei) for imei in imeis)


def test_a_profile_is_what_the_device_reports() -> None:
    for device in _devices(50):
        site_code, role_code, number = device.name.split("-")
        assert len(site_code) == 3 and role_code in ("LT", "DT", "KSK", "POS")
        assert len(number) == 4 and number.isdigit()
        assert device.tags[1] in ("laptop", "desktop", "kiosk", "pos")
        assert set(device.tags[2:]) <= {"pilot"}
        assert (device.user is not None) == (role_code in ("LT", "DT"))
        assert re.fullmatch(r"[0-9a-f]{24}", device.id)
        assert START - 500 * DAY <= device.enrolled <= START - 20 * DAY
    assert [int(d.name.rsplit("-", 1)[1]) for d in _devices(3)] == [1, 2, 3]


def test_ordinary_devices_are_active_and_online_at_their_own_pace() -> None:
    devices = _devices(30)
    assert all(d.state == ACTIVE and d.online for d in devices)
    assert len({d.mean_interval for d in devices}) == len(devices)
    assert {d.mean_interval for d in _devices(30, checkin_seconds=900.0)} == {900.0}


@pytest.mark.parametrize(
    ("quirk", "state", "silent_from"),
    [
        (SILENT, ACTIVE, (START - 20 * DAY, START - 1.5 * DAY)),
        (DELETE_REQUESTED, DELETE_REQUESTED, (START - 10 * DAY, START - DAY)),
        (GOING_SILENT, ACTIVE, (START + 10 * MINUTE, START + 60 * MINUTE)),
    ],
)
def test_quirky_devices_fall_silent(
    quirk: str, state: str, silent_from: tuple[float, float]
) -> None:
    (device,) = _devices(1, {0: quirk})
    low, high = silent_from
    assert device.state == state and device.offline_since is not None
    assert low <= device.offline_since <= high
    assert device.offline_since >= device.enrolled + DAY


def test_a_provisioning_device_enrolled_minutes_ago_and_syncs_often() -> None:
    (device,) = _devices(1, {0: PROVISIONING}, checkin_seconds=86400.0)
    assert device.state == PROVISIONING and device.online
    assert START - 40 * MINUTE <= device.enrolled <= START - 10 * MINUTE
    assert 3 * MINUTE <= device.mean_interval <= 10 * MINUTE


def test_a_users_sid_is_fixed_by_the_user_id() -> None:
    sid = user_sid("0123456789abcdef01234567")
    assert re.fullmatch(r"S-1-12-1(-\d+){4}", sid)
    assert sid == user_sid("0123456789abcdef01234567") != user_sid("0123456789abcdef01234568")
