"""Frame parsing and the device signature: the pieces every gateway conversation rests on."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.gateway import (
    DeviceKey,
    ErrorShape,
    Event,
    FrameError,
    Request,
    Response,
    chat_text,
    parse_frame,
    verify_device_signature,
)


def test_it_parses_an_event_with_seq() -> None:
    frame = parse_frame('{"type":"event","event":"tick","payload":{"ts":1},"seq":7}')
    assert frame == Event(event="tick", payload={"ts": 1}, seq=7)


def test_it_parses_an_error_response() -> None:
    raw = json.dumps(
        {
            "type": "res",
            "id": "c1",
            "ok": False,
            "error": {
                "code": "NOT_PAIRED",
                "message": "pairing required",
                "details": {
                    "code": "PAIRING_REQUIRED",
                    "requestId": "r-1",
                    "reason": "not-paired",
                },
            },
        }
    )
    frame = parse_frame(raw)
    assert isinstance(frame, Response)
    assert frame.error is not None
    assert frame.error.detail_code == "PAIRING_REQUIRED"
    assert frame.error.details["requestId"] == "r-1"


def test_it_keeps_retry_after_ms() -> None:
    frame = parse_frame(
        '{"type":"res","id":"x","ok":false,"error":{"code":"UNAVAILABLE","message":"gateway starting",'
        '"retryable":true,"retryAfterMs":500}}'
    )
    assert isinstance(frame, Response) and frame.error == ErrorShape(
        "UNAVAILABLE", "gateway starting", True, 500, {}
    )


def test_it_parses_a_request_with_no_params() -> None:
    assert parse_frame('{"type":"req","id":"1","method":"health"}') == Request(
        "1", "health", {}
    )


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[]",
        '{"type":"event"}',
        '{"type":"event","event":"x","seq":-1}',
        '{"type":"event","event":"x","seq":"3"}',
        '{"type":"res","id":1,"ok":true}',
        '{"type":"res","id":"1","ok":false}',
        '{"type":"res","id":"1","ok":false,"error":{"message":"no code"}}',
        '{"type":"req","id":"1","method":"x","params":[]}',
        '{"type":"hello"}',
        b"\xff\xfe",
    ],
)
def test_it_rejects_malformed_frames(raw: str | bytes) -> None:
    with pytest.raises(FrameError):
        parse_frame(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(deadline=None)  # timing varies on a busy 2-core machine; the property doesn't
@given(
    st.dictionaries(
        st.sampled_from(
            ["type", "id", "ok", "event", "payload", "seq", "error", "method", "params"]
        ),
        json_values,
    )
)
def test_it_never_raises_anything_but_frame_error(data: dict[str, object]) -> None:
    with contextlib.suppress(FrameError):
        parse_frame(json.dumps(data))


def test_it_reads_chat_text_from_v3_and_v4_shapes() -> None:
    assert chat_text({"role": "user", "content": "hi"}) == "hi"
    assert (
        chat_text(
            {
                "content": [
                    {"type": "text", "text": "a"},
                    {"type": "image"},
                    {"type": "text", "text": "b"},
                ]
            }
        )
        == "ab"
    )
    assert chat_text(None) == ""


def test_it_signs_a_connect_the_gateway_can_verify() -> None:
    key = DeviceKey.generate()
    device = key.sign_connect(
        client_id="gateway-client",
        client_mode="backend",
        role="operator",
        scopes=["operator.read", "operator.write"],
        signed_at=1795282391351,
        token="t0k",
        nonce="n-1",
        platform="Linux",
    )
    assert device["id"] == key.device_id and len(device["id"]) == 64
    assert "=" not in device["publicKey"] and "=" not in device["signature"]
    common: dict[str, Any] = {
        "client_id": "gateway-client",
        "client_mode": "backend",
        "role": "operator",
        "scopes": ["operator.read", "operator.write"],
        "platform": "linux",
    }
    assert verify_device_signature(device, token="t0k", **common)
    # Any change to what was signed breaks it.
    assert not verify_device_signature(device, token="other", **common)
    assert not verify_device_signature(
        {**device, "nonce": "n-2"}, token="t0k", **common
    )
    assert not verify_device_signature(
        {**device, "id": "0" * 64}, token="t0k", **common
    )


def test_it_round_trips_the_key_through_pem() -> None:
    key = DeviceKey.generate()
    again = DeviceKey.from_pem(key.to_pem())
    assert again.device_id == key.device_id
    assert again.fingerprint.count(":") == 15
