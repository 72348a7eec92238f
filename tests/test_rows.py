"""The pure parsing of what gateways report (fleet/services/rows.py): no database, no
settings, so these tests carry no `django_db` mark and touch nothing but the functions."""

from __future__ import annotations

from datetime import UTC, datetime

from fleet.services import rows


def test_it_reads_a_protocol_4_session_row() -> None:
    fields = rows.session_fields(
        {
            "key": "agent:main:telegram:dm:42",
            "sessionId": "s-1",
            "label": "Ops",
            "displayName": "Alice",
            "kind": "direct",
            "deliveryContext": {"channel": "telegram"},
            "model": "gpt-5",
            "modelProvider": "openai",
            "inputTokens": 10,
            "outputTokens": 20,
            "totalTokens": 30,
            "contextTokens": 400,
            "status": "running",
            "updatedAt": 1_700_000_000_000,
        }
    )
    assert fields["agent_key"] == "main"
    assert fields["channel"] == "telegram"
    assert fields["has_active_run"] is True
    assert fields["total_tokens"] == 30
    assert fields["updated_at"] == datetime.fromtimestamp(1_700_000_000, tz=UTC)


def test_it_prefers_has_active_run_over_the_status() -> None:
    fields = rows.session_fields(
        {"key": "k", "status": "running", "hasActiveRun": False}
    )
    assert fields["has_active_run"] is False
    assert fields["agent_key"] == ""


def test_it_bounds_what_a_gateway_may_send() -> None:
    fields = rows.session_fields(
        {
            "key": "x" * 1000,
            "label": "y" * 1000,
            "totalTokens": 2**70,
            "inputTokens": True,
            "outputTokens": float("nan"),
            "updatedAt": 10**30,
            "model": ["not", "a", "string"],
        }
    )
    assert len(fields["key"]) == 512
    assert len(fields["label"]) == 500
    assert fields["total_tokens"] is None
    assert fields["input_tokens"] is None
    assert fields["output_tokens"] is None
    assert fields["updated_at"] is None
    assert fields["model"] == ""


def test_it_rejects_times_that_are_not_positive_numbers() -> None:
    assert rows.from_ms(0) is None
    assert rows.from_ms(-5) is None
    assert rows.from_ms(True) is None
    assert rows.from_ms("1700000000000") is None
    assert rows.from_ms(1_000) == datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)


def test_it_reads_an_agent_row_and_its_default() -> None:
    fields = rows.agent_fields(
        {
            "id": "main",
            "identity": {"name": "Main", "emoji": "🦞"},
            "model": {"primary": "anthropic/claude"},
        },
        default_id="main",
    )
    assert fields == {
        "agent_id": "main",
        "name": "Main",
        "emoji": "🦞",
        "identity": {"name": "Main", "emoji": "🦞"},
        "model": "anthropic/claude",
        "is_default": True,
    }
    assert rows.agent_fields({"id": "ops", "model": 3}, "main")["model"] == ""


def test_it_hashes_rows_by_content_not_order() -> None:
    assert rows.row_hash({"a": 1, "b": 2}) == rows.row_hash({"b": 2, "a": 1})
    assert rows.row_hash({"a": 1}) != rows.row_hash({"a": 2})


def test_it_tells_a_sessions_changed_upsert_delete_and_resync() -> None:
    assert rows.session_event({"sessionKey": "k", "reason": "delete"}) == (
        "delete",
        "k",
        None,
        False,
    )
    assert rows.session_event({"session": {"key": "k", "label": "L"}}) == (
        "upsert",
        "k",
        {"key": "k", "label": "L"},
        False,
    )
    kind, key, fields, merge = rows.session_event(
        {"sessionKey": "k", "runId": "r", "ts": 1, "label": "L"}
    )
    assert (kind, key, merge) == ("upsert", "k", True)
    assert fields == {"key": "k", "label": "L"}  # the event's own fields left out
    assert rows.session_event({"reason": "compact"})[0] == "resync"
    assert rows.session_event(["not", "a", "dict"])[0] == "resync"
