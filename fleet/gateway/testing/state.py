"""The simulator's state and the session store under it: the constructor (every option and
every table), the addresses, and the session rows and transcripts as the methods, the events
and the test controls read and change them."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Any

from fleet.gateway.protocol import ErrorShape, response_frame
from fleet.gateway.testing import data
from fleet.gateway.testing.core import (
    Conn,
    Device,
    MethodSpec,
    PairingHook,
    Run,
    Session,
    invalid,
    method_table,
    now_ms,
)

if TYPE_CHECKING:
    from fleet.gateway.testing.server import _Server


class GatewayState:
    """Options, tables and the session store (FakeGateway's docstring lists the options)."""

    def __init__(
        self,
        token: str,
        *,
        protocol: int = 4,
        agents: int = 2,
        sessions: int = 5,
        seed: int = 1,
        pairing: bool = False,
        tick_interval_ms: int = 30000,
        handshake_timeout: float = 15.0,
        delta_interval: float = 0.02,
        event_rate: float = 0.0,
        history: int = 2,
        reply: str = data.REPLY,
        host: str = "127.0.0.1",
        port: int = 0,
        on_pairing_request: PairingHook | None = None,
        tls_certfile: str = "",
        tls_keyfile: str = "",
    ) -> None:
        if protocol not in (3, 4):
            raise ValueError("protocol must be 3 or 4")
        if not token:
            raise ValueError("a gateway token is required")
        self.protocol = protocol
        self.seed = seed
        self.pairing = pairing
        self.tick_interval_ms = tick_interval_ms
        self.handshake_timeout = handshake_timeout
        self.delta_interval = delta_interval
        self.event_rate = event_rate
        self.history = history
        self.reply = reply
        self.host = host
        self.port = port
        self.on_pairing_request = on_pairing_request
        # TLS mode: both given, the one port serves wss:// and https:// with this pair.
        self.tls_certfile = tls_certfile
        self.tls_keyfile = tls_keyfile
        self.version = data.SERVER_VERSION[protocol]
        self.build_id = data.BUILD_ID
        self.boot_id = str(uuid.uuid4())
        self.ws_enabled = True
        self.ready = True
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.http_calls: list[tuple[str, str]] = []
        self.tool_calls: list[tuple[str, dict[str, Any]]] = []
        # method -> seconds to wait before answering it (a slow gateway)
        self.answer_delays: dict[str, float] = {}

        self._token = token
        self._agents = data.make_agents(agents)
        self._agent_ids = {a["id"] for a in self._agents}
        self._default_agent = self._agents[0]["id"]
        self._sessions: dict[str, Session] = {}
        self._order: list[Session] | None = None
        self._key_list: list[str] | None = None
        now = now_ms()

        def build(spec: data.SessionSpec) -> dict[str, Any]:
            return data.row_from_spec(spec, seed, now)

        for spec in data.make_session_specs(sessions, self._agents, seed, now):
            self._sessions[spec.key] = Session(
                spec.key, spec.agent_id, spec=spec, build=build, seeded=True
            )

        self._conns: dict[int, Conn] = {}
        self._conn_counter = 0
        self._global_seq = 0
        self._state_version = {"presence": 1, "health": 1}
        self._presence: dict[int, dict[str, Any]] = {}
        self._runs: dict[str, Run] = {}
        # exec approvals (methods/approvals.py): pending by id, the ledger, standing grants
        self._approvals: dict[str, dict[str, Any]] = {}
        self._approval_waiters: dict[str, asyncio.Future[str]] = {}
        self._approval_history: list[dict[str, Any]] = []
        self._approval_grants: list[dict[str, Any]] = []
        self.approval_timeout_ms = 30 * 60_000
        self._devices: dict[str, Device] = {}
        self._device_tokens: dict[str, Device] = {}
        self._pending: dict[str, dict[str, Any]] = {}
        self._pending_by_device: dict[str, str] = {}
        self._fail_connects = 0
        self._fail_retry_after_ms = 500
        self._rng = random.Random(seed ^ 0x5EED)
        self._methods: dict[str, MethodSpec] = method_table(self, protocol)

        self._server: _Server | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._background: list[asyncio.Task[None]] = []
        self._started_mono = time.monotonic()

    @property
    def token(self) -> str:
        return self._token

    @property
    def tls(self) -> bool:
        return bool(self.tls_certfile and self.tls_keyfile)

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{self._public_host()}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self._public_host()}:{self.port}"

    def _public_host(self) -> str:
        host = self.host
        if host in ("0.0.0.0", ""):
            return "127.0.0.1"
        if host == "::":
            return "[::1]"
        return f"[{host}]" if ":" in host else host

    @property
    def main_session_key(self) -> str:
        return f"agent:{self._default_agent}:{data.MAIN_KEY}"

    def _respond(
        self,
        conn: Conn,
        rid: str,
        payload: Any = None,
        error: ErrorShape | None = None,
    ) -> None:
        conn.push(response_frame(rid, payload, error))

    async def _wait_closed(self, conns: Iterable[Conn], timeout: float = 2.0) -> None:
        numbers = [c.number for c in conns]
        deadline = time.monotonic() + timeout
        while any(n in self._conns for n in numbers) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def runner() -> None:
            await coro

        task = asyncio.create_task(runner())
        self._background.append(task)
        task.add_done_callback(
            lambda t: self._background.remove(t) if t in self._background else None
        )

    def _resolve_key(self, raw: str, agent_hint: str | None) -> tuple[str, str]:
        """Canonical session key and its agent; unknown agents are refused."""
        key = raw.strip().lower()
        if not key:
            raise invalid("invalid session key")
        if key == data.MAIN_KEY:
            key = self.main_session_key
        elif not key.startswith("agent:"):
            key = f"agent:{agent_hint or self._default_agent}:{key}"
        parts = key.split(":", 2)
        if len(parts) < 3 or not parts[1] or not parts[2]:
            raise invalid(f"invalid session key: {raw}")
        if parts[1] not in self._agent_ids:
            raise invalid(f'unknown agent id "{parts[1]}"')
        return key, parts[1]

    def _get_or_create(self, key: str, agent_id: str) -> tuple[Session, bool]:
        s = self._sessions.get(key)
        if s is not None:
            return s, False
        row = data.session_row(
            key=key,
            agent_id=agent_id,
            session_id=str(uuid.uuid4()),
            now_ms=now_ms(),
        )
        s = Session(key, agent_id, materialized=row, transcript=[])
        self._sessions[key] = s
        self._invalidate(keys=True)
        return s, True

    def _touch(self, s: Session, when: int | None = None) -> None:
        now = when or now_ms()
        s.row["updatedAt"] = now
        s.row["lastActivityAt"] = now
        self._invalidate()

    def _invalidate(self, *, keys: bool = False) -> None:
        self._order = None
        if keys:
            self._key_list = None

    def _sorted_sessions(self) -> list[Session]:
        if self._order is None:
            self._order = sorted(
                self._sessions.values(), key=lambda s: s.updated_at, reverse=True
            )
        return self._order

    def _render_row(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.protocol >= 4:
            return row
        return {k: v for k, v in row.items() if k not in data.V4_ONLY_ROW_KEYS}

    def _entry(self, s: Session) -> dict[str, Any]:
        row = s.row
        keys = (
            "sessionId",
            "updatedAt",
            "systemSent",
            "abortedLastRun",
            "label",
            "displayName",
            "inputTokens",
            "outputTokens",
            "totalTokens",
            "totalTokensFresh",
            "modelProvider",
            "model",
            "thinkingLevel",
            "sessionStartedAt",
        )
        return {k: row[k] for k in keys if k in row}

    def _list_defaults(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "modelProvider": data.DEFAULT_PROVIDER,
            "model": data.DEFAULT_MODEL,
            "contextTokens": data.DEFAULT_CONTEXT,
        }
        if self.protocol >= 4:
            out.update(
                agentRuntime=data.AGENT_RUNTIME,
                thinkingLevels=data.THINKING_LEVELS,
                thinkingOptions=data.THINKING_OPTIONS,
                thinkingDefault="off",
                modelSelectionTarget="session",
            )
        return out

    def _sessions_list(self, p: dict[str, Any]) -> dict[str, Any]:
        rows = self._sorted_sessions()
        agent_id = p.get("agentId")
        search = str(p.get("search") or "").strip().lower()
        label = p.get("label")
        spawned_by = p.get("spawnedBy")
        active = p.get("activeMinutes")
        since = now_ms() - int(active) * 60_000 if active else None
        if agent_id or search or label is not None or spawned_by is not None or since:
            rows = [
                s
                for s in rows
                if (not agent_id or s.agent_id == agent_id)
                and (label is None or s.row.get("label") == label)
                and (spawned_by is None or s.row.get("spawnedBy") == spawned_by)
                and (since is None or s.updated_at >= since)
                and (not search or _matches(s.row, search))
            ]
        total = len(rows)
        v4 = self.protocol >= 4
        offset = int(p.get("offset", 0)) if v4 else 0
        limit_given = p.get("limit")
        limit = int(limit_given) if limit_given is not None else (100 if v4 else total)
        page = rows[offset : offset + limit]
        if v4:
            sessions = [s.row for s in page]
        else:
            keep_title = bool(p.get("includeDerivedTitles"))
            keep_last = bool(p.get("includeLastMessage"))
            sessions = []
            for s in page:
                row = self._render_row(s.row)
                if not keep_title:
                    row.pop("derivedTitle", None)
                if not keep_last:
                    row.pop("lastMessagePreview", None)
                sessions.append(row)
        out: dict[str, Any] = {
            "ts": now_ms(),
            "path": "(multiple)",
            "count": len(sessions),
        }
        if v4:
            more = offset + len(page) < total
            out.update(
                totalCount=total,
                limitApplied=limit,
                nextOffset=offset + len(page) if more else None,
                hasMore=more,
                owners=[data.CREATED_ACTOR],
            )
        out["defaults"] = self._list_defaults()
        out["sessions"] = sessions
        return out

    def _ensure_transcript(self, s: Session) -> list[dict[str, Any]]:
        if s.transcript is None:
            s.transcript = []
            if s.seeded and self.history > 0:
                topic = str(
                    s.row.get("derivedTitle") or s.row.get("displayName") or "this"
                )
                turns = data.seeded_history(self.seed, s.key, topic, self.history)
                end = int(s.row.get("updatedAt") or now_ms())
                step = 45_000
                start = end - step * len(turns)
                for i, (role, text) in enumerate(turns):
                    s.transcript.append(
                        self._make_message(
                            s, role, text, seq=s.next_seq, ts=start + i * step
                        )
                    )
                    s.next_seq += 1
        return s.transcript

    def _make_message(
        self,
        s: Session,
        role: str,
        text: str,
        *,
        seq: int,
        ts: int,
        run: Run | None = None,
        stop_reason: str = "stop",
        usage: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        v4 = self.protocol >= 4
        mid = str(uuid.uuid4()) if v4 else uuid.uuid4().hex[:8]
        meta: dict[str, Any] = {"id": mid, "seq": seq}
        msg: dict[str, Any]
        if role == "user":
            msg = {
                "role": "user",
                "content": text if v4 else [{"type": "text", "text": text}],
                "timestamp": ts,
            }
            if run is not None and v4 and run.kind != "external":
                msg["idempotencyKey"] = run.run_id
                meta.update(senderId=data.OWNER_ID, idempotencyKey=run.run_id)
        else:
            msg = {
                "role": "assistant",
                "content": [{"type": "text", "text": text}],
                "api": "openai-completions",
                "provider": s.row.get("modelProvider", data.DEFAULT_PROVIDER),
                "model": s.row.get("model", data.DEFAULT_MODEL),
                "usage": usage
                or {
                    "input": 0,
                    "output": 0,
                    "totalTokens": 0,
                    "cacheRead": 0,
                    "cacheWrite": 0,
                    "cost": {"total": 0},
                },
                "stopReason": stop_reason,
                "timestamp": ts,
                "responseId": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            }
        if run is not None:
            meta["runId"] = run.run_id
        msg["__openclaw"] = meta
        return msg

    def _add_message(
        self,
        s: Session,
        role: str,
        text: str,
        *,
        seq: int | None = None,
        run: Run | None = None,
        stop_reason: str = "stop",
        usage: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        transcript = self._ensure_transcript(s)
        if seq is None:
            seq = s.next_seq
            s.next_seq += 1
        msg = self._make_message(
            s,
            role,
            text,
            seq=seq,
            ts=now_ms(),
            run=run,
            stop_reason=stop_reason,
            usage=usage,
        )
        transcript.append(msg)
        s.row["lastMessagePreview"] = text[:120]
        return msg

    def _counts_by_agent(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self._sessions.values():
            counts[s.agent_id] = counts.get(s.agent_id, 0) + 1
        return counts

    def _sessions_path(self, agent_id: str) -> str:
        return f"{data.STATE_DIR}/agents/{agent_id}/sessions/sessions.json"

    def _recent(self, s: Session) -> dict[str, Any]:
        updated = s.updated_at
        return {"key": s.key, "updatedAt": updated, "age": max(0, now_ms() - updated)}


def _matches(row: dict[str, Any], needle: str) -> bool:
    for name in ("key", "label", "displayName", "derivedTitle"):
        value = row.get(name)
        if isinstance(value, str) and needle in value.lower():
            return True
    return False
