"""A faithful stand-in for a real OpenClaw gateway: HTTP and WebSocket on one port, protocol 4
(2026.9.6) by default or protocol 3 (2026.4.12), shaped after frames recorded from the real
gateways.

It is a plain asyncio component: uvicorn serves a raw ASGI app inside the caller's loop.

    async with FakeGateway(token="t", agents=3, sessions=20) as sim:
        ...  # connect to sim.url, probe sim.http_url, drive it with the test hooks

Every outgoing frame goes through one queue per connection, so event `seq` numbers are
assigned in the order frames hit the wire.

This module is the server and its lifecycle: listening, the ASGI entry, each WebSocket's
reader and writer, and the routing of frames to the handshake or to a method. The rest sits
beside it: state.py (options, tables, the session store), events.py, runs.py, handshake.py,
methods/ (one module per method family), http.py and controls.py (the test controls).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import uvicorn

from fleet.gateway.protocol import (
    CLOSE_AUTH_CHANGED,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    ErrorShape,
    FrameError,
    Request,
    event_frame,
    parse_frame,
)
from fleet.gateway.testing.controls import GatewayControls
from fleet.gateway.testing.core import (
    DEFERRED,
    MAX_PAYLOAD,
    Close,
    Conn,
    Ctx,
    Receive,
    Refusal,
    RpcError,
    Scope,
    Send,
    invalid,
    now_ms,
    record_call,
    scope_headers,
)
from fleet.gateway.testing.http import HttpSide
from fleet.gateway.testing.methods.agents import AgentMethods
from fleet.gateway.testing.methods.approvals import ApprovalMethods
from fleet.gateway.testing.methods.chat import ChatMethods
from fleet.gateway.testing.methods.cron import CronMethods
from fleet.gateway.testing.methods.sessions import SessionMethods
from fleet.gateway.testing.methods.system import SystemMethods
from fleet.gateway.testing.methods.usage import UsageMethods
from fleet.gateway.testing.schema import check

log = logging.getLogger(__name__)

MAX_PREAUTH = 64 * 1024
# uvicorn's websockets implementation, as the project chose it (see pyproject).
WS_IMPLEMENTATION = "websockets"


class _Server(uvicorn.Server):
    """uvicorn without its signal capture (the caller owns signals) and without the
    0.1 s polling main loop."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.exit_event = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def main_loop(self) -> None:
        await self.exit_event.wait()


class FakeGateway(
    SystemMethods,
    AgentMethods,
    SessionMethods,
    ChatMethods,
    ApprovalMethods,
    CronMethods,
    UsageMethods,
    GatewayControls,
    HttpSide,
):
    """A simulated OpenClaw gateway (tests/test_simulator.py shows every feature in use).

    Its bases: one class per method family (methods/), the test controls (controls.py, over
    the handshake) and the HTTP side, all over the shared core (state, events, runs).

    Options: token, protocol (4 or 3), agents (first is "main"), sessions (first is
    agent:main:main; ids deterministic per seed), seed, pairing, tick_interval_ms,
    handshake_timeout (s), delta_interval (s between reply chunks), event_rate (background
    sessions.changed per second), history (seeded question/answer pairs per seeded session),
    reply (the default reply text), host, port, on_pairing_request(request_dict),
    tls_certfile and tls_keyfile (PEM files: serve wss:// and https:// instead).

    Lifecycle: `await start(host, port)` (port 0: a free one), `await stop()`, or
    `async with`. Then: port, url, http_url, running, version, build_id.

    State: connections (open sockets), clients (handshaken), calls [(method, params)],
    answer_delays {method: seconds} (settable: answer that method late, a slow gateway),
    http_calls [(method, path)], tool_calls [(tool, args)], pending_requests, agent_ids,
    main_session_key, session_keys(), session(key), transcript(key), active_runs(),
    ws_enabled (False: upgrades get HTTP 503), ready (False: /readyz 503).

    Hooks: set_token(new), fail_next_connects(n, retry_after_ms), approve(request_id),
    reject(request_id), device_token_of(device_id), rotate_device_token(device_id),
    revoke_device_token(device_id), remove_device(device_id), set_device_scopes(device_id,
    scopes) (with pairing on, a connect asking for more is a "scope-upgrade" request),
    add_session(...), remove_session(key), start_external_run(key, text);
    async: emit_session_changed(key, reason=, phase=, **row), emit_rowless_sessions_changed(),
    skip_seq(n), send_raw(text), shutdown(restart_expected_ms), close_all(code, reason),
    wait_connections(n).
    """

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self, host: str | None = None, port: int | None = None) -> None:
        """Listen (port 0 picks a free port) and return once connections are accepted."""
        if self._server is not None:
            raise RuntimeError("the simulator is already running")
        self.host = host or self.host
        wanted = self.port if port is None else port
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, wanted), family=family, backlog=1024)
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self._asgi,
            host=self.host,
            port=self.port,
            log_level="warning",
            log_config=None,
            access_log=False,
            ws=WS_IMPLEMENTATION,
            ws_max_size=MAX_PAYLOAD,
            ws_ping_interval=None,
            ws_per_message_deflate=False,
            lifespan="off",
            interface="asgi3",
            proxy_headers=False,
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=2,
            ssl_certfile=self.tls_certfile or None,
            ssl_keyfile=self.tls_keyfile or None,
        )
        with warnings.catch_warnings():
            # uvicorn's "websockets" implementation sits on websockets.legacy.
            warnings.simplefilter("ignore")
            config.load()
        # ...which also warns on every connection; only that one message is silenced.
        warnings.filterwarnings(
            "ignore",
            message="remove second argument of ws_handler",
            category=DeprecationWarning,
            module=r"websockets\.legacy\.server",
        )
        server = _Server(config)
        self._server = server
        self._started_mono = time.monotonic()
        self._serve_task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if self._serve_task.done():
                self._server = None
                sock.close()
                exc = self._serve_task.exception()
                raise RuntimeError(f"the simulator failed to start: {exc!r}")
            await asyncio.sleep(0.002)
        self._background.append(asyncio.create_task(self._tick_loop()))
        if self.event_rate > 0:
            self._background.append(asyncio.create_task(self._activity_loop()))

    async def stop(self) -> None:
        """Close every socket (shutdown event + 1012) and stop listening."""
        server, task = self._server, self._serve_task
        if server is None or task is None:
            return
        background, self._background = list(self._background), []
        for bg in background:
            bg.cancel()
        for bg in background:
            with contextlib.suppress(asyncio.CancelledError):
                await bg
        await self.shutdown(reason="gateway stopping")
        await self._cancel_run_tasks()
        server.should_exit = True
        server.exit_event.set()
        try:
            await asyncio.wait_for(task, timeout=5)
        except Exception:  # pragma: no cover
            log.warning("the simulator did not stop cleanly", exc_info=True)
        self._server = None
        self._serve_task = None

    async def __aenter__(self) -> FakeGateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = await receive()
        if first["type"] != "websocket.connect":
            return
        if not self.ws_enabled:
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": 503,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                }
            )
            await send(
                {"type": "websocket.http.response.body", "body": b"Service Unavailable"}
            )
            return
        await send({"type": "websocket.accept"})
        headers = scope_headers(scope)
        self._conn_counter += 1
        conn = Conn(
            number=self._conn_counter,
            conn_id=str(uuid.uuid4()),
            nonce=str(uuid.uuid4()),
            challenge_ts=now_ms(),
            origin=headers.get("origin"),
        )
        self._conns[conn.number] = conn
        writer = asyncio.create_task(self._writer(conn, send))
        challenge: dict[str, Any] = {"nonce": conn.nonce, "ts": conn.challenge_ts}
        if self.protocol >= 4:
            challenge["capabilities"] = ["model-catalog-snapshot"]
        conn.push(event_frame("connect.challenge", challenge))
        conn.timer = asyncio.get_running_loop().call_later(
            self.handshake_timeout, self._handshake_expired, conn
        )
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    break
                if message["type"] != "websocket.receive" or conn.closing:
                    continue
                text = message.get("text")
                if text is None:
                    try:
                        text = bytes(message.get("bytes") or b"").decode()
                    except UnicodeDecodeError:
                        text = "\ufffd"
                self._on_text(conn, text)
        finally:
            if conn.timer is not None:
                conn.timer.cancel()
            self._drop(conn)
            if not writer.done():
                writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _writer(self, conn: Conn, send: Send) -> None:
        try:
            while True:
                item = await conn.queue.get()
                if isinstance(item, Close):
                    await send(
                        {
                            "type": "websocket.close",
                            "code": item.code,
                            "reason": item.reason,
                        }
                    )
                    return
                if isinstance(item, bytes):
                    await send({"type": "websocket.send", "bytes": item})
                else:
                    await send({"type": "websocket.send", "text": item})
        except asyncio.CancelledError:
            raise
        except Exception:  # the client went away mid-send
            conn.closing = True

    def _drop(self, conn: Conn) -> None:
        self._conns.pop(conn.number, None)
        was_authed = conn.authed
        conn.closing = True
        entry = self._presence.get(conn.number)
        if entry is not None:
            entry.update(reason="disconnect", ts=now_ms())
            self._state_version["presence"] += 1
            self._prune_presence()
            if was_authed:
                self._broadcast(
                    "presence", {"presence": self._presence_list()}, state_version=True
                )

    def _handshake_expired(self, conn: Conn) -> None:
        if not conn.authed:
            conn.close(CLOSE_NORMAL, "")

    def _on_text(self, conn: Conn, text: str) -> None:
        if not conn.authed:
            self._on_preauth(conn, text)
            return
        try:
            frame = parse_frame(text)
        except FrameError as exc:
            self._respond(
                conn,
                _frame_id(text),
                error=ErrorShape("INVALID_REQUEST", f"invalid request frame: {exc}"),
            )
            return
        if not isinstance(frame, Request):
            self._respond(
                conn,
                _frame_id(text),
                error=ErrorShape(
                    "INVALID_REQUEST", "invalid request frame: expected a req frame"
                ),
            )
            return
        record_call(self.calls, (frame.method, frame.params))
        if conn.auth_method == "token" and conn.shared_token != self._token:
            conn.close(CLOSE_AUTH_CHANGED, "gateway auth changed")
            return
        self._dispatch(conn, frame)

    def _on_preauth(self, conn: Conn, text: str) -> None:
        if len(text) > MAX_PREAUTH // 4 and len(text.encode()) > MAX_PREAUTH:
            conn.close(CLOSE_TOO_BIG, "preauth payload too large")
            return
        try:
            json.loads(text)
        except ValueError:
            conn.close(CLOSE_NORMAL, "")
            return
        try:
            frame = parse_frame(text)
        except FrameError:
            frame = None
        if not isinstance(frame, Request):
            self._refuse(conn, _frame_id(text), invalid("invalid request frame"))
            return
        record_call(self.calls, (frame.method, frame.params))
        if frame.method != "connect":
            self._refuse(
                conn,
                frame.id,
                invalid("invalid handshake: first request must be connect"),
            )
            return
        try:
            self._connect(conn, frame)
        except Refusal as refusal:
            self._refuse(conn, frame.id, refusal.error, refusal.code, refusal.reason)

    def _refuse(
        self,
        conn: Conn,
        rid: str,
        error: RpcError,
        code: int = CLOSE_POLICY,
        reason: str | None = None,
    ) -> None:
        self._respond(conn, rid, error=error.shape)
        conn.close(code, error.shape.message if reason is None else reason)

    def _dispatch(self, conn: Conn, req: Request) -> None:
        delay = self.answer_delays.get(req.method)
        if delay:
            asyncio.get_running_loop().call_later(delay, self._dispatch_now, conn, req)
            return
        self._dispatch_now(conn, req)

    def _dispatch_now(self, conn: Conn, req: Request) -> None:
        method = self._methods.get(req.method)
        if method is None:
            message = (
                "connect is only valid as the first request"
                if req.method == "connect"
                else f"unknown method: {req.method}"
            )
            self._respond(conn, req.id, error=ErrorShape("INVALID_REQUEST", message))
            return
        if method.scope is not None and not conn.has_scope(method.scope):
            self._respond(conn, req.id, error=self._missing_scope(method.scope))
            return
        errors = check(method.params, req.params)
        if errors:
            message = f"invalid {req.method} params: " + "; ".join(errors)
            self._respond(conn, req.id, error=ErrorShape("INVALID_REQUEST", message))
            return
        ctx = Ctx(req.id)
        try:
            payload = method.handler(conn, req.params, ctx)
        except RpcError as exc:
            self._respond(conn, req.id, error=exc.shape)
            return
        if payload is not DEFERRED:
            self._respond(conn, req.id, payload)
        for after in ctx.after:
            after()

    def _missing_scope(self, scope: str) -> ErrorShape:
        message = f"missing scope: {scope}"
        if self.protocol < 4:
            return ErrorShape("INVALID_REQUEST", message)
        return ErrorShape(
            "FORBIDDEN",
            message,
            details={
                "code": "MISSING_SCOPE",
                "missingScope": scope,
                "requiredScopes": [scope],
            },
        )


def _frame_id(text: str) -> str:
    try:
        value = json.loads(text)
    except ValueError:
        return "invalid"
    rid = value.get("id") if isinstance(value, dict) else None
    return rid if isinstance(rid, str) and rid else "invalid"
