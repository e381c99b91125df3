"""Who the simulated devices are: their profiles, their habits, and the quirky few.

A device's profile is what it reports (site and role in its name and tags, maker, model,
serial number, IMEI, OS, its user); its habits are how it behaves (how often it checks in,
how often its commands fail, when it goes silent). Everything is drawn from the fleet's
generator in a fixed order, so a seed builds the same fleet.

Devices out of the ordinary, a few of each in any fleet of ``QUIRKS_FROM`` devices or more:
silent for days before the start, going silent soon after it (their sessions stop, their
actions stay pending), ``DELETE_REQUESTED`` (silent as well) and ``PROVISIONING`` (enrolled
minutes ago, ``ACTIVE`` at its first session after ``sessions.PROVISIONING_SPAN``).
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable, Container
from typing import NamedTuple

from exporter.simulator.model import (
    ACTIVE,
    DAY,
    DELETE_REQUESTED,
    HOUR,
    MINUTE,
    PROVISIONING,
    Device,
    ObjectIds,
    Profile,
    millis,
)

# Devices out of the ordinary, as shares of the fleet; every fleet of QUIRKS_FROM devices or
# more has at least one of each, smaller ones (most tests) only what the shares round to.
SILENT, GOING_SILENT = "silent", "going-silent"
QUIRKS: tuple[tuple[str, float], ...] = (
    (SILENT, 0.03), (GOING_SILENT, 0.03), (DELETE_REQUESTED, 0.02), (PROVISIONING, 0.01),
)
QUIRKS_FROM = 10

_SITES = (
    ("madrid", "MAD", 1), ("barcelona", "BCN", 2), ("london", "LON", 3),
    ("new-york", "NYC", 4), ("berlin", "BER", 5),
)
_ROLES = (
    ("laptop", "LT", 0.55), ("desktop", "DT", 0.25), ("kiosk", "KSK", 0.12), ("pos", "POS", 0.08),
)
# Still drawn, so that every seed's stream stays as it was; health.py replaces the value
# with a build of its own spread.
_OS_VERSIONS = (
    ("10.0.22631.4460", "Windows 11 23H2"),
    ("10.0.26100.2314", "Windows 11 24H2"),
    ("10.0.26100.3194", "Windows 11 24H2"),
    ("10.0.19045.5131", "Windows 10 22H2"),
)
# Makers by share, told apart by their serial numbers' style, and their models: portable
# (laptops) and fixed (desktops, kiosks, tills).
_MAKERS = ("Dell", "HP", "Lenovo", "Microsoft")
_MAKER_WEIGHTS = (0.4, 0.3, 0.2, 0.1)
_MODELS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Dell": (("Latitude 5440", "Latitude 7440"), ("OptiPlex 7010",)),
    "HP": (("HP EliteBook 840 G10", "HP ProBook 450 G9"), ("HP ProDesk 400 G9",)),
    "Lenovo": (("ThinkPad T14 Gen 4", "ThinkPad X1 Carbon Gen 11"), ("ThinkCentre M70q Gen 4",)),
    "Microsoft": (("Surface Laptop 5", "Surface Pro 9"), ("Surface Pro 9",)),
}
_FIRST = ("Ana", "Luis", "Marta", "John", "Priya", "Jonas", "Chen", "Lucia", "Omar", "Sofia")
_LAST = ("Garcia", "Smith", "Muller", "Rossi", "Khan", "Lopez", "Novak", "Kim", "Silva", "Weber")
_ALNUM = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"


class Habits(NamedTuple):
    """How a device behaves, drawn once."""

    state: str
    mean_interval: float  # mean seconds between two sessions
    offline_since: float | None  # its sessions stop then (past or future)
    error_share: float


def choose_quirks(rng: random.Random, count: int) -> dict[int, str]:
    """Which devices (by index) are out of the ordinary, and how."""
    wanted = [(kind, _quirk_count(share, count)) for kind, share in QUIRKS]
    chosen = iter(rng.sample(range(count), min(count, sum(n for _, n in wanted))))
    return {index: kind for kind, n in wanted for index in itertools.islice(chosen, n)}


def new_device(
    rng: random.Random,
    ids: ObjectIds,
    index: int,
    start: float,
    quirk: str | None,
    *,
    taken: Container[str],
    checkin_seconds: float | None,
) -> Device:
    """Device number ``index`` of a fleet starting at ``start``; ``taken`` holds the serial
    numbers and IMEIs already drawn (they must be unique: devices are looked up by them)."""
    if quirk == PROVISIONING:  # enrolled minutes ago, still in its setup sessions
        enrolled = millis(start - rng.uniform(10.0, 40.0) * MINUTE)
    else:
        enrolled = millis(start - rng.uniform(20.0, 500.0) * DAY)
    device_id = ids.make(enrolled)
    profile = _profile(rng, index, enrolled, taken)
    habits = _habits(rng, start, enrolled, quirk, checkin_seconds)
    return Device(
        device_id,
        profile,
        state=habits.state,
        mean_interval=habits.mean_interval,
        offline_since=habits.offline_since,
        error_share=habits.error_share,
    )


def user_sid(user_id: str) -> str:
    """The user's Entra ID SID (S-1-12-1 and four numbers), fixed by the user's id."""
    digest = hashlib.blake2b(user_id.encode(), digest_size=16).digest()
    parts = (int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4))
    return "S-1-12-1-" + "-".join(map(str, parts))


def _profile(rng: random.Random, index: int, enrolled: float, taken: Container[str]) -> Profile:
    site, site_code, segment = rng.choice(_SITES)
    role, role_code = _pick_weighted(rng, _ROLES)
    name = f"{site_code}-{role_code}-{index + 1:04d}"
    tags = [site, role]
    if rng.random() < 0.1:
        tags.append("pilot")
    maker = rng.choices(_MAKERS, weights=_MAKER_WEIGHTS)[0]
    serial = _unique(lambda: _serial(rng, maker), taken)
    portable, fixed = _MODELS[maker]
    model = rng.choice(portable if role == "laptop" else fixed)
    imei = _unique(lambda: _imei(rng), taken) if rng.random() < 0.35 else None
    return Profile(
        enrolled=enrolled,
        name=name,
        tags=tuple(tags),
        segment=segment,
        serial=serial,
        model=model,
        imei=imei,
        win_id=_guid(rng),
        os=rng.choice(_OS_VERSIONS),
        user=_user(rng) if role in ("laptop", "desktop") else None,
    )


def _habits(
    rng: random.Random,
    start: float,
    enrolled: float,
    quirk: str | None,
    checkin_seconds: float | None,
) -> Habits:
    # Drawn even where a quirk sets the pace below: skipping the draw would change every
    # fleet a seed has built so far.
    mean_interval = checkin_seconds or _mean_interval(rng)
    state, offline_since = ACTIVE, None
    if quirk == PROVISIONING:
        state = PROVISIONING
        mean_interval = rng.uniform(3.0, 10.0) * MINUTE  # setup syncs often
    elif quirk == GOING_SILENT:  # chatty until then, so that the silence shows
        mean_interval = rng.uniform(5.0, 30.0) * MINUTE
        offline_since = millis(start + rng.uniform(10.0, 60.0) * MINUTE)
    elif quirk == SILENT:
        offline_since = _silent_since(start - rng.uniform(1.5, 20.0) * DAY, enrolled)
    elif quirk == DELETE_REQUESTED:  # an unenrolment the device never came to collect
        state = DELETE_REQUESTED
        offline_since = _silent_since(start - rng.uniform(1.0, 10.0) * DAY, enrolled)
    return Habits(state, mean_interval, offline_since, _error_share(rng))


def _silent_since(drawn: float, enrolled: float) -> float:
    # A device that has been silent since it enrolled would have nothing to show.
    return millis(max(drawn, enrolled + DAY))


def _unique(make: Callable[[], str], taken: Container[str]) -> str:
    while True:
        value = make()
        if value not in taken:
            return value


def _pick_weighted(
    rng: random.Random, table: tuple[tuple[str, str, float], ...]
) -> tuple[str, str]:
    draw = rng.random() * sum(weight for _, _, weight in table)
    for name, code, weight in table:
        draw -= weight
        if draw < 0:
            return name, code
    return table[-1][0], table[-1][1]


def _serial(rng: random.Random, maker: str) -> str:
    if maker == "Dell":  # service tag
        return "".join(rng.choice(_ALNUM) for _ in range(7))
    if maker == "HP":
        return "5CG" + "".join(rng.choice(_ALNUM) for _ in range(7))
    if maker == "Lenovo":
        return "PF" + "".join(rng.choice(_ALNUM) for _ in range(6))
    return "".join(rng.choice("0123456789") for _ in range(12))  # Surface


def _imei(rng: random.Random) -> str:
    body = "35" + "".join(rng.choice("0123456789") for _ in range(12))
    total = 0
    for position, char in enumerate(reversed(body)):
        digit = int(char)
        if position % 2 == 0:  # doubled digits, counted from the check digit's left
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return body + str((10 - total % 10) % 10)


def _guid(rng: random.Random) -> str:
    text = f"{rng.getrandbits(128):032X}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def _user(rng: random.Random) -> tuple[str, str, str]:
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    email = f"{first.lower()}.{last.lower()}@example.com"
    return f"{rng.getrandbits(96):024x}", email, f"{first} {last}"


def _quirk_count(share: float, count: int) -> int:
    wanted = round(share * count)
    return max(1, wanted) if count >= QUIRKS_FROM else wanted


def _mean_interval(rng: random.Random) -> float:
    """Mean seconds between a device's sessions."""
    draw = rng.random()
    if draw < 0.77:
        return rng.uniform(5, 60) * MINUTE
    if draw < 0.93:
        return rng.uniform(2, 12) * HOUR
    return rng.uniform(1, 3) * DAY


def _error_share(rng: random.Random) -> float:
    draw = rng.random()
    if draw < 0.8:
        return rng.uniform(0.02, 0.08)
    if draw < 0.95:
        return rng.uniform(0.1, 0.25)
    return rng.uniform(0.4, 0.7)  # a device with a broken policy stack
