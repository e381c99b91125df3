"""YAML configuration -> a frozen, validated :class:`Config`.

Each key is declared once, as a field of a frozen pydantic dataclass (``configmodel.py``):
its type (which carries its check and message), its default and, as the field's docstring,
what it means. The same declarations give ``config.schema.json`` at the repository root
(``python3 -m exporter.config --schema``), which editors use to complete and check keys.

Validation reports every problem at once, one line each, prefixed by its key path
(``devices[2].commands[0]: not a 24-hex id, got 'x'``), so one edit-check cycle fixes a file.
A file that is not YAML at all stops at its first syntax error, with line and column.

Choices worth knowing:

- ``null`` for a section (``api:``) means "all defaults"; for an optional value (``name``,
  ``token_file``, ``commands``, ``segment``, ``max_series``, ``discovery.devices``) it means
  unset. For a number it is an error: an empty value is more likely a slip than a wish.
- Ids, names, tags and label values may be written unquoted even when YAML reads them as
  numbers (IMEIs, all-digit serials, ``zone: 010``): they are taken verbatim as written, leading
  zeros included (``exporter/yamlload.py``). Booleans are not: quote them.
- YAML dates stay strings; duplicate keys in one mapping are errors (YAML would keep the last).
- Device ids compare case-insensitively when looking for duplicates (upstream ids are hex).
- ``commands: []`` is an error: omit the key to discover recent batches.
- Label names also may not shadow ``serial``, ``imei`` and ``win_id``, which the exporter puts
  on ``applivery_windows_device_info`` for discovered devices.
- ``discovery.batches`` takes ``max_age`` (as in the design) or ``max_age_seconds``.

Nothing here logs, and no message echoes a value that might be the API token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from exporter.apierrors import TokenUnavailable
from exporter.configmodel import (
    CONFIG_FILE,
    DEFAULT_LATENCY_BUCKETS,
    RESERVED_LABELS,
    STRATEGIES,
    TOKEN_ENV,
    ApiConfig,
    BatchDiscovery,
    Config,
    DeviceConfig,
    DeviceDiscovery,
    DiscoveryConfig,
    MetricsConfig,
    PollConfig,
)
from exporter.configvalues import parse_duration
from exporter.problems import ConfigError, problem_lines, shown
from exporter.token import (
    TokenFileUnreadable,
    TokenInvalid,
    check_token,
    read_token_file,
)
from exporter.yamlload import load_document, read_file

SCHEMA_FILE = "config.schema.json"
SCHEMA_COMMAND = f"python3 -m exporter.config --schema > {SCHEMA_FILE}"


# --- the token ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenSpec:
    """Where the API token comes from: a file (re-read by the client) or a fixed value."""

    path: str | None = None
    value: str | None = field(default=None, repr=False)


# A config file is read whole: bounded, yet far above a fleet of 10,000 devices listed one
# by one with names and labels (about 1 MiB).
MAX_CONFIG_BYTES = 16 << 20

# --- entry points -------------------------------------------------------------------------


def load_config(path: str) -> Config:
    """Read and validate a config file; ``token_file`` resolves against its directory."""
    data = read_file(path, MAX_CONFIG_BYTES)
    return parse_config(data, source=path, base_dir=os.path.dirname(os.path.abspath(path)))


def parse_config(
    text: str | bytes, *, source: str = "<config>", base_dir: str | None = None
) -> Config:
    """Validate YAML text. A relative ``token_file`` joins ``base_dir`` (else stays relative)."""
    document = load_document(text, source)
    if document is None:
        raise ConfigError(f"{source}: empty config; it needs at least organization and devices")
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: top level must be a mapping of keys, got {shown(document)}")
    try:
        return CONFIG_FILE.validate_python(document, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(problem_lines(exc, Config)) from None


def config_schema() -> dict[str, Any]:
    """The JSON Schema of a config file, as committed in config.schema.json."""
    schema = CONFIG_FILE.json_schema(mode="validation")
    schema["title"] = "applivery-mdm-exporter configuration"
    schema["description"] = f"Generated from exporter/configmodel.py by: {SCHEMA_COMMAND}"
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def resolve_token(api: ApiConfig, environ: Mapping[str, str]) -> TokenSpec:
    """The token source: ``api.token_file`` when set (checked now), else the environment."""
    if api.token_file is not None:
        _check_token_file(api.token_file)
        return TokenSpec(path=api.token_file)
    value = environ.get(TOKEN_ENV, "").strip()
    if not value:
        raise ConfigError(f"no API token: set api.token_file or {TOKEN_ENV}")
    try:
        check_token(value)  # as every request would
    except TokenInvalid as exc:
        raise ConfigError(f"{TOKEN_ENV}: {exc.reason}") from None
    return TokenSpec(value=value)


def _check_token_file(path: str) -> None:
    """The file must hold one non-empty line; its content (or a token-like path) is never shown."""
    shown_path = (
        path if _could_be_path(path) else "the configured path (not shown: it looks like a token)"
    )
    try:
        read_token_file(path)  # as the client reads it
    except TokenFileUnreadable as exc:
        raise ConfigError(f"api.token_file: cannot read {shown_path}: {exc.reason}") from None
    except TokenUnavailable as exc:
        raise ConfigError(f"api.token_file: {exc.reason}: {shown_path}") from None


def _could_be_path(path: str) -> bool:
    # A long, high-entropy name is more likely a token pasted into token_file than a file name.
    name = os.path.basename(path)
    mixed = any(c.isupper() for c in name) and any(c.islower() for c in name)
    hex_only = all(c in "0123456789abcdefABCDEF" for c in name)
    digits = any(c.isdigit() for c in name)
    return len(name) < 24 or not ((mixed and digits) or (hex_only and len(name) >= 32))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m exporter.config", description="The config file's JSON Schema."
    )
    parser.add_argument("--schema", action="store_true", help="print the JSON Schema")
    args = parser.parse_args(argv)
    if not args.schema:
        parser.print_usage(sys.stderr)
        return 2
    print(json.dumps(config_schema(), indent=2))
    return 0


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
    "config_schema",
    "load_config",
    "parse_config",
    "parse_duration",
    "resolve_token",
]

if __name__ == "__main__":
    sys.exit(main())
