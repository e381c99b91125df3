"""Fleet views over HTTP: rollouts, setting results and check-ins, from a scripted upstream.

Each test tells a story in upstream documents (tests/scripted.py), polls the exporter and
scrapes it; expectations come from the story, never from the exporter.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from samples import Samples
from scripted import DEVICE, START, Rig, Upstream, actions, batch_id, device_id, iso

from exporter import logs
from exporter.exposition import GUARD_LEVELS
from exporter.state import MAX_SETTINGS

ROLLOUT = "Security baseline"
MSI = "./Device/Vendor/MSFT/EnterpriseDesktopAppManagement/MSI/{%s}/DownloadInstall"
APP_SETTING = "EnterpriseDesktopAppManagement/MSI/*/DownloadInstall"


def series(found: Samples, name: str, **labels: str) -> dict[tuple[str, ...], float]:
    """Samples of ``name`` matching ``labels``, keyed by their other label values."""
    out = {}
    for (metric, pairs), value in found.items():
        got = dict(pairs)
        if metric == name and all(got.get(k) == v for k, v in labels.items()):
            rest = tuple(v for k, v in sorted(got.items()) if k not in labels)
            out[rest] = value
    return out


async def rollout(rig: Rig, name: str = ROLLOUT) -> tuple[dict[str, float], dict[str, float]]:
    """(devices per state, actions per class) of one rollout, as scraped."""
    found = await rig.scrape()
    devices = {dict(k)["state"]: v for (n, k), v in found.items()
               if n == "applivery_windows_rollout_devices" and dict(k)["rollout"] == name}
    classes = {dict(k)["status_class"]: v for (n, k), v in found.items()
               if n == "applivery_windows_rollout_actions" and dict(k)["rollout"] == name}
    return devices, classes


def nonzero(counts: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in counts.items() if v}


def configured(*ids: str) -> list[dict[str, Any]]:
    return [{"id": i} for i in ids]


def with_config(docs: list[dict[str, Any]], path: str, operation: str) -> list[dict[str, Any]]:
    return [{**doc, "config": {"path": path, "action": operation, "value": "1"}} for doc in docs]


def guid(n: int) -> str:
    return f"{n:08X}-1A2B-4C3D-8E9F-{n:012X}"


# --- rollouts ---------------------------------------------------------------------------------


async def test_the_latest_batch_per_device_and_name_wins(make_rig) -> None:
    upstream = Upstream()
    a, b = device_id(1), device_id(2)
    # Device a: the rollout failed, was pushed again and succeeded.
    upstream.add(a, batch_id(1), actions(3, "CommandNotFound"), created=START + 10)
    upstream.add(a, batch_id(2), actions(3, "Acknowledged"), created=START + 20)
    # Device b: pushed once, still pending.
    upstream.add(b, batch_id(3), actions(3, "Pending"), created=START + 15)
    for batch in (batch_id(1), batch_id(2), batch_id(3)):
        upstream.names[batch] = ROLLOUT
    rig = await make_rig(upstream, devices=configured(a, b))
    await rig.poll()
    devices, classes = await rollout(rig)
    assert devices == {"failed": 0, "pending": 1, "unknown": 0, "canceled": 0, "succeeded": 1}
    assert nonzero(classes) == {"success": 3, "pending": 3}  # the older batch counts nothing


async def test_a_device_with_an_error_and_a_pending_action_counts_as_failed(make_rig) -> None:
    upstream = Upstream()
    docs = actions(1, "CommandNotFound") + actions(2, "Pending", prefix="p")
    upstream.add(DEVICE, batch_id(1), docs)
    upstream.names[batch_id(1)] = ROLLOUT
    rig = await make_rig(upstream)
    await rig.poll()
    devices, classes = await rollout(rig)
    assert nonzero(devices) == {"failed": 1}
    assert nonzero(classes) == {"error": 1, "pending": 2}


async def test_rollout_states_follow_their_precedence(make_rig) -> None:
    # failed > pending > unknown > canceled > succeeded, one device per case.
    cases = [
        (["CommandNotFound", "Pending", "BrandNew", "Cancel"], "failed"),
        (["Pending", "BrandNew", "Cancel", "Acknowledged"], "pending"),
        (["BrandNew", "Cancel", "Acknowledged"], "unknown"),
        (["Cancel", "Acknowledged"], "canceled"),
        (["Acknowledged"], "succeeded"),
    ]
    upstream = Upstream()
    for n, (statuses, _) in enumerate(cases):
        docs = [doc for i, s in enumerate(statuses) for doc in actions(1, s, prefix=f"{n}-{i}")]
        upstream.add(device_id(n), batch_id(n), docs)
        upstream.names[batch_id(n)] = ROLLOUT
    rig = await make_rig(upstream, devices=configured(*(device_id(n) for n in range(5))))
    await rig.poll()
    devices, _ = await rollout(rig)
    assert devices == {state: 1 for _, state in cases}


async def test_rollout_series_survive_every_guard_level(make_rig) -> None:
    # Two batches per device and two statuses per class, so every level removes something.
    upstream = Upstream()
    failing = ["CommandNotFound", "MethodNotAllowed"]
    working = ["Acknowledged", "DeleteWithoutArchive"]
    for n in range(6):
        statuses = failing if n < 2 else working
        for k, name in enumerate((ROLLOUT, f"inventory {n}")):
            docs = [doc for i, s in enumerate(statuses) for doc in actions(2, s, prefix=f"{i}")]
            upstream.add(device_id(n), batch_id(10 * n + k), docs)
            upstream.names[batch_id(10 * n + k)] = name
    rig = await make_rig(upstream, devices=configured(*(device_id(n) for n in range(6))))
    await rig.poll()
    full = await rollout(rig)
    assert nonzero(full[0]) == {"failed": 2, "succeeded": 4}
    assert nonzero(full[1]) == {"error": 8, "success": 16}
    levels = set()
    exposition = rig.exporter.exposition
    for ceiling in range(400, 0, -2):
        exposition.max_series = ceiling
        exposition.refresh()
        levels.add(exposition.guard_level)
        assert await rollout(rig) == full, f"max_series {ceiling}"
    assert levels == set(range(len(GUARD_LEVELS)))


# --- settings ---------------------------------------------------------------------------------


async def settings(rig: Rig) -> dict[tuple[str, ...], float]:
    """(setting, operation, status_class) -> count, as scraped (non-zero only)."""
    found = await rig.scrape()
    return {
        (dict(k)["setting"], dict(k)["operation"], dict(k)["status_class"]): v
        for (n, k), v in found.items()
        if n == "applivery_windows_setting_results_total" and v
    }


async def test_forty_installs_under_forty_guids_are_one_setting(make_rig) -> None:
    upstream = Upstream()
    pending = [with_config(actions(1, "Pending", prefix=f"i{n}"), MSI % guid(n), "Exec")[0]
               for n in range(40)]
    upstream.add(DEVICE, batch_id(1), pending)
    rig = await make_rig(upstream)
    await rig.poll()
    assert await settings(rig) == {}  # nothing final yet, but the series are there at 0
    found = await rig.scrape()
    assert {dict(k)["status_class"] for (n, k), v in found.items()
            if n == "applivery_windows_setting_results_total" and v == 0
            and dict(k)["setting"] == APP_SETTING} == {"success", "error", "canceled", "unknown"}
    outcomes = ["CommandNotFound" if n < 4 else "Acknowledged" for n in range(40)]
    upstream.actions[batch_id(1)] = [
        with_config(actions(1, status, prefix=f"i{n}"), MSI % guid(n), "Exec")[0]
        for n, status in enumerate(outcomes)
    ]
    await rig.poll(3)  # read again and again: each action still counts once
    assert await settings(rig) == {
        (APP_SETTING, "Exec", "error"): 4,
        (APP_SETTING, "Exec", "success"): 36,
    }


async def test_answers_from_before_the_watermark_are_not_counted_per_setting(make_rig) -> None:
    upstream = Upstream()
    path = "./Device/Vendor/MSFT/Policy/Config/Security/RequireDeviceEncryption"
    history = with_config(actions(5, "Acknowledged", prefix="old", at=START - 3600), path,
                          "Replace")
    waiting = with_config(actions(3, "Awaiting", prefix="new", at=START - 60), path, "Replace")
    upstream.add(DEVICE, batch_id(1), history + waiting, created=START - 7200)
    rig = await make_rig(upstream)
    await rig.poll()
    assert await settings(rig) == {}
    # The three waiting actions are answered after the watermark: only they count.
    answered = [{**doc, "status": "Acknowledged", "receivedAt": iso(START + 90)}
                for doc in waiting]
    upstream.actions[batch_id(1)] = history + answered
    await rig.poll(2)
    assert await settings(rig) == {
        ("Policy/Config/Security/RequireDeviceEncryption", "Replace", "success"): 3
    }


async def test_two_thousand_distinct_paths_stay_within_the_bound_and_are_counted_in_full(
    make_rig,
) -> None:
    upstream = Upstream()
    docs = [
        with_config(actions(1, "Acknowledged", prefix=f"s{n}"),
                    f"./Vendor/MSFT/Policy/Config/Area{n}/Setting", "Replace")[0]
        for n in range(2000)
    ]
    upstream.add(DEVICE, batch_id(1), docs)
    rig = await make_rig(upstream)
    await rig.poll(2)
    found = await settings(rig)
    names = {setting for setting, _, _ in found}
    assert len(names) == MAX_SETTINGS + 1 and "other" in names
    assert sum(found.values()) == 2000
    assert found[("other", "Replace", "success")] == 2000 - MAX_SETTINGS


# --- check-ins --------------------------------------------------------------------------------


def device_document(ident: str, state: str, check_in: float | None, **summary: str):
    doc: dict[str, Any] = {"id": ident, "state": state, "summary": summary}
    if check_in is not None:
        doc["lastStatusReportTime"] = iso(check_in)
    return doc


async def check_ins(rig: Rig) -> tuple[dict[str, float], dict[str, float]]:
    """(check-in time per device, devices per state), as scraped."""
    found = await rig.scrape()
    times = {dict(k)["device"]: v for (n, k), v in found.items()
             if n == "applivery_windows_device_last_check_in_timestamp_seconds"}
    states = {dict(k)["state"]: v for (n, k), v in found.items()
              if n == "applivery_windows_devices" and v}
    return times, states


async def test_configured_devices_get_their_check_in_time_and_state(make_rig) -> None:
    upstream = Upstream()
    by_id, by_serial, missing = device_id(1), "SERIAL0002", device_id(3)
    upstream.devices = [
        device_document(by_id, "ACTIVE", START - 600),
        device_document(device_id(2), "DELETE_REQUESTED", START - 3 * 86400,
                        serialNumber=by_serial),
        device_document(device_id(9), "ACTIVE", START - 60),  # not watched
    ]
    rig = await make_rig(upstream, devices=configured(by_id, by_serial, missing))
    await rig.poll()
    times, states = await check_ins(rig)
    assert times == {by_id: START - 600, by_serial: START - 3 * 86400}
    assert states == {"ACTIVE": 1, "DELETE_REQUESTED": 1, "not_listed": 1}
    # The list is read again once refresh_seconds (900 s by default) have passed.
    upstream.devices[0] = device_document(by_id, "ACTIVE", START + 700)
    reads = upstream.requests["devices"]
    await rig.poll(advance=600)
    assert upstream.requests["devices"] == reads
    await rig.poll(advance=600)
    assert upstream.requests["devices"] == reads + 1
    times, _ = await check_ins(rig)
    assert times[by_id] == START + 700


async def test_a_device_list_that_fails_is_said_in_the_configured_log_format(
    make_rig, capsys
) -> None:
    upstream = Upstream()
    upstream.devices = None  # type: ignore[assignment]  # the handler fails: HTTP 500
    rig = await make_rig(upstream, devices=configured(device_id(1)))
    logs.configure("info", "json")
    try:
        await rig.poll()
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    failed = [line for line in lines if line["event"] == "device_list_failed"]
    assert len(failed) == 1 and failed[0]["level"] == "warning"


async def test_configured_devices_outside_the_discovered_tags_are_looked_up_too(
    make_rig,
) -> None:
    upstream = Upstream()
    upstream.devices = [
        {**device_document(device_id(1), "ACTIVE", START - 60), "tags": ["kiosk"]},
        device_document(device_id(2), "PROVISIONING", START - 120),
    ]
    rig = await make_rig(
        upstream, devices=configured(device_id(2)),
        discovery={"devices": {"tags": ["kiosk"]}},
    )
    await rig.poll()
    times, states = await check_ins(rig)
    assert times == {device_id(1): START - 60, device_id(2): START - 120}
    assert states == {"ACTIVE": 1, "PROVISIONING": 1}
    # One filtered list (discovery), one whole list (the configured device): nothing more
    # until a refresh is due, whatever the rounds.
    assert upstream.requests["devices"] == 2
