"""The watch list: configured entries and discovery's members merged, each device watched
once under one key, this shard's part only; what a merge changed."""

from __future__ import annotations

from typing import Any

import yaml

from exporter.config import DeviceConfig, parse_config
from exporter.records import Device
from exporter.targets import Shard, Target, Watchlist


def hexid(n: int) -> str:
    return f"65f0c0ffee65f0c0ffee{0x2000 + n:04x}"


def configured(*entries: str | dict[str, Any]) -> tuple[DeviceConfig, ...]:
    document = {
        "organization": "acme",
        "api": {"base_url": "http://127.0.0.1:1/v1"},
        "devices": list(entries),
    }
    return parse_config(yaml.safe_dump(document)).devices


def listed(n: int, **fields: Any) -> Device:
    return Device(hexid(n), name=f"pc-{n}", **fields)


def test_a_configured_entry_named_by_serial_is_watched_once_under_that_serial() -> None:
    watchlist = Watchlist()
    watchlist.reconfigure(configured({"id": "SERIAL7", "name": "till"}), discovering=True)
    watchlist.discover([listed(1), listed(7, serial="serial7", imei="3550")])
    assert set(watchlist.targets) == {hexid(1), "SERIAL7"}
    assert watchlist.targets["SERIAL7"].name == "till"  # the explicit entry wins
    assert watchlist.discovered_count == 2


def test_a_listed_device_goes_by_its_id_serial_or_imei_in_any_case() -> None:
    watchlist = Watchlist()
    watchlist.reconfigure(configured("SERIAL7", "35500001"), discovering=True)
    watchlist.discover([listed(1)])
    assert watchlist.key_of(Device(hexid(1).upper())) == hexid(1)
    assert watchlist.key_of(Device("other", serial="serial7")) == "SERIAL7"
    assert watchlist.key_of(Device("other", imei="35500001")) == "35500001"
    assert watchlist.key_of(Device("other", serial="unknown")) is None


def test_a_merge_says_who_left_and_who_is_new_or_changed() -> None:
    watchlist = Watchlist()
    first = watchlist.discover([listed(1), listed(2)])
    assert first.discovered_moved and not first.unwatched
    assert [(t.device, before) for t, before in first.changed] == [(hexid(1), None),
                                                                   (hexid(2), None)]
    renamed = Device(hexid(2), name="renamed")
    second = watchlist.discover([listed(1), renamed, listed(3)])
    assert second.discovered_moved
    assert second.changed == (
        (Target.discovered(renamed), Target.discovered(listed(2))),
        (Target.discovered(listed(3)), None),
    )
    third = watchlist.discover([listed(1), listed(3)])
    assert third.unwatched == (hexid(2),)
    assert not watchlist.discover([listed(1), listed(3)]).discovered_moved


def test_configured_devices_discovery_did_not_show_are_the_ones_to_look_up() -> None:
    watchlist = Watchlist()
    watchlist.reconfigure(configured(hexid(1), "SERIAL9"), discovering=True)
    assert watchlist.configured_only() == {hexid(1), "SERIAL9"}
    watchlist.discover([listed(1), listed(2)])
    assert watchlist.configured_only() == {"SERIAL9"}


def test_without_discovery_its_members_are_forgotten() -> None:
    watchlist = Watchlist()
    watchlist.reconfigure(configured(hexid(1)), discovering=True)
    watchlist.discover([listed(1), listed(2)])
    changes = watchlist.reconfigure(configured(hexid(1)), discovering=False)
    assert changes.unwatched == (hexid(2),)
    assert set(watchlist.targets) == {hexid(1)}
    assert watchlist.configured_only() == {hexid(1)}


def test_shards_split_by_the_discovered_id_whatever_names_the_device() -> None:
    devices = [listed(n, serial=f"S{n}") for n in range(40)]
    entries = configured(*(f"S{n}" for n in range(0, 40, 3)))
    keys: list[str] = []
    for index in range(3):
        shard = Shard(index, 3)
        watchlist = Watchlist(shard)
        watchlist.reconfigure(entries, discovering=True)
        watchlist.discover(devices)
        for key in watchlist.targets:
            device = next(d for d in devices if key in (d.id, d.serial))
            assert shard.owns(device.id)
        keys += watchlist.targets
    assert len(keys) == len(set(keys)) == 40
