"""The pure reading of chat's event payloads (chat/payloads.py): no database, no settings,
so these tests carry no `django_db` mark and touch nothing but the functions."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from chat import payloads


def test_it_reads_the_run_an_event_is_about() -> None:
    ref = payloads.run_ref({"runId": "r1", "sessionKey": "agent:main:main"})
    assert ref == payloads.RunRef("r1", "agent:main:main")
    # Without a run id, with an empty one, or with a session key that is not text: none.
    assert payloads.run_ref({"sessionKey": "k"}) is None
    assert payloads.run_ref({"runId": "", "sessionKey": "k"}) is None
    assert payloads.run_ref({"runId": "r1", "sessionKey": 7}) is None
    assert payloads.run_ref(["runId", "r1"]) is None


def test_it_tells_a_protocol_4_delta_from_a_protocol_3_one() -> None:
    v4 = {"state": "delta", "deltaText": "lo", "message": {"content": "hello"}}
    assert payloads.delta_text(v4) == "lo"
    v3 = {
        "state": "delta",
        "message": {"content": [{"type": "text", "text": "hel"}, {"type": "x"}]},
    }
    assert payloads.delta_text(v3) is None
    assert payloads.cumulative_text(v3) == "hel"
    assert payloads.delta_text({"deltaText": 5}) is None
    assert payloads.cumulative_text({"message": "not a dict"}) == ""


def test_it_reads_a_run_end() -> None:
    end = payloads.run_end(
        {
            "state": "final",
            "message": {"content": "done", "model": "gpt-5"},
            "usage": {"input": 3, "output": 4},
        }
    )
    assert end == payloads.RunEnd(
        state="final",
        text="done",
        error="",
        model="gpt-5",
        usage={"input": 3, "output": 4},
    )
    failed = payloads.run_end({"state": "error", "usage": {}, "message": "x"})
    assert failed is not None
    assert failed.error == payloads.RUN_FAILED
    assert failed.usage is None and failed.model == "" and failed.text == ""
    said = payloads.run_end({"state": "error", "errorMessage": "quota"})
    assert said is not None and said.error == "quota"
    aborted = payloads.run_end({"state": "aborted"})
    assert aborted is not None and aborted.state == "aborted" and aborted.error == ""
    # Not a terminal state, nor text at all (a list is unhashable: no TypeError either).
    for state in ("delta", "status", None, "FINAL", ["final"], {"final": 1}):
        assert payloads.run_end({"state": state}) is None


def test_it_reads_a_lifecycle_event_and_usage() -> None:
    life = payloads.lifecycle({"phase": "start", "startedAt": 1700, "model": "m"})
    assert life == payloads.Lifecycle(phase="start", started_at_ms=1700, model="m")
    odd = payloads.lifecycle({"phase": 3, "startedAt": True, "model": ["m"]})
    assert odd == payloads.Lifecycle(phase="", started_at_ms=None, model="")
    assert payloads.usage_numbers(
        {"input": 1, "cost": 0.5, "model": "m", "cached": True, "x": None}
    ) == {"input": 1, "cost": 0.5}


def test_it_makes_a_tool_card() -> None:
    card = payloads.tool_card(
        {
            "toolCallId": "call-1",
            "name": "exec",
            "phase": "result",
            "args": {"command": "ls"},
            "result": "a\nb",
            "partialResult": None,
            "isError": "yes",  # only True is an error
            "secret": "not shown",
        }
    )
    assert card == {
        "id": "call-1",
        "name": "exec",
        "phase": "result",
        "args": {"command": "ls"},
        "result": "a\nb",
        "isError": False,
    }
    bare = payloads.tool_card({"isError": True})
    assert bare == {"id": "tool", "name": "tool", "phase": "", "isError": True}
    long = payloads.tool_card({"name": "n" * 500})
    assert long["id"] == long["name"] == "n" * 200


def test_it_words_a_phase() -> None:
    assert payloads.phase_text("start") == "Thinking…"
    assert payloads.phase_text("preparing_workspace") == "Preparing the workspace…"
    assert payloads.phase_text("compacting_history") == "Compacting history…"
    assert payloads.phase_text("") == "Working…"
    assert payloads.phase_text(None) == "Working…"
    assert payloads.ends_run({"phase": "end"}) and payloads.ends_run({"phase": "error"})
    assert not payloads.ends_run({"phase": "start"})


def test_it_reads_a_transcript_entrys_identity() -> None:
    message = {"__openclaw": {"id": "m-1", "seq": 4}, "timestamp": 1_700_000_000_000}
    assert payloads.entry_identity({}, message) == ("m-1", 4)
    # The event's own fields win over the entry's.
    assert payloads.entry_identity({"messageId": "m-2", "messageSeq": 9}, message) == (
        "m-2",
        9,
    )
    assert payloads.entry_identity({"messageSeq": True}, {"__openclaw": "x"}) == (
        "",
        None,
    )
    assert payloads.entry_timestamp(message) == datetime.fromtimestamp(
        1_700_000_000, tz=UTC
    )
    for ts in (0, -5, True, "1700", 10**30):
        assert payloads.entry_timestamp({"timestamp": ts}) is None
    assert payloads.entry_usage({"usage": {"input": 1}}) == {"input": 1}
    assert payloads.entry_usage({"usage": [1]}) == {}


def test_it_reads_our_own_message_ids() -> None:
    ours = uuid.uuid4()
    assert payloads.as_uuid(str(ours)) == ours
    for value in ("run-1", "", None, 7):
        assert payloads.as_uuid(value) is None
