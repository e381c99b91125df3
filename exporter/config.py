"""YAML configuration -> a frozen, validated :class:`Config`.

Validation reports every problem at once, one line each, prefixed by its key path
(``devices[2].commands[0]: not a 24-hex id, got 'x'``), so one edit-check cycle fixes a file.
A file that is not YAML at all stops at its first syntax error, with line and column.

Choices worth knowing:

- ``null`` for a section (``api:``) means "all defaults"; for an optional value (``name``,
  ``token_file``, ``commands``, ``segment``, ``max_series``, ``discovery.devices``) it means
  unset. For a number it is an error: an empty value is more likely a slip than a wish.
- Ids, names, tags and label values may be written unquoted even when YAML reads them as
  numbers (IMEIs, all-digit serials, ``zone: 010``): they are taken verbatim as written, leading
  zeros included. Booleans are not (``yes``, ``on`` and ``true`` read alike): quote them.
- YAML dates stay strings; duplicate keys in one mapping are errors (YAML would keep the last).
- Device ids compare case-insensitively when looking for duplicates (upstream ids are hex).
- ``commands: []`` is an error: omit the key to discover recent batches.
- Label names also may not shadow ``serial``, ``imei`` and ``win_id``, which the exporter puts
  on ``applivery_windows_device_info`` for discovered devices.
- ``discovery.batches`` takes ``max_age`` (as in the design) or ``max_age_seconds``.

Nothing here logs, and no message echoes a value that might be the API token.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

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
MAX_TOKEN_BYTES = 64 * 1024

T = TypeVar("T")


# --- the configuration --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiConfig:
    base_url: str = "https://api.applivery.io/v1"
    token_file: str | None = None
    timeout_seconds: float = 10.0
    max_concurrency: int = 8
    requests_per_hour: float = 9000.0
    page_size: int = 100
    max_pages: int = 1000
    max_body_bytes: int = 32 * 2**20


@dataclass(frozen=True, slots=True)
class PollConfig:
    interval_seconds: float = 60.0
    stale_after_rounds: int = 3
    strategy: str = "budget"  # or "round_robin"
    jitter: float = 0.1  # fraction of the interval


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    id: str
    name: str | None = None
    labels: tuple[tuple[str, str], ...] = ()  # sorted by name
    commands: tuple[str, ...] | None = None  # None: discover recent batches


@dataclass(frozen=True, slots=True)
class DeviceDiscovery:
    tags: tuple[str, ...] = ()
    segment: int | None = None
    refresh_seconds: float = 900.0

    @property
    def whole_list(self) -> bool:
        """No filter: discovery reads the organization's whole device list."""
        return not self.tags and self.segment is None


@dataclass(frozen=True, slots=True)
class BatchDiscovery:
    max_age_seconds: float = 7 * 86400.0
    max_per_device: int = 20


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    devices: DeviceDiscovery | None = None
    batches: BatchDiscovery = BatchDiscovery()


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    latency_buckets: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS
    max_series: int | None = None  # cardinality guard ceiling (None = no ceiling)


@dataclass(frozen=True, slots=True)
class Config:
    organization: str
    api: ApiConfig = ApiConfig()
    poll: PollConfig = PollConfig()
    devices: tuple[DeviceConfig, ...] = ()
    discovery: DiscoveryConfig = DiscoveryConfig()
    metrics: MetricsConfig = MetricsConfig()


@dataclass(frozen=True, slots=True)
class TokenSpec:
    """Where the API token comes from: a file (re-read by the client) or a fixed value."""

    path: str | None = None
    value: str | None = field(default=None, repr=False)


class ConfigError(Exception):
    """One or more configuration problems; ``str()`` gives one line per problem."""

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems: tuple[str, ...] = (
            (problems,) if isinstance(problems, str) else tuple(problems)
        )
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


# --- entry points -------------------------------------------------------------------------


def load_config(path: str) -> Config:
    """Read and validate a config file; ``token_file`` resolves against its directory."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_config(data, source=path, base_dir=os.path.dirname(os.path.abspath(path)))


def parse_config(
    text: str | bytes, *, source: str = "<config>", base_dir: str | None = None
) -> Config:
    """Validate YAML text. A relative ``token_file`` joins ``base_dir`` (else stays relative)."""
    document = load_document(text, source)
    if document is None:
        raise ConfigError(f"{source}: empty config; it needs at least organization and devices")
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: top level must be a mapping of keys, got {_shown(document)}")
    report = _Report()
    config = _config(document, report, base_dir)
    if report.problems:
        raise ConfigError(report.problems)
    return config


def resolve_token(api: ApiConfig, environ: Mapping[str, str]) -> TokenSpec:
    """The token source: ``api.token_file`` when set (checked now), else the environment."""
    if api.token_file is not None:
        _check_token_file(api.token_file)
        return TokenSpec(path=api.token_file)
    value = environ.get(TOKEN_ENV, "").strip()
    if not value:
        raise ConfigError(f"no API token: set api.token_file or {TOKEN_ENV}")
    return TokenSpec(value=value)


def parse_duration(value: object) -> float:
    """Seconds from a number, or a string like ``45s``, ``30m``, ``12h``, ``7d``, ``1h30m``.

    Units ``w d h m s ms`` go in that order, each at most once (as Prometheus writes them).
    Raises ``ValueError`` for anything else.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.strip() and _DURATION.fullmatch(value.strip()):
        seconds = _duration_seconds(value.strip())
    else:
        raise ValueError(f"not a duration: {_shown(value)}")
    if not math.isfinite(seconds):
        raise ValueError(f"not a finite duration: {_shown(value)}")
    return seconds


# --- text and YAML ------------------------------------------------------------------------


def _decode(text: str | bytes, source: str) -> str:
    if isinstance(text, bytes):
        if b"\x00" in text:
            raise ConfigError(f"{source}: not a text file (it contains NUL bytes)")
        try:
            return text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{source}: not a UTF-8 text file (invalid byte at offset {exc.start})"
            ) from None
    if "\x00" in text:
        raise ConfigError(f"{source}: not a text file (it contains NUL characters)")
    return text


class _Int(int):
    """An int that remembers how it was written (``010`` is an id, not octal 8)."""

    text: str


class _Float(float):
    text: str


class _Loader(yaml.SafeLoader):
    """Safe YAML that rejects duplicate keys, keeps dates as text and numbers' spelling."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], yaml.Mark] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                mark = first.setdefault((key_node.tag, key_node.value), key_node.start_mark)
                if mark is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key_node.value!r} (first at line {mark.line + 1})",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> _Int:
    number = _Int(yaml.constructor.SafeConstructor.construct_yaml_int(loader, node))
    number.text = node.value
    return number


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> _Float:
    number = _Float(yaml.constructor.SafeConstructor.construct_yaml_float(loader, node))
    number.text = node.value
    return number


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if not tag.endswith(":timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_document(text: str | bytes, source: str) -> Any:
    """YAML text (or bytes) to plain data; the web config file uses the same rules."""
    return _load_yaml(_decode(text, source), source)


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(_syntax_problem(exc, source)) from None
    except yaml.reader.ReaderError as exc:
        line, column = _line_column(text, exc.position)
        raise ConfigError(
            f"{source}:{line}:{column}: character #x{exc.character:04x} is not allowed in YAML"
        ) from None
    except yaml.YAMLError as exc:  # any other shape of parser error
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None


def _syntax_problem(exc: yaml.MarkedYAMLError, source: str) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
    message = exc.problem or exc.context or "not valid YAML"
    if exc.problem and exc.context:
        at = f" at line {exc.context_mark.line + 1}" if exc.context_mark else ""
        message += f" ({exc.context}{at})"
    return f"{where}: {message}"


def _line_column(text: str, position: int) -> tuple[int, int]:
    line_start = text.rfind("\n", 0, position) + 1
    return text.count("\n", 0, position) + 1, position - line_start + 1


# --- problems and paths -------------------------------------------------------------------


class _Invalid(Exception):
    """A value's problem; the caller knows its key path."""


class _Report:
    __slots__ = ("problems",)

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\-]+")


def _child(path: str, key: object) -> str:
    name = _spelling(key)
    if not _PLAIN_KEY.fullmatch(name):
        return f"{path}[{json.dumps(name)}]"
    return f"{path}.{name}" if path else name


def _spelling(value: object) -> str:
    """A scalar as the user wrote it."""
    if isinstance(value, str):
        return value
    if isinstance(value, (_Int, _Float)):
        return value.text
    return _shown(value)


def _shown(value: object) -> str:
    """A value for a message: scalars as written, containers by kind."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (_Int, _Float)):
        return value.text
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _section(
    value: object, path: str, keys: tuple[str, ...], report: _Report
) -> dict[str, Any] | None:
    """The known keys of a mapping (null = empty); unknown keys are reported."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        report.add(path, f"must be a mapping, got {_shown(value)}")
        return None
    known: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(key, str) and key in keys:
            known[key] = item
        else:
            report.add(_child(path, key), _unknown_key(_spelling(key), keys))
    return known


def _unknown_key(name: str, keys: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean {close[0]}?)"
    return f"unknown key (expected one of: {', '.join(keys)})"


def _get(
    section: Mapping[str, Any],
    key: str,
    path: str,
    read: Callable[[Any], T],
    default: T,
    report: _Report,
) -> T:
    if key not in section:
        return default
    try:
        return read(section[key])
    except _Invalid as exc:
        report.add(_child(path, key), str(exc))
        return default


# --- value readers (pure; raise _Invalid) -------------------------------------------------


def _optional(read: Callable[[Any], T]) -> Callable[[Any], T | None]:
    return lambda value: None if value is None else read(value)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_number(value: object) -> float:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:  # type: ignore[arg-type]
        raise _Invalid(f"must be a number > 0, got {_shown(value)}")
    return float(value)  # type: ignore[arg-type]


def _integer(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    wanted = (
        f"an integer from {minimum} to {maximum}" if maximum is not None
        else f"an integer > {minimum - 1}" if minimum > 0 else f"an integer >= {minimum}"
    )  # fmt: skip

    def read(value: object) -> int:
        if (
            not isinstance(value, int) or isinstance(value, bool) or value < minimum
            or (maximum is not None and value > maximum)
        ):  # fmt: skip
            raise _Invalid(f"must be {wanted}, got {_shown(value)}")
        return int(value)

    return read


_UNITS = {"w": 604800.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
# Units in descending order, each at most once, as Prometheus writes durations.
_DURATION = re.compile(
    "".join(rf"(?:(\d+(?:\.\d+)?){unit}(?![a-z]))?" for unit in _UNITS), re.ASCII
)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|[wdhms])", re.ASCII)


def _duration_seconds(text: str) -> float:
    return sum(float(n) * _UNITS[unit] for n, unit in _DURATION_PART.findall(text))


def _positive_duration(value: object) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError:
        seconds = math.nan
    if not seconds > 0:
        raise _Invalid(
            "must be a number > 0 (seconds) or a duration like 45s, 30m, 12h, 7d, 1w, 1h30m, "
            f"got {_shown(value)}"
        )
    return seconds


def _fraction(value: object) -> float:
    if not _is_number(value) or not 0 <= value < 1:  # type: ignore[operator]
        raise _Invalid(f"must be a number from 0 up to (not including) 1, got {_shown(value)}")
    return float(value)  # type: ignore[arg-type]


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def read(value: object) -> str:
        if value not in options:
            raise _Invalid(f"must be one of {', '.join(options)}; got {_shown(value)}")
        return str(value)

    return read


def _text(value: object, what: str = "a string") -> str:
    """A non-empty string; numbers count, spelled as written."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        hint = " (quote it)" if isinstance(value, bool) else ""
        raise _Invalid(f"must be {what}, got {_shown(value)}{hint}")
    text = _spelling(value)
    if not text.strip():
        raise _Invalid(f"must be {what}, got an empty string")
    return text


def _organization(value: object) -> str:
    text = _text(value, "an organization id or slug")
    if not ORGANIZATION_ID.fullmatch(text) or not text.isascii():
        raise _Invalid(
            "not an organization id (24 hex digits) or slug (letters, digits and dashes, "
            f"at least 3), got {_shown(text)}"
        )
    return text


def _device_id(value: object) -> str:
    text = _text(value, "a device id")
    if not DEVICE_ID.fullmatch(text) or not text.isascii():
        raise _Invalid(
            "not a device id (a 24-hex id, a serial number or an IMEI: letters, digits and "
            f"underscores), got {_shown(text)}"
        )
    return text


def _command_id(value: object) -> str:
    text = _text(value, "a 24-hex command id")
    if not COMMAND_ID.fullmatch(text):
        raise _Invalid(f"not a 24-hex id, got {_shown(text)}")
    return text


def _base_url(value: object) -> str:
    text = _text(value, "an http(s) URL")
    try:
        parts = urlsplit(text)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        raise _Invalid(f"not a valid URL, got {_shown(text)}") from None
    if parts.scheme.lower() not in ("http", "https") or any(c.isspace() for c in text):
        raise _Invalid(f"must be an http:// or https:// URL, got {_shown(text)}")
    if parts.username is not None or parts.password is not None:
        # Not echoed: it carries a secret.
        raise _Invalid(
            f"must not carry credentials; the token comes from api.token_file or {TOKEN_ENV}"
        )
    if not parts.hostname or not port_ok:
        raise _Invalid(f"must name a host (and a valid port), got {_shown(text)}")
    if parts.query or parts.fragment:
        raise _Invalid(f"must not have a query or fragment, got {_shown(text)}")
    return text.rstrip("/")


def _token_file(base_dir: str | None) -> Callable[[Any], str]:
    def read(value: object) -> str:
        if not isinstance(value, str) or not value.strip():
            # The value is not shown: a misplaced token must not reach a log.
            raise _Invalid("must be the path of a file holding the token")
        path = os.path.expanduser(value)
        if base_dir is not None and not os.path.isabs(path):
            path = os.path.normpath(os.path.join(base_dir, path))
        return path

    return read


# --- sections -----------------------------------------------------------------------------

_TOP_KEYS = ("organization", "api", "poll", "devices", "discovery", "metrics")
_API_KEYS = (
    "base_url", "token_file", "timeout_seconds", "max_concurrency", "requests_per_hour",
    "page_size", "max_pages", "max_body_bytes",
)  # fmt: skip
_POLL_KEYS = ("interval_seconds", "stale_after_rounds", "strategy", "jitter")
_DEVICE_KEYS = ("id", "name", "labels", "commands")
_DISCOVERY_KEYS = ("devices", "batches")
_DEVICE_DISCOVERY_KEYS = ("tags", "segment", "refresh_seconds")
_BATCH_DISCOVERY_KEYS = ("max_age", "max_age_seconds", "max_per_device")
_METRICS_KEYS = ("latency_buckets", "max_series")


def _config(document: dict[Any, Any], report: _Report, base_dir: str | None) -> Config:
    top = _section(document, "", _TOP_KEYS, report) or {}
    organization = ""
    if top.get("organization") is None:
        report.add("organization", "required (an organization id or slug)")
    else:
        organization = _get(top, "organization", "", _organization, "", report)
    api = _api(top.get("api"), report, base_dir)
    poll = _poll(top.get("poll"), report)
    devices = _devices(top.get("devices"), report)
    discovery = _discovery(top.get("discovery"), report)
    metrics = _metrics(top.get("metrics"), report)
    if _nothing_to_watch(top):
        report.add(
            "devices",
            "nothing to watch: list devices, or set discovery.devices "
            "(discovery: {devices: {}} watches every device)",
        )
    return Config(organization, api, poll, devices, discovery, metrics)


def _nothing_to_watch(top: Mapping[str, Any]) -> bool:
    # Only when both are truly absent: an invalid value was reported already.
    discovery = top.get("discovery") or {}
    if not isinstance(discovery, dict) or discovery.get("devices") is not None:
        return False
    return top.get("devices") in (None, [])


def _api(value: object, report: _Report, base_dir: str | None) -> ApiConfig:
    section = _section(value, "api", _API_KEYS, report) or {}
    d = ApiConfig()

    def get(key: str, read: Callable[[Any], T], default: T) -> T:
        return _get(section, key, "api", read, default, report)

    return ApiConfig(
        base_url=get("base_url", _base_url, d.base_url),
        token_file=get("token_file", _optional(_token_file(base_dir)), d.token_file),
        timeout_seconds=get("timeout_seconds", _positive_duration, d.timeout_seconds),
        max_concurrency=get("max_concurrency", _integer(1), d.max_concurrency),
        requests_per_hour=get("requests_per_hour", _positive_number, d.requests_per_hour),
        page_size=get("page_size", _integer(1, MAX_PAGE_SIZE), d.page_size),
        max_pages=get("max_pages", _integer(1), d.max_pages),
        max_body_bytes=get("max_body_bytes", _integer(1), d.max_body_bytes),
    )


def _poll(value: object, report: _Report) -> PollConfig:
    section = _section(value, "poll", _POLL_KEYS, report) or {}
    d = PollConfig()

    def get(key: str, read: Callable[[Any], T], default: T) -> T:
        return _get(section, key, "poll", read, default, report)

    return PollConfig(
        interval_seconds=get("interval_seconds", _positive_duration, d.interval_seconds),
        stale_after_rounds=get("stale_after_rounds", _integer(1), d.stale_after_rounds),
        strategy=get("strategy", _choice(STRATEGIES), d.strategy),
        jitter=get("jitter", _fraction, d.jitter),
    )


def _devices(value: object, report: _Report) -> tuple[DeviceConfig, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        report.add("devices", f"must be a list of devices, got {_shown(value)}")
        return ()
    devices: list[DeviceConfig] = []
    first_seen: dict[str, str] = {}
    for index, raw in enumerate(value):
        path = f"devices[{index}]"
        id_path = f"{path}.id" if isinstance(raw, dict) else path
        device = _device(raw, path, report)
        if device is None:
            continue
        first = first_seen.setdefault(device.id.lower(), id_path)
        if first != id_path:
            report.add(id_path, f"duplicate of {first} ({device.id!r})")
        else:
            devices.append(device)
    return tuple(devices)


def _device(raw: object, path: str, report: _Report) -> DeviceConfig | None:
    """One device entry: a mapping, or a bare id as shorthand for ``{id: ...}``."""
    if not isinstance(raw, dict):
        try:
            return DeviceConfig(_device_id(raw))
        except _Invalid as exc:
            report.add(path, str(exc))
            return None
    section = _section(raw, path, _DEVICE_KEYS, report) or {}
    if section.get("id") is None:
        report.add(f"{path}.id", "required (a 24-hex id, a serial number or an IMEI)")
    device_id = _get(section, "id", path, _device_id, "", report)
    name = _get(section, "name", path, _optional(_text), None, report)
    labels = _labels(section.get("labels"), f"{path}.labels", report)
    commands = _commands(section, f"{path}.commands", report)
    # The whole file fails on any problem; a device with a valid id still joins the
    # duplicate check so that one run reports everything.
    return DeviceConfig(device_id, name, labels, commands) if device_id else None


def _labels(value: object, path: str, report: _Report) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        report.add(path, f"must be a mapping of label names to values, got {_shown(value)}")
        return ()
    labels: list[tuple[str, str]] = []
    for key, raw in value.items():
        key_path = _child(path, key)
        problem = _label_name_problem(key)
        if problem:
            report.add(key_path, problem)
            continue
        try:
            labels.append((key, _text(raw, "a non-empty string label value")))
        except _Invalid as exc:
            report.add(key_path, str(exc))
    return tuple(sorted(labels))


def _label_name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not LABEL_NAME.fullmatch(name):
        return "not a valid label name (letters, digits and underscores, not starting with a digit)"
    if name.startswith("__"):
        return "reserved label name (names starting with __ belong to Prometheus)"
    if name in RESERVED_LABELS:
        return "reserved label name (the exporter sets it itself)"
    return None


def _commands(section: Mapping[str, Any], path: str, report: _Report) -> tuple[str, ...] | None:
    value = section.get("commands")
    if value is None:
        return None
    if not isinstance(value, list):
        report.add(path, f"must be a list of 24-hex command ids, got {_shown(value)}")
        return None
    if not value:
        report.add(path, "empty list; omit the key to discover recent batches")
        return None
    return _unique_list(value, path, _command_id, report)


def _unique_list(
    values: list[Any], path: str, read: Callable[[Any], str], report: _Report
) -> tuple[str, ...]:
    """Read each item; duplicates (case-insensitive) are problems."""
    items: list[str] = []
    first_seen: dict[str, str] = {}
    for index, raw in enumerate(values):
        item_path = f"{path}[{index}]"
        try:
            item = read(raw)
        except _Invalid as exc:
            report.add(item_path, str(exc))
            continue
        first = first_seen.setdefault(item.lower(), item_path)
        if first != item_path:
            report.add(item_path, f"duplicate of {first} ({item!r})")
        else:
            items.append(item)
    return tuple(items)


def _discovery(value: object, report: _Report) -> DiscoveryConfig:
    section = _section(value, "discovery", _DISCOVERY_KEYS, report) or {}
    devices = None
    if section.get("devices") is not None:
        devices = _device_discovery(section["devices"], report)
    return DiscoveryConfig(devices, _batch_discovery(section.get("batches"), report))


def _device_discovery(value: object, report: _Report) -> DeviceDiscovery:
    path = "discovery.devices"
    section = _section(value, path, _DEVICE_DISCOVERY_KEYS, report) or {}
    d = DeviceDiscovery()
    tags = section.get("tags")
    if isinstance(tags, (str, int, float)) and not isinstance(tags, bool):
        tags = [tags]  # one tag needs no list
    if tags is not None and not isinstance(tags, list):
        report.add(f"{path}.tags", f"must be a list of tags, got {_shown(tags)}")
        tags = None
    return DeviceDiscovery(
        tags=_unique_list(tags, f"{path}.tags", _text, report) if tags else d.tags,
        segment=_get(section, "segment", path, _optional(_integer(0)), d.segment, report),
        refresh_seconds=_get(
            section, "refresh_seconds", path, _positive_duration, d.refresh_seconds, report
        ),
    )


def _batch_discovery(value: object, report: _Report) -> BatchDiscovery:
    path = "discovery.batches"
    section = _section(value, path, _BATCH_DISCOVERY_KEYS, report) or {}
    d = BatchDiscovery()
    if "max_age" in section and "max_age_seconds" in section:
        report.add(f"{path}.max_age_seconds", "set either max_age or max_age_seconds, not both")
    age_key = "max_age_seconds" if "max_age_seconds" in section else "max_age"
    return BatchDiscovery(
        max_age_seconds=_get(section, age_key, path, _positive_duration, d.max_age_seconds, report),
        max_per_device=_get(section, "max_per_device", path, _integer(1), d.max_per_device, report),
    )


def _metrics(value: object, report: _Report) -> MetricsConfig:
    path = "metrics"
    section = _section(value, path, _METRICS_KEYS, report) or {}
    d = MetricsConfig()
    buckets = d.latency_buckets
    if "latency_buckets" in section:
        buckets = _buckets(section["latency_buckets"], f"{path}.latency_buckets", report)
    return MetricsConfig(
        latency_buckets=buckets,
        max_series=_get(section, "max_series", path, _optional(_integer(1)), None, report),
    )


def _buckets(value: object, path: str, report: _Report) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        report.add(path, f"must be a non-empty list of bucket bounds, got {_shown(value)}")
        return DEFAULT_LATENCY_BUCKETS
    bounds: list[float] = []
    for index, raw in enumerate(value):
        try:
            bound = _positive_duration(raw)
        except _Invalid as exc:
            report.add(f"{path}[{index}]", str(exc))
            return DEFAULT_LATENCY_BUCKETS
        if bounds and bound <= bounds[-1]:
            report.add(
                f"{path}[{index}]",
                f"buckets must be strictly increasing: {_shown(raw)} does not exceed "
                f"{bounds[-1]:g} before it",
            )
            return DEFAULT_LATENCY_BUCKETS
        bounds.append(bound)
    return tuple(bounds)


# --- the token ----------------------------------------------------------------------------


def _check_token_file(path: str) -> None:
    """The file must hold one non-empty line; its content (or a token-like path) is never shown."""
    shown = (
        path if _could_be_path(path) else "the configured path (not shown: it looks like a token)"
    )
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"api.token_file: cannot read {shown}: {exc.strerror or exc}") from None
    if len(data) > MAX_TOKEN_BYTES:
        raise ConfigError(f"api.token_file: file is too large for a token: {shown}")
    try:
        token = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"api.token_file: not a UTF-8 text file: {shown}") from None
    if not token:
        raise ConfigError(f"api.token_file: file is empty: {shown}")
    if any(c.isspace() for c in token):
        raise ConfigError(f"api.token_file: the token must be one word on one line: {shown}")


def _could_be_path(path: str) -> bool:
    # A long, high-entropy name is more likely a token pasted into token_file than a file name.
    name = os.path.basename(path)
    mixed = any(c.isupper() for c in name) and any(c.islower() for c in name)
    hex_only = all(c in "0123456789abcdefABCDEF" for c in name)
    digits = any(c.isdigit() for c in name)
    return len(name) < 24 or not ((mixed and digits) or (hex_only and len(name) >= 32))


__all__ = [
    "DEFAULT_LATENCY_BUCKETS",
    "RESERVED_LABELS",
    "STRATEGIES",
    "TOKEN_ENV",
    "ApiConfig",
    "BatchDiscovery",
    "Config",
    "ConfigError",
    "DeviceConfig",
    "DeviceDiscovery",
    "DiscoveryConfig",
    "MetricsConfig",
    "PollConfig",
    "TokenSpec",
    "load_config",
    "parse_config",
    "parse_duration",
    "resolve_token",
]
