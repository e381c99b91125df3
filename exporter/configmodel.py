"""The config file's keys, declared once each as fields of frozen pydantic dataclasses.

A field gives a key's type (which carries its check and message: ``configvalues.py`` for the
shared kinds, the functions below for this file's own), its default and, as its docstring,
what it means; ``config.py`` reads files against :data:`CONFIG_FILE` and publishes the JSON
Schema the same declarations give. The classes are what the rest of the exporter receives:
plain frozen dataclasses, hashable, compared field by field (a reload diffs devices so).
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BeforeValidator,
    Field,
    PlainSerializer,
    TypeAdapter,
    ValidationInfo,
)
from pydantic_core import ArgsKwargs, PydanticCustomError

from exporter.configvalues import (
    TEXT_SCHEMA,
    Fraction,
    PositiveDuration,
    PositiveNumber,
    Section,
    Text,
    checked,
    choice,
    integer,
    matching,
    model,
    positive_duration,
    text,
    unique_items,
)
from exporter.problems import IfMissing, Loc, Problems, also, invalid, shown
from exporter.problems import spelling as _spelling
from exporter.records import COMMAND_ID, DEVICE_ID, ORGANIZATION_ID

TOKEN_ENV = "APPLIVERY_API_TOKEN"
STRATEGIES = ("budget", "round_robin")
DEFAULT_LATENCY_BUCKETS: tuple[float, ...] = (
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
    7200.0, 14400.0, 28800.0, 86400.0, 259200.0,
)  # fmt: skip
# design.md's reserved names, plus the identifiers device_info carries for discovered devices.
# The Prometheus Operator adds these to every series it scrapes: a config label of the same
# name would be renamed exported_* and break every rule that joins on it.
OPERATOR_TARGET_LABELS = ("endpoint", "namespace", "pod", "service", "container")
RESERVED_LABELS = frozenset((
    "organization", "device", "command", "status", "status_class", "name", "api_endpoint",
    "code", "kind", "job", "instance", "le", "quantile", "serial", "imei", "win_id",
    "rollout", "setting", "operation", "state", *OPERATOR_TARGET_LABELS,
))  # fmt: skip
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
MAX_PAGE_SIZE = 10_000  # the largest `limit` upstream declares anywhere

T = TypeVar("T")


# --- values of this file ------------------------------------------------------------------


def _base_url(value: object) -> str:
    url = text(value, "an http(s) URL")
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        raise invalid(f"not a valid URL, got {shown(url)}") from None
    if parts.scheme.lower() not in ("http", "https") or any(c.isspace() for c in url):
        raise invalid(f"must be an http:// or https:// URL, got {shown(url)}")
    if parts.username is not None or parts.password is not None:
        # Not echoed: it carries a secret.
        raise invalid(
            f"must not carry credentials; the token comes from api.token_file or {TOKEN_ENV}"
        )
    if not parts.hostname or not port_ok:
        raise invalid(f"must name a host (and a valid port), got {shown(url)}")
    if parts.query or parts.fragment:
        raise invalid(f"must not have a query or fragment, got {shown(url)}")
    return url.rstrip("/")


def _token_file(value: object, info: ValidationInfo) -> str:
    """A path; relative ones join the config file's directory (the validation context)."""
    if not isinstance(value, str) or not value.strip():
        # The value is not shown: a misplaced token must not reach a log.
        raise invalid("must be the path of a file holding the token")
    path = os.path.expanduser(value)
    base_dir = (info.context or {}).get("base_dir")
    if base_dir is not None and not os.path.isabs(path):
        path = os.path.normpath(os.path.join(base_dir, path))
    return path


def _label_name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not LABEL_NAME.fullmatch(name):
        return "not a valid label name (letters, digits and underscores, not starting with a digit)"
    if name.startswith("__"):
        return "reserved label name (names starting with __ belong to Prometheus)"
    if name in RESERVED_LABELS:
        return "reserved label name (the exporter sets it itself)"
    return None


def _label_value(value: object) -> str:
    return text(value, "a non-empty string label value")


def _labels(value: object) -> tuple[tuple[str, str], ...]:
    """A mapping of label names to values, as (name, value) pairs sorted by name."""
    if value is None:
        return ()
    if isinstance(value, tuple):  # pairs, from code
        return tuple(sorted(value))
    if not isinstance(value, dict):
        raise invalid(f"must be a mapping of label names to values, got {shown(value)}")
    problems = Problems()
    labels: list[tuple[str, str]] = []
    for key, raw in value.items():
        loc = (_spelling(key),)
        problem = _label_name_problem(key)
        if problem:
            problems.add(loc, problem, key)
            continue
        label = problems.read(loc, _label_value, raw)
        if label is not None:
            labels.append((key, label))
    problems.raise_any()
    return tuple(sorted(labels))


def _command_id(value: object) -> str:
    written = text(value, "a 24-hex command id")
    if not COMMAND_ID.fullmatch(written):
        raise invalid(f"not a 24-hex id, got {shown(written)}")
    return written


def _commands(value: object) -> tuple[str, ...]:
    if isinstance(value, tuple):  # from code
        return value
    if not isinstance(value, list):
        raise invalid(f"must be a list of 24-hex command ids, got {shown(value)}")
    if not value:
        raise invalid("empty list; omit the key to discover recent batches")
    return unique_items(value, _command_id)


def _tags(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, tuple):  # from code
        return value
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]  # one tag needs no list
    if not isinstance(value, list):
        raise invalid(f"must be a list of tags, got {shown(value)}")
    return unique_items(value, text)


def _buckets(value: object) -> tuple[float, ...]:
    """Strictly increasing bounds; reading stops at the first wrong one (the rest would follow)."""
    if isinstance(value, tuple):  # from code
        return value
    if not isinstance(value, list) or not value:
        raise invalid(f"must be a non-empty list of bucket bounds, got {shown(value)}")
    problems = Problems()
    bounds: list[float] = []
    for index, raw in enumerate(value):
        bound = problems.read((index,), positive_duration, raw)
        if bound is not None and bounds and bound <= bounds[-1]:
            message = (
                f"buckets must be strictly increasing: {shown(raw)} does not exceed "
                f"{bounds[-1]:g} before it"
            )
            problems.add((index,), message, raw)
        if bound is None or problems:
            break
        bounds.append(bound)
    problems.raise_any()
    return tuple(bounds)


Organization = Annotated[
    str,
    IfMissing("required (an organization id or slug)"),
    matching(ORGANIZATION_ID, "an organization id or slug",
             "not an organization id (24 hex digits) or slug (letters, digits and dashes, "
             "at least 3)"),
]  # fmt: skip
DeviceId = Annotated[
    str,
    IfMissing("required (a 24-hex id, a serial number or an IMEI)"),
    matching(DEVICE_ID, "a device id",
             "not a device id (a 24-hex id, a serial number or an IMEI: letters, digits and "
             "underscores)"),
]  # fmt: skip
# Names starting with __ belong to Prometheus.
_LABEL_NAMES = {
    "pattern": f"^(?!__){LABEL_NAME.pattern}$", "not": {"enum": sorted(RESERVED_LABELS)}
}
CommandId = Annotated[str, Field(pattern=COMMAND_ID.pattern)]
Labels = Annotated[
    tuple[tuple[str, str], ...],
    checked(_labels, Annotated[dict[str, TEXT_SCHEMA],
                               Field(json_schema_extra={"propertyNames": _LABEL_NAMES})]),
]  # fmt: skip
Commands = Annotated[
    tuple[str, ...], checked(_commands, Annotated[list[CommandId], Field(min_length=1)])
]
Tags = Annotated[tuple[str, ...], checked(_tags, list[TEXT_SCHEMA] | TEXT_SCHEMA | None)]
Buckets = Annotated[
    tuple[float, ...],
    checked(_buckets, Annotated[list[PositiveDuration], Field(min_length=1)]),
    # Newer pydantic serializes a default (for the JSON Schema) through a list: say how.
    PlainSerializer(list, return_type=list[float]),
]


# --- the configuration --------------------------------------------------------------------


@model
class ApiConfig:
    """How the exporter calls the Applivery API."""

    base_url: Annotated[str, checked(_base_url, Annotated[str, Field(pattern="^https?://")])] = (
        "https://api.applivery.io/v1"
    )
    """API root; point it at the simulator for demos and tests."""
    token_file: Annotated[str, checked(_token_file, str)] | None = None
    """File holding the API token, re-read when it changes; relative to the config file.
    When null, the token comes from the environment variable APPLIVERY_API_TOKEN."""
    timeout_seconds: PositiveDuration = 10.0
    """Per request: seconds, or a duration like 45s, 30m, 12h, 7d, 1w, 1h30m."""
    max_concurrency: Annotated[int, integer(1)] = 8
    """Requests in flight at once."""
    requests_per_hour: PositiveNumber = 9000.0
    """Budget for the whole organization; the exporter stays under it."""
    page_size: Annotated[int, integer(1, MAX_PAGE_SIZE)] = 100
    """`limit` of every paged call."""
    max_pages: Annotated[int, integer(1)] = 1000
    """Safety cap on pages per listing."""
    max_body_bytes: Annotated[int, integer(1)] = 32 * 2**20
    """Larger responses are rejected."""


@model
class PollConfig:
    """How often devices are read."""

    interval_seconds: PositiveDuration = 60.0
    """Target freshness of active batches."""
    stale_after_rounds: Annotated[int, integer(1)] = 3
    """A failing device keeps its last values this many rounds."""
    strategy: Annotated[str, choice(STRATEGIES)] = "budget"
    """budget (active batches first) or round_robin."""
    jitter: Fraction = 0.1
    """Random spread of each wait, as a fraction of the interval."""


@model
class DeviceConfig:
    """A watched device; a bare id is shorthand for {id: ...}."""

    id: DeviceId
    """The winDeviceId (24 hex digits), a serial number or an IMEI; the `device` label."""
    name: Text | None = None
    """On applivery_windows_device_info."""
    labels: Labels = Field((), json_schema_extra={"default": {}})
    """Extra labels on applivery_windows_device_info; numbers become strings as written."""
    commands: Commands | None = None
    """These batches (winCommandId) only; omit the key to follow recent batches instead."""


@model
class DeviceDiscovery:
    """Devices the API lists; {} watches every Windows device of the organization."""

    tags: Tags = ()
    """Watch every device the API lists with these tags (its `tags` filter)."""
    segment: Annotated[int, integer(0)] | None = None
    """Segment id; null = any segment."""
    refresh_seconds: PositiveDuration = 900.0
    """How often the device list is re-read."""

    @property
    def whole_list(self) -> bool:
        """No filter: discovery reads the organization's whole device list."""
        return not self.tags and self.segment is None


def _both_spellings(schema: dict[str, Any]) -> None:
    """The schema names the field's second spelling too (pydantic shows the first)."""
    schema["properties"]["max_age_seconds"] = schema["properties"]["max_age"]


@model(json_schema_extra=_both_spellings)
class BatchDiscovery:
    """Which batches to follow for devices without `commands`."""

    max_age_seconds: PositiveDuration = Field(
        7 * 86400.0, validation_alias=AliasChoices("max_age", "max_age_seconds")
    )
    """Batches created longer ago are not followed (max_age or max_age_seconds)."""
    max_per_device: Annotated[int, integer(1)] = 20
    """Newest first."""


@model
class DiscoveryConfig:
    """What to watch besides the configured devices and batches."""

    devices: DeviceDiscovery | None = None
    batches: Section[BatchDiscovery] = BatchDiscovery()


@model
class MetricsConfig:
    """What is exported, and how much of it."""

    latency_buckets: Buckets = DEFAULT_LATENCY_BUCKETS
    """Buckets of applivery_windows_command_ack_latency_seconds, strictly increasing."""
    max_series: Annotated[int, integer(1)] | None = None
    """Ceiling of the cardinality guard; null = no ceiling."""


def _device_entry(value: object) -> object:
    """A bare id is shorthand for ``{id: ...}``."""
    if isinstance(value, (dict, ArgsKwargs, DeviceConfig)):
        return value
    return {"id": _DEVICE_ID.func(value)}


def _device_list(value: object) -> object:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise invalid(f"must be a list of devices, got {shown(value)}")
    return value


def _duplicate_devices(value: object, problems: Problems) -> None:
    """Devices with a valid id join the check even when another of their keys is wrong."""
    if not isinstance(value, list):
        return
    first_seen: dict[str, tuple[int, Loc]] = {}
    for index, raw in enumerate(value):
        key: Loc = ("id",) if isinstance(raw, dict) else ()
        try:
            device_id = _DEVICE_ID.func(raw.get("id") if key else raw)
        except PydanticCustomError:  # reported by the entry's own validation
            continue
        first, first_key = first_seen.setdefault(device_id.lower(), (index, key))
        if first != index:
            problems.duplicate((index, *key), first, device_id, first_key)


_DEVICE_ID = DeviceId.__metadata__[-1]
DeviceEntry = Annotated[
    DeviceConfig, BeforeValidator(_device_entry, json_schema_input_type=DeviceId | DeviceConfig)
]


@model
class Config:
    """applivery-mdm-exporter's configuration (--config.file)."""

    organization: Organization
    """Organization id (24 hex digits) or slug."""
    api: Section[ApiConfig] = ApiConfig()
    poll: Section[PollConfig] = PollConfig()
    devices: Annotated[
        tuple[DeviceEntry, ...], BeforeValidator(_device_list), also(_duplicate_devices)
    ] = ()
    """Watched devices: entries, or bare ids."""
    discovery: Section[DiscoveryConfig] = DiscoveryConfig()
    metrics: Section[MetricsConfig] = MetricsConfig()


def _nothing_to_watch(document: object, problems: Problems) -> None:
    # Only when both are truly absent: an invalid value is reported as such.
    if not isinstance(document, dict):
        return
    discovery = document.get("discovery") or {}
    if not isinstance(discovery, dict) or discovery.get("devices") is not None:
        return
    if document.get("devices") in (None, []):
        problems.add(
            ("devices",),
            "nothing to watch: list devices, or set discovery.devices "
            "(discovery: {devices: {}} watches every device)",
        )


CONFIG_FILE: TypeAdapter[Config] = TypeAdapter(Annotated[Config, also(_nothing_to_watch)])

