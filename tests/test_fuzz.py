"""Property-based tests: random frames thrown at the protocol parser and at the worker's
event handlers. Whatever a gateway sends, the parser either returns a frame or raises its
one documented error (FrameError), and the handlers take any payload without raising.

Example counts stay moderate (the suite runs on two cores); under CI the examples are
derandomized, so a failure there is reproducible."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet import services
from fleet.gateway import Event, FrameError, Request, Response, parse_frame
from fleet.models import Gateway, PresenceEntry, Session
from tests.helpers import ci

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=ci(),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FUZZ_DB = settings(FUZZ, max_examples=120)

EVENT_NAMES = [
    "sessions.changed",
    "session.message",
    "chat",
    "agent",
    "presence",
    "health",
    "tick",
    "shutdown",
    "client.seq_gap",
    "connect.challenge",
    "no.such.event",
]


def json_of(*, wire: bool) -> st.SearchStrategy[Any]:
    """Any JSON value, with integers far beyond 64 bits. `wire`: also what the parser must
    refuse or clean (NaN and Infinity, which Python's json module reads; NUL characters,
    which PostgreSQL cannot store; lone surrogates, which are not UTF-8). Without it, only
    what the parser lets through, which is what the handlers get."""
    if wire:
        chars = st.characters(blacklist_categories=())  # lone surrogates too
    else:
        chars = st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00")

    def text(max_size: int) -> st.SearchStrategy[str]:
        return st.text(chars, max_size=max_size)

    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=-(2**80), max_value=2**80),
        st.floats(allow_nan=wire, allow_infinity=wire),
        text(max_size=30),
        st.sampled_from(["", "agent:main:main", "main", "final", "delta", "error"]),
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(text(max_size=12), children, max_size=4),
        ),
        max_leaves=20,
    )


wire_values = json_of(wire=True)
json_values = json_of(wire=False)

# Dicts that look like the protocol's frames, with each field present or not, right or wrong.
frame_dicts = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(["req", "res", "event"]), wire_values)},
    optional={
        "id": st.one_of(st.text(max_size=8), wire_values),
        "ok": st.one_of(st.booleans(), wire_values),
        "method": st.one_of(st.text(max_size=12), wire_values),
        "params": wire_values,
        "event": st.one_of(st.sampled_from(EVENT_NAMES), wire_values),
        "payload": wire_values,
        "seq": st.one_of(st.integers(min_value=-3, max_value=2**70), wire_values),
        "error": st.one_of(
            st.fixed_dictionaries(
                {"code": st.text(max_size=8), "message": st.text(max_size=8)},
                optional={
                    "retryable": wire_values,
                    "retryAfterMs": wire_values,
                    "details": wire_values,
                },
            ),
            wire_values,
        ),
    },
)

# Rows shaped like the gateway's session and presence rows, each field any JSON value.
SESSION_FIELDS = [
    "key",
    "sessionId",
    "label",
    "displayName",
    "kind",
    "channel",
    "model",
    "modelProvider",
    "inputTokens",
    "outputTokens",
    "totalTokens",
    "contextTokens",
    "status",
    "hasActiveRun",
    "updatedAt",
    "origin",
    "deliveryContext",
]
session_rows = st.fixed_dictionaries(
    {"key": st.one_of(st.sampled_from(["agent:main:main", "agent:x:y"]), json_values)},
    optional={name: json_values for name in SESSION_FIELDS if name != "key"},
)
PRESENCE_FIELDS = ["instanceId", "deviceId", "host", "ip", "mode", "roles", "scopes"]
presence_rows = st.fixed_dictionaries(
    {},
    optional=dict.fromkeys(
        [*PRESENCE_FIELDS, "lastInputSeconds", "ts", "text", "platform"], json_values
    ),
)
payloads = st.one_of(
    json_values,
    session_rows,
    st.fixed_dictionaries(
        {},
        optional={
            "sessionKey": st.one_of(st.just("agent:main:main"), json_values),
            "reason": st.one_of(st.sampled_from(["delete", "update"]), json_values),
            "session": st.one_of(session_rows, json_values),
            "runId": st.one_of(st.sampled_from(["run-1", "run-2"]), json_values),
            "state": st.one_of(
                st.sampled_from(["delta", "final", "error", "aborted"]), json_values
            ),
            "deltaText": json_values,
            "message": json_values,
            "stream": st.one_of(
                st.sampled_from(["lifecycle", "tool", "usage", "assistant"]),
                json_values,
            ),
            "data": json_values,
            "presence": st.one_of(st.lists(presence_rows, max_size=3), json_values),
            "totalTokens": json_values,
            "label": json_values,
        },
    ),
)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    return []


def _check(raw: str | bytes) -> None:
    try:
        frame = parse_frame(raw)
    except FrameError:
        return
    assert isinstance(frame, Request | Response | Event)
    fields = [getattr(frame, name) for name in frame.__slots__]
    error = getattr(frame, "error", None)
    if error is not None:
        fields += [error.code, error.message, error.details]
    assert not any("\x00" in s for s in _strings(fields))


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200)))
def test_the_parser_takes_any_bytes_or_text(raw: str | bytes) -> None:
    _check(raw)


@FUZZ
@given(wire_values)
def test_the_parser_takes_any_json_value(value: Any) -> None:
    _check(json.dumps(value))


@FUZZ
@given(frame_dicts)
def test_the_parser_takes_any_frame_shaped_object(frame: dict[str, Any]) -> None:
    _check(json.dumps(frame))
    _check(json.dumps(frame).encode())


def test_the_parser_refuses_what_json_allows_but_the_protocol_does_not() -> None:
    raws: list[str | bytes] = [
        '{"type":"event","event":"tick","payload":NaN}',
        '{"type":"res","id":"a","ok":false,"error":{"code":"X","message":"m","retryAfterMs":Infinity}}',
        "[" * 100_000 + "]" * 100_000,  # deeper than the JSON reader goes
        b"\xff\xfe not utf-8",
    ]
    for raw in raws:
        with pytest.raises(FrameError):
            parse_frame(raw)
    event = parse_frame(
        '{"type":"event","event":"x","payload":{"a\\u0000":["b\\u0000"]}}'
    )
    assert isinstance(event, Event) and event.payload == {"a\ufffd": ["b\ufffd"]}
    # A sender that cut a string inside an emoji leaves half of it: kept, as U+FFFD.
    event = parse_frame('{"type":"event","event":"x","payload":"ok \\ud83d"}')
    assert isinstance(event, Event) and event.payload == "ok \ufffd"


# -- the handlers, on the database ------------------------------------------------------------


@pytest.fixture
def gateway(transactional_db: Any) -> Gateway:
    return Gateway.objects.create(name="fuzz", url="ws://127.0.0.1:9")


@FUZZ_DB
@given(payload=payloads)
def test_sessions_changed_takes_any_payload(gateway: Gateway, payload: Any) -> None:
    change = services.apply_session_changed(gateway.pk, payload)
    assert change.resync or change.session_id is None or change.session_id > 0
    assert Session.objects.filter(gateway=gateway).count() <= 3


@FUZZ_DB
@given(rows=st.lists(st.one_of(session_rows, json_values), max_size=4))
def test_the_session_reconcile_takes_any_rows(gateway: Gateway, rows: Any) -> None:
    services.reconcile_sessions(gateway.pk, rows, complete=True)
    services.reconcile_sessions(gateway.pk, rows, complete=False, merge=True)


@FUZZ_DB
@given(payload=st.one_of(st.lists(presence_rows, max_size=4), payloads))
def test_presence_and_health_take_any_payload(gateway: Gateway, payload: Any) -> None:
    services.replace_presence(gateway.pk, payload)
    services.record_health(gateway.pk, payload)
    assert PresenceEntry.objects.filter(gateway=gateway).count() <= 4


@FUZZ_DB
@given(payload=payloads)
def test_the_agent_reconcile_refuses_only_with_its_documented_error(
    gateway: Gateway, payload: Any
) -> None:
    try:
        services.reconcile_agents(gateway.pk, payload)
    except ValueError as exc:
        assert "agents list" in str(exc)  # noqa: PT017 - the documented refusal


@FUZZ_DB
@given(events=st.lists(st.tuples(st.sampled_from(EVENT_NAMES), payloads), max_size=6))
def test_the_worker_handles_any_event(
    gateway: Gateway, caplog: pytest.LogCaptureFixture, events: list[tuple[str, Any]]
) -> None:
    """Through the runner's event router (GatewayRunner.events.on_event), the chat relay included, with no socket: events
    that would need the gateway (a resync) find no connection and are skipped."""
    from chat import relay
    from fleet.worker import GatewayRunner

    runner = GatewayRunner(gateway)
    caplog.clear()

    async def handle() -> None:
        for name, payload in events:
            await runner.events.on_event(Event(name, payload, None))
        await relay.drain(gateway.pk)
        await relay.on_connection_lost(gateway.pk)
        await relay.drain(gateway.pk)

    asyncio.run(handle())
    # The relay's store lane logs (rather than raises) what fails: nothing may have.
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
