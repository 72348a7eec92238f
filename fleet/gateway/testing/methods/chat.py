"""Chat and agent runs: chat.history, chat.send, chat.abort, agent, agent.wait (the runs
themselves are runs.py's)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fleet.gateway.testing import data
from fleet.gateway.testing.core import (
    DEFERRED,
    READ,
    WRITE,
    Conn,
    Ctx,
    invalid,
    method,
    now_ms,
)
from fleet.gateway.testing.runs import Runs
from fleet.gateway.testing.schema import ARR, BOOL, INT, NE, OBJ, Field, S, Schema

_AGENT_OPTIONAL = (
    "agentId",
    "sessionKey",
    "sessionId",
    "thinking",
    "to",
    "replyTo",
    "channel",
    "replyChannel",
    "accountId",
    "replyAccountId",
    "threadId",
    "groupId",
    "groupChannel",
    "groupSpace",
    "lane",
    "extraSystemPrompt",
    "bootstrapContextMode",
    "bootstrapContextRunKind",
    "label",
    "provider",
    "model",
)


class ChatMethods(Runs):
    """chat.history, chat.send, chat.abort, agent, agent.wait."""

    @method(
        "chat.history",
        READ,
        params=Schema(
            {
                "sessionKey": NE,
                "limit": Field("integer", minimum=1, maximum=1000),
                "maxChars": Field("integer", minimum=1),
            },
            ("sessionKey",),
        ),
    )
    def _m_history(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        key = self._resolve_key(str(p["sessionKey"]), None)[0]
        limit = int(p.get("limit", 200))
        s = self._sessions.get(key)
        messages = self._ensure_transcript(s) if s is not None else []
        page = messages[-limit:]
        out: dict[str, Any] = {"sessionKey": key}
        if s is not None:
            out["sessionId"] = s.row.get("sessionId")
        out["messages"] = page
        if self.protocol >= 4:
            out.update(
                pendingInputs={"items": [], "total": 0},
                hasMore=len(messages) > len(page),
                totalMessages=len(messages),
                defaults=self._list_defaults(),
            )
            if s is not None:
                out["sessionInfo"] = self._render_row(s.row)
        else:
            out["thinkingLevel"] = "off"
        return out

    @method(
        "chat.send",
        WRITE,
        params=Schema(
            {
                "sessionKey": NE,
                "message": S,
                "idempotencyKey": NE,
                "thinking": S,
                "deliver": BOOL,
                "attachments": ARR,
                "timeoutMs": Field("integer", minimum=0),
            },
            ("sessionKey", "message", "idempotencyKey"),
        ),
    )
    def _m_chat_send(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        key, agent = self._resolve_key(str(p["sessionKey"]), None)
        idem = str(p["idempotencyKey"])
        message = str(p.get("message", ""))
        existing = self._runs.get(idem)
        if existing is not None:
            if not existing.finished:
                return {"runId": idem, "status": "in_flight"}
            return {
                "runId": idem,
                "status": "error" if existing.status == "error" else "ok",
            }
        if not message.strip() and not p.get("attachments"):
            raise invalid("message or attachment required")
        if message.strip().lower() in ("/stop", "stop"):
            ids = [
                r.run_id
                for r in self._runs.values()
                if r.session_key == key and not r.finished
            ]
            ctx.after.extend(self._abort_session_runs(key, "stop"))
            return {"ok": True, "aborted": bool(ids), "runIds": ids}
        run = self._begin_run(
            key=key,
            agent_id=agent,
            message=message,
            kind="chat",
            conn=conn,
            rid=ctx.rid,
            run_id=idem,
        )
        ack: dict[str, Any] = {"runId": idem, "status": "started"}
        if self.protocol >= 4:
            ack["messageSeq"] = run.user_seq
        run.ack = ack
        return ack

    @method(
        "chat.abort",
        WRITE,
        params=Schema({"sessionKey": NE, "runId": S}, ("sessionKey",)),
    )
    def _m_chat_abort(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        key = self._resolve_key(str(p["sessionKey"]), None)[0]
        run_id = p.get("runId")
        if run_id:
            run = self._runs.get(str(run_id))
            if run is not None and run.session_key != key:
                raise invalid("runId does not match sessionKey")
            targets = [run] if run is not None and not run.finished else []
        else:
            targets = [
                r
                for r in self._runs.values()
                if r.session_key == key and not r.finished
            ]
        ids: list[str] = []
        for run in targets:
            emit = self._abort_run(run, "rpc")
            if emit is not None:
                ids.append(run.run_id)
                ctx.after.append(emit)
        return {"ok": True, "aborted": bool(ids), "runIds": ids}

    @method(
        "agent",
        WRITE,
        params=Schema(
            {
                "message": NE,
                "idempotencyKey": NE,
                "deliver": BOOL,
                "bestEffortDeliver": BOOL,
                "attachments": ARR,
                "timeout": INT,
                "internalEvents": ARR,
                "inputProvenance": OBJ,
                **dict.fromkeys(_AGENT_OPTIONAL, S),
            },
            ("message", "idempotencyKey"),
        ),
    )
    def _m_agent(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        idem = str(p["idempotencyKey"])
        existing = self._runs.get(idem)
        if existing is not None:
            if existing.finished and existing.final is not None:
                if existing.final_error is not None:
                    self._respond(conn, ctx.rid, existing.final, existing.final_error)
                    return DEFERRED
                return existing.final
            return existing.ack
        agent_id = p.get("agentId")
        if agent_id is not None and agent_id not in self._agent_ids:
            raise invalid(f'unknown agent id "{agent_id}"')
        if p.get("sessionKey"):
            key, agent = self._resolve_key(str(p["sessionKey"]), None)
            if agent_id is not None and agent_id != agent:
                raise invalid(
                    f'agent id "{agent_id}" does not match session key "{key}"'
                )
        else:
            agent = str(agent_id or self._default_agent)
            key = f"agent:{agent}:{data.MAIN_KEY}"
        run = self._begin_run(
            key=key,
            agent_id=agent,
            message=str(p["message"]),
            kind="agent",
            conn=conn,
            rid=ctx.rid,
            run_id=idem,
        )
        ack: dict[str, Any] = {
            "runId": idem,
            "status": "accepted",
            "acceptedAt": now_ms(),
        }
        if self.protocol >= 4:
            ack = {
                "runId": idem,
                "sessionKey": key,
                "agentId": agent,
                "status": "accepted",
                "acceptedAt": ack["acceptedAt"],
            }
        run.ack = ack
        return ack

    @method(
        "agent.wait",
        WRITE,
        params=Schema(
            {"runId": NE, "timeoutMs": Field("integer", minimum=0)}, ("runId",)
        ),
    )
    def _m_agent_wait(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        run_id = str(p["runId"])
        timeout = int(p.get("timeoutMs", 30000)) / 1000
        run = self._runs.get(run_id)
        if run is None:
            return {"runId": run_id, "status": "timeout"}
        if run.finished:
            return self._wait_result(run)

        async def wait() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.done.wait(), timeout)
            result = (
                self._wait_result(run)
                if run.finished
                else {"runId": run_id, "status": "timeout"}
            )
            self._respond(conn, ctx.rid, result)

        self._spawn(wait())
        return DEFERRED
