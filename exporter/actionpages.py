"""Actions pages parsed straight from the response body (msgspec), the general path of
:mod:`exporter.records` as the fallback.

Actions pages are most of what the exporter reads; this module is their fast path and gives
exactly what ``records.decode_page(..., decode_action)`` would.
"""

from __future__ import annotations

from typing import Any

import msgspec

from exporter.records import (
    Action,
    Page,
    action_from_fields,
    decode_action,
    decode_json,
    decode_page,
    envelope_data,
    page_of,
)


class _WireConfig(msgspec.Struct):
    # The CSP node and the operation; the value (maybe a long XML) is skipped by the parser.
    path: Any = None
    action: Any = None


class _WireAction(msgspec.Struct, rename="camel"):
    # Only the fields the exporter reads, of any JSON type: the rest of each action (its
    # data, the config's value) is skipped by the parser, and types are judged by
    # action_from_fields. A config that is not an object fails the page over to the
    # general path, which names the problem.
    cmd_id: Any = None
    status: Any = None
    status_code: Any = None
    sent_at: Any = None
    received_at: Any = None
    canceled_at: Any = None
    config: _WireConfig | None = None


class _WireActionsPage(msgspec.Struct, rename="camel"):
    items: list[_WireAction]
    total_docs: Any = None
    page: Any = None
    limit: Any = None
    has_next_page: Any = None


class _WireActionsEnvelope(msgspec.Struct):
    data: _WireActionsPage
    status: Any = None


_read_actions_envelope = msgspec.json.Decoder(_WireActionsEnvelope).decode
_NO_CONFIG = _WireConfig()


def decode_actions_body(body: bytes, limit: int | None = None) -> Page[Action]:
    """A page of actions from a response body, the same as the general path would give
    (items past ``limit`` cut unread, as :func:`exporter.records.decode_page` does).

    Actions pages are most of what the exporter reads. Parsing them straight into the few
    fields it uses is several times cheaper than building every JSON object as a dict; any
    body of another shape (bare arrays, items that are not objects, error envelopes, bad
    JSON) goes the general way, which names the problem.
    """
    try:
        envelope = _read_actions_envelope(body)
    except msgspec.DecodeError:  # ValidationError included
        envelope = None
    if envelope is None or envelope.status is False:
        return decode_page(envelope_data(decode_json(body)), decode_action, limit)
    page = envelope.data
    raw_items = page.items if limit is None else page.items[:limit]
    no_config = _NO_CONFIG
    items = tuple(
        filter(
            None,
            [
                action_from_fields(
                    raw.cmd_id,
                    raw.status,
                    raw.status_code,
                    raw.sent_at,
                    raw.received_at,
                    raw.canceled_at,
                    (raw.config or no_config).path,
                    (raw.config or no_config).action,
                )
                for raw in raw_items
            ],
        )
    )
    excess = len(page.items) - len(raw_items)
    return page_of(items, len(raw_items), excess, page.total_docs, page.page, page.limit,
                   page.has_next_page)
