"""Parsing what gateways report into model fields: session and agent rows (protocol 3 and
4 shapes, and the REST rows), `sessions.changed` payloads, timestamps and bounded numbers.

Pure functions: no database, no Django settings; tested without either."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

# Fields of a `sessions.changed` payload that describe the event, not the session row.
EVENT_META_KEYS = frozenset(
    {
        "sessionKey",
        "reason",
        "phase",
        "runId",
        "messageId",
        "messageSeq",
        "ts",
        "session",
        "ancestorSessions",
        "recipientProfileId",
    }
)


def row_hash(row: Mapping[str, Any]) -> str:
    return hashlib.blake2b(
        json.dumps(row, sort_keys=True, default=str).encode(), digest_size=16
    ).hexdigest()


def from_ms(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return None
    try:
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def bounded_str(row: Mapping[str, Any], *names: str, limit: int = 500) -> str:
    for name in names:
        value = row.get(name)
        if isinstance(value, str) and value:
            return value[:limit]
    return ""


def dict_of(row: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = row.get(name)
    return value if isinstance(value, dict) else {}


INT64 = 2**63 - 1


def bounded_int(row: Mapping[str, Any], name: str, limit: int = INT64) -> int | None:
    """A whole number the database column can hold, or None (JSON allows any size)."""
    value = row.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not -limit <= value <= limit:  # also false for NaN
        return None
    return int(value)


def agent_id_from_key(key: str) -> str:
    """`agent:<agentId>:<rest>` → agentId; other keys (`global`, `unknown`) have none."""
    parts = key.split(":", 2)
    return parts[1] if len(parts) >= 3 and parts[0] == "agent" else ""


def session_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """The model fields for one session row (protocol 3 and 4 shapes, and the REST rows)."""
    key = str(row.get("key", ""))
    origin = dict_of(row, "origin")
    delivery = dict_of(row, "deliveryContext")
    channel = bounded_str(row, "channel", "lastChannel", limit=100) or bounded_str(
        {**delivery, **origin}, "channel", "provider", "surface", limit=100
    )
    status = bounded_str(row, "status", limit=50)
    active = row.get("hasActiveRun")
    return {
        "key": key[:512],
        "agent_key": agent_id_from_key(key)[:200],
        "session_id": bounded_str(row, "sessionId", limit=200),
        "label": bounded_str(row, "label"),
        "display_name": bounded_str(row, "displayName", "derivedTitle", "subject"),
        "kind": bounded_str(row, "kind", limit=50),
        "channel": channel,
        "model": bounded_str(row, "model", limit=200),
        "model_provider": bounded_str(row, "modelProvider", limit=100),
        "input_tokens": bounded_int(row, "inputTokens"),
        "output_tokens": bounded_int(row, "outputTokens"),
        "total_tokens": bounded_int(row, "totalTokens"),
        "context_tokens": bounded_int(row, "contextTokens"),
        "status": status,
        "has_active_run": active if isinstance(active, bool) else status == "running",
        "updated_at": from_ms(row.get("updatedAt")),
    }


def agent_fields(row: Mapping[str, Any], default_id: str) -> dict[str, Any]:
    identity = dict_of(row, "identity")
    model = row.get("model")
    if isinstance(model, dict):
        model = model.get("primary")
    agent_id = str(row.get("id", ""))
    return {
        "agent_id": agent_id[:200],
        "name": bounded_str(row, "name", limit=200)
        or bounded_str(identity, "name", limit=200),
        "emoji": bounded_str(identity, "emoji", limit=32)
        or bounded_str(row, "emoji", limit=32),
        "identity": identity,
        "model": model[:200] if isinstance(model, str) else "",
        "is_default": agent_id == default_id,
    }


def session_event(payload: Any) -> tuple[str, str, dict[str, Any] | None, bool]:
    """("upsert", key, fields, merge), ("delete", key, None, False) or ("resync", ...)."""
    if not isinstance(payload, dict):
        return ("resync", "", None, False)
    key = payload.get("sessionKey")
    row = payload.get("session")
    if not isinstance(key, str) or not key:
        if isinstance(row, dict) and isinstance(row.get("key"), str):
            key = row["key"]
        else:
            return ("resync", "", None, False)
    if payload.get("reason") == "delete" and not isinstance(row, dict):
        return ("delete", key, None, False)
    if isinstance(row, dict):
        return ("upsert", key, {**row, "key": row.get("key") or key}, False)
    fields = {k: v for k, v in payload.items() if k not in EVENT_META_KEYS}
    fields["key"] = key
    return ("upsert", key, fields, True)
