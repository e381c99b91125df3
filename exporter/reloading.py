"""A reload, all or nothing: the config file and the web config file are both read and
validated before either is applied; on any problem both running configs stay.

SIGHUP and ``POST /-/reload`` both come here (``cli.serve``)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import structlog

from exporter.config import Config, ConfigError, load_config, resolve_token
from exporter.state import ledger_retention
from exporter.token import TokenSource
from exporter.webconfig import WebSecurity

if TYPE_CHECKING:
    from exporter.cli import Exporter

log = structlog.get_logger("exporter")
_T = TypeVar("_T")


def token_source(config: Config) -> TokenSource:
    spec = resolve_token(config.api, os.environ)
    return TokenSource(path=spec.path, value=spec.value)


async def reload_configs(
    exporter: Exporter, security: WebSecurity | None = None
) -> str | None:
    """None on success, else the problems (and both running configs stay). In demo mode
    only the web config reloads: there is no config file."""
    problems: list[str] = []
    main = web = None
    # Reading and checking the files (YAML, the token file, TLS files) is done off the loop:
    # scrapes go on meanwhile. Nothing is applied until both are read.
    if exporter.config_path is not None:
        main = await asyncio.to_thread(
            _prepare, partial(_read_config, exporter.config_path), problems,
            "config_reload_failed",
        )
    if security is not None:
        web = await asyncio.to_thread(
            _prepare, security.prepare, problems, "web_config_reload_failed"
        )
    if not problems and security is not None and web is not None:
        # Applied first: the only step that can fail late (a TLS file changed since).
        try:
            security.apply(web)
        except ConfigError as exc:
            log.error("web_config_reload_failed", problems=list(exc.problems))
            problems += exc.problems
    if main is None:  # demo mode, or a problem
        if exporter.config_path is None and not problems:
            return "no config file to reload (demo mode)"
    elif not problems:
        _apply_config(exporter, *main)
        log.info("config_reloaded", devices=len(exporter.scheduler.targets))
    exporter.metrics.config_reload_successful = not problems
    exporter.metrics.touch()
    return "\n".join(problems) if problems else None


def _prepare(step: Callable[[], _T], problems: list[str], event: str) -> _T | None:
    """``step``'s result, or None with its problems logged and added to ``problems``."""
    try:
        return step()
    except ConfigError as exc:
        log.error(event, problems=list(exc.problems))
        problems += exc.problems
        return None


def _read_config(path: str) -> tuple[Config, TokenSource]:
    config = load_config(path)
    return config, token_source(config)


def _apply_config(exporter: Exporter, config: Config, token: TokenSource) -> None:
    exporter.client.use_token(token)
    if replace(config.api, token_file=None) != replace(exporter.config.api, token_file=None):
        # The client's session, budget and limits are built once; say so rather than
        # pretend the new values apply.
        log.warning("config_reload_api_settings_need_restart")
    exporter.scheduler.reload(config)
    exporter.state.ledger_retention_seconds = ledger_retention(
        config.discovery.batches.max_age_seconds
    )
    exporter.exposition.max_series = config.metrics.max_series
    exporter.config = config
