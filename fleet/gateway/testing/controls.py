"""The test controls: what a test reads of the simulator's state and the hooks with which it
drives the simulator like an operator, another client or a failing gateway would."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import Iterable
from typing import Any

from fleet.gateway.protocol import (
    CLOSE_AUTH_CHANGED,
    CLOSE_NORMAL,
    CLOSE_SERVICE_RESTART,
)
from fleet.gateway.testing import data
from fleet.gateway.testing.core import Session, now_ms
from fleet.gateway.testing.handshake import Handshake


class GatewayControls(Handshake):
    """State for assertions and hooks for tests (FakeGateway's docstring lists them)."""

    @property
    def connections(self) -> int:
        """Open WebSocket connections (including those still in the handshake)."""
        return len(self._conns)

    @property
    def clients(self) -> int:
        """Connections that completed the handshake."""
        return sum(1 for c in self._conns.values() if c.authed and not c.closing)

    @property
    def pending_requests(self) -> list[dict[str, Any]]:
        """Pairing requests waiting for `approve` (copies)."""
        return [dict(r) for r in self._pending.values()]

    @property
    def agent_ids(self) -> list[str]:
        return [a["id"] for a in self._agents]

    def session_keys(self) -> list[str]:
        """Session keys, most recently updated first."""
        return [s.key for s in self._sorted_sessions()]

    def session(self, key: str) -> dict[str, Any] | None:
        """A copy of a session row as the current protocol shows it (None if absent)."""
        s = self._sessions.get(key)
        return dict(self._render_row(s.row)) if s else None

    def usage_total(self, key: str) -> float:
        """The session's cost in all, as its usage log adds it up (what the timeseries'
        cumulativeCost and sessions.usage say): the row's counters are its last run's."""
        log: list[dict[str, Any]] = self.__dict__.get("usage_log", [])
        total = sum(round(float(e["cost"]), 6) for e in log if e["key"] == key)
        return round(total, 6)

    def transcript(self, key: str) -> list[dict[str, Any]]:
        s = self._sessions.get(key)
        if s is None:
            return []
        return list(self._ensure_transcript(s))

    def active_runs(self) -> list[str]:
        return [r.run_id for r in self._runs.values() if not r.finished]

    def set_token(self, new_token: str) -> None:
        """Rotate the shared token: sockets that authenticated with the old one are closed
        with 4001 "gateway auth changed" on their next request."""
        if not new_token:
            raise ValueError("a gateway token is required")
        self._token = new_token

    def fail_next_connects(self, n: int, retry_after_ms: int = 500) -> None:
        """Answer the next `n` connects like a gateway that is still starting (close 1013)."""
        self._fail_connects = n
        self._fail_retry_after_ms = retry_after_ms

    def approve(self, request_id: str) -> None:
        """Approve a pending pairing request (`openclaw devices approve <requestId>`)."""
        req = self._pending.pop(request_id, None)
        if req is None:
            raise KeyError(f"no pending pairing request {request_id!r}")
        self._pending_by_device.pop(req["deviceId"], None)
        self._pair(req["deviceId"], req["publicKey"], req["role"], req["scopes"])
        self._broadcast_pairing(
            "device.pair.resolved",
            {
                "requestId": request_id,
                "deviceId": req["deviceId"],
                "decision": "approved",
                "ts": now_ms(),
            },
        )

    def reject(self, request_id: str) -> None:
        req = self._pending.pop(request_id, None)
        if req is None:
            raise KeyError(f"no pending pairing request {request_id!r}")
        self._pending_by_device.pop(req["deviceId"], None)
        self._broadcast_pairing(
            "device.pair.resolved",
            {
                "requestId": request_id,
                "deviceId": req["deviceId"],
                "decision": "rejected",
                "ts": now_ms(),
            },
        )

    def device_token_of(self, device_id: str) -> str:
        """The device token issued to a paired device ("" if none)."""
        record = self._devices.get(device_id)
        return record.token if record is not None else ""

    def rotate_device_token(self, device_id: str) -> str:
        """`openclaw devices rotate`: a new token; the device's sockets close with 4001."""
        record = self._devices[device_id]
        self._device_tokens.pop(record.token, None)
        record.token = secrets.token_urlsafe(32)
        record.issued_at = now_ms()
        self._device_tokens[record.token] = record
        self._disconnect_device(device_id)
        return record.token

    def revoke_device_token(self, device_id: str) -> None:
        """`openclaw devices revoke --role operator`: the token stops working and the device
        loses the role, so (with pairing on) its next connect is a "role-upgrade" request,
        as on the real gateway; sockets close with 4001 "device removed"."""
        record = self._devices[device_id]
        self._device_tokens.pop(record.token, None)
        record.token = secrets.token_urlsafe(32)
        record.role = ""
        self._disconnect_device(device_id)

    def remove_device(self, device_id: str) -> None:
        """`openclaw devices remove`: unpaired; the next connect needs a new approval."""
        record = self._devices.pop(device_id)
        self._device_tokens.pop(record.token, None)
        self._disconnect_device(device_id)

    def set_device_scopes(self, device_id: str, scopes: Iterable[str]) -> None:
        """Narrow an approved device's scopes (`openclaw devices rotate --scope ...`): a
        connect asking for more is then a scope upgrade that needs approval."""
        record = self._devices[device_id]
        record.scopes = tuple(sorted(set(scopes)))
        self._disconnect_device(device_id)

    def _disconnect_device(self, device_id: str) -> None:
        for conn in self._conns.values():
            if conn.device_id == device_id and conn.authed:
                conn.close(CLOSE_AUTH_CHANGED, "device removed")

    def add_session(
        self,
        key: str | None = None,
        *,
        agent_id: str | None = None,
        label: str | None = None,
        display_name: str | None = None,
        status: str | None = "done",
        kind: str = "direct",
        channel: str = "webchat",
        model: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        updated_at: int | None = None,
        notify: bool = True,
        **row_fields: Any,
    ) -> dict[str, Any]:
        """Add a session row (extra camelCase row fields may be given) and, with `notify`,
        tell subscribers (`sessions.changed` reason "create"). Returns the row."""
        agent = agent_id or self._default_agent
        if key is None:
            key = f"agent:{agent}:dashboard:{uuid.uuid4()}"
        key, agent = self._resolve_key(key, agent_id)
        if key in self._sessions:
            raise ValueError(f"session {key!r} exists")
        provider, model_id, context = data.MODELS[0]
        if model:
            provider, _, model_id = model.partition("/")
            context = next((m[2] for m in data.MODELS if m[1] == model_id), context)
        now = now_ms()
        row = data.session_row(
            key=key,
            agent_id=agent,
            session_id=str(uuid.uuid4()),
            now_ms=now,
            kind=kind,
            display_name=display_name,
            label=label,
            channel=channel,
            chat_type="group" if kind == "group" else "direct",
            provider=provider,
            model=model_id,
            context_tokens=context,
            updated_at=updated_at,
            status=status,
            ended_at=(updated_at or now) if status not in (None, "running") else None,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
        )
        row.update(row_fields)
        s = Session(key, agent, materialized=row, transcript=[])
        self._sessions[key] = s
        self._invalidate(keys=True)
        if notify:
            self._emit_changed(s, reason="create")
        return dict(self._render_row(row))

    def remove_session(self, key: str, *, notify: bool = True) -> bool:
        """Delete a session like `sessions.delete` (without the main-session guard)."""
        s = self._sessions.get(key)
        if s is None:
            return False
        for emit in self._abort_session_runs(key, "delete"):
            emit()
        self._delete_session(s, notify=notify)
        return True

    def start_external_run(self, session_key: str, text: str) -> str:
        """Start a run "elsewhere" (another client, a channel): it streams to every
        connection like any other run. Returns its runId."""
        key, agent = self._resolve_key(session_key, None)
        run = self._begin_run(
            key=key,
            agent_id=agent,
            message=text,
            kind="external",
            conn=None,
            rid=None,
            run_id=str(uuid.uuid4()),
        )
        return run.run_id

    async def emit_session_changed(
        self,
        key: str,
        *,
        reason: str | None = "update",
        phase: str | None = None,
        **row_changes: Any,
    ) -> dict[str, Any]:
        """Update a row (created if absent) and send `sessions.changed` with the full row to
        subscribers. `updatedAt` is bumped unless given. Returns the row."""
        canonical = self._resolve_key(key, None)[0]
        s = self._sessions.get(canonical)
        if s is None:
            self.add_session(canonical, notify=False)
            s = self._sessions[canonical]
        row_changes.setdefault("updatedAt", now_ms())
        s.row.update(row_changes)
        self._invalidate()
        self._emit_changed(s, reason=reason, phase=phase)
        return dict(self._render_row(s.row))

    async def emit_rowless_sessions_changed(self, reason: str = "delete") -> None:
        """A `sessions.changed` without a session row: "refresh the whole list"."""
        self._targeted(
            self._subscribers(), "sessions.changed", {"reason": reason, "ts": now_ms()}
        )

    async def skip_seq(self, n: int = 1, *, emit: bool = True) -> None:
        """The next broadcast event seq jumps by `n` (a gap, as if events were lost). With
        `emit` a `tick` follows at once, so clients see the gap now rather than at the next
        broadcast."""
        if self.protocol < 4:
            self._global_seq += n
        else:
            for c in self._conns.values():
                if c.authed:
                    c.seq += n
        if emit:
            self._broadcast("tick", {"ts": now_ms()})

    async def send_raw(self, text: str | bytes) -> None:
        """Send `text` as-is to every open connection (malformed-frame tests); bytes go
        as a binary frame."""
        for c in list(self._conns.values()):
            c.push(text)

    async def close_all(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        conns = list(self._conns.values())
        for c in conns:
            c.close(code, reason)
        await self._wait_closed(conns)

    async def shutdown(
        self, restart_expected_ms: int | None = None, *, reason: str | None = None
    ) -> None:
        """Like a gateway stop/restart: `shutdown` event, then close 1012 "service restart"
        on every socket. Runs in flight die. The sim keeps listening unless stopped."""
        text = reason or (
            "gateway restarting"
            if restart_expected_ms is not None
            else "gateway stopping"
        )
        self._broadcast(
            "shutdown", {"reason": text, "restartExpectedMs": restart_expected_ms}
        )
        conns = list(self._conns.values())
        for c in conns:
            c.close(CLOSE_SERVICE_RESTART, "service restart")
        self._kill_runs()
        await self._wait_closed(conns)

    async def wait_connections(
        self, n: int, timeout: float = 5.0, *, authed: bool = True
    ) -> None:
        """Wait until `clients` (or `connections`) equals `n`."""
        deadline = time.monotonic() + timeout
        while (self.clients if authed else self.connections) != n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"expected {n} connections, have {self.connections}")
            await asyncio.sleep(0.01)
