"""Tolerant decoding of upstream records: timestamps, statuses, summaries, envelopes, pages."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from exporter.actionpages import decode_actions_body
from exporter.records import (
    SCHEMA,
    TIMESTAMP,
    UNKNOWN_STATUS,
    Action,
    InvalidBody,
    decode_action,
    decode_batch,
    decode_device,
    decode_json,
    decode_page,
    decode_summary,
    envelope_data,
    error_code,
    parse_timestamp,
)
from exporter.statuses import KNOWN_STATUSES

# The upstream reference page of the actions endpoint, as published (its 200 example body).
REFERENCE = Path(__file__).parent / "data" / "actions-endpoint.txt"
MOMENT = datetime(2026, 2, 10, 10, 5, 0, tzinfo=UTC).timestamp()


def reference_example() -> dict:
    """The 200 example body of the upstream reference page, as printed there."""
    text = REFERENCE.read_text(encoding="utf-8")
    start = text.index('{\n    "status": true')
    document, _ = json.JSONDecoder().raw_decode(text, start)
    return document


# --- timestamps -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "2026-02-10T10:05:00Z",
        "2026-02-10T10:05:00.000Z",
        "2026-02-10T10: 05: 00.000Z",  # the docs' example style
        " 2026-02-10T10:05:00Z\n",
        "2026-02-10T10:05:00+00:00",
        "2026-02-10T12:05:00+02:00",
        "2026-02-10T05:05:00.000-05:00",
        "2026-02-10T10:05:00z",
        "2026-02-10T10:05:00",  # no zone: upstream times are UTC
    ],
)
def test_timestamp_forms_name_the_same_moment(text: str) -> None:
    assert parse_timestamp(text) == MOMENT


def test_timestamp_keeps_fractions() -> None:
    assert parse_timestamp("2026-02-10T10:05:00.250Z") == MOMENT + 0.25


def test_timestamp_epoch_numbers_in_seconds_or_milliseconds() -> None:
    assert parse_timestamp(int(MOMENT)) == MOMENT
    assert parse_timestamp(MOMENT * 1000) == MOMENT
    assert parse_timestamp(int(MOMENT * 1000) + 500) == MOMENT + 0.5


@pytest.mark.parametrize("value", [None, ""])
def test_absent_timestamp_is_none(value: object) -> None:
    assert parse_timestamp(value) is None


@pytest.mark.parametrize("value", ["yesterday", "2026-13-40T99:00:00Z", True, [], {"$date": 1}])
def test_garbage_timestamp_raises_value_error(value: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        parse_timestamp(value)


def test_offset_without_z_is_honoured() -> None:
    expected = datetime(2026, 2, 10, 10, 5, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    assert parse_timestamp("2026-02-10T10:05:00+05:30") == expected.timestamp()


# --- actions ----------------------------------------------------------------------------------


def test_reference_example_decodes_exactly() -> None:
    document = reference_example()
    page = decode_page(envelope_data(document), decode_action)
    assert page.total_docs == 42
    assert page.problems == ()
    [action] = page.items
    assert action == Action(
        cmd_id="cmd-550e8400-e29b-41d4",
        status="Acknowledged",
        status_code=200,
        sent_at=MOMENT,
        received_at=MOMENT + 15,
        canceled_at=MOMENT + 60,
        path="./Device/Vendor/MSFT/Policy/Config/Security/RequireDeviceEncryption",
        operation="Replace",
    )
    assert action.received_at is not None and action.sent_at is not None
    assert action.received_at - action.sent_at == 15
    assert not action.problems


def test_config_path_and_operation_are_read() -> None:
    config = {"path": "./Device/Vendor/MSFT/Reboot/RebootNow", "action": "Exec", "value": "1"}
    [action] = decode_actions_body(_action_page({**GOOD, "config": config})).items
    assert (action.path, action.operation, action.problems) == (
        "./Device/Vendor/MSFT/Reboot/RebootNow", "Exec", frozenset()
    )


@pytest.mark.parametrize("config", ["./Vendor/MSFT/X", [1], {"path": 7}, {"action": {}}])
def test_a_config_of_the_wrong_shape_is_a_schema_problem(config: object) -> None:
    [action] = decode_actions_body(_action_page({**GOOD, "config": config})).items
    assert action.problems == {SCHEMA}
    assert action.status == "Acknowledged"  # the rest of the action is kept


def _general_path(body: bytes):
    return decode_page(envelope_data(decode_json(body)), decode_action)


def _action_page(*items: object, **meta: object) -> bytes:
    data = {"items": list(items), "totalDocs": len(items), "page": 1, "limit": 100, **meta}
    return json.dumps({"status": True, "data": data}).encode()


GOOD = {
    "cmdId": "a1",
    "status": "Acknowledged",
    "statusCode": 200,
    "sentAt": "2026-02-10T10:05:00Z",
}

ACTION_BODIES = {
    "reference example": json.dumps(reference_example()).encode(),
    "canonical": _action_page(GOOD, {**GOOD, "cmdId": "a2", "receivedAt": "2026-02-10T10:05:15Z"}),
    "doc-style timestamps": _action_page({**GOOD, "sentAt": "2026-02-10T10: 05: 00.000Z"}),
    "epoch timestamps": _action_page({**GOOD, "sentAt": MOMENT * 1000, "receivedAt": MOMENT}),
    "garbage timestamps": _action_page({**GOOD, "sentAt": "soon", "canceledAt": [1]}),
    "unknown status": _action_page({**GOOD, "status": "BrandNew"}),
    "missing status": _action_page({"cmdId": "a1"}),
    "status of the wrong type": _action_page({**GOOD, "status": 7}),
    "code as text": _action_page({**GOOD, "statusCode": "200"}),
    "code as float": _action_page({**GOOD, "statusCode": 200.0}),
    "code as bool": _action_page({**GOOD, "statusCode": True}),
    "numeric cmdId": _action_page({**GOOD, "cmdId": 17}),
    "no cmdId": _action_page({"status": "Pending"}, GOOD),
    "empty cmdId": _action_page({**GOOD, "cmdId": ""}),
    "item that is not an object": _action_page("a1", GOOD, None, 3),
    "nulls everywhere": _action_page(
        {"cmdId": "a1", "status": "Pending", "statusCode": None, "receivedAt": None}
    ),
    "paging meta of odd types": _action_page(GOOD, totalDocs="1", page=1.0, hasNextPage="no"),
    "no paging meta": json.dumps({"status": True, "data": {"items": [GOOD]}}).encode(),
    "data as a bare array": json.dumps({"status": True, "data": [GOOD]}).encode(),
    "items without the envelope": json.dumps({"items": [GOOD], "totalDocs": 1}).encode(),
    "duplicate keys": b'{"status": true, "data": {"items": [{"cmdId": "a", "cmdId": "b",'
    b' "status": "Pending"}]}}',
    "non-ASCII": _action_page({**GOOD, "cmdId": "acci\u00f3n-\ud83d\ude00"}),
    "NaN literal": b'{"status": true, "data": {"items": [{"cmdId": "a", "status": "Pending",'
    b' "statusCode": NaN}]}}',
    "huge integer": b'{"status": true, "data": {"items": [{"cmdId": "a", "status": "Pending",'
    b' "statusCode": 123456789012345678901234567890}]}}',
    "config": _action_page({**GOOD, "config": {"path": "./Vendor/MSFT/Reboot/RebootNow",
                                               "action": "Exec", "value": "<x/>" * 50}}),
    "config without path": _action_page({**GOOD, "config": {"format": "int"}}),
    "config of null": _action_page({**GOOD, "config": None}),
    "config that is not an object": _action_page({**GOOD, "config": "./Vendor/MSFT/X"}, GOOD),
    "config path of the wrong type": _action_page({**GOOD, "config": {"path": 7, "action": []}}),
}

BROKEN_BODIES = {
    "not JSON": b"<html>oops</html>",
    "truncated": _action_page(GOOD)[:-7],
    "error envelope": b'{"status": false, "error": {"code": 3001, "message": "nope"}}',
    "no data": b'{"status": true}',
    "items not a list": b'{"status": true, "data": {"items": {"a": 1}}}',
    "top-level array": b"[1, 2]",
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "not UTF-8": b'{"status": true, "data": {"items": ["\xff\xfe"]}}',
}


@pytest.mark.parametrize("body", ACTION_BODIES.values(), ids=ACTION_BODIES.keys())
def test_actions_body_decodes_as_the_general_path_does(body: bytes) -> None:
    # The direct parse of actions pages is an optimisation: it must never change a result.
    assert decode_actions_body(body) == _general_path(body)


@pytest.mark.parametrize("body", BROKEN_BODIES.values(), ids=BROKEN_BODIES.keys())
def test_broken_actions_body_is_refused_as_the_general_path_does(body: bytes) -> None:
    with pytest.raises(InvalidBody) as general:
        _general_path(body)
    with pytest.raises(InvalidBody) as direct:
        decode_actions_body(body)
    assert str(direct.value) == str(general.value)


def test_decoded_action_is_an_ordinary_frozen_record() -> None:
    raw = {
        "cmdId": "a1",
        "status": "Acknowledged",
        "statusCode": 200,
        "sentAt": "2026-02-10T10:05:00Z",
        "receivedAt": "2026-02-10T10:05:15Z",
    }
    decoded = decode_action(raw)
    built = Action("a1", "Acknowledged", 200, MOMENT, MOMENT + 15, None)
    assert decoded == built
    assert hash(decoded) == hash(built)
    assert repr(decoded) == repr(built)
    assert built._replace(status="Cancel") != decoded
    assert type(decoded) is Action
    with pytest.raises(AttributeError):
        decoded.status = "Cancel"  # type: ignore[misc, union-attr]


def test_repeated_timestamps_decode_alike_through_the_cache() -> None:
    # The fast path remembers parsed strings; a remembered one must give the same moment,
    # and an untidy spelling of it the same moment again.
    first = decode_action({"cmdId": "a", "status": "Pending", "sentAt": "2026-02-10T10:05:00Z"})
    again = decode_action({"cmdId": "b", "status": "Pending", "sentAt": "2026-02-10T10:05:00Z"})
    untidy = decode_action(
        {"cmdId": "c", "status": "Pending", "sentAt": "2026-02-10T10: 05: 00.000Z"}
    )
    assert first.sent_at == again.sent_at == untidy.sent_at == MOMENT


def test_pending_action_without_answer_fields() -> None:
    action = decode_action({"cmdId": "a1", "status": "Pending"})
    assert action == Action(cmd_id="a1", status="Pending")
    assert not action.problems


def test_null_answer_fields_are_absent_not_problems() -> None:
    action = decode_action(
        {
            "cmdId": "a1",
            "status": "Awaiting",
            "statusCode": None,
            "sentAt": "2026-02-10T10:05:00Z",
            "receivedAt": None,
            "canceledAt": None,
        }
    )
    assert action is not None
    assert (action.sent_at, action.received_at, action.status_code) == (MOMENT, None, None)
    assert not action.problems


def test_unknown_status_is_kept_as_is_and_named() -> None:
    action = decode_action({"cmdId": "a1", "status": "BrandNewStatus", "statusCode": 200})
    assert action is not None
    assert action.status == "BrandNewStatus"
    assert action.problems == {UNKNOWN_STATUS}


@pytest.mark.parametrize("status", KNOWN_STATUSES)
def test_every_known_status_decodes_without_problem(status: str) -> None:
    action = decode_action({"cmdId": "a1", "status": status})
    assert action is not None and action.status == status and not action.problems


def test_bad_timestamp_blanks_that_field_only() -> None:
    action = decode_action(
        {
            "cmdId": "a1",
            "status": "Acknowledged",
            "sentAt": "soon",
            "receivedAt": "2026-02-10T10:05:00Z",
        }
    )
    assert action is not None
    assert action.sent_at is None
    assert action.received_at == MOMENT
    assert action.status == "Acknowledged"
    assert action.problems == {TIMESTAMP}


@pytest.mark.parametrize(
    ("raw", "expected_code", "problems"),
    [
        ({"statusCode": "404"}, 404, set()),
        ({"statusCode": 404.0}, 404, set()),
        ({"statusCode": "n/a"}, None, {SCHEMA}),
        ({"statusCode": True}, None, {SCHEMA}),
        ({"statusCode": [200]}, None, {SCHEMA}),
    ],
)
def test_status_code_types(raw: dict, expected_code: int | None, problems: set[str]) -> None:
    action = decode_action({"cmdId": "a1", "status": "CommandNotFound", **raw})
    assert action is not None
    assert action.status_code == expected_code
    assert action.problems == problems


@pytest.mark.parametrize("status", [None, 7, "", ["Acknowledged"]])
def test_missing_or_mistyped_status_becomes_unknown(status: object) -> None:
    raw = {"cmdId": "a1"} if status is None else {"cmdId": "a1", "status": status}
    action = decode_action(raw)
    assert action is not None
    assert action.status == "Unknown"
    assert action.problems == {SCHEMA}


def test_numeric_cmd_id_is_kept_as_text() -> None:
    action = decode_action({"cmdId": 17, "status": "Pending"})
    assert action is not None and action.cmd_id == "17"


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "a1",
        [],
        {},
        {"cmdId": ""},
        {"cmdId": None},
        {"cmdId": True, "status": "Pending"},
        {"status": "Pending"},
    ],
)
def test_action_without_usable_cmd_id_is_undecodable(raw: object) -> None:
    assert decode_action(raw) is None


def test_several_problems_on_one_action_are_all_named() -> None:
    action = decode_action(
        {"cmdId": "a1", "status": "NewThing", "statusCode": "x", "receivedAt": "never"}
    )
    assert action is not None
    assert action.problems == {UNKNOWN_STATUS, SCHEMA, TIMESTAMP}


# --- batches and summaries --------------------------------------------------------------------


def test_summary_as_list_of_counts() -> None:
    problems: set[str] = set()
    summary = decode_summary(
        [{"status": "Pending", "count": 2}, {"status": "Acknowledged", "count": 3}], problems
    )
    assert summary == (("Acknowledged", 3), ("Pending", 2))
    assert not problems


def test_summary_as_map() -> None:
    problems: set[str] = set()
    assert decode_summary({"Pending": 1, "Acknowledged": 4}, problems) == (
        ("Acknowledged", 4),
        ("Pending", 1),
    )
    assert not problems


def test_summary_count_under_another_name_and_repeated_statuses_merge() -> None:
    problems: set[str] = set()
    summary = decode_summary(
        [{"status": "Pending", "total": 2}, {"status": "Pending", "value": "3"}], problems
    )
    assert summary == (("Pending", 5),)
    assert not problems


def test_summary_with_unknown_status_keeps_it() -> None:
    problems: set[str] = set()
    summary = decode_summary([{"status": "Mystery", "count": 1}], problems)
    assert summary == (("Mystery", 1),)
    assert problems == {UNKNOWN_STATUS}


@pytest.mark.parametrize(
    "raw",
    [
        [{"status": "Pending"}],
        [{"status": 3, "count": 1}],
        [{"status": "Pending", "count": -1}],
        ["Pending"],
        {"Pending": "lots"},
    ],
)
def test_summary_bad_entries_are_skipped_as_schema_problems(raw: object) -> None:
    problems: set[str] = set()
    assert decode_summary(raw, problems) == ()
    assert problems == {SCHEMA}


def test_summary_of_wrong_type_is_none() -> None:
    problems: set[str] = set()
    assert decode_summary("Pending: 3", problems) is None
    assert problems == {SCHEMA}


def test_absent_summary_is_none_without_problem() -> None:
    batch = decode_batch({"id": "65f0c0ffee65f0c0ffee1001"})
    assert batch is not None and batch.summary is None and not batch.problems


def test_batch_fields_and_finished() -> None:
    batch = decode_batch(
        {
            "id": "65f0c0ffee65f0c0ffee1001",
            "name": "encryption",
            "winDeviceId": "65f0c0ffee65f0c0ffee0001",
            "summary": [{"status": "Acknowledged", "count": 2}, {"status": "Cancel", "count": 1}],
            "createdAt": "2026-02-10T10:05:00.000Z",
            "updatedAt": "2026-02-10T10:06:00.000Z",
        }
    )
    assert batch is not None
    assert (batch.id, batch.name, batch.device_id) == (
        "65f0c0ffee65f0c0ffee1001",
        "encryption",
        "65f0c0ffee65f0c0ffee0001",
    )
    assert (batch.created_at, batch.updated_at) == (MOMENT, MOMENT + 60)
    assert batch.finished
    pending = decode_batch({"id": "b", "summary": [{"status": "Awaiting", "count": 1}]})
    assert pending is not None and not pending.finished
    unknown_summary = decode_batch({"id": "b"})
    assert unknown_summary is not None and not unknown_summary.finished


def test_batch_with_mistyped_name_keeps_text_and_names_problem() -> None:
    batch = decode_batch({"id": "b", "name": 12, "createdAt": "later"})
    assert batch is not None
    assert batch.name == "12"
    assert batch.created_at is None
    assert batch.problems == {SCHEMA, TIMESTAMP}


@pytest.mark.parametrize("raw", [None, [], {"name": "x"}, {"id": 5}, {"id": ""}])
def test_batch_without_id_is_undecodable(raw: object) -> None:
    assert decode_batch(raw) is None


# --- devices ----------------------------------------------------------------------------------


def test_device_fields() -> None:
    device = decode_device(
        {
            "id": "65f0c0ffee65f0c0ffee0001",
            "displayName": "reception-pc",
            "tags": ["kiosk", "madrid"],
            "winId": "WIN-1",
            "state": "ACTIVE",
            "summary": {"name": "other", "serialNumber": "SN1", "imei": "3520"},
            "lastStatusReportTime": "2026-02-10T10:05:00Z",
        }
    )
    assert device is not None
    assert device.id == "65f0c0ffee65f0c0ffee0001"
    assert device.name == "reception-pc"
    assert (device.serial, device.imei, device.win_id, device.state) == (
        "SN1",
        "3520",
        "WIN-1",
        "ACTIVE",
    )
    assert device.tags == ("kiosk", "madrid")
    assert device.last_status_report == MOMENT
    assert not device.problems


def test_device_name_falls_back_to_summary_and_bad_tags_are_a_problem() -> None:
    device = decode_device({"id": "d1", "summary": {"name": "kiosk-7"}, "tags": "kiosk"})
    assert device is not None
    assert device.name == "kiosk-7"
    assert device.tags == ()
    assert device.problems == {SCHEMA}


# --- envelopes and pages ----------------------------------------------------------------------


def test_page_of_mongoose_envelope() -> None:
    body = json.dumps(
        {
            "status": True,
            "data": {
                "items": [{"cmdId": "a", "status": "Pending"}],
                "totalDocs": 7,
                "page": 2,
                "limit": 1,
                "hasNextPage": True,
            },
        }
    )
    page = decode_page(envelope_data(decode_json(body)), decode_action)
    assert [a.cmd_id for a in page.items] == ["a"]
    assert (page.total_docs, page.page, page.limit, page.has_next_page) == (7, 2, 1, True)


def test_page_as_bare_array() -> None:
    page = decode_page(envelope_data({"status": True, "data": [{"cmdId": "a"}]}), decode_action)
    assert [a.cmd_id for a in page.items] == ["a"]
    assert (page.total_docs, page.has_next_page) == (None, None)


def test_page_with_top_level_items() -> None:
    document = {"items": [{"cmdId": "a", "status": "Pending"}], "totalDocs": 1}
    page = decode_page(envelope_data(document), decode_action)
    assert [a.cmd_id for a in page.items] == ["a"]
    assert page.total_docs == 1


def test_undecodable_items_are_dropped_and_counted_as_schema() -> None:
    data = {"items": [{"cmdId": "a", "status": "Pending"}, {"status": "Pending"}, 5]}
    page = decode_page(data, decode_action)
    assert [a.cmd_id for a in page.items] == ["a"]
    assert page.problems == (SCHEMA, SCHEMA)


def test_page_meta_of_wrong_types_is_ignored() -> None:
    page = decode_page(
        {"items": [], "totalDocs": "12", "hasNextPage": "yes", "limit": None}, decode_action
    )
    assert (page.total_docs, page.has_next_page, page.limit) == (12, None, None)


@pytest.mark.parametrize("data", [None, "items", {"items": {}}, {"docs": []}])
def test_data_without_items_array_is_invalid(data: object) -> None:
    with pytest.raises(InvalidBody):
        decode_page(data, decode_action)


@pytest.mark.parametrize(
    "document",
    [
        {"status": False, "error": {"code": 4004, "message": "Invalid Token"}},
        {"status": True},
        [1, 2],
        "ok",
    ],
)
def test_envelopes_without_data_are_invalid(document: object) -> None:
    with pytest.raises(InvalidBody):
        envelope_data(document)


@pytest.mark.parametrize(
    "body", [b"<html>502</html>", b'{"status": true, "data": {', b"", b"\xff\xfe{}"]
)
def test_non_json_body_is_invalid(body: bytes) -> None:
    with pytest.raises(InvalidBody):
        decode_json(body)


def test_error_code_of_failure_envelopes() -> None:
    assert (
        error_code({"status": False, "error": {"code": 3001, "message": "Entity not found"}})
        == 3001
    )
    assert error_code({"status": False, "error": {"code": "4002"}}) == 4002
    assert error_code({"status": False, "error": "boom"}) is None
    assert error_code(["error"]) is None
