"""What chat's gateway event payloads say, read without a database or a template: the run an
event belongs to, a delta's text, a run's end, a tool card, a phase's words, a transcript
entry's identity. Shared by the relay (what it keeps and stores) and the consumer (what it
shows). Pure (the `chat-payloads-are-pure` import contract): its tests need no database.

Everything here comes from a gateway, so nothing is trusted: each reader checks types and
answers with a safe default."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fleet.gateway.protocol import chat_text

# A run's terminal `chat` states; the same strings are chat.models.Message.State values.
TERMINAL_STATES = frozenset({"final", "error", "aborted"})
# Agent streams a page shows; `assistant` duplicates the chat deltas and `usage` is kept
# by the relay for the stored message, so neither is forwarded.
FORWARDED_AGENT_STREAMS = frozenset(
    {"lifecycle", "run_status", "tool", "item", "error"}
)
RUN_FAILED = "The run failed."

PHASES = {
    "start": "Thinking…",
    "model": "Thinking…",
    "finishing": "Finishing…",
    "preparing_workspace": "Preparing the workspace…",
    "preparing_context": "Preparing the context…",
    "starting_model": "Starting the model…",
}


def text_or_empty(value: Any) -> str:
    return value if isinstance(value, str) else ""


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_uuid(value: Any) -> uuid.UUID | None:
    """Our own message ids (the idempotency key, so the run id of a run started here)."""
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        return None


# -- runs: `chat` and `agent` events ------------------------------------------------------


@dataclass(frozen=True)
class RunRef:
    run_id: str
    session_key: str


def run_ref(payload: Any) -> RunRef | None:
    """The run and session a `chat`/`agent`/`session.tool` event is about, if it says."""
    if not isinstance(payload, dict):
        return None
    run_id, key = payload.get("runId"), payload.get("sessionKey")
    if not isinstance(run_id, str) or not run_id or not isinstance(key, str):
        return None
    return RunRef(run_id, key)


def delta_text(payload: dict[str, Any]) -> str | None:
    """The text a `chat` delta adds (protocol 4's `deltaText`), or None when it carries the
    cumulative text instead (protocol 3: see `cumulative_text`)."""
    delta = payload.get("deltaText")
    return delta if isinstance(delta, str) else None


def cumulative_text(payload: dict[str, Any]) -> str:
    """All text of the reply so far, as a protocol 3 delta (or a run's end) carries it."""
    return chat_text(payload.get("message"))


@dataclass(frozen=True)
class RunEnd:
    """What a terminal `chat` event says of the run's reply; empty fields are unknown (the
    relay then keeps what the run's deltas and agent events brought)."""

    state: str
    text: str
    error: str
    model: str
    usage: dict[str, Any] | None


def run_end(payload: dict[str, Any]) -> RunEnd | None:
    """The end of a run, or None when the event is not one."""
    state = payload.get("state")
    if not isinstance(state, str) or state not in TERMINAL_STATES:
        return None
    message = payload.get("message")
    error = ""
    if state == "error":
        error = str(payload.get("errorMessage") or RUN_FAILED)
    usage = payload.get("usage")
    model = message.get("model") if isinstance(message, dict) else None
    return RunEnd(
        state=str(state),
        text=chat_text(message),
        error=error,
        model=model if isinstance(model, str) else "",
        usage=usage if isinstance(usage, dict) and usage else None,
    )


@dataclass(frozen=True)
class Lifecycle:
    phase: str
    started_at_ms: int | None
    model: str


def lifecycle(data: dict[str, Any]) -> Lifecycle:
    """An agent `lifecycle` (or `run_status`) event's data: its phase, start and model."""
    started = data.get("startedAt")
    model = data.get("model")
    return Lifecycle(
        phase=text_or_empty(data.get("phase")),
        started_at_ms=started
        if isinstance(started, int) and not isinstance(started, bool)
        else None,
        model=model if isinstance(model, str) else "",
    )


def usage_numbers(data: dict[str, Any]) -> dict[str, int | float]:
    """The numbers of an agent `usage` event (token counts, cost)."""
    return {
        k: v
        for k, v in data.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def tool_card(data: dict[str, Any]) -> dict[str, Any]:
    """The part of a `tool` agent event a card shows (kept by the relay on the stored
    reply, drawn live by the consumer)."""
    card: dict[str, Any] = {
        "id": str(data.get("toolCallId") or data.get("name") or "tool")[:200],
        "name": str(data.get("name") or "tool")[:200],
        "phase": str(data.get("phase") or ""),
    }
    for key in ("args", "partialResult", "result", "meta"):
        if key in data and data[key] is not None:
            card[key] = data[key]
    card["isError"] = data.get("isError") is True
    return card


def phase_text(phase: Any) -> str:
    """The run bar's words for a run's phase."""
    if not isinstance(phase, str) or not phase:
        return "Working…"
    return PHASES.get(phase) or phase.replace("_", " ").capitalize() + "…"


def ends_run(data: dict[str, Any]) -> bool:
    """A lifecycle event that ends the run: its stored message follows, the bar waits."""
    return data.get("phase") in ("end", "error")


# -- transcript entries: `session.message` and `chat.history` ----------------------------


def entry_meta(message: dict[str, Any]) -> dict[str, Any]:
    """The gateway's own fields of a transcript entry (`__openclaw`: id, seq, runId...)."""
    return as_dict(message.get("__openclaw"))


def entry_identity(
    payload: dict[str, Any], message: dict[str, Any]
) -> tuple[str, int | None]:
    """A transcript entry's gateway message id and seq, from the event or the entry."""
    meta = entry_meta(message)
    mid = text_or_empty(payload.get("messageId")) or text_or_empty(meta.get("id"))
    seq = payload.get("messageSeq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        meta_seq = meta.get("seq")
        seq = (
            meta_seq
            if isinstance(meta_seq, int) and not isinstance(meta_seq, bool)
            else None
        )
    return mid, seq


def entry_usage(message: dict[str, Any]) -> dict[str, Any]:
    return as_dict(message.get("usage"))


def entry_timestamp(message: dict[str, Any]) -> datetime | None:
    """When the gateway says the entry was written (milliseconds since the epoch)."""
    ts = message.get("timestamp")
    if isinstance(ts, int | float) and not isinstance(ts, bool) and ts > 0:
        try:
            return datetime.fromtimestamp(ts / 1000, tz=UTC)
        except (OverflowError, OSError, ValueError):
            return None
    return None
