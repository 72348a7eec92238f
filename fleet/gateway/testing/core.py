"""What every part of the simulator shares: limits, scopes, the per-connection, session, run
and device records, the refusals, small helpers, and `method`, the decorator with which a
method family registers its handlers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fleet.gateway.protocol import CLOSE_POLICY, ErrorShape
from fleet.gateway.testing import data
from fleet.gateway.testing.schema import NO_PARAMS, Schema

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
PairingHook = Callable[[dict[str, Any]], None]

MAX_PAYLOAD = 25 * 1024 * 1024
MAX_BUFFERED = 50 * 1024 * 1024
MAX_TOOLS_BODY = 2 * 1024 * 1024
MAX_RUNS_KEPT = 5000
READ, WRITE, ADMIN, PAIRING = (
    "operator.read",
    "operator.write",
    "operator.admin",
    "operator.pairing",
)


def now_ms() -> int:
    return int(time.time() * 1000)


def truncate(reason: str, limit: int = 120) -> str:
    raw = reason.encode()
    return raw[:limit].decode(errors="ignore") if len(raw) > limit else reason


def dumps(value: Any) -> str:
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


def invalid(message: str) -> RpcError:
    return RpcError("INVALID_REQUEST", message)


class Refusal(Exception):
    """A refused connect: the error `res`, then the close."""

    def __init__(
        self, error: RpcError, code: int = CLOSE_POLICY, reason: str | None = None
    ) -> None:
        super().__init__(error.shape.message)
        self.error = error
        self.code = code
        self.reason = error.shape.message if reason is None else reason


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str


@dataclass(eq=False)
class Conn:
    """One WebSocket connection, before and after the handshake."""

    number: int
    conn_id: str
    nonce: str
    challenge_ts: int
    origin: str | None
    queue: asyncio.Queue[str | bytes | Close] = field(default_factory=asyncio.Queue)
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
            self.queue.put_nowait(Close(code, truncate(reason)))

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
class Session:
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
class Run:
    run_id: str
    session_key: str
    agent_id: str
    message: str
    kind: str  # "chat", "agent" or "external"
    conn: Conn | None
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
class Device:
    device_id: str
    public_key: str
    role: str
    scopes: tuple[str, ...]
    token: str
    issued_at: int


@dataclass(eq=False)
class Ctx:
    """Per-request context: `after` runs once the response is queued."""

    rid: str
    after: list[Callable[[], None]] = field(default_factory=list)


Handler = Callable[[Conn, dict[str, Any], Ctx], Any]

DEFERRED = object()


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """A registered method, bound to its gateway."""

    handler: Handler
    scope: str | None
    params: Schema


def record_call(records: list[Any], item: Any, cap: int = 20_000) -> None:
    """Append to a record list; a long-running demo drops the oldest half past `cap`."""
    records.append(item)
    if len(records) > cap:
        del records[: cap // 2]


def halted(run: Run) -> bool:
    """Whether a run was ended from outside (abort, delete, restart) while it slept."""
    return run.finished


def is_main_key(key: str) -> bool:
    parts = key.split(":", 2)
    return len(parts) == 3 and parts[0] == "agent" and parts[2] == data.MAIN_KEY


def scope_headers(scope: Scope) -> dict[str, str]:
    return {
        bytes(k).decode("latin-1").lower(): bytes(v).decode("latin-1")
        for k, v in scope.get("headers") or []
    }


# What status and health report as the event loop's state (protocol 4).
EVENT_LOOP: dict[str, Any] = {
    "degraded": False,
    "degradedSinceMs": None,
    "reasons": [],
    "intervalMs": 1000.0,
    "delayP99Ms": 1.2,
    "delayMaxMs": 2.5,
    "utilization": 0.02,
}

# ---------------------------------------------------------------------- method registration

_MARK = "_gateway_method"
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class _Registration:
    name: str
    scope: str | None
    params: Schema | Callable[[int], Schema]
    protocols: tuple[int, ...]


def method(
    name: str,
    scope: str | None,
    *,
    params: Schema | Callable[[int], Schema] = NO_PARAMS,
    protocols: tuple[int, ...] = (3, 4),
) -> Callable[[F], F]:
    """Register a handler `(self, conn, params, ctx) -> payload` as the gateway method `name`,
    callable with `scope` (None: any connection), its params checked against `params` (a
    Schema, or a function of the protocol giving one), offered on `protocols` only.

    A handler returns the `res` payload, raises RpcError for an error `res`, or returns
    DEFERRED when it answers later itself; `ctx.after` runs once the `res` is queued."""

    def register(fn: F) -> F:
        setattr(fn, _MARK, _Registration(name, scope, params, protocols))
        return fn

    return register


def method_table(gateway: object, protocol: int) -> dict[str, MethodSpec]:
    """The methods `gateway` offers on `protocol`, from the handlers its classes register
    (in the order of its method-family bases, then of definition)."""
    table: dict[str, MethodSpec] = {}
    seen: set[str] = set()
    for cls in type(gateway).__mro__:
        for attr, value in vars(cls).items():
            if attr in seen:
                continue  # overridden in a subclass
            seen.add(attr)
            reg = getattr(value, _MARK, None)
            if not isinstance(reg, _Registration) or protocol not in reg.protocols:
                continue
            if reg.name in table:
                raise TypeError(f"two handlers for the gateway method {reg.name!r}")
            params = (
                reg.params if isinstance(reg.params, Schema) else reg.params(protocol)
            )
            table[reg.name] = MethodSpec(getattr(gateway, attr), reg.scope, params)
    return table
