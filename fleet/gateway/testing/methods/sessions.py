"""Session methods: sessions.list, the subscriptions (sessions.subscribe, .unsubscribe on
protocol 3, sessions.messages.subscribe/.unsubscribe) and the admin actions
(sessions.patch, .reset, .delete)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fleet.gateway.testing import data
from fleet.gateway.testing.core import (
    ADMIN,
    READ,
    Conn,
    Ctx,
    invalid,
    is_main_key,
    method,
    now_ms,
)
from fleet.gateway.testing.runs import Runs
from fleet.gateway.testing.schema import (
    BOOL,
    NANY,
    NE,
    NO_PARAMS,
    Field,
    S,
    Schema,
)


def _sessions_list_params(protocol: int) -> Schema:
    fields = {
        "limit": Field("integer", minimum=1),
        "activeMinutes": Field("integer", minimum=1),
        "includeGlobal": BOOL,
        "includeUnknown": BOOL,
        "includeDerivedTitles": BOOL,
        "includeLastMessage": BOOL,
        "label": S,
        "spawnedBy": S,
        "agentId": S,
        "search": S,
    }
    if protocol >= 4:
        fields["offset"] = Field("integer", minimum=0)
    return Schema(fields)


def _subscribe_params(protocol: int) -> Schema:
    """Protocol 4 subscribes with the list's params (and answers with the list)."""
    return _sessions_list_params(protocol) if protocol >= 4 else NO_PARAMS


_KEY = Schema({"key": NE}, ("key",))
_PATCH_FIELDS = (
    "label",
    "thinkingLevel",
    "fastMode",
    "verboseLevel",
    "traceLevel",
    "reasoningLevel",
    "responseUsage",
    "elevatedLevel",
    "execHost",
    "execSecurity",
    "execAsk",
    "execNode",
    "model",
    "spawnedBy",
    "spawnedWorkspaceDir",
    "spawnDepth",
    "subagentRole",
    "subagentControlScope",
    "sendPolicy",
    "groupActivation",
)


class SessionMethods(Runs):
    """sessions.*: the list, the subscriptions and the admin actions."""

    @method("sessions.list", READ, params=_sessions_list_params)
    def _m_sessions_list(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        return self._sessions_list(p)

    @method("sessions.subscribe", READ, params=_subscribe_params)
    def _m_subscribe(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        conn.subscribed = True
        out: dict[str, Any] = {"subscribed": True}
        if p:
            out["list"] = self._sessions_list(p)
        return out

    @method("sessions.unsubscribe", READ, protocols=(3,))
    def _m_unsubscribe(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        conn.subscribed = False
        return {"subscribed": False}

    @method("sessions.messages.subscribe", READ, params=_KEY)
    def _m_messages_subscribe(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        key = self._resolve_key(str(p["key"]), None)[0]
        conn.message_keys.add(key)
        return {"subscribed": True, "key": key}

    @method("sessions.messages.unsubscribe", READ, params=_KEY)
    def _m_messages_unsubscribe(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        key = self._resolve_key(str(p["key"]), None)[0]
        conn.message_keys.discard(key)
        return {"subscribed": False, "key": key}

    @method(
        "sessions.patch",
        ADMIN,
        params=Schema({"key": NE, **dict.fromkeys(_PATCH_FIELDS, NANY)}, ("key",)),
    )
    def _m_patch(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        key, agent = self._resolve_key(str(p["key"]), None)
        s, _ = self._get_or_create(key, agent)
        row = s.row
        for name, value in p.items():
            if name == "key":
                continue
            if name == "model":
                if value is None:
                    row["modelProvider"], row["model"] = (
                        data.DEFAULT_PROVIDER,
                        data.DEFAULT_MODEL,
                    )
                else:
                    provider, _, model = str(value).rpartition("/")
                    row["modelProvider"] = provider or row.get("modelProvider")
                    row["model"] = model
            elif value is None:
                row.pop(name, None)
            else:
                row[name] = value
        self._touch(s)
        ctx.after.append(lambda: self._emit_changed(s, reason="patch"))
        return {
            "ok": True,
            "path": self._sessions_path(s.agent_id),
            "key": key,
            "entry": self._entry(s),
            "resolved": {
                "modelProvider": row.get("modelProvider"),
                "model": row.get("model"),
            },
        }

    @method(
        "sessions.reset",
        ADMIN,
        params=Schema(
            {"key": NE, "reason": Field("string", enum=("new", "reset"))}, ("key",)
        ),
    )
    def _m_reset(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        key, agent = self._resolve_key(str(p["key"]), None)
        emits = self._abort_session_runs(key, "reset")
        s, created = self._get_or_create(key, agent)
        now = now_ms()
        s.row.update(
            sessionId=str(uuid.uuid4()),
            inputTokens=0,
            outputTokens=0,
            totalTokens=0,
            totalTokensFresh=True,
            estimatedCostUsd=0.0,
            systemSent=False,
            abortedLastRun=False,
            sessionStartedAt=now,
        )
        s.row.pop("lastMessagePreview", None)
        s.row.pop("lastRunId", None)
        s.transcript = []
        s.next_seq = 1
        self._touch(s, now)

        def after() -> None:
            for emit in emits:
                emit()
            self._emit_changed(s, reason="create" if created else "reset")

        ctx.after.append(after)
        return {
            "ok": True,
            "key": key,
            "entry": self._entry(s),
            "resolved": {
                "modelProvider": s.row.get("modelProvider"),
                "model": s.row.get("model"),
            },
        }

    @method(
        "sessions.delete",
        ADMIN,
        params=Schema(
            {"key": NE, "deleteTranscript": BOOL, "emitLifecycleHooks": BOOL},
            ("key",),
        ),
    )
    def _m_delete(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        key, _ = self._resolve_key(str(p["key"]), None)
        if is_main_key(key):
            raise invalid(f"Cannot delete the main session ({key}).")
        s = self._sessions.get(key)
        if s is None:
            return {"ok": True, "key": key, "deleted": False, "archived": []}
        emits = self._abort_session_runs(key, "delete")
        stamp = time.strftime("%Y-%m-%dT%H-%M-%S", time.gmtime())
        archived = (
            [
                f"{data.STATE_DIR}/agents/{s.agent_id}/sessions/{s.row['sessionId']}.jsonl.deleted.{stamp}Z"
            ]
            if p.get("deleteTranscript", True)
            else []
        )

        def after() -> None:
            for emit in emits:
                emit()
            self._delete_session(s, notify=True)

        ctx.after.append(after)
        return {"ok": True, "key": key, "deleted": True, "archived": archived}
