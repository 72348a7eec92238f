"""Event emission: broadcast events with their frame seq (per connection on protocol 4,
global on 3), targeted events, the session, message, agent, tool and chat events, presence and
health, and the background events (tick, and the demo's random activity)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable
from typing import Any

from fleet.gateway.protocol import event_frame
from fleet.gateway.testing import data
from fleet.gateway.testing.core import EVENT_LOOP, Conn, Run, Session, dumps, now_ms
from fleet.gateway.testing.state import GatewayState


class Events(GatewayState):
    """Every event the simulator sends."""

    def _broadcast(
        self,
        event: str,
        payload: Any,
        *,
        gate: bool = False,
        state_version: bool = False,
        targets: Iterable[Conn] | None = None,
    ) -> None:
        """A broadcast event with a frame seq (per connection on v4, global on v3)."""
        v4 = self.protocol >= 4
        pool = self._conns.values() if targets is None else targets
        conns = [
            c
            for c in pool
            if c.authed and not c.closing and (not (gate and v4) or c.reads)
        ]
        head = f'{{"type":"event","event":{dumps(event)},"payload":{dumps(payload)}'
        tail = ""
        if state_version:
            tail += f',"stateVersion":{dumps(self._state_version)}'
        if v4:
            tail += f',"recipientProfileId":"{data.OWNER_ID}"'
            for c in conns:
                c.seq += 1
                c.push(f'{head},"seq":{c.seq}{tail}}}')
        else:
            self._global_seq += 1
            text = f'{head},"seq":{self._global_seq}{tail}}}'
            for c in conns:
                c.push(text)

    def _targeted(self, conns: Iterable[Conn], event: str, payload: Any) -> None:
        """A targeted event: no frame seq."""
        text = event_frame(event, payload)
        for c in conns:
            c.push(text)

    def _subscribers(self) -> list[Conn]:
        return [
            c for c in self._conns.values() if c.authed and c.subscribed and c.reads
        ]

    def _emit_changed(
        self,
        s: Session,
        *,
        reason: str | None = None,
        phase: str | None = None,
        run_id: str | None = None,
    ) -> None:
        subs = self._subscribers()
        if not subs:
            return
        row = self._render_row(s.row)
        payload: dict[str, Any] = {k: v for k, v in row.items() if k != "key"}
        payload["sessionKey"] = s.key
        if self.protocol >= 4:
            payload["agentId"] = s.agent_id
        if reason is not None:
            payload["reason"] = reason
        if phase is not None:
            payload["phase"] = phase
        if run_id is not None:
            payload["runId"] = run_id
        payload["ts"] = now_ms()
        payload["session"] = row
        self._targeted(subs, "sessions.changed", payload)

    def _emit_message(self, s: Session, message: dict[str, Any]) -> None:
        targets = [
            c
            for c in self._conns.values()
            if c.authed and c.reads and (c.subscribed or s.key in c.message_keys)
        ]
        if not targets:
            return
        row = self._render_row(s.row)
        payload: dict[str, Any] = {k: v for k, v in row.items() if k != "key"}
        payload["sessionKey"] = s.key
        if self.protocol >= 4:
            payload["agentId"] = s.agent_id
        meta = message["__openclaw"]
        payload.update(
            message=message, messageId=meta["id"], messageSeq=meta["seq"], session=row
        )
        self._targeted(targets, "session.message", payload)

    def _agent_event(
        self, run: Run, stream: str, body: dict[str, Any], *, lifecycle: bool = False
    ) -> None:
        run.seq += 1
        payload: dict[str, Any] = {
            "runId": run.run_id,
            "stream": stream,
            "data": body,
            "sessionKey": run.session_key,
            "seq": run.seq,
            "ts": now_ms(),
        }
        if self.protocol >= 4:
            payload["agentId"] = run.agent_id
            payload["isHeartbeat"] = False
            if lifecycle:
                s = self._sessions.get(run.session_key)
                if s is not None:
                    payload["sessionId"] = s.row.get("sessionId")
        self._broadcast("agent", payload, gate=True)

    def _tool_event(self, run: Run, body: dict[str, Any]) -> None:
        """Tool frames are targeted (no frame seq): `agent` to the connections with the
        tool-events cap that run on this session, `session.tool` to subscribers."""
        run.seq += 1
        payload: dict[str, Any] = {
            "runId": run.run_id,
            "stream": "tool",
            "data": body,
            "sessionKey": run.session_key,
            "seq": run.seq,
            "ts": now_ms(),
        }
        if self.protocol >= 4:
            payload["agentId"] = run.agent_id
        runners = [
            c
            for c in self._conns.values()
            if c.authed
            and "tool-events" in c.caps
            and run.session_key in c.run_sessions
        ]
        self._targeted(runners, "agent", payload)
        self._targeted(self._subscribers(), "session.tool", payload)

    def _book_usage(
        self,
        s: Session,
        grow_in: int,
        grow_out: int,
        at_ms: int | None = None,
        *,
        run_id: str | None = None,
    ) -> float:
        """A run's usage recorded at its end, as 2026.9.6 does: the row's counters become
        that run's usage (not a running total; `totalTokens` is the context after it) and
        `lastRunId` names it; the usage is logged (what usage.cost, sessions.usage and the
        timeseries answer from). Returns the cost."""
        row = s.row
        cost = data.cost_of(str(row.get("model") or ""), grow_in, grow_out)
        row["inputTokens"], row["outputTokens"] = grow_in, grow_out
        row["totalTokens"] = grow_in + grow_out
        row["totalTokensFresh"] = True
        row["estimatedCostUsd"] = round(cost, 6)
        if run_id:
            row["lastRunId"] = run_id
        log: list[dict[str, Any]] = self.__dict__.setdefault("usage_log", [])
        log.append(
            {
                "ts": at_ms if at_ms is not None else now_ms(),
                "key": s.key,
                "agentId": s.agent_id,
                "model": row.get("model") or "",
                "provider": row.get("modelProvider") or "",
                "channel": row.get("lastChannel") or "",
                "input": grow_in,
                "output": grow_out,
                "cost": cost,
            }
        )
        if len(log) > 100_000:
            del log[:10_000]
        return cost

    def _chat_event(
        self, run: Run, state: str, *, message: bool = True, **extra: Any
    ) -> None:
        payload: dict[str, Any] = {"runId": run.run_id, "sessionKey": run.session_key}
        if self.protocol >= 4:
            payload["agentId"] = run.agent_id
        payload.update(seq=run.seq, state=state)
        payload.update(extra)
        if message:
            payload["message"] = {
                "role": "assistant",
                "content": [{"type": "text", "text": run.text}],
                "timestamp": now_ms(),
            }
        self._broadcast("chat", payload, gate=True)

    def _delete_session(self, s: Session, *, notify: bool) -> None:
        if self._sessions.get(s.key) is not s:
            return
        del self._sessions[s.key]
        self._invalidate(keys=True)
        if notify:
            subs = self._subscribers()
            ts = now_ms()
            payload: dict[str, Any] = {
                "sessionKey": s.key,
                "sessionId": s.row.get("sessionId"),
                "reason": "delete",
                "ts": ts,
            }
            if self.protocol >= 4:
                payload["agentId"] = s.agent_id
            self._targeted(subs, "sessions.changed", payload)
            self._targeted(subs, "sessions.changed", {"reason": "delete", "ts": ts})

    def _presence_entry(self, conn: Conn) -> dict[str, Any]:
        client = conn.client
        host = str(client.get("displayName") or client.get("id"))
        now = now_ms()
        entry: dict[str, Any] = {
            "host": host,
            "version": client.get("version"),
            "platform": client.get("platform"),
            "mode": client.get("mode"),
            "roles": [conn.role],
            "scopes": list(conn.scopes),
            "reason": "connect",
            "ts": now,
            "text": f"Node: {host} · mode {client.get('mode')}",
        }
        if client.get("instanceId"):
            entry["instanceId"] = client["instanceId"]
        if conn.device_id:
            entry["deviceId"] = conn.device_id
        if self.protocol >= 4:
            entry.update(clientId=client.get("id"), onlineSince=now)
        return entry

    def _presence_list(self) -> list[dict[str, Any]]:
        me = {
            "host": "openclaw-sim",
            "ip": "127.0.0.1",
            "version": self.version,
            "platform": "linux",
            "deviceFamily": "Linux",
            "mode": "gateway",
            "reason": "self",
            "instanceId": self.boot_id,
            "text": f"Gateway: openclaw-sim (127.0.0.1) · app {self.version} · mode gateway · reason self",
            "ts": now_ms(),
        }
        return [me, *self._presence.values()]

    def _prune_presence(self) -> None:
        gone = [n for n, e in self._presence.items() if e.get("reason") == "disconnect"]
        for n in gone[: max(0, len(self._presence) - 200)]:
            del self._presence[n]

    def _uptime_ms(self) -> int:
        return int((time.monotonic() - self._started_mono) * 1000)

    def _health_summary(self) -> dict[str, Any]:
        counts = self._counts_by_agent()
        rows = self._sorted_sessions()
        summary: dict[str, Any] = {
            "ok": True,
            "ts": now_ms(),
            "durationMs": 1,
            "channels": {},
            "channelOrder": [],
            "channelLabels": {},
            "heartbeatSeconds": 0,
            "defaultAgentId": self._default_agent,
            "agents": [
                {
                    "agentId": a["id"],
                    "isDefault": a["id"] == self._default_agent,
                    "heartbeat": {
                        "enabled": False,
                        "every": "disabled",
                        "everyMs": None,
                    },
                    "sessions": {
                        "path": self._sessions_path(a["id"]),
                        "count": counts.get(a["id"], 0),
                        "recent": [],
                    },
                }
                for a in self._agents
            ],
            "sessions": {
                "path": "(multiple)",
                "count": len(rows),
                "recent": [self._recent(s) for s in rows[:5]],
            },
        }
        if self.protocol >= 4:
            summary.update(
                plugins={"loaded": ["memory-core"], "errors": [], "unavailable": []},
                configReload={"hotReloadStatus": "active"},
                modelRuntime={"degraded": False, "pendingAgents": []},
                eventLoop=EVENT_LOOP,
            )
        return summary

    async def _tick_loop(self) -> None:
        interval = max(0.01, self.tick_interval_ms / 1000)
        while True:
            await asyncio.sleep(interval)
            self._broadcast("tick", {"ts": now_ms()})

    async def _activity_loop(self) -> None:
        period = 0.05 if self.event_rate >= 20 else 1.0 / self.event_rate
        per_period = self.event_rate * period
        owed = 0.0
        while True:
            await asyncio.sleep(period)
            owed += per_period
            while owed >= 1:
                owed -= 1
                self._random_activity()

    def _random_activity(self) -> None:
        """A background update so a demo fleet looks alive: tokens grow, status flips."""
        if not self._sessions:
            return
        if self._key_list is None:
            self._key_list = list(self._sessions)
        s = self._sessions.get(self._rng.choice(self._key_list))
        if s is None:
            return
        row, rng, now = s.row, self._rng, now_ms()
        if any(not str(i).startswith("bg-") for i in row.get("activeRunIds") or []):
            return  # a real run owns this row
        grow_in, grow_out = rng.randrange(50, 2000), rng.randrange(20, 800)
        ended: str | None = None
        if row.get("status") == "running":
            started = int(row.get("startedAt") or now)
            ids = [str(i) for i in row.get("activeRunIds") or []]
            row.update(
                status="done",
                endedAt=now,
                runtimeMs=max(0, now - started),
                hasActiveRun=False,
                activeRunIds=[],
                unread=True,
            )
            phase, run_id = "end", (ids[0] if ids else None)
            ended = run_id
        elif rng.random() < 0.35:
            run_id = f"bg-{uuid.UUID(int=rng.getrandbits(128), version=4)}"
            row.update(
                status="running",
                startedAt=now,
                endedAt=None,
                runtimeMs=None,
                hasActiveRun=True,
                activeRunIds=[run_id],
            )
            row.pop("lastRunId", None)  # absent while a run is under way
            phase = "start"
        else:
            # A quick run that started and ended between two updates.
            phase, run_id = "message", None
            ended = f"bg-{uuid.UUID(int=rng.getrandbits(128), version=4)}"
        if ended:
            self._book_usage(s, grow_in, grow_out, now, run_id=ended)
        self._touch(s, now)
        self._emit_changed(s, phase=phase, run_id=run_id)
