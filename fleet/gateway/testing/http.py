"""The HTTP side of the gateway's port: /healthz, /readyz, the Control UI page and
POST /tools/invoke (sessions_list, agents_list) behind the bearer token."""

from __future__ import annotations

import json
import secrets
from typing import Any

from fleet.gateway.testing import data
from fleet.gateway.testing.core import (
    MAX_TOOLS_BODY,
    Receive,
    Scope,
    Send,
    now_ms,
    record_call,
    scope_headers,
)
from fleet.gateway.testing.runs import Runs


class HttpSide(Runs):
    """The HTTP requests on the gateway's port."""

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = str(scope.get("method", "GET")).upper()
        path = str(scope.get("path", "/"))
        record_call(self.http_calls, (method, path))
        head = method == "HEAD"
        if path in ("/health", "/healthz") and method in ("GET", "HEAD"):
            await _send_json(send, 200, {"ok": True, "status": "live"}, head=head)
        elif path in ("/ready", "/readyz") and method in ("GET", "HEAD"):
            body = {
                "ready": self.ready,
                "failing": [] if self.ready else ["startup-sidecars"],
                "uptimeMs": self._uptime_ms(),
            }
            await _send_json(send, 200 if self.ready else 503, body, head=head)
        elif path == "/tools/invoke":
            await self._tools_invoke(scope, receive, send, method)
        elif path in ("/", "/index.html") and method in ("GET", "HEAD"):
            page = (
                '<!doctype html><html lang="en"><head><meta charset="UTF-8" />'
                "<title>OpenClaw Control (simulated)</title></head>"
                f"<body><p>Simulated OpenClaw gateway {self.version}, protocol {self.protocol}.</p>"
                "</body></html>"
            )
            await _send_text(send, 200, page, "text/html; charset=utf-8", head=head)
        else:
            await _send_text(send, 404, "Not Found", head=head)

    async def _tools_invoke(
        self, scope: Scope, receive: Receive, send: Send, method: str
    ) -> None:
        if method != "POST":
            await _send_text(send, 405, "Method Not Allowed")
            return
        auth = scope_headers(scope).get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            given.strip().encode(), self._token.encode()
        ):
            await _send_json(
                send,
                401,
                {"error": {"message": "Unauthorized", "type": "unauthorized"}},
            )
            return
        body = await _read_body(receive, MAX_TOOLS_BODY)
        if body is None:
            await _send_json(
                send,
                413,
                {
                    "ok": False,
                    "error": {
                        "type": "payload_too_large",
                        "message": "Payload too large",
                    },
                },
            )
            return
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            request = None
        if not isinstance(request, dict) or not isinstance(request.get("tool"), str):
            await _send_json(
                send,
                400,
                {
                    "ok": False,
                    "error": {"type": "invalid_request", "message": "tool is required"},
                },
            )
            return
        tool = str(request["tool"])
        raw_args = request.get("args")
        args: dict[str, Any] = raw_args if isinstance(raw_args, dict) else {}
        record_call(self.tool_calls, (tool, dict(args)))
        if tool == "sessions_list":
            details = self._tool_sessions_list(args)
        elif tool == "agents_list":
            details = {
                "requester": self._default_agent,
                "allowAny": False,
                "agents": [
                    {"id": a["id"], "configured": a["id"] != self._default_agent}
                    for a in self._agents
                ],
            }
        else:
            await _send_json(
                send,
                404,
                {
                    "ok": False,
                    "error": {
                        "type": "not_found",
                        "message": f"Tool not available: {tool}",
                    },
                },
            )
            return
        result = {
            "content": [{"type": "text", "text": json.dumps(details, indent=2)}],
            "details": details,
        }
        await _send_json(send, 200, {"ok": True, "result": result})

    def _tool_sessions_list(self, args: dict[str, Any]) -> dict[str, Any]:
        rows = self._sorted_sessions()
        active = args.get("activeMinutes")
        if isinstance(active, int) and active > 0:
            since = now_ms() - active * 60_000
            rows = [s for s in rows if s.updated_at >= since]
        kinds = args.get("kinds")
        limit = args.get("limit")
        out: list[dict[str, Any]] = []
        for s in rows:
            row = s.row
            if row.get("kind") == "group":
                kind = "group"
            elif row.get("classification") == "cron":
                kind = "cron"
            else:
                kind = "other"
            if isinstance(kinds, list) and kinds and kind not in kinds:
                continue
            item: dict[str, Any] = {
                "key": s.key,
                "kind": kind,
                "channel": row.get("channel"),
                "origin": {"provider": row.get("channel")},
                "displayName": row.get("displayName"),
                "deliveryContext": row.get("deliveryContext"),
                "updatedAt": row.get("updatedAt"),
                "sessionId": row.get("sessionId"),
                "model": row.get("model"),
                "contextTokens": row.get("contextTokens"),
                "estimatedCostUsd": row.get("estimatedCostUsd"),
                "status": row.get("status"),
                "startedAt": row.get("startedAt"),
                "endedAt": row.get("endedAt"),
                "runtimeMs": row.get("runtimeMs"),
                "systemSent": row.get("systemSent"),
                "abortedLastRun": row.get("abortedLastRun"),
                "lastChannel": row.get("lastChannel"),
                "transcriptPath": f"{data.STATE_DIR}/agents/{s.agent_id}/sessions/{row.get('sessionId')}.jsonl",
            }
            if row.get("label") is not None:
                item["label"] = row["label"]
            out.append(item)
            if isinstance(limit, int) and limit > 0 and len(out) >= limit:
                break
        return {"count": len(out), "sessions": out}


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunk = bytes(message.get("body") or b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send_json(send: Send, status: int, body: Any, *, head: bool = False) -> None:
    await _send_text(
        send, status, json.dumps(body), "application/json; charset=utf-8", head=head
    )


async def _send_text(
    send: Send,
    status: int,
    text: str,
    content_type: str = "text/plain; charset=utf-8",
    *,
    head: bool = False,
) -> None:
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body})
