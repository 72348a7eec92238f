"""Frames of the OpenClaw gateway protocol (3 and 4), parsed strictly into small typed
objects. Anything that does not fit raises FrameError, so the caller can log it and go on."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MIN_PROTOCOL = 3
MAX_PROTOCOL = 4
CLIENT_ID = "gateway-client"
CLIENT_MODE = "backend"
ROLE = "operator"
SCOPES = ("operator.read", "operator.write", "operator.admin")

# Close codes the gateway uses (see the protocol notes).
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_SERVICE_RESTART = 1012
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_AUTH_CHANGED = 4001


class FrameError(ValueError):
    """A frame that is not valid JSON or not of the protocol's shape."""


@dataclass(frozen=True, slots=True)
class ErrorShape:
    code: str
    message: str
    retryable: bool = False
    retry_after_ms: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def detail_code(self) -> str:
        value = self.details.get("code")
        return value if isinstance(value, str) else ""

    @classmethod
    def parse(cls, data: Any) -> ErrorShape:
        if not isinstance(data, dict):
            raise FrameError("error is not an object")
        code = data.get("code")
        message = data.get("message", "")
        if not isinstance(code, str) or not isinstance(message, str):
            raise FrameError("error needs a string code and message")
        retry_after = data.get("retryAfterMs")
        if retry_after is not None and (
            not isinstance(retry_after, int | float) or retry_after < 0
        ):
            retry_after = None
        details = data.get("details")
        return cls(
            code=code,
            message=message,
            retryable=data.get("retryable") is True,
            retry_after_ms=int(retry_after) if retry_after is not None else None,
            details=details if isinstance(details, dict) else {},
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.retryable:
            out["retryable"] = True
        if self.retry_after_ms is not None:
            out["retryAfterMs"] = self.retry_after_ms
        if self.details:
            out["details"] = self.details
        return out


@dataclass(frozen=True, slots=True)
class Request:
    id: str
    method: str
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Response:
    id: str
    ok: bool
    payload: Any
    error: ErrorShape | None


@dataclass(frozen=True, slots=True)
class Event:
    event: str
    payload: Any
    seq: int | None


Frame = Request | Response | Event


def _no_constant(name: str) -> Any:
    # Python reads NaN and Infinity; JSON (and the gateway) has no such values, and the
    # database's JSON columns refuse them.
    raise ValueError(f"{name} is not a JSON value")


def _clean(value: Any) -> Any:
    """Strings the database can store: NUL (PostgreSQL text and jsonb cannot hold it) and
    lone surrogates (not UTF-8; a sender that cut a string inside an emoji leaves one)
    become U+FFFD."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            value = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    return value


def _needs_cleaning(raw: str | bytes) -> bool:
    """JSON carries NUL and lone surrogates only as escapes, so a frame without them is
    left alone (no walk for each delta). Binary frames, in any of the encodings json
    reads, are always cleaned."""
    if isinstance(raw, bytes):
        return True
    return "\\u0000" in raw or "\\ud" in raw or "\\uD" in raw


def parse_frame(raw: str | bytes) -> Frame:
    try:
        data = json.loads(raw, parse_constant=_no_constant)
        if _needs_cleaning(raw):
            data = _clean(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FrameError(f"not JSON: {exc}") from None
    except RecursionError:
        raise FrameError("not JSON we read: nested too deeply") from None
    if not isinstance(data, dict):
        raise FrameError("frame is not an object")
    kind = data.get("type")
    if kind == "event":
        name = data.get("event")
        if not isinstance(name, str) or not name:
            raise FrameError("event frame without an event name")
        seq = data.get("seq")
        if seq is not None and (
            not isinstance(seq, int) or isinstance(seq, bool) or seq < 0
        ):
            raise FrameError("event seq is not a non-negative integer")
        return Event(event=name, payload=data.get("payload"), seq=seq)
    if kind == "res":
        rid = data.get("id")
        ok = data.get("ok")
        if not isinstance(rid, str) or not isinstance(ok, bool):
            raise FrameError("response frame needs a string id and a boolean ok")
        error = None
        if not ok:
            error = ErrorShape.parse(data.get("error"))
        return Response(id=rid, ok=ok, payload=data.get("payload"), error=error)
    if kind == "req":
        rid = data.get("id")
        method = data.get("method")
        params = data.get("params", {})
        if not isinstance(rid, str) or not isinstance(method, str):
            raise FrameError("request frame needs a string id and method")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise FrameError("request params must be an object")
        return Request(id=rid, method=method, params=params)
    raise FrameError(f"unknown frame type {kind!r}")


def request_frame(rid: str, method: str, params: dict[str, Any]) -> str:
    return json.dumps({"type": "req", "id": rid, "method": method, "params": params})


def response_frame(
    rid: str, payload: Any = None, error: ErrorShape | None = None
) -> str:
    if error is None:
        return json.dumps({"type": "res", "id": rid, "ok": True, "payload": payload})
    frame: dict[str, Any] = {
        "type": "res",
        "id": rid,
        "ok": False,
        "error": error.to_dict(),
    }
    if payload is not None:
        frame["payload"] = payload
    return json.dumps(frame)


def event_frame(event: str, payload: Any, seq: int | None = None) -> str:
    frame: dict[str, Any] = {"type": "event", "event": event, "payload": payload}
    if seq is not None:
        frame["seq"] = seq
    return json.dumps(frame)


def chat_text(message: Any) -> str:
    """The text of a transcript or chat message: `content` is a string (v4 user messages)
    or a list of blocks of which the `text` ones count."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            block.get("text", "")
            for block in content
            if isinstance(block, dict) and block.get("type") == "text"
        ]
        return "".join(p for p in parts if isinstance(p, str))
    text = message.get("text")
    return text if isinstance(text, str) else ""
