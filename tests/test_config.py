"""Configuration: YAML -> frozen Config, and every problem reported at once with its key path."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from exporter.config import (
    ApiConfig,
    BatchDiscovery,
    Config,
    ConfigError,
    DeviceConfig,
    DeviceDiscovery,
    DiscoveryConfig,
    MetricsConfig,
    PollConfig,
    TokenSpec,
    config_schema,
    load_config,
    parse_config,
    parse_duration,
    resolve_token,
)

REPO = Path(__file__).resolve().parent.parent
DEVICE = "65f0c0ffee65f0c0ffee0001"
OTHER_DEVICE = "65f0c0ffee65f0c0ffee0002"
COMMAND = "65f0c0ffee65f0c0ffee1001"
OTHER_COMMAND = "65f0c0ffee65f0c0ffee1002"
MINIMAL = f"organization: acme\ndevices:\n  - id: {DEVICE}\n"
# A token-shaped string: long, mixed case, digits.
TOKEN = "eyJhbGciOiJIUzI1NiJ9Xq7TokenValue42Zz"

MINUTE, HOUR, DAY, WEEK = 60.0, 3600.0, 86400.0, 604800.0


def problems_of(text: str | bytes) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return caught.value.problems


# --- valid configs ----------------------------------------------------------------------------


def test_minimal_config_takes_the_documented_defaults() -> None:
    config = parse_config(MINIMAL)

    assert config.organization == "acme"
    assert config.devices == (DeviceConfig(id=DEVICE),)
    device = config.devices[0]
    assert (device.name, device.labels, device.commands) == (None, (), None)
    # design.md, "Defaults and precise semantics"
    assert config.api.base_url == "https://api.applivery.io/v1"
    assert config.api.token_file is None
    assert config.api.timeout_seconds == 10
    assert config.api.max_concurrency == 8
    assert config.api.requests_per_hour == 9000
    assert config.api.page_size == 100
    assert config.api.max_pages == 1000
    assert config.api.max_body_bytes == 32 * 1024 * 1024
    assert config.poll.interval_seconds == 60
    assert config.poll.stale_after_rounds == 3
    assert config.poll.strategy == "budget"
    assert config.poll.jitter == 0.1
    assert config.discovery.devices is None
    assert config.discovery.batches.max_age_seconds == 7 * DAY
    assert config.discovery.batches.max_per_device == 20
    assert config.metrics.latency_buckets == (
        1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400, 259200,
    )  # fmt: skip
    assert config.metrics.max_series is None


def test_empty_sections_mean_defaults() -> None:
    text = MINIMAL + "api:\npoll: {}\nmetrics:\ndiscovery:\n  batches:\n"
    assert parse_config(text) == parse_config(MINIMAL)


def test_full_config_sets_every_key() -> None:
    text = f"""
organization: 65F0C0FFEE65F0C0FFEE0000
api:
  base_url: http://127.0.0.1:8080/v1/
  token_file: /run/secrets/token
  timeout_seconds: 2.5
  max_concurrency: 3
  requests_per_hour: 1200.5
  page_size: 50
  max_pages: 7
  max_body_bytes: 1048576
poll:
  interval_seconds: 1m30s
  stale_after_rounds: 5
  strategy: round_robin
  jitter: 0
devices:
  - id: {DEVICE}
    name: reception-pc
    labels: {{site: madrid, _team: ops}}
    commands: [{COMMAND}, {OTHER_COMMAND}]
  - {OTHER_DEVICE}
discovery:
  devices:
    tags: [kiosk, lobby]
    segment: 0
    refresh_seconds: 2h
  batches:
    max_age: 1w
    max_per_device: 3
metrics:
  latency_buckets: [0.5, 1, 1m, 1h]
  max_series: 50000
"""
    config = parse_config(text)

    assert config == Config(
        organization="65F0C0FFEE65F0C0FFEE0000",
        api=ApiConfig(
            base_url="http://127.0.0.1:8080/v1",  # the trailing slash is dropped
            token_file="/run/secrets/token",
            timeout_seconds=2.5,
            max_concurrency=3,
            requests_per_hour=1200.5,
            page_size=50,
            max_pages=7,
            max_body_bytes=1048576,
        ),
        poll=PollConfig(
            interval_seconds=MINUTE + 30, stale_after_rounds=5, strategy="round_robin", jitter=0
        ),
        devices=(
            DeviceConfig(
                id=DEVICE,
                name="reception-pc",
                labels=(("_team", "ops"), ("site", "madrid")),
                commands=(COMMAND, OTHER_COMMAND),
            ),
            DeviceConfig(id=OTHER_DEVICE),
        ),
        discovery=DiscoveryConfig(
            devices=DeviceDiscovery(tags=("kiosk", "lobby"), segment=0, refresh_seconds=2 * HOUR),
            batches=BatchDiscovery(max_age_seconds=WEEK, max_per_device=3),
        ),
        metrics=MetricsConfig(latency_buckets=(0.5, 1, MINUTE, HOUR), max_series=50000),
    )


def test_discovery_alone_is_something_to_watch() -> None:
    config = parse_config("organization: acme\ndiscovery:\n  devices: {}\n")
    assert config.devices == ()
    assert config.discovery.devices == DeviceDiscovery()


def test_single_tag_needs_no_list_and_max_age_seconds_is_accepted() -> None:
    text = (
        "organization: acme\ndiscovery:\n  devices: {tags: kiosk}\n"
        "  batches: {max_age_seconds: 3600}\n"
    )
    config = parse_config(text)
    assert config.discovery.devices == DeviceDiscovery(tags=("kiosk",))
    assert config.discovery.batches.max_age_seconds == HOUR


def test_unquoted_numbers_and_dates_are_taken_as_written() -> None:
    text = """
organization: 2024-acme
devices:
  - id: 356938035643809
    name: 2024-01-31
    labels: {floor: 010, ratio: 1.50, rack: 7}
    commands: [650000000000000000000001]
  - 0123
discovery:
  devices: {tags: [42, 007]}
"""
    config = parse_config(text)

    imei, serial = config.devices
    assert imei.id == "356938035643809"
    assert imei.name == "2024-01-31"
    assert dict(imei.labels) == {"floor": "010", "ratio": "1.50", "rack": "7"}
    assert imei.commands == ("650000000000000000000001",)
    assert serial.id == "0123"  # not octal 83
    assert config.discovery.devices is not None
    assert config.discovery.devices.tags == ("42", "007")


def test_config_objects_are_frozen_and_hashable() -> None:
    config = parse_config(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.organization = "other"  # type: ignore[misc]
    assert hash(config) == hash(parse_config(MINIMAL))


def test_a_reload_diff_sees_only_the_devices_that_changed() -> None:
    before = parse_config(f"""
organization: acme
devices:
  - id: {DEVICE}
    labels: {{site: madrid, floor: "2"}}
  - id: {OTHER_DEVICE}
    commands: [{COMMAND}]
""")
    after = parse_config(f"""
organization: acme
devices:
  - id: {OTHER_DEVICE}
    commands: [{COMMAND}, {OTHER_COMMAND}]
  - id: {DEVICE}
    labels:
      floor: 2
      site: madrid
""")
    assert set(after.devices) - set(before.devices) == {
        DeviceConfig(id=OTHER_DEVICE, commands=(COMMAND, OTHER_COMMAND))
    }
    assert set(before.devices) - set(after.devices) == {
        DeviceConfig(id=OTHER_DEVICE, commands=(COMMAND,))
    }


def test_example_config_is_valid_and_documents_every_key() -> None:
    path = REPO / "config.example.yaml"
    config = load_config(str(path))
    assert config.devices
    assert config.discovery.devices is not None

    text = path.read_text()
    sections = (ApiConfig, PollConfig, DeviceConfig, DeviceDiscovery, MetricsConfig)
    keys = {f.name for cls in sections for f in dataclasses.fields(cls)}
    keys |= {"organization", "discovery", "batches", "max_age", "max_per_device"}
    missing = sorted(key for key in keys if f"{key}:" not in text)
    assert missing == []


def test_example_config_shows_the_defaults() -> None:
    config = load_config(str(REPO / "config.example.yaml"))
    assert config.api == ApiConfig()
    assert config.poll == PollConfig()
    assert config.discovery.batches == BatchDiscovery()
    assert dataclasses.replace(config.discovery.devices, tags=()) == DeviceDiscovery()
    assert config.metrics == MetricsConfig()


# --- the JSON Schema ------------------------------------------------------------------------


def test_the_committed_schema_is_the_one_the_models_give() -> None:
    committed = json.loads((REPO / "config.schema.json").read_text())
    assert committed == config_schema(), (
        "config.schema.json is stale: python3 -m exporter.config --schema > config.schema.json"
    )


def test_the_example_names_the_schema_and_validates_against_it() -> None:
    path = REPO / "config.example.yaml"
    first_line = path.read_text().splitlines()[0]
    assert first_line == "# yaml-language-server: $schema=./config.schema.json"
    jsonschema = pytest.importorskip("jsonschema")
    yaml = pytest.importorskip("yaml")
    schema = json.loads((REPO / "config.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    errors = jsonschema.Draft202012Validator(schema).iter_errors(yaml.safe_load(path.read_text()))
    assert [error.message for error in errors] == []


def test_the_schema_knows_every_key_and_refuses_unknown_ones() -> None:
    schema = config_schema()
    defs = schema["$defs"]
    sections = {"ApiConfig": ApiConfig, "PollConfig": PollConfig, "DeviceConfig": DeviceConfig,
                "DeviceDiscovery": DeviceDiscovery, "MetricsConfig": MetricsConfig}  # fmt: skip
    for name, cls in sections.items():
        assert set(defs[name]["properties"]) == {f.name for f in dataclasses.fields(cls)}, name
        assert defs[name]["additionalProperties"] is False, name
    assert set(defs["BatchDiscovery"]["properties"]) == {
        "max_age", "max_age_seconds", "max_per_device"
    }  # fmt: skip
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["organization"]
    for key in ("timeout_seconds", "requests_per_hour", "page_size", "max_pages"):
        assert "description" in defs["ApiConfig"]["properties"][key], key


# --- durations --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (90, 90.0),
        (1.5, 1.5),
        ("45s", 45.0),
        ("30m", 30 * MINUTE),
        ("12h", 12 * HOUR),
        ("7d", 7 * DAY),
        ("1w", WEEK),
        ("500ms", 0.5),
        ("1h30m", HOUR + 30 * MINUTE),
        ("1w2d3h4m5s", WEEK + 2 * DAY + 3 * HOUR + 4 * MINUTE + 5),
        ("1.5h", 1.5 * HOUR),
        (" 2m ", 2 * MINUTE),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value", ["", "45", "1x", "m", "1m1h", "1h1h", "-5s", "5 s", "1h 30m", True, None, [1]]
)
def test_not_durations(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


# --- the token --------------------------------------------------------------------------------


def test_relative_token_file_resolves_against_the_config_directory(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "token").write_text(TOKEN + "\n")
    (tmp_path / "config.yaml").write_text(MINIMAL + "api:\n  token_file: secrets/token\n")

    config = load_config(str(tmp_path / "config.yaml"))

    assert config.api.token_file == str(tmp_path / "secrets" / "token")
    # The client re-reads the file; the spec carries only its path.
    assert resolve_token(config.api, {}) == TokenSpec(path=str(tmp_path / "secrets" / "token"))


def test_without_base_dir_a_relative_token_file_stays_relative() -> None:
    config = parse_config(MINIMAL + "api:\n  token_file: secrets/token\n")
    assert config.api.token_file == "secrets/token"


def test_token_file_wins_over_the_environment(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN)
    api = ApiConfig(token_file=str(tmp_path / "token"))
    spec = resolve_token(api, {"APPLIVERY_API_TOKEN": "from-env"})
    assert spec == TokenSpec(path=str(tmp_path / "token"))


def test_environment_token_when_no_token_file() -> None:
    spec = resolve_token(ApiConfig(), {"APPLIVERY_API_TOKEN": f"  {TOKEN}\n"})
    assert spec == TokenSpec(value=TOKEN)
    assert TOKEN not in repr(spec)


@pytest.mark.parametrize("value", ["ab cd", "tok\u2028en", "t\u00f6ken"])
def test_an_environment_token_no_request_could_send_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_token(ApiConfig(), {"APPLIVERY_API_TOKEN": value})
    (problem,) = caught.value.problems
    assert problem.startswith("APPLIVERY_API_TOKEN: ") and value not in problem


def test_no_token_anywhere_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_token(ApiConfig(), {"APPLIVERY_API_TOKEN": "  "})
    assert caught.value.problems == ("no API token: set api.token_file or APPLIVERY_API_TOKEN",)


def test_messages_never_echo_a_token(tmp_path: Path) -> None:
    # A token pasted where a path belongs.
    (tmp_path / "config.yaml").write_text(MINIMAL + f"api:\n  token_file: {TOKEN}\n")
    with pytest.raises(ConfigError) as pasted:
        resolve_token(load_config(str(tmp_path / "config.yaml")).api, {})
    # A token file holding more than one line.
    (tmp_path / "two-lines").write_text(f"{TOKEN}\n{TOKEN}\n")
    with pytest.raises(ConfigError) as two_lines:
        resolve_token(ApiConfig(token_file=str(tmp_path / "two-lines")), {})
    # Credentials in the URL, a token where a path belongs in the wrong type.
    secret = "s3cr3tPassw0rd"
    wrong = problems_of(
        MINIMAL + f"api:\n  base_url: https://me:{secret}@api.example/v1\n  token_file: [{TOKEN}]\n"
    )

    assert str(pasted.value).startswith("api.token_file: cannot read the configured path")
    assert "looks like a token" in str(pasted.value)
    assert str(two_lines.value).startswith("api.token_file: the token must be one word")
    assert wrong[0].startswith("api.base_url: must not carry credentials")
    assert wrong[1].startswith("api.token_file: must be the path of a file")
    for message in (str(pasted.value), str(two_lines.value), *wrong):
        assert TOKEN not in message
        assert secret not in message


# --- invalid configs --------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """An invalid config and the problems expected, in order: (key path, message fragment).

    ``{file}`` and ``{dir}`` stand for the config file and its directory. ``files`` are created
    next to it (``None`` makes a directory).
    """

    name: str
    text: str | bytes
    expected: list[tuple[str, str]]
    files: dict[str, str | None] = field(default_factory=dict)


D = f"devices:\n  - id: {DEVICE}\n"
ORG = "organization: acme\n"

BAD = [
    # --- not a config at all
    Bad("empty file", b"", [("{file}", "empty config")]),
    Bad("only comments", "# organization: acme\n", [("{file}", "empty config")]),
    Bad("binary garbage", bytes(range(256)) * 4, [("{file}", "not a text file")]),
    Bad(
        "not UTF-8",
        "organization: caf\xe9\n".encode("latin-1"),
        [("{file}", "not a UTF-8 text file (invalid byte at offset 17)")],
    ),
    Bad(
        "top-level list",
        "- organization: acme\n",
        [("{file}", "must be a mapping of keys, got a list")],
    ),
    Bad("top-level scalar", "acme\n", [("{file}", "must be a mapping of keys, got 'acme'")]),
    Bad(
        "syntax: bad indentation",
        ORG + "api:\n  timeout_seconds: 10\n   page_size: 5\n" + D,
        [("{file}:4:13", "mapping values are not allowed here")],
    ),
    Bad(
        "syntax: tab indentation",
        ORG + "api:\n\ttimeout_seconds: 10\n",
        [("{file}:3:1", "found character '\\t' that cannot start any token")],
    ),
    Bad(
        "syntax: unclosed flow sequence",
        ORG + f"devices: [{DEVICE}\npoll: {{}}\n",
        [("{file}:3:5", "expected ',' or ']'")],
    ),
    Bad(
        "syntax: duplicate key",
        ORG + "api:\n  page_size: 10\n  page_size: 20\n" + D,
        [("{file}:4:3", "duplicate key 'page_size' (first at line 3)")],
    ),
    Bad(
        "syntax: two documents",
        ORG + D + "---\n" + ORG,
        [("{file}:4:1", "expected a single document")],
    ),
    # --- top level
    Bad("organization missing", D, [("organization", "required")]),
    Bad(
        "organization too short",
        "organization: ac\n" + D,
        [("organization", "not an organization id")],
    ),
    Bad("organization a list", "organization: [acme]\n" + D, [("organization", "got a list")]),
    Bad(
        "unknown top-level key with suggestion",
        ORG + f"device:\n  - id: {DEVICE}\n",
        [("device", "unknown key (did you mean devices?)"), ("devices", "nothing to watch")],
    ),
    Bad("nothing to watch", ORG, [("devices", "nothing to watch: list devices, or set discovery")]),
    Bad("nothing to watch: empty list", ORG + "devices: []\n", [("devices", "nothing to watch")]),
    Bad(
        "section not a mapping",
        ORG + D + "api: [1, 2]\n",
        [("api", "must be a mapping, got a list")],
    ),
    # --- api
    Bad(
        "unknown key, no close match",
        ORG + D + "api:\n  colour: blue\n",
        [("api.colour", "unknown key (expected one of: base_url, token_file, timeout_seconds")],
    ),
    Bad(
        "negative timeout",
        ORG + D + "api:\n  timeout_seconds: -1\n",
        [
            (
                "api.timeout_seconds",
                "must be a number > 0 (seconds) or a duration like 45s, 30m, 12h, 7d, 1w, 1h30m, "
                "got -1",
            )
        ],
    ),
    Bad(
        "zero timeout", ORG + D + "api: {timeout_seconds: 0}\n", [("api.timeout_seconds", "got 0")]
    ),
    Bad(
        "bool is not a number",
        ORG + D + "api: {max_concurrency: true}\n",
        [("api.max_concurrency", "must be an integer > 0, got true")],
    ),
    Bad(
        "string is not a number",
        ORG + D + "api: {requests_per_hour: lots}\n",
        [("api.requests_per_hour", "must be a number > 0, got 'lots'")],
    ),
    Bad(
        "infinite budget",
        ORG + D + "api: {requests_per_hour: .inf}\n",
        [("api.requests_per_hour", "got .inf")],
    ),
    Bad(
        "fractional count",
        ORG + D + "api: {max_pages: 2.5}\n",
        [("api.max_pages", "must be an integer > 0, got 2.5")],
    ),
    Bad("null number", ORG + D + "api: {page_size: null}\n", [("api.page_size", "got null")]),
    Bad(
        "page size above upstream maximum",
        ORG + D + "api: {page_size: 20000}\n",
        [("api.page_size", "must be an integer from 1 to 10000, got 20000")],
    ),
    Bad(
        "base_url not http(s)",
        ORG + D + "api: {base_url: 'ftp://api.example/v1'}\n",
        [("api.base_url", "must be an http:// or https:// URL, got 'ftp://api.example/v1'")],
    ),
    Bad(
        "base_url without scheme",
        ORG + D + "api: {base_url: api.example}\n",
        [("api.base_url", "must be an http:// or https:// URL")],
    ),
    Bad(
        "base_url without host",
        ORG + D + "api: {base_url: 'https:///v1'}\n",
        [("api.base_url", "must name a host")],
    ),
    Bad(
        "base_url with a bad port",
        ORG + D + "api: {base_url: 'https://h:99999/v1'}\n",
        [("api.base_url", "not a valid URL")],
    ),
    # --- poll
    Bad(
        "misspelt key",
        ORG + D + "poll:\n  intervall_seconds: 30\n",
        [("poll.intervall_seconds", "unknown key (did you mean interval_seconds?)")],
    ),
    Bad(
        "interval in words",
        ORG + D + "poll: {interval_seconds: 5 minutes}\n",
        [("poll.interval_seconds", "got '5 minutes'")],
    ),
    Bad(
        "unknown strategy",
        ORG + D + "poll: {strategy: fastest}\n",
        [("poll.strategy", "must be one of budget, round_robin; got 'fastest'")],
    ),
    Bad(
        "jitter of a whole interval",
        ORG + D + "poll: {jitter: 1}\n",
        [("poll.jitter", "from 0 up to (not including) 1, got 1")],
    ),
    Bad(
        "zero stale rounds",
        ORG + D + "poll: {stale_after_rounds: 0}\n",
        [("poll.stale_after_rounds", "got 0")],
    ),
    # --- devices
    Bad(
        "devices a mapping",
        ORG + f"devices:\n  {DEVICE}: {{}}\n",
        [("devices", "must be a list of devices, got a mapping")],
    ),
    Bad("device without id", ORG + "devices:\n  - name: pc\n", [("devices[0].id", "required")]),
    Bad(
        "malformed device id",
        ORG + "devices:\n  - id: ABC-123\n",
        [("devices[0].id", "not a device id (a 24-hex id, a serial number or an IMEI")],
    ),
    Bad(
        "bare malformed device id", ORG + "devices: ['a b']\n", [("devices[0]", "not a device id")]
    ),
    Bad("non-ASCII device id", ORG + "devices: [gerät]\n", [("devices[0]", "not a device id")]),
    Bad(
        "device id with a trailing newline",
        ORG + "devices:\n  - id: |\n      ABC123\n",
        [("devices[0].id", "not a device id")],
    ),
    Bad(
        "device key misspelt",
        ORG + f"devices:\n  - id: {DEVICE}\n    label: {{site: madrid}}\n",
        [("devices[0].label", "unknown key (did you mean labels?)")],
    ),
    Bad(
        "empty name",
        ORG + f"devices:\n  - id: {DEVICE}\n    name: ''\n",
        [("devices[0].name", "empty string")],
    ),
    Bad(
        "malformed command",
        ORG
        + f"devices:\n  - {DEVICE}\n  - {OTHER_DEVICE}\n  - id: SN1\n"
        + f"    commands: [{COMMAND}, 65f0c0ffee]\n",
        [("devices[2].commands[1]", "not a 24-hex id, got '65f0c0ffee'")],
    ),
    Bad(
        "duplicate device ids, case aside",
        ORG + f"devices:\n  - id: {DEVICE}\n  - id: {DEVICE.upper()}\n",
        [("devices[1].id", "duplicate of devices[0].id")],
    ),
    Bad(
        "duplicate commands",
        ORG
        + f"devices:\n  - id: {DEVICE}\n    commands: [{COMMAND}, {OTHER_COMMAND}, {COMMAND}]\n",
        [("devices[0].commands[2]", "duplicate of devices[0].commands[0]")],
    ),
    Bad(
        "empty commands",
        ORG + f"devices:\n  - id: {DEVICE}\n    commands: []\n",
        [("devices[0].commands", "empty list; omit the key to discover recent batches")],
    ),
    Bad(
        "invalid label names",
        ORG + f"devices:\n  - id: {DEVICE}\n    labels: {{site-code: a, 9lives: b, 'a b': c}}\n",
        [
            ("devices[0].labels.site-code", "not a valid label name"),
            ("devices[0].labels.9lives", "not a valid label name"),
            ('devices[0].labels["a b"]', "not a valid label name"),
        ],
    ),
    Bad(
        "labels shadowing the exporter's own",
        ORG
        + f"devices:\n  - id: {DEVICE}\n    labels: {{status: x, le: y, serial: z, __meta: w}}\n",
        [
            ("devices[0].labels.status", "reserved label name (the exporter sets it itself)"),
            ("devices[0].labels.le", "reserved label name"),
            ("devices[0].labels.serial", "reserved label name"),
            ("devices[0].labels.__meta", "reserved label name (names starting with __"),
        ],
    ),
    Bad(
        "labels the Prometheus Operator sets on every target, and the fleet views' own",
        ORG
        + f"devices:\n  - id: {DEVICE}\n    labels: {{namespace: a, pod: b, endpoint: c, "
        + "service: d, container: e, rollout: f, setting: g, state: h}\n",
        [
            (f"devices[0].labels.{name}", "reserved label name")
            for name in ("namespace", "pod", "endpoint", "service", "container", "rollout",
                         "setting", "state")
        ],
    ),
    Bad(
        "label values that are not strings",
        ORG + f"devices:\n  - id: {DEVICE}\n    labels: {{kiosk: yes, site: null, floors: [1]}}\n",
        [
            ("devices[0].labels.kiosk", "got true (quote it)"),
            ("devices[0].labels.site", "got null"),
            ("devices[0].labels.floors", "got a list"),
        ],
    ),
    # --- discovery and metrics
    Bad(
        "discovery.devices a list",
        ORG + "discovery:\n  devices: [kiosk]\n",
        [("discovery.devices", "must be a mapping, got a list")],
    ),
    Bad(
        "negative segment, duplicate tag",
        ORG + "discovery:\n  devices: {tags: [kiosk, kiosk], segment: -1}\n",
        [
            ("discovery.devices.tags[1]", "duplicate of discovery.devices.tags[0]"),
            ("discovery.devices.segment", "must be an integer >= 0, got -1"),
        ],
    ),
    Bad(
        "zero max_age",
        ORG + D + "discovery:\n  batches: {max_age: 0d}\n",
        [("discovery.batches.max_age", "got '0d'")],
    ),
    Bad(
        "both spellings of max_age",
        ORG + D + "discovery:\n  batches: {max_age: 1d, max_age_seconds: 60}\n",
        [("discovery.batches.max_age_seconds", "set either max_age or max_age_seconds, not both")],
    ),
    Bad(
        "buckets not increasing",
        ORG + D + "metrics: {latency_buckets: [1, 5, 5, 10]}\n",
        [
            (
                "metrics.latency_buckets[2]",
                "buckets must be strictly increasing: 5 does not exceed 5",
            )
        ],
    ),
    Bad(
        "no buckets",
        ORG + D + "metrics: {latency_buckets: []}\n",
        [("metrics.latency_buckets", "must be a non-empty list")],
    ),
    Bad(
        "zero bucket",
        ORG + D + "metrics: {latency_buckets: [0, 1]}\n",
        [("metrics.latency_buckets[0]", "must be a number > 0")],
    ),
    Bad(
        "zero max_series",
        ORG + D + "metrics: {max_series: 0}\n",
        [("metrics.max_series", "must be an integer > 0, got 0")],
    ),
    # --- the token (checked by resolve_token)
    Bad(
        "token file missing",
        ORG + D + "api: {token_file: nope}\n",
        [("api.token_file", "cannot read {dir}/nope: No such file or directory")],
    ),
    Bad(
        "token file empty",
        ORG + D + "api: {token_file: token}\n",
        [("api.token_file", "file is empty: {dir}/token")],
        {"token": " \n"},
    ),
    Bad(
        "token file a directory",
        ORG + D + "api: {token_file: token}\n",
        [("api.token_file", "cannot read {dir}/token: Is a directory")],
        {"token": None},
    ),
    Bad(
        "no token at all", ORG + D, [("no API token", "set api.token_file or APPLIVERY_API_TOKEN")]
    ),
]


@pytest.mark.parametrize("case", BAD, ids=[case.name for case in BAD])
def test_invalid_config(case: Bad, tmp_path: Path) -> None:
    for name, content in case.files.items():
        if content is None:
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_text(content)
    path = tmp_path / "config.yaml"
    path.write_bytes(case.text if isinstance(case.text, bytes) else case.text.encode())

    with pytest.raises(ConfigError) as caught:
        resolve_token(load_config(str(path)).api, {})

    problems = caught.value.problems
    assert str(caught.value).splitlines() == list(problems)
    expected = [
        (where.format(file=path, dir=tmp_path), what.format(file=path, dir=tmp_path))
        for where, what in case.expected
    ]
    assert len(problems) == len(expected), problems
    for problem, (where, what) in zip(problems, expected, strict=True):
        assert problem.startswith(f"{where}: "), problem
        assert what in problem, problem


def test_a_config_file_larger_than_the_bound_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from exporter import config

    monkeypatch.setattr(config, "MAX_CONFIG_BYTES", 1000)
    path = tmp_path / "config.yaml"
    path.write_text("organization: acme\ndevices:\n" + "  - 65f0c0ffee65f0c0ffee0001\n" * 40)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert caught.value.problems == (f"{path}: larger than 1000 bytes",)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as absent:
        load_config(str(missing))
    with pytest.raises(ConfigError) as directory:
        load_config(str(tmp_path))

    assert absent.value.problems == (f"{missing}: cannot read: No such file or directory",)
    assert directory.value.problems == (f"{tmp_path}: cannot read: Is a directory",)


def test_all_problems_of_a_file_are_reported_together() -> None:
    text = f"""
organization: a
api:
  timeout_seconds: -1
  base_url: ftp://x
poll:
  strategy: fast
  intervall_seconds: 5
devices:
  - id: {DEVICE}
    commands: [nope]
    labels: {{job: x}}
  - id: {DEVICE}
discovery:
  batches: {{max_per_device: 0}}
metrics:
  max_series: -5
"""
    problems = problems_of(text)

    assert [problem.split(": ")[0] for problem in problems] == [
        "organization",
        "api.base_url",
        "api.timeout_seconds",
        "poll.intervall_seconds",
        "poll.strategy",
        "devices[0].labels.job",
        "devices[0].commands[0]",
        "devices[1].id",
        "discovery.batches.max_per_device",
        "metrics.max_series",
    ]


def test_str_of_a_config_error_is_one_line_per_problem() -> None:
    error = ConfigError(["a: one", "b: two"])
    assert str(error) == "a: one\nb: two"
    assert ConfigError("c: three").problems == ("c: three",)


def test_load_config_accepts_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load_config(str(path)) == parse_config(MINIMAL)
