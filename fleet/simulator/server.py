"""A faithful stand-in for a real OpenClaw gateway: HTTP and WebSocket on one port, protocol 4
(2026.9.6) by default or protocol 3 (2026.4.12), shaped after frames recorded from the real
gateways.

It is a plain asyncio component: uvicorn serves a raw ASGI app inside the caller's loop.

    async with FakeGateway(token="t", agents=3, sessions=20) as sim:
        ...  # connect to sim.url, probe sim.http_url, drive it with the test hooks

Every outgoing frame goes through one queue per connection, so event `seq` numbers are
assigned in the order frames hit the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import socket
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import uvicorn

from fleet.gateway.identity import verify_device_signature
from fleet.gateway.protocol import (
    CLOSE_AUTH_CHANGED,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_SERVICE_RESTART,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN_LATER,
    ErrorShape,
    FrameError,
    Request,
    event_frame,
    parse_frame,
    response_frame,
)
from fleet.simulator import data
from fleet.simulator.schema import check, connect_schema, method_schemas

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
PairingHook = Callable[[dict[str, Any]], None]

MAX_PAYLOAD = 25 * 1024 * 1024
MAX_BUFFERED = 50 * 1024 * 1024
MAX_PREAUTH = 64 * 1024
MAX_TOOLS_BODY = 2 * 1024 * 1024
SIGNATURE_SKEW_MS = 2 * 60 * 1000
MAX_RUNS_KEPT = 5000
READ, WRITE, ADMIN, PAIRING = (
    "operator.read",
    "operator.write",
    "operator.admin",
    "operator.pairing",
)
# uvicorn's websockets implementation, as the project chose it (see pyproject).
WS_IMPLEMENTATION = "websockets"

_V4_EVENTS = [
    "connect.challenge",
    "agent",
    "chat",
    "session.message",
    "session.tool",
    "sessions.changed",
    "presence",
    "tick",
    "shutdown",
    "health",
    "heartbeat",
    "cron",
    "task",
    "device.pair.requested",
    "device.pair.resolved",
    "update.available",
]
_V3_EVENTS = [e for e in _V4_EVENTS if e != "task"]
_TOKEN_MISSING = (
    "unauthorized: gateway token missing (paste in Control UI settings or "
    "openclaw doctor --generate-gateway-token; restart)"
)
_TOKEN_MISMATCH = {
    4: "unauthorized: gateway token mismatch (open the dashboard URL and paste the token in Control UI settings)",
    3: "unauthorized: gateway token mismatch (provide gateway auth token)",
}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _truncate(reason: str, limit: int = 120) -> str:
    raw = reason.encode()
    return raw[:limit].decode(errors="ignore") if len(raw) > limit else reason


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class RpcError(Exception):
    """A handler's refusal, answered as an error `res`."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        retryable: bool = False,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.shape = ErrorShape(
            code=code,
            message=message,
            retryable=retryable,
            retry_after_ms=retry_after_ms,
            details=details or {},
        )


def _invalid(message: str) -> RpcError:
    return RpcError("INVALID_REQUEST", message)


@dataclass(frozen=True, slots=True)
class _Close:
    code: int
    reason: str


@dataclass(eq=False)
class _Conn:
    """One WebSocket connection, before and after the handshake."""

    number: int
    conn_id: str
    nonce: str
    challenge_ts: int
    origin: str | None
    queue: asyncio.Queue[str | bytes | _Close] = field(default_factory=asyncio.Queue)
    timer: asyncio.TimerHandle | None = None
    authed: bool = False
    closing: bool = False
    seq: int = 0
    role: str = "operator"
    scopes: tuple[str, ...] = ()
    client: dict[str, Any] = field(default_factory=dict)
    caps: frozenset[str] = frozenset()
    device_id: str | None = None
    auth_method: str = ""
    shared_token: str | None = None
    subscribed: bool = False
    message_keys: set[str] = field(default_factory=set)
    run_sessions: set[str] = field(default_factory=set)
    connected_at: int = 0

    def push(self, text: str | bytes) -> None:
        if not self.closing:
            self.queue.put_nowait(text)

    def close(self, code: int, reason: str = "") -> None:
        if not self.closing:
            self.closing = True
            self.queue.put_nowait(_Close(code, _truncate(reason)))

    def has_scope(self, scope: str) -> bool:
        if ADMIN in self.scopes:
            return True
        if scope == READ:
            return READ in self.scopes or WRITE in self.scopes
        return scope in self.scopes

    @property
    def reads(self) -> bool:
        return self.has_scope(READ)


@dataclass(eq=False)
class _Session:
    """A session: its row (built lazily for seeded sessions) and its transcript."""

    key: str
    agent_id: str
    materialized: dict[str, Any] | None = None
    spec: data.SessionSpec | None = None
    build: Callable[[data.SessionSpec], dict[str, Any]] | None = None
    seeded: bool = False
    transcript: list[dict[str, Any]] | None = None  # None: not generated yet
    next_seq: int = 1

    @property
    def row(self) -> dict[str, Any]:
        if self.materialized is None:
            assert self.spec is not None and self.build is not None
            self.materialized = self.build(self.spec)
        return self.materialized

    @property
    def updated_at(self) -> int:
        if self.materialized is None and self.spec is not None:
            return self.spec.updated_at
        return int(self.row.get("updatedAt") or 0)


@dataclass(eq=False)
class _Run:
    run_id: str
    session_key: str
    agent_id: str
    message: str
    kind: str  # "chat", "agent" or "external"
    conn: _Conn | None
    request_id: str | None
    user_seq: int
    created: bool
    item_id: str
    status: str = "running"  # running, ok, error, aborted
    text: str = ""
    seq: int = 0
    started_at: int = 0
    ended_at: int | None = None
    error: str | None = None
    finished: bool = False
    ack: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] | None = None
    final_error: ErrorShape | None = None
    last_chat: float = 0.0
    chat_pending: bool = False
    task: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class _Device:
    device_id: str
    public_key: str
    role: str
    scopes: tuple[str, ...]
    token: str
    issued_at: int


@dataclass(eq=False)
class _Ctx:
    """Per-request context: `after` runs once the response is queued."""

    rid: str
    after: list[Callable[[], None]] = field(default_factory=list)


Handler = Callable[[_Conn, dict[str, Any], _Ctx], Any]
_DEFERRED = object()


@dataclass(frozen=True, slots=True)
class _Method:
    handler: Handler
    scope: str | None


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


class FakeGateway:
    """A simulated OpenClaw gateway (tests/test_simulator.py shows every feature in use).

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
    scopes) (with pairing on, a connect asking for more is a "scope-upgrade" request), add_session(...), remove_session(key), start_external_run(key, text);
    async: emit_session_changed(key, reason=, phase=, **row), emit_rowless_sessions_changed(),
    skip_seq(n), send_raw(text), shutdown(restart_expected_ms), close_all(code, reason),
    wait_connections(n).
    """

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
        self._sessions: dict[str, _Session] = {}
        self._order: list[_Session] | None = None
        self._key_list: list[str] | None = None
        now = _now_ms()

        def build(spec: data.SessionSpec) -> dict[str, Any]:
            return data.row_from_spec(spec, seed, now)

        for spec in data.make_session_specs(sessions, self._agents, seed, now):
            self._sessions[spec.key] = _Session(
                spec.key, spec.agent_id, spec=spec, build=build, seeded=True
            )

        self._conns: dict[int, _Conn] = {}
        self._conn_counter = 0
        self._global_seq = 0
        self._state_version = {"presence": 1, "health": 1}
        self._presence: dict[int, dict[str, Any]] = {}
        self._runs: dict[str, _Run] = {}
        self._devices: dict[str, _Device] = {}
        self._device_tokens: dict[str, _Device] = {}
        self._pending: dict[str, dict[str, Any]] = {}
        self._pending_by_device: dict[str, str] = {}
        self._fail_connects = 0
        self._fail_retry_after_ms = 500
        self._rng = random.Random(seed ^ 0x5EED)
        self._methods = self._method_table()
        self._schemas = method_schemas(protocol)

        self._server: _Server | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._background: list[asyncio.Task[None]] = []
        self._started_mono = time.monotonic()

    # ------------------------------------------------------------------ public API

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

    @property
    def running(self) -> bool:
        return self._server is not None

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

    @property
    def main_session_key(self) -> str:
        return f"agent:{self._default_agent}:{data.MAIN_KEY}"

    def session_keys(self) -> list[str]:
        """Session keys, most recently updated first."""
        return [s.key for s in self._sorted_sessions()]

    def session(self, key: str) -> dict[str, Any] | None:
        """A copy of a session row as the current protocol shows it (None if absent)."""
        s = self._sessions.get(key)
        return dict(self._render_row(s.row)) if s else None

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
                "ts": _now_ms(),
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
        record.issued_at = _now_ms()
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
                "ts": _now_ms(),
            },
        )

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
        now = _now_ms()
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
        s = _Session(key, agent, materialized=row, transcript=[])
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
        row_changes.setdefault("updatedAt", _now_ms())
        s.row.update(row_changes)
        self._invalidate()
        self._emit_changed(s, reason=reason, phase=phase)
        return dict(self._render_row(s.row))

    async def emit_rowless_sessions_changed(self, reason: str = "delete") -> None:
        """A `sessions.changed` without a session row: "refresh the whole list"."""
        self._targeted(
            self._subscribers(), "sessions.changed", {"reason": reason, "ts": _now_ms()}
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
            self._broadcast("tick", {"ts": _now_ms()})

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

    # ------------------------------------------------------------------ ASGI

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
        headers = _headers(scope)
        self._conn_counter += 1
        conn = _Conn(
            number=self._conn_counter,
            conn_id=str(uuid.uuid4()),
            nonce=str(uuid.uuid4()),
            challenge_ts=_now_ms(),
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

    async def _writer(self, conn: _Conn, send: Send) -> None:
        try:
            while True:
                item = await conn.queue.get()
                if isinstance(item, _Close):
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

    def _drop(self, conn: _Conn) -> None:
        self._conns.pop(conn.number, None)
        was_authed = conn.authed
        conn.closing = True
        entry = self._presence.get(conn.number)
        if entry is not None:
            entry.update(reason="disconnect", ts=_now_ms())
            self._state_version["presence"] += 1
            self._prune_presence()
            if was_authed:
                self._broadcast(
                    "presence", {"presence": self._presence_list()}, state_version=True
                )

    def _handshake_expired(self, conn: _Conn) -> None:
        if not conn.authed:
            conn.close(CLOSE_NORMAL, "")

    async def _wait_closed(self, conns: Iterable[_Conn], timeout: float = 2.0) -> None:
        numbers = [c.number for c in conns]
        deadline = time.monotonic() + timeout
        while any(n in self._conns for n in numbers) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    # ------------------------------------------------------------------ frames

    def _on_text(self, conn: _Conn, text: str) -> None:
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
        _record(self.calls, (frame.method, frame.params))
        if conn.auth_method == "token" and conn.shared_token != self._token:
            conn.close(CLOSE_AUTH_CHANGED, "gateway auth changed")
            return
        self._dispatch(conn, frame)

    def _on_preauth(self, conn: _Conn, text: str) -> None:
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
            self._refuse(conn, _frame_id(text), _invalid("invalid request frame"))
            return
        _record(self.calls, (frame.method, frame.params))
        if frame.method != "connect":
            self._refuse(
                conn,
                frame.id,
                _invalid("invalid handshake: first request must be connect"),
            )
            return
        try:
            self._connect(conn, frame)
        except _Refusal as refusal:
            self._refuse(conn, frame.id, refusal.error, refusal.code, refusal.reason)

    def _respond(
        self,
        conn: _Conn,
        rid: str,
        payload: Any = None,
        error: ErrorShape | None = None,
    ) -> None:
        conn.push(response_frame(rid, payload, error))

    def _refuse(
        self,
        conn: _Conn,
        rid: str,
        error: RpcError,
        code: int = CLOSE_POLICY,
        reason: str | None = None,
    ) -> None:
        self._respond(conn, rid, error=error.shape)
        conn.close(code, error.shape.message if reason is None else reason)

    # ------------------------------------------------------------------ handshake

    def _connect(self, conn: _Conn, req: Request) -> None:
        p = req.params
        errors = check(connect_schema(self.protocol), p)
        if errors:
            raise _Refusal(_invalid("invalid connect params: " + "; ".join(errors)))
        lo, hi = int(p["minProtocol"]), int(p["maxProtocol"])
        if not lo <= self.protocol <= hi:
            details: dict[str, Any] = {
                "code": "PROTOCOL_MISMATCH",
                "expectedProtocol": self.protocol,
            }
            if self.protocol >= 4:
                details.update(
                    clientMinProtocol=lo, clientMaxProtocol=hi, minimumProbeProtocol=3
                )
            raise _Refusal(
                RpcError("INVALID_REQUEST", "protocol mismatch", details=details),
                CLOSE_PROTOCOL_ERROR,
            )
        if self._fail_connects > 0:
            self._fail_connects -= 1
            raise _Refusal(
                RpcError(
                    "UNAVAILABLE",
                    "gateway starting; retry shortly",
                    retryable=True,
                    retry_after_ms=self._fail_retry_after_ms,
                    details={"reason": "startup-sidecars"},
                ),
                CLOSE_TRY_AGAIN_LATER,
                "gateway starting",
            )
        client: dict[str, Any] = p["client"]
        client_id, mode = str(client["id"]), str(client["mode"])
        role = str(p.get("role", "operator"))
        if role not in ("operator", "node"):
            raise _Refusal(_invalid("invalid role"))
        if (
            self.protocol >= 4
            and client_id == "openclaw-control-ui"
            and client.get("buildId") not in (self.build_id, "dev")
        ):
            raise _Refusal(
                RpcError(
                    "UNAVAILABLE",
                    "protocol mismatch: Control UI updated; reload this page to continue",
                    details={
                        "code": "PROTOCOL_MISMATCH",
                        "gatewayBuildId": self.build_id,
                        "reloadRequired": True,
                    },
                )
            )
        if conn.origin is not None and not _loopback_origin(conn.origin):
            raise _Refusal(
                RpcError(
                    "INVALID_REQUEST",
                    "origin not allowed (open the Control UI from the gateway host or allow it "
                    "in gateway.controlUi.allowedOrigins)",
                    details={
                        "code": "CONTROL_UI_ORIGIN_NOT_ALLOWED",
                        "reason": "origin not allowed",
                    },
                )
            )

        auth: dict[str, Any] = p.get("auth") or {}
        device: dict[str, Any] | None = p.get("device")
        token, device_token = auth.get("token"), auth.get("deviceToken")
        shared_ok = isinstance(token, str) and secrets.compare_digest(
            token.encode(), self._token.encode()
        )
        issued: _Device | None = None
        if not shared_ok:
            for candidate in (device_token, token):
                if candidate and candidate in self._device_tokens:
                    issued = self._device_tokens[candidate]
                    break
        if not shared_ok and issued is None:
            if device_token and not token:
                # A stale or revoked device token, as the real gateway answers it.
                raise _Refusal(
                    RpcError(
                        "INVALID_REQUEST",
                        "unauthorized: device token mismatch (rotate/reissue device token)",
                        details={
                            "code": "AUTH_DEVICE_TOKEN_MISMATCH",
                            "authReason": "device_token_mismatch",
                            "canRetryWithDeviceToken": False,
                            "recommendedNextStep": "update_auth_credentials",
                        },
                    )
                )
            self._auth_failure(bool(token or device_token or auth.get("password")))
        if (
            issued is not None
            and device is not None
            and device.get("id") != issued.device_id
        ):
            raise _Refusal(
                RpcError(
                    "INVALID_REQUEST",
                    "unauthorized: device token mismatch (rotate/reissue device token)",
                    details={
                        "code": "AUTH_DEVICE_TOKEN_MISMATCH",
                        "authReason": "device_token_mismatch",
                        "canRetryWithDeviceToken": False,
                        "recommendedNextStep": "update_auth_credentials",
                    },
                )
            )
        if device is None and issued is None and client_id == "openclaw-control-ui":
            raise _Refusal(
                RpcError(
                    "INVALID_REQUEST",
                    "control ui requires device identity (use HTTPS or localhost secure context)",
                    details={"code": "CONTROL_UI_DEVICE_IDENTITY_REQUIRED"},
                )
            )

        scopes = [str(s) for s in p.get("scopes") or []]
        record: _Device | None = issued
        if device is not None:
            self._verify_device(conn, device, client, role, scopes, auth)
            device_id = str(device["id"])
            record = self._devices.get(device_id)
            upgrade = ""
            if record is not None and self.pairing:
                if role != record.role:
                    upgrade = "role-upgrade"
                elif ADMIN not in record.scopes and not set(scopes) <= set(
                    record.scopes
                ):
                    upgrade = "scope-upgrade"
            if (record is None and self.pairing) or upgrade:
                reason = upgrade or "not-paired"
                request_id = self._request_pairing(
                    device, client, role, scopes, reason=reason
                )
                # Shaped like the real gateway's answer (2026.9.6, seen off loopback).
                raise _Refusal(
                    RpcError(
                        "NOT_PAIRED",
                        "pairing required: device is not approved yet"
                        if reason == "not-paired"
                        else f"pairing required: {reason}",
                        details={
                            "code": "PAIRING_REQUIRED",
                            "reason": reason,
                            "requestId": request_id,
                            "remediationHint": "Approve this device from the pending pairing requests.",
                            "deviceId": device_id,
                            "requestedRole": role,
                            "requestedScopes": list(scopes),
                        },
                    ),
                    CLOSE_POLICY,
                    "pairing required",
                )
            # Loopback auto-approval; a protocol-3 backend client skips pairing entirely.
            if (record is None or record.role != role) and not (
                self.protocol < 4 and (client_id, mode) == ("gateway-client", "backend")
            ):
                record = self._pair(device_id, str(device["publicKey"]), role, scopes)
        elif issued is not None:
            scopes = [s for s in scopes if s in issued.scopes or ADMIN in issued.scopes]
        elif self.protocol < 4 or conn.origin is not None or mode == "webchat":
            scopes = []  # a device-less operator keeps no scopes (v3; v4 with an Origin)

        conn.authed = True
        conn.role = role
        conn.scopes = tuple(scopes)
        conn.client = dict(client)
        conn.caps = frozenset(str(c) for c in p.get("caps") or [])
        conn.device_id = (
            str(device["id"])
            if device is not None
            else (issued.device_id if issued else None)
        )
        conn.auth_method = "token" if shared_ok else "device-token"
        conn.shared_token = self._token if shared_ok else None
        conn.connected_at = _now_ms()
        if conn.timer is not None:
            conn.timer.cancel()
        if mode != "cli":
            self._presence[conn.number] = self._presence_entry(conn)
            self._state_version["presence"] += 1
        self._respond(conn, req.id, self._hello(conn, record))
        # What a real gateway sends right after hello-ok.
        if self.protocol >= 4:
            self._broadcast(
                "presence", {"presence": self._presence_list()}, state_version=True
            )
            self._state_version["health"] += 1
            self._broadcast(
                "health", self._health_summary(), state_version=True, targets=[conn]
            )
        else:
            self._state_version["health"] += 1
            self._broadcast("health", self._health_summary(), state_version=True)

    def _auth_failure(self, token_given: bool) -> None:
        if not token_given:
            raise _Refusal(
                RpcError(
                    "INVALID_REQUEST",
                    _TOKEN_MISSING,
                    details={
                        "code": "AUTH_TOKEN_MISSING",
                        "authReason": "token_missing",
                        "canRetryWithDeviceToken": False,
                        "recommendedNextStep": "update_auth_configuration",
                    },
                )
            )
        v4 = self.protocol >= 4
        raise _Refusal(
            RpcError(
                "INVALID_REQUEST",
                _TOKEN_MISMATCH[4 if v4 else 3],
                details={
                    "code": "AUTH_TOKEN_MISMATCH",
                    "authReason": "token_mismatch",
                    "canRetryWithDeviceToken": v4,
                    "recommendedNextStep": "retry_with_device_token"
                    if v4
                    else "update_auth_credentials",
                },
            )
        )

    def _verify_device(
        self,
        conn: _Conn,
        device: dict[str, Any],
        client: dict[str, Any],
        role: str,
        scopes: list[str],
        auth: dict[str, Any],
    ) -> None:
        signed_token = (
            auth.get("token")
            or auth.get("deviceToken")
            or auth.get("bootstrapToken")
            or ""
        )
        ok = device.get("nonce") == conn.nonce and verify_device_signature(
            device,
            client_id=str(client["id"]),
            client_mode=str(client["mode"]),
            role=role,
            scopes=scopes,
            token=str(signed_token),
            platform=str(client.get("platform", "")),
            device_family=str(client.get("deviceFamily", "")),
        )
        if not ok:
            raise _Refusal(
                RpcError(
                    "INVALID_REQUEST",
                    "device signature invalid",
                    details={"code": "DEVICE_AUTH_SIGNATURE_INVALID"},
                )
            )
        if abs(_now_ms() - int(device["signedAt"])) > SIGNATURE_SKEW_MS:
            raise _Refusal(
                RpcError(
                    "INVALID_REQUEST",
                    "device signature expired",
                    details={"code": "DEVICE_AUTH_SIGNATURE_EXPIRED"},
                )
            )

    def _pair(
        self, device_id: str, public_key: str, role: str, scopes: Iterable[str]
    ) -> _Device:
        existing = self._devices.get(device_id)
        if existing is not None:
            if existing.role == role and set(scopes) <= set(existing.scopes):
                return existing
            if not existing.role and not self.pairing:
                existing.role = role  # loopback: silently re-approved
                self._device_tokens[existing.token] = existing
                return existing
            # An approved upgrade: the wider contract and a fresh token.
            self._device_tokens.pop(existing.token, None)
        record = _Device(
            device_id=device_id,
            public_key=public_key,
            role=role,
            scopes=tuple(sorted(set(scopes))),
            token=secrets.token_urlsafe(32),
            issued_at=_now_ms(),
        )
        self._devices[device_id] = record
        self._device_tokens[record.token] = record
        return record

    def _request_pairing(
        self,
        device: dict[str, Any],
        client: dict[str, Any],
        role: str,
        scopes: list[str],
        reason: str = "not-paired",
    ) -> str:
        device_id = str(device["id"])
        existing = self._pending_by_device.get(device_id)
        if existing is not None and self._pending[existing].get("reason") == reason:
            return existing  # a retry with the same details keeps its request id
        if existing is not None:
            self._pending.pop(existing, None)
        request_id = str(uuid.uuid4())
        req: dict[str, Any] = {
            "requestId": request_id,
            "deviceId": device_id,
            "publicKey": str(device["publicKey"]),
            "displayName": client.get("displayName"),
            "platform": client.get("platform"),
            "deviceFamily": client.get("deviceFamily"),
            "clientId": client.get("id"),
            "clientMode": client.get("mode"),
            "role": role,
            "roles": [role],
            "scopes": list(scopes),
            "silent": False,
            "isRepair": reason != "not-paired",
            "reason": reason,
            "ts": _now_ms(),
        }
        self._pending[request_id] = req
        self._pending_by_device[device_id] = request_id
        self._broadcast_pairing("device.pair.requested", dict(req))
        if self.on_pairing_request is not None:
            self.on_pairing_request(dict(req))
        return request_id

    def _broadcast_pairing(self, event: str, payload: dict[str, Any]) -> None:
        targets = [c for c in self._conns.values() if c.has_scope(PAIRING)]
        self._broadcast(event, payload, targets=targets)

    def _hello(self, conn: _Conn, record: _Device | None) -> dict[str, Any]:
        v4 = self.protocol >= 4
        snapshot: dict[str, Any] = {
            "presence": self._presence_list(),
            "health": self._health_summary(),
            "stateVersion": dict(self._state_version),
            "uptimeMs": self._uptime_ms(),
            "sessionDefaults": {
                "defaultAgentId": self._default_agent,
                "mainKey": data.MAIN_KEY,
                "mainSessionKey": self.main_session_key,
                "scope": "per-sender",
            },
        }
        if v4:
            snapshot = {"suspension": {"phase": "accepting"}, **snapshot}
            snapshot["sessionDefaults"].update(
                modelConfigured=True, ownership="sole", selectionRequired=False
            )
            snapshot["updateSchedule"] = {"channel": "stable", "autoEnabled": False}
        if ADMIN in conn.scopes:
            snapshot.update(
                configPath=f"{data.STATE_DIR}/openclaw.json",
                stateDir=data.STATE_DIR,
                authMode="token",
            )
        policy: dict[str, Any] = {
            "maxPayload": MAX_PAYLOAD,
            "maxBufferedBytes": MAX_BUFFERED,
            "tickIntervalMs": self.tick_interval_ms,
        }
        hello: dict[str, Any] = {
            "type": "hello-ok",
            "protocol": self.protocol,
            "server": {"version": self.version, "connId": conn.conn_id},
            "features": {
                "methods": list(self._methods),
                "events": _V4_EVENTS if v4 else _V3_EVENTS,
            },
            "snapshot": snapshot,
        }
        if v4:
            hello["server"] = {
                "version": self.version,
                "buildId": self.build_id,
                "bootId": self.boot_id,
                "controlUiBuildSource": "bundled",
                "connId": conn.conn_id,
            }
            policy.update(
                attachments={"maxBytes": 19464192, "maxImageBytes": 6291456},
                allowedSessionVisibilities=["shared", "read-only", "suggest", "draft"],
            )
            auth: dict[str, Any] = {
                "method": "token" if conn.auth_method == "token" else "device-token",
                "role": conn.role,
                "scopes": list(conn.scopes),
            }
            if record is not None:
                auth.update(deviceToken=record.token, issuedAtMs=record.issued_at)
            hello["auth"] = auth
        else:
            hello["canvasHostUrl"] = f"{self.http_url}/__openclaw__/canvas/"
            if record is not None:
                hello["auth"] = {
                    "deviceToken": record.token,
                    "role": conn.role,
                    "scopes": list(conn.scopes),
                    "issuedAtMs": record.issued_at,
                }
        hello["policy"] = policy
        return hello

    # ------------------------------------------------------------------ methods

    def _method_table(self) -> dict[str, _Method]:
        table: dict[str, _Method] = {
            "health": _Method(self._m_health, None),
            "status": _Method(self._m_status, READ),
            "system-presence": _Method(self._m_presence, READ),
            "agents.list": _Method(self._m_agents_list, READ),
            "agent.identity.get": _Method(self._m_identity, READ),
            "models.list": _Method(self._m_models, READ),
            "sessions.list": _Method(self._m_sessions_list, READ),
            "sessions.subscribe": _Method(self._m_subscribe, READ),
            "sessions.messages.subscribe": _Method(self._m_messages_subscribe, READ),
            "sessions.messages.unsubscribe": _Method(
                self._m_messages_unsubscribe, READ
            ),
            "sessions.patch": _Method(self._m_patch, ADMIN),
            "sessions.reset": _Method(self._m_reset, ADMIN),
            "sessions.delete": _Method(self._m_delete, ADMIN),
            "chat.history": _Method(self._m_history, READ),
            "chat.send": _Method(self._m_chat_send, WRITE),
            "chat.abort": _Method(self._m_chat_abort, WRITE),
            "agent": _Method(self._m_agent, WRITE),
            "agent.wait": _Method(self._m_agent_wait, WRITE),
        }
        if self.protocol < 4:
            table["sessions.unsubscribe"] = _Method(self._m_unsubscribe, READ)
        return table

    def _dispatch(self, conn: _Conn, req: Request) -> None:
        delay = self.answer_delays.get(req.method)
        if delay:
            asyncio.get_running_loop().call_later(delay, self._dispatch_now, conn, req)
            return
        self._dispatch_now(conn, req)

    def _dispatch_now(self, conn: _Conn, req: Request) -> None:
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
        errors = check(self._schemas[req.method], req.params)
        if errors:
            message = f"invalid {req.method} params: " + "; ".join(errors)
            self._respond(conn, req.id, error=ErrorShape("INVALID_REQUEST", message))
            return
        ctx = _Ctx(req.id)
        try:
            payload = method.handler(conn, req.params, ctx)
        except RpcError as exc:
            self._respond(conn, req.id, error=exc.shape)
            return
        if payload is not _DEFERRED:
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

    def _m_health(self, conn: _Conn, p: dict[str, Any], ctx: _Ctx) -> Any:
        return self._health_summary()

    def _m_status(self, conn: _Conn, p: dict[str, Any], ctx: _Ctx) -> Any:
        rows = self._sorted_sessions()
        counts = self._counts_by_agent()
        running = sum(1 for r in self._runs.values() if not r.finished)
        status: dict[str, Any] = {
            "runtimeVersion": self.version,
            "heartbeat": {
                "defaultAgentId": self._default_agent,
                "agents": [
                    {
                        "agentId": a["id"],
                        "enabled": False,
                        "every": "disabled",
                        "everyMs": None,
                    }
                    for a in self._agents
                ],
            },
            "channelSummary": [],
            "queuedSystemEvents": [],
            "tasks": {
                "total": len(self._runs),
                "active": running,
                "terminal": len(self._runs) - running,
                "failures": sum(1 for r in self._runs.values() if r.status == "error"),
            },
            "taskAudit": {"total": 0, "warnings": 0, "errors": 0},
            "sessions": {
                "paths": [self._sessions_path(a["id"]) for a in self._agents],
                "count": len(rows),
                "defaults": {
                    "model": data.DEFAULT_MODEL,
                    "contextTokens": data.DEFAULT_CONTEXT,
                },
                "recent": [self._recent(s) for s in rows[:10]],
                "byAgent": [
                    {
                        "agentId": a["id"],
                        "path": self._sessions_path(a["id"]),
                        "count": counts.get(a["id"], 0),
                        "recent": [],
                    }
                    for a in self._agents
                ],
            },
        }
        if self.protocol >= 4:
            status.update(
                hostDesktop={"enabled": False, "state": "disabled"},
                modelRuntime={"degraded": False, "pendingAgents": []},
                eventLoop=_EVENT_LOOP,
            )
        return status

    def _m_presence(self, conn: _Conn, p: dict[str, Any], ctx: _Ctx) -> Any:
        return self._presence_list()

    def _m_agents_list(self, conn: _Conn, p: dict[str, Any], ctx: _Ctx) -> Any:
        if self.protocol < 4:
            return {
                "defaultId": self._default_agent,
                "mainKey": data.MAIN_KEY,
                "scope": "per-sender",
                "agents": [
                    {
                        "id": a["id"],
                        "name": a["name"],
                        "identity": {"name": a["name"], "emoji": a["emoji"]},
                        "workspace": a["workspace"],
                        "model": {"primary": a["model"]},
                    }
                    for a in self._agents
                ],
            }
        return {
            "defaultId": self._default_agent,
            "ownership": "sole",
            "selectionRequired": False,
            "mainKey": data.MAIN_KEY,
            "scope": "per-sender",
            "agents": [
                {
                    "id": a["id"],
                    "name": a["name"],
                    "identity": {"name": a["name"], "emoji": a["emoji"]},
                    "workspace": a["workspace"],
                    "workspaceGit": False,
                    "agentRuntime": data.AGENT_RUNTIME,
                    "thinkingLevels": data.THINKING_LEVELS,
                    "thinkingOptions": data.THINKING_OPTIONS,
                    "thinkingDefault": "off",
                    "model": {"primary": a["model"]},
                    "defaultPermissionMode": "full",
                }
                for a in self._agents
            ],
        }

    def _m_identity(self, conn: _Conn, p: dict[str, Any], ctx: _Ctx) -> Any:
        agent_id = p.get("agentId")
        if agent_id is None and p.get("sessionKey"):
            agent_id = self._resolve_key(str(p["sessionKey"]), None)[1]
        agent_id = agent_id or self._default_agent
        agent = next((a for a in self._agents if a["id"] == agent_id), None)
        if agent is None:
            raise _invalid(f'unknown agent id "{agent_id}"')
        return {
            "agentId": agent["id"],
            "name": agent["name"],
            "avatar": agent["emoji"],
            "emoji": agent["emoji"],
        }

    def _m_models(self, conn: _Conn, p: dict[str, Any], ctx: _Ctx) -> Any:
        return {
            "models": [
                {
                    "id": model,
                    "name": model,
                    "provider": provider,
                    "contextWindow": context,
                    "reasoning": False,
                    "input": ["text"],
                }
                for provider, model, context in data.MODELS
            ]
        }

    def _m_sessions_list(self, conn: _Conn, p: dict[str, Any], ctx: _Ctx) -> Any:
        return self._sessions_list(p)

    def _m_subscribe(self, conn: _Conn, p: dict[str, Any], ctx: _Ctx) -> Any:
        conn.subscribed = True
        out: dict[str, Any] = {"subscribed": True}
        if p:
            out["list"] = self._sessions_list(p)
        return out

    def _m_unsubscribe(self, conn: _Conn, p: dict[str, Any], ctx: _Ctx) -> Any:
        conn.subscribed = False
        return {"subscribed": False}

    def _m_messages_subscribe(self, conn: _Conn, p: dict[str, Any], ctx: _Ctx) -> Any:
        key = self._resolve_key(str(p["key"]), None)[0]
        conn.message_keys.add(key)
        return {"subscribed": True, "key": key}

    def _m_messages_unsubscribe(self, conn: _Conn, p: dict[str, Any], ctx: _Ctx) -> Any:
        key = self._resolve_key(str(p["key"]), None)[0]
        conn.message_keys.discard(key)
        return {"subscribed": False, "key": key}

    def _m_patch(self, conn: _Conn, p: dict[str, Any], ctx: _Ctx) -> Any:
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

    def _m_reset(self, conn: _Conn, p: dict[str, Any], ctx: _Ctx) -> Any:
        key, agent = self._resolve_key(str(p["key"]), None)
        emits = self._abort_session_runs(key, "reset")
        s, created = self._get_or_create(key, agent)
        now = _now_ms()
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

    def _m_delete(self, conn: _Conn, p: dict[str, Any], ctx: _Ctx) -> Any:
        key, _ = self._resolve_key(str(p["key"]), None)
        if _is_main_key(key):
            raise _invalid(f"Cannot delete the main session ({key}).")
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

    def _m_history(self, conn: _Conn, p: dict[str, Any], ctx: _Ctx) -> Any:
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

    def _m_chat_send(self, conn: _Conn, p: dict[str, Any], ctx: _Ctx) -> Any:
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
            raise _invalid("message or attachment required")
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

    def _m_chat_abort(self, conn: _Conn, p: dict[str, Any], ctx: _Ctx) -> Any:
        key = self._resolve_key(str(p["sessionKey"]), None)[0]
        run_id = p.get("runId")
        if run_id:
            run = self._runs.get(str(run_id))
            if run is not None and run.session_key != key:
                raise _invalid("runId does not match sessionKey")
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

    def _m_agent(self, conn: _Conn, p: dict[str, Any], ctx: _Ctx) -> Any:
        idem = str(p["idempotencyKey"])
        existing = self._runs.get(idem)
        if existing is not None:
            if existing.finished and existing.final is not None:
                if existing.final_error is not None:
                    self._respond(conn, ctx.rid, existing.final, existing.final_error)
                    return _DEFERRED
                return existing.final
            return existing.ack
        agent_id = p.get("agentId")
        if agent_id is not None and agent_id not in self._agent_ids:
            raise _invalid(f'unknown agent id "{agent_id}"')
        if p.get("sessionKey"):
            key, agent = self._resolve_key(str(p["sessionKey"]), None)
            if agent_id is not None and agent_id != agent:
                raise _invalid(
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
            "acceptedAt": _now_ms(),
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

    def _m_agent_wait(self, conn: _Conn, p: dict[str, Any], ctx: _Ctx) -> Any:
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
        return _DEFERRED

    def _wait_result(self, run: _Run) -> dict[str, Any]:
        out: dict[str, Any] = {
            "runId": run.run_id,
            "status": "error" if run.status == "error" else "ok",
            "startedAt": run.started_at,
            "endedAt": run.ended_at,
        }
        if run.error:
            out["error"] = run.error
        return out

    # ------------------------------------------------------------------ sessions

    def _resolve_key(self, raw: str, agent_hint: str | None) -> tuple[str, str]:
        """Canonical session key and its agent; unknown agents are refused."""
        key = raw.strip().lower()
        if not key:
            raise _invalid("invalid session key")
        if key == data.MAIN_KEY:
            key = self.main_session_key
        elif not key.startswith("agent:"):
            key = f"agent:{agent_hint or self._default_agent}:{key}"
        parts = key.split(":", 2)
        if len(parts) < 3 or not parts[1] or not parts[2]:
            raise _invalid(f"invalid session key: {raw}")
        if parts[1] not in self._agent_ids:
            raise _invalid(f'unknown agent id "{parts[1]}"')
        return key, parts[1]

    def _get_or_create(self, key: str, agent_id: str) -> tuple[_Session, bool]:
        s = self._sessions.get(key)
        if s is not None:
            return s, False
        row = data.session_row(
            key=key,
            agent_id=agent_id,
            session_id=str(uuid.uuid4()),
            now_ms=_now_ms(),
        )
        s = _Session(key, agent_id, materialized=row, transcript=[])
        self._sessions[key] = s
        self._invalidate(keys=True)
        return s, True

    def _delete_session(self, s: _Session, *, notify: bool) -> None:
        if self._sessions.get(s.key) is not s:
            return
        del self._sessions[s.key]
        self._invalidate(keys=True)
        if notify:
            subs = self._subscribers()
            ts = _now_ms()
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

    def _touch(self, s: _Session, when: int | None = None) -> None:
        now = when or _now_ms()
        s.row["updatedAt"] = now
        s.row["lastActivityAt"] = now
        self._invalidate()

    def _invalidate(self, *, keys: bool = False) -> None:
        self._order = None
        if keys:
            self._key_list = None

    def _sorted_sessions(self) -> list[_Session]:
        if self._order is None:
            self._order = sorted(
                self._sessions.values(), key=lambda s: s.updated_at, reverse=True
            )
        return self._order

    def _render_row(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.protocol >= 4:
            return row
        return {k: v for k, v in row.items() if k not in data.V4_ONLY_ROW_KEYS}

    def _entry(self, s: _Session) -> dict[str, Any]:
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
        since = _now_ms() - int(active) * 60_000 if active else None
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
            "ts": _now_ms(),
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

    def _ensure_transcript(self, s: _Session) -> list[dict[str, Any]]:
        if s.transcript is None:
            s.transcript = []
            if s.seeded and self.history > 0:
                topic = str(
                    s.row.get("derivedTitle") or s.row.get("displayName") or "this"
                )
                turns = data.seeded_history(self.seed, s.key, topic, self.history)
                end = int(s.row.get("updatedAt") or _now_ms())
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
        s: _Session,
        role: str,
        text: str,
        *,
        seq: int,
        ts: int,
        run: _Run | None = None,
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
        s: _Session,
        role: str,
        text: str,
        *,
        seq: int | None = None,
        run: _Run | None = None,
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
            ts=_now_ms(),
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

    def _recent(self, s: _Session) -> dict[str, Any]:
        updated = s.updated_at
        return {"key": s.key, "updatedAt": updated, "age": max(0, _now_ms() - updated)}

    # ------------------------------------------------------------------ runs

    def _begin_run(
        self,
        *,
        key: str,
        agent_id: str,
        message: str,
        kind: str,
        conn: _Conn | None,
        rid: str | None,
        run_id: str,
    ) -> _Run:
        s, created = self._get_or_create(key, agent_id)
        self._ensure_transcript(s)
        seq = s.next_seq
        s.next_seq += 1
        run = _Run(
            run_id=run_id,
            session_key=key,
            agent_id=agent_id,
            message=message,
            kind=kind,
            conn=conn,
            request_id=rid,
            user_seq=seq,
            created=created,
            item_id=f"{uuid.uuid4()}:1",
            started_at=_now_ms(),
        )
        if len(self._runs) > MAX_RUNS_KEPT:
            self._forget_old_runs()
        self._runs[run_id] = run
        if conn is not None:
            conn.run_sessions.add(key)
        run.task = asyncio.create_task(self._run_main(run))
        return run

    def _forget_old_runs(self) -> None:
        """Finished runs stay for idempotency (5 minutes, like the gateway's dedupe)."""
        horizon = _now_ms() - 5 * 60_000
        for run_id in [
            r.run_id
            for r in self._runs.values()
            if r.finished and (r.ended_at or 0) < horizon
        ]:
            del self._runs[run_id]

    async def _run_main(self, run: _Run) -> None:
        try:
            await self._run_body(run)
        except asyncio.CancelledError:
            raise
        except Exception:  # pragma: no cover - a bug in the simulator itself
            log.exception("simulated run %s crashed", run.run_id)
        finally:
            run.done.set()

    async def _run_body(self, run: _Run) -> None:
        s = self._sessions.get(run.session_key)
        if s is None or run.finished:
            return
        script = data.script_for(run.message, self.reply)
        delay = (
            script.chunk_delay
            if script.chunk_delay is not None
            else self.delta_interval
        )
        v4 = self.protocol >= 4
        if run.created:
            self._emit_changed(s, reason="create")
        user = self._add_message(s, "user", run.message, seq=run.user_seq, run=run)
        self._touch(s)
        self._emit_changed(s, reason="send")
        self._emit_message(s, user)
        run.started_at = _now_ms()
        self._mark_running(s, run)
        self._agent_event(
            run,
            "lifecycle",
            {"phase": "start", "startedAt": run.started_at},
            lifecycle=True,
        )
        self._emit_changed(s, phase="start", run_id=run.run_id)
        if v4:
            self._agent_event(
                run,
                "lifecycle",
                {
                    "phase": "model",
                    "provider": s.row.get("modelProvider"),
                    "model": s.row.get("model"),
                },
                lifecycle=True,
            )
        if script.fail:
            await asyncio.sleep(min(delay, 0.05))
            if not _halted(run):
                self._finish_error(run, s, data.FAIL_MESSAGE)
            return
        if script.tool:
            await asyncio.sleep(delay)
            if _halted(run):
                return
            call_id = f"call_{uuid.uuid4().hex[:24]}"
            args = {"command": "ls -1 ~/notes"}
            self._tool_event(
                run,
                {"phase": "start", "name": "exec", "toolCallId": call_id, "args": args},
            )
            await asyncio.sleep(delay)
            if _halted(run):
                return
            self._tool_event(
                run,
                {
                    "phase": "result",
                    "name": "exec",
                    "toolCallId": call_id,
                    "args": args,
                    "meta": "ls -1 ~/notes",
                    "isError": False,
                    "result": {
                        "content": [
                            {
                                "type": "text",
                                "text": "groceries.md\nideas.md\ntodo.md\n",
                            }
                        ],
                        "details": {"exitCode": 0, "durationMs": 12},
                    },
                },
            )
        for piece in data.chunks_of(script.text, script.words_per_chunk):
            await asyncio.sleep(delay)
            if _halted(run):
                return
            run.text += piece
            assistant: dict[str, Any] = {"text": run.text, "delta": piece}
            if v4:
                assistant["itemId"] = run.item_id
            self._agent_event(run, "assistant", assistant)
            self._chat_delta(run, piece)
        await asyncio.sleep(0)
        if not _halted(run):
            self._finish_ok(run, s)

    def _chat_delta(self, run: _Run, piece: str) -> None:
        if self.protocol >= 4:
            self._chat_event(run, "delta", deltaText=piece)
            return
        now = time.monotonic()  # protocol 3 throttles chat deltas to one per 150 ms
        if now - run.last_chat >= 0.15:
            run.last_chat = now
            run.chat_pending = False
            self._chat_event(run, "delta")
        else:
            run.chat_pending = True

    def _usage(self, run: _Run) -> tuple[int, int]:
        return 10 + len(run.message.split()), len(data.chunks_of(run.text))

    def _finish_ok(self, run: _Run, s: _Session) -> None:
        v4 = self.protocol >= 4
        in_tokens, out_tokens = self._usage(run)
        if v4:
            self._agent_event(run, "usage", {"outputTokens": out_tokens})
        usage = {
            "input": in_tokens,
            "output": out_tokens,
            "totalTokens": in_tokens + out_tokens,
            "cacheRead": 0,
            "cacheWrite": 0,
            "cost": {"total": 0},
        }
        reply = self._add_message(s, "assistant", run.text, run=run, usage=usage)
        self._emit_message(s, reply)
        run.ended_at = _now_ms()
        if v4:
            self._agent_event(
                run,
                "lifecycle",
                {
                    "phase": "finishing",
                    "stopReason": "stop",
                    "aborted": False,
                    "livenessState": "working",
                    "endedAt": run.ended_at,
                },
                lifecycle=True,
            )
            end: dict[str, Any] = {
                "phase": "end",
                "startedAt": run.started_at,
                "endedAt": run.ended_at,
                "aborted": False,
                "stopReason": "stop",
                "livenessState": "working",
                "executionSettled": True,
                "terminalReply": {"disposition": "visible", "text": run.text},
            }
        else:
            end = {"phase": "end", "endedAt": run.ended_at, "livenessState": "working"}
        self._agent_event(run, "lifecycle", end, lifecycle=True)
        if run.chat_pending:
            self._chat_event(run, "delta")
        final: dict[str, Any] = {"stopReason": "stop"} if v4 else {}
        self._chat_event(run, "final", **final)
        run.status, run.finished = "ok", True
        s.row["inputTokens"] = int(s.row.get("inputTokens") or 0) + in_tokens
        s.row["outputTokens"] = int(s.row.get("outputTokens") or 0) + out_tokens
        s.row["totalTokens"] = s.row["inputTokens"] + s.row["outputTokens"]
        s.row["totalTokensFresh"] = True
        s.row["systemSent"] = True
        self._mark_ended(s, run, "done")
        self._emit_changed(s, phase="end", run_id=run.run_id)
        if run.kind == "agent":
            run.final = {
                "runId": run.run_id,
                "status": "ok",
                "summary": "completed",
                "result": {
                    "payloads": [{"text": run.text, "mediaUrl": None}],
                    "meta": {
                        "durationMs": run.ended_at - run.started_at,
                        "agentMeta": {
                            "sessionId": s.row.get("sessionId"),
                            "provider": s.row.get("modelProvider"),
                            "model": s.row.get("model"),
                            "usage": {
                                "input": in_tokens,
                                "output": out_tokens,
                                "total": in_tokens + out_tokens,
                            },
                        },
                        "aborted": False,
                        "stopReason": "stop",
                    },
                },
            }
            self._send_final(run)

    def _finish_error(self, run: _Run, s: _Session, message: str) -> None:
        run.ended_at = _now_ms()
        run.status, run.finished, run.error = "error", True, message
        self._agent_event(
            run,
            "lifecycle",
            {
                "phase": "error",
                "error": message,
                "endedAt": run.ended_at,
                "livenessState": "working",
            },
            lifecycle=True,
        )
        self._chat_event(
            run, "error", message=False, errorMessage=message, errorKind="unknown"
        )
        self._mark_ended(s, run, "failed")
        self._emit_changed(s, phase="error", run_id=run.run_id)
        if run.kind == "agent":
            run.final = {"runId": run.run_id, "status": "error", "summary": message}
            run.final_error = ErrorShape("UNAVAILABLE", message)
            self._send_final(run)

    def _abort_run(self, run: _Run, stop_reason: str) -> Callable[[], None] | None:
        """Stop a run now; returns the function that emits what an abort looks like (or
        None if the run had already ended)."""
        if run.finished:
            return None
        run.finished = True
        run.status = "aborted"
        run.ended_at = _now_ms()

        def emit() -> None:
            assert run.ended_at is not None
            s = self._sessions.get(run.session_key)
            end: dict[str, Any] = {
                "phase": "end",
                "startedAt": run.started_at,
                "endedAt": run.ended_at,
                "aborted": True,
                "stopReason": "aborted",
                "livenessState": "working",
            }
            self._agent_event(run, "lifecycle", end, lifecycle=True)
            extra: dict[str, Any] = {"stopReason": stop_reason}
            self._chat_event(run, "aborted", message=bool(run.text), **extra)
            if s is not None:
                if run.text:
                    partial = self._add_message(
                        s, "assistant", run.text, run=run, stop_reason="aborted"
                    )
                    self._emit_message(s, partial)
                s.row["abortedLastRun"] = True
                self._mark_ended(s, run, "killed")
                self._emit_changed(s, reason="abort", phase="end", run_id=run.run_id)
            if run.kind == "agent":
                run.final = {
                    "runId": run.run_id,
                    "status": "ok",
                    "summary": "aborted",
                    "result": {
                        "payloads": [{"text": run.text, "mediaUrl": None}]
                        if run.text
                        else [],
                        "meta": {
                            "durationMs": run.ended_at - run.started_at,
                            "aborted": True,
                            "stopReason": "aborted",
                        },
                    },
                }
                self._send_final(run)
            run.done.set()

        return emit

    def _abort_session_runs(
        self, key: str, stop_reason: str
    ) -> list[Callable[[], None]]:
        emits: list[Callable[[], None]] = []
        for run in list(self._runs.values()):
            if run.session_key == key and not run.finished:
                emit = self._abort_run(run, stop_reason)
                if emit is not None:
                    emits.append(emit)
        return emits

    def _kill_runs(self) -> None:
        """A restart: runs in flight end without any event (their sockets are closing)."""
        for run in self._runs.values():
            if run.finished:
                continue
            run.finished, run.status, run.ended_at = True, "aborted", _now_ms()
            s = self._sessions.get(run.session_key)
            if s is not None:
                self._mark_ended(s, run, "killed")
            if run.task is not None:
                run.task.cancel()
            run.done.set()

    async def _cancel_run_tasks(self) -> None:
        tasks = [
            r.task
            for r in self._runs.values()
            if r.task is not None and not r.task.done()
        ]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _send_final(self, run: _Run) -> None:
        conn = run.conn
        if (
            conn is not None
            and run.request_id is not None
            and conn.number in self._conns
        ):
            self._respond(conn, run.request_id, run.final, run.final_error)

    def _mark_running(self, s: _Session, run: _Run) -> None:
        ids = [i for i in s.row.get("activeRunIds") or [] if i != run.run_id] + [
            run.run_id
        ]
        s.row.update(
            status="running",
            startedAt=run.started_at,
            endedAt=None,
            runtimeMs=None,
            hasActiveRun=True,
            activeRunIds=ids,
            lastRunId=run.run_id,
            unread=False,
        )
        self._touch(s, run.started_at)

    def _mark_ended(self, s: _Session, run: _Run, status: str) -> None:
        ids = [i for i in s.row.get("activeRunIds") or [] if i != run.run_id]
        ended = run.ended_at or _now_ms()
        s.row.update(
            status="running" if ids else status,
            endedAt=ended,
            runtimeMs=max(0, ended - run.started_at),
            hasActiveRun=bool(ids),
            activeRunIds=ids,
            unread=True,
        )
        self._touch(s, ended)

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def runner() -> None:
            await coro

        task = asyncio.create_task(runner())
        self._background.append(task)
        task.add_done_callback(
            lambda t: self._background.remove(t) if t in self._background else None
        )

    # ------------------------------------------------------------------ events

    def _broadcast(
        self,
        event: str,
        payload: Any,
        *,
        gate: bool = False,
        state_version: bool = False,
        targets: Iterable[_Conn] | None = None,
    ) -> None:
        """A broadcast event with a frame seq (per connection on v4, global on v3)."""
        v4 = self.protocol >= 4
        pool = self._conns.values() if targets is None else targets
        conns = [
            c
            for c in pool
            if c.authed and not c.closing and (not (gate and v4) or c.reads)
        ]
        head = f'{{"type":"event","event":{_dumps(event)},"payload":{_dumps(payload)}'
        tail = ""
        if state_version:
            tail += f',"stateVersion":{_dumps(self._state_version)}'
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

    def _targeted(self, conns: Iterable[_Conn], event: str, payload: Any) -> None:
        """A targeted event: no frame seq."""
        text = event_frame(event, payload)
        for c in conns:
            c.push(text)

    def _subscribers(self) -> list[_Conn]:
        return [
            c for c in self._conns.values() if c.authed and c.subscribed and c.reads
        ]

    def _emit_changed(
        self,
        s: _Session,
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
        payload["ts"] = _now_ms()
        payload["session"] = row
        self._targeted(subs, "sessions.changed", payload)

    def _emit_message(self, s: _Session, message: dict[str, Any]) -> None:
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
        self, run: _Run, stream: str, body: dict[str, Any], *, lifecycle: bool = False
    ) -> None:
        run.seq += 1
        payload: dict[str, Any] = {
            "runId": run.run_id,
            "stream": stream,
            "data": body,
            "sessionKey": run.session_key,
            "seq": run.seq,
            "ts": _now_ms(),
        }
        if self.protocol >= 4:
            payload["agentId"] = run.agent_id
            payload["isHeartbeat"] = False
            if lifecycle:
                s = self._sessions.get(run.session_key)
                if s is not None:
                    payload["sessionId"] = s.row.get("sessionId")
        self._broadcast("agent", payload, gate=True)

    def _tool_event(self, run: _Run, body: dict[str, Any]) -> None:
        """Tool frames are targeted (no frame seq): `agent` to the connections with the
        tool-events cap that run on this session, `session.tool` to subscribers."""
        run.seq += 1
        payload: dict[str, Any] = {
            "runId": run.run_id,
            "stream": "tool",
            "data": body,
            "sessionKey": run.session_key,
            "seq": run.seq,
            "ts": _now_ms(),
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

    def _chat_event(
        self, run: _Run, state: str, *, message: bool = True, **extra: Any
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
                "timestamp": _now_ms(),
            }
        self._broadcast("chat", payload, gate=True)

    # ------------------------------------------------------------------ presence / health

    def _presence_entry(self, conn: _Conn) -> dict[str, Any]:
        client = conn.client
        host = str(client.get("displayName") or client.get("id"))
        now = _now_ms()
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
            "ts": _now_ms(),
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
            "ts": _now_ms(),
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
                eventLoop=_EVENT_LOOP,
            )
        return summary

    # ------------------------------------------------------------------ background

    async def _tick_loop(self) -> None:
        interval = max(0.01, self.tick_interval_ms / 1000)
        while True:
            await asyncio.sleep(interval)
            self._broadcast("tick", {"ts": _now_ms()})

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
        row, rng, now = s.row, self._rng, _now_ms()
        if any(not str(i).startswith("bg-") for i in row.get("activeRunIds") or []):
            return  # a real run owns this row
        grow_in, grow_out = rng.randrange(50, 2000), rng.randrange(20, 800)
        if row.get("status") == "running":
            started = int(row.get("startedAt") or now)
            row.update(
                status="done",
                endedAt=now,
                runtimeMs=max(0, now - started),
                hasActiveRun=False,
                activeRunIds=[],
                unread=True,
            )
            phase, run_id = "end", (row.get("lastRunId") or None)
        elif rng.random() < 0.35:
            run_id = f"bg-{uuid.UUID(int=rng.getrandbits(128), version=4)}"
            row.update(
                status="running",
                startedAt=now,
                endedAt=None,
                runtimeMs=None,
                hasActiveRun=True,
                activeRunIds=[run_id],
                lastRunId=run_id,
            )
            phase = "start"
        else:
            phase, run_id = "message", None
        row["inputTokens"] = int(row.get("inputTokens") or 0) + grow_in
        row["outputTokens"] = int(row.get("outputTokens") or 0) + grow_out
        row["totalTokens"] = row["inputTokens"] + row["outputTokens"]
        row["totalTokensFresh"] = True
        if row.get("modelProvider") != "fake":
            cost = float(row.get("estimatedCostUsd") or 0)
            row["estimatedCostUsd"] = round(
                cost + grow_in * 3e-6 + grow_out * 1.5e-5, 4
            )
        self._touch(s, now)
        self._emit_changed(s, phase=phase, run_id=run_id)

    # ------------------------------------------------------------------ HTTP

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = str(scope.get("method", "GET")).upper()
        path = str(scope.get("path", "/"))
        _record(self.http_calls, (method, path))
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
        auth = _headers(scope).get("authorization", "")
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
        _record(self.tool_calls, (tool, dict(args)))
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
            since = _now_ms() - active * 60_000
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

    def _public_host(self) -> str:
        host = self.host
        if host in ("0.0.0.0", ""):
            return "127.0.0.1"
        if host == "::":
            return "[::1]"
        return f"[{host}]" if ":" in host else host


class _Refusal(Exception):
    """A refused connect: the error `res`, then the close."""

    def __init__(
        self, error: RpcError, code: int = CLOSE_POLICY, reason: str | None = None
    ) -> None:
        super().__init__(error.shape.message)
        self.error = error
        self.code = code
        self.reason = error.shape.message if reason is None else reason


_EVENT_LOOP: dict[str, Any] = {
    "degraded": False,
    "degradedSinceMs": None,
    "reasons": [],
    "intervalMs": 1000.0,
    "delayP99Ms": 1.2,
    "delayMaxMs": 2.5,
    "utilization": 0.02,
}


def _record(records: list[Any], item: Any, cap: int = 20_000) -> None:
    """Append to a record list; a long-running demo drops the oldest half past `cap`."""
    records.append(item)
    if len(records) > cap:
        del records[: cap // 2]


def _halted(run: _Run) -> bool:
    """Whether a run was ended from outside (abort, delete, restart) while it slept."""
    return run.finished


def _is_main_key(key: str) -> bool:
    parts = key.split(":", 2)
    return len(parts) == 3 and parts[0] == "agent" and parts[2] == data.MAIN_KEY


def _matches(row: dict[str, Any], needle: str) -> bool:
    for name in ("key", "label", "displayName", "derivedTitle"):
        value = row.get(name)
        if isinstance(value, str) and needle in value.lower():
            return True
    return False


def _frame_id(text: str) -> str:
    try:
        value = json.loads(text)
    except ValueError:
        return "invalid"
    rid = value.get("id") if isinstance(value, dict) else None
    return rid if isinstance(rid, str) and rid else "invalid"


def _loopback_origin(origin: str) -> bool:
    try:
        host = urlsplit(origin).hostname or ""
    except ValueError:
        return False
    return host in ("127.0.0.1", "localhost", "::1")


def _headers(scope: Scope) -> dict[str, str]:
    return {
        bytes(k).decode("latin-1").lower(): bytes(v).decode("latin-1")
        for k, v in scope.get("headers") or []
    }


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
