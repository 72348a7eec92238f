"""An asyncio client for one OpenClaw gateway connection (protocol 3 and 4).

One `GatewayConnection` is one socket: `connect()` does the challenge → connect → hello-ok
handshake, `run()` reads frames until the socket ends, `request()` sends a call and waits
for its answer. Events are queued and handed to `on_event` one at a time, in order, on a
task of their own: a handler may itself call `request()` (a resync does) without blocking
the reader that must deliver the answer. Reconnecting is the caller's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from fleet.gateway import protocol
from fleet.gateway.identity import DeviceKey
from fleet.gateway.protocol import ErrorShape, Event, FrameError, Response, parse_frame

log = logging.getLogger(__name__)

CLIENT_VERSION = "0.1.0"
MAX_FRAME_BYTES = 32 * 1024 * 1024
# Event frames held while the handler is busy; beyond this we drop the connection and
# resync, rather than grow without bound.
EVENT_QUEUE_LIMIT = 10_000

EventHandler = Callable[[Event], Awaitable[None]]
BatchHandler = Callable[[list[Event]], Awaitable[None]]

# Events that may be handed over together (to `on_events`, when given): a run of them that
# is already waiting in the queue, in order, up to BATCH_LIMIT. A burst of `sessions.changed`
# then costs one database transaction, not one each. Nothing waits to fill a batch.
BATCH_EVENTS = frozenset({"sessions.changed"})
BATCH_LIMIT = 500

# Events that carry a run's live stream. They go on a queue of their own, so that a token
# never waits behind database work done for other events (a burst of `sessions.changed`
# at the start of every run). Order is kept within each queue.
STREAM_EVENTS = frozenset({"chat", "agent", "session.tool"})


class GatewayError(Exception):
    """The gateway answered a call with an error."""

    def __init__(self, method: str, error: ErrorShape) -> None:
        super().__init__(f"{method}: {error.message}")
        self.method = method
        self.error = error


class ConnectRefused(Exception):
    """The handshake did not end in hello-ok: the gateway said why (error), or closed."""

    def __init__(
        self,
        message: str,
        error: ErrorShape | None = None,
        close_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.error = error
        self.close_code = close_code


class ConnectionLost(Exception):
    """The socket ended while a call was waiting."""


@dataclass(frozen=True)
class HelloOk:
    protocol: int
    server_version: str
    tick_interval_ms: int
    snapshot: dict[str, Any]
    auth: dict[str, Any]
    methods: frozenset[str]
    raw: dict[str, Any]

    @property
    def device_token(self) -> str:
        value = self.auth.get("deviceToken")
        return value if isinstance(value, str) else ""

    @property
    def main_session_key(self) -> str:
        defaults = self.snapshot.get("sessionDefaults")
        if isinstance(defaults, dict) and isinstance(
            defaults.get("mainSessionKey"), str
        ):
            return str(defaults["mainSessionKey"])
        return ""

    @classmethod
    def parse(cls, payload: Any) -> HelloOk:
        if not isinstance(payload, dict) or payload.get("type") != "hello-ok":
            raise FrameError("connect answered without hello-ok")
        proto = payload.get("protocol")
        if not isinstance(proto, int):
            raise FrameError("hello-ok without a protocol number")
        server = (
            payload.get("server") if isinstance(payload.get("server"), dict) else {}
        )
        policy = (
            payload.get("policy") if isinstance(payload.get("policy"), dict) else {}
        )
        features = (
            payload.get("features") if isinstance(payload.get("features"), dict) else {}
        )
        tick = policy.get("tickIntervalMs") if isinstance(policy, dict) else None
        methods = features.get("methods") if isinstance(features, dict) else None
        snapshot = payload.get("snapshot")
        auth = payload.get("auth")
        return cls(
            protocol=proto,
            server_version=str(server.get("version", ""))
            if isinstance(server, dict)
            else "",
            tick_interval_ms=tick if isinstance(tick, int) and tick > 0 else 30_000,
            snapshot=snapshot if isinstance(snapshot, dict) else {},
            auth=auth if isinstance(auth, dict) else {},
            methods=frozenset(m for m in methods if isinstance(m, str))
            if isinstance(methods, list)
            else frozenset(),
            raw=payload,
        )


@dataclass
class ConnectOptions:
    url: str
    token: str = ""
    device: DeviceKey | None = None
    device_token: str = ""
    # Authenticate with the device token even though a shared token is set (the gateway
    # refused the shared token and offered `canRetryWithDeviceToken`).
    prefer_device_token: bool = False
    ssl_context: ssl.SSLContext | None = None
    # How this client introduces itself (the gateway's device list shows it).
    display_name: str = "OpenClaw client"
    user_agent: str = f"openclaw-python-client/{CLIENT_VERSION}"
    platform: str = "linux"
    open_timeout: float = 10.0
    request_timeout: float = 30.0
    scopes: tuple[str, ...] = protocol.SCOPES
    # What this client declares it handles; e.g. "approvals" makes the gateway send it exec
    # approval requests (with the operator.approvals scope).
    caps: tuple[str, ...] = ("tool-events",)


@dataclass
class Closed:
    """Why `run()` ended."""

    code: int | None
    reason: str
    shutdown: dict[str, Any] | None = (
        None  # the `shutdown` event's payload, if one came
    )


@dataclass
class _Pending:
    method: str
    future: asyncio.Future[Any]
    # `agent` answers twice on one id: first `accepted`, then the result.
    expect_final: bool = False
    ack: asyncio.Future[Any] | None = None


@dataclass
class _Stats:
    malformed_frames: int = 0
    events: int = 0
    seq_gaps: int = 0
    last_frame_at: float = field(default_factory=time.monotonic)


def ws_url(url: str) -> str:
    """The WebSocket URL for a gateway URL given as ws(s):// or http(s)://."""
    if url.startswith("http://"):
        return "ws://" + url[len("http://") :]
    if url.startswith("https://"):
        return "wss://" + url[len("https://") :]
    return url


class GatewayConnection:
    def __init__(
        self,
        options: ConnectOptions,
        on_event: EventHandler,
        on_events: BatchHandler | None = None,
    ) -> None:
        self.options = options
        self.on_event = on_event
        self.on_events = on_events
        self.hello: HelloOk | None = None
        self.stats = _Stats()
        self._ws: ClientConnection | None = None
        self._pending: dict[str, _Pending] = {}
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._stream: asyncio.Queue[Event | None] = asyncio.Queue()
        self._last_seq: int | None = None
        self._shutdown: dict[str, Any] | None = None

    # -- handshake -------------------------------------------------------------------------

    async def connect(self) -> HelloOk:
        """Open the socket and complete the handshake, or raise ConnectRefused (the gateway
        said no, or closed) or OSError/TimeoutError (it could not be reached)."""
        opts = self.options
        url = ws_url(opts.url)
        try:
            ws = await websockets.connect(
                url,
                open_timeout=opts.open_timeout,
                max_size=MAX_FRAME_BYTES,
                ssl=opts.ssl_context if url.startswith("wss://") else None,
                # The gateway pings us with `tick`; its own library answers our pings too,
                # but a dead peer is found by the tick watchdog either way.
                ping_interval=20,
                ping_timeout=20,
                compression=None,
                user_agent_header=opts.user_agent,
                # No Origin header: a backend client must not look like a browser.
            )
        except InvalidURI as exc:
            raise ConnectRefused(f"invalid gateway URL: {exc}") from None
        except InvalidHandshake as exc:
            raise ConnectRefused(
                f"the gateway refused the WebSocket upgrade: {exc}"
            ) from None
        self._ws = ws
        try:
            challenge = await asyncio.wait_for(
                self._read_challenge(ws), opts.open_timeout
            )
            rid = uuid.uuid4().hex
            await ws.send(
                protocol.request_frame(rid, "connect", self._connect_params(challenge))
            )
            response = await asyncio.wait_for(
                self._read_response(ws, rid), opts.open_timeout
            )
        except ConnectionClosed as exc:
            await ws.close()
            raise ConnectRefused(
                f"the gateway closed the connection during the handshake ({_close_text(exc)})",
                close_code=_close_code(exc),
            ) from None
        except BaseException:
            await ws.close()
            raise
        if not response.ok:
            code = await self._close_code_after_refusal(ws)
            assert response.error is not None
            raise ConnectRefused(
                response.error.message, response.error, close_code=code
            )
        try:
            self.hello = HelloOk.parse(response.payload)
        except FrameError as exc:
            await ws.close()
            raise ConnectRefused(f"unexpected handshake answer: {exc}") from None
        self.stats.last_frame_at = time.monotonic()
        return self.hello

    def _connect_params(self, challenge: dict[str, Any]) -> dict[str, Any]:
        opts = self.options
        nonce = str(challenge.get("nonce", ""))
        signed_at = challenge.get("ts")
        if not isinstance(signed_at, int):
            signed_at = int(time.time() * 1000)
        # The shared token when we have one; otherwise the device token the gateway issued.
        auth: dict[str, Any] = {}
        if opts.device_token and (opts.prefer_device_token or not opts.token):
            auth["deviceToken"] = opts.device_token
        elif opts.token:
            auth["token"] = opts.token
        params: dict[str, Any] = {
            "minProtocol": protocol.MIN_PROTOCOL,
            "maxProtocol": protocol.MAX_PROTOCOL,
            "client": {
                "id": protocol.CLIENT_ID,
                "version": CLIENT_VERSION,
                "platform": opts.platform,
                "mode": protocol.CLIENT_MODE,
                "displayName": opts.display_name,
            },
            "role": protocol.ROLE,
            "scopes": list(opts.scopes),
            "caps": list(opts.caps),
            "auth": auth,
            "userAgent": opts.user_agent,
            "locale": "en-US",
        }
        if opts.device is not None:
            params["device"] = opts.device.sign_connect(
                client_id=protocol.CLIENT_ID,
                client_mode=protocol.CLIENT_MODE,
                role=protocol.ROLE,
                scopes=list(opts.scopes),
                signed_at=signed_at,
                token=str(auth.get("token") or auth.get("deviceToken") or ""),
                nonce=nonce,
                platform=opts.platform,
            )
        return params

    async def _read_challenge(self, ws: ClientConnection) -> dict[str, Any]:
        while True:
            frame = self._parse(await ws.recv())
            if isinstance(frame, Event) and frame.event == "connect.challenge":
                return frame.payload if isinstance(frame.payload, dict) else {}

    async def _read_response(self, ws: ClientConnection, rid: str) -> Response:
        while True:
            frame = self._parse(await ws.recv())
            if isinstance(frame, Response) and frame.id == rid:
                return frame

    async def _close_code_after_refusal(self, ws: ClientConnection) -> int | None:
        """The gateway sends the error, then closes: wait a moment for the close code."""
        with contextlib.suppress(TimeoutError, ConnectionClosed):
            async with asyncio.timeout(2):
                async for _ in ws:
                    pass
        await ws.close()
        return ws.close_code

    def _parse(self, raw: str | bytes) -> protocol.Frame | None:
        try:
            return parse_frame(raw)
        except FrameError as exc:
            self.stats.malformed_frames += 1
            log.warning(
                "skipped a malformed frame from %s: %s",
                _safe_url(self.options.url),
                exc,
            )
            return None

    # -- the running connection ---------------------------------------------------------

    async def run(self) -> Closed:
        """Read frames until the socket ends; dispatch events in order. Returns why it ended."""
        ws = self._ws
        if ws is None or self.hello is None:
            raise RuntimeError("connect() first")
        dispatchers = [
            asyncio.create_task(
                self._dispatch_events(self._events), name="gateway-events"
            ),
            asyncio.create_task(
                self._dispatch_events(self._stream), name="gateway-stream"
            ),
        ]
        watchdog = asyncio.create_task(
            self._watch_ticks(ws), name="gateway-tick-watchdog"
        )
        too_big = False
        try:
            async for raw in ws:
                self.stats.last_frame_at = time.monotonic()
                frame = self._parse(raw)
                if isinstance(frame, Response):
                    self._resolve(frame)
                elif isinstance(frame, Event):
                    self._accept_event(frame)
                    if (
                        max(self._events.qsize(), self._stream.qsize())
                        > EVENT_QUEUE_LIMIT
                    ):
                        log.warning(
                            "event handler fell behind; dropping the connection"
                        )
                        await ws.close(4000, "client overloaded")
        except ConnectionClosed as exc:
            if exc.sent is not None and exc.sent.code == protocol.CLOSE_TOO_BIG:
                # Our side closed: the gateway may not answer the close any more.
                too_big = True
                log.warning(
                    "the gateway at %s sent a frame over %d MiB; closed the connection (1009)",
                    _safe_url(self.options.url),
                    MAX_FRAME_BYTES // 2**20,
                )
        finally:
            watchdog.cancel()
            self._fail_pending(ConnectionLost("the gateway connection closed"))
            # Let the handlers finish what already arrived (database first), then stop them.
            self._events.put_nowait(None)
            self._stream.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*dispatchers)
        code = protocol.CLOSE_TOO_BIG if too_big else ws.close_code
        reason = ws.close_reason or ""
        return Closed(code=code, reason=reason, shutdown=self._shutdown)

    def enqueue(self, event: Event) -> None:
        """Queue a synthetic event (e.g. "sync now") in order with the gateway's events."""
        self._events.put_nowait(event)

    def _accept_event(self, event: Event) -> None:
        self.stats.events += 1
        if event.seq is not None:
            last = self._last_seq
            if last is not None and event.seq > last + 1:
                self.stats.seq_gaps += 1
                self._events.put_nowait(
                    Event(
                        "client.seq_gap",
                        {"expected": last + 1, "received": event.seq},
                        None,
                    )
                )
            if last is None or event.seq > last:
                self._last_seq = event.seq
        if event.event == "shutdown":
            self._shutdown = event.payload if isinstance(event.payload, dict) else {}
        (self._stream if event.event in STREAM_EVENTS else self._events).put_nowait(
            event
        )

    async def _dispatch_events(self, queue: asyncio.Queue[Event | None]) -> None:
        held: list[
            Event | None
        ] = []  # taken from the queue while batching, not yet handled
        while True:
            event = held.pop() if held else await queue.get()
            if event is None:
                return
            batch = [event]
            if self.on_events is not None and event.event in BATCH_EVENTS:
                while len(batch) < BATCH_LIMIT and not queue.empty():
                    following = queue.get_nowait()
                    if following is None or following.event != event.event:
                        held.append(following)
                        break
                    batch.append(following)
            try:
                if len(batch) > 1 and self.on_events is not None:
                    await self.on_events(batch)
                else:
                    await self.on_event(event)
            except asyncio.CancelledError:
                raise
            except Exception:
                # One bad event must not end the connection; the next resync repairs state.
                log.exception("handling the %s event failed", event.event)

    async def _watch_ticks(self, ws: ClientConnection) -> None:
        assert self.hello is not None
        limit = 2 * self.hello.tick_interval_ms / 1000
        while True:
            await asyncio.sleep(min(limit / 4, 5.0))
            silent = time.monotonic() - self.stats.last_frame_at
            if silent > limit:
                log.warning(
                    "no frame from the gateway for %.0f s; reconnecting", silent
                )
                await ws.close(4000, "tick timeout")
                return

    def _resolve(self, response: Response) -> None:
        pending = self._pending.get(response.id)
        if pending is None:
            return
        if (
            pending.expect_final
            and response.ok
            and isinstance(response.payload, dict)
            and response.payload.get("status") == "accepted"
        ):
            if pending.ack is not None and not pending.ack.done():
                pending.ack.set_result(response.payload)
            return
        del self._pending[response.id]
        if pending.future.done():
            return
        if response.ok:
            pending.future.set_result(response.payload)
        else:
            assert response.error is not None
            pending.future.set_exception(GatewayError(pending.method, response.error))
        if pending.ack is not None and not pending.ack.done():
            pending.ack.set_result(None)

    def _fail_pending(self, exc: Exception) -> None:
        for pending in self._pending.values():
            for fut in (pending.future, pending.ack):
                if fut is not None and not fut.done():
                    fut.set_exception(exc)
                    # Nobody may be waiting on an ack any more: don't warn about it.
                    fut.exception()
        self._pending.clear()

    # -- calls ----------------------------------------------------------------------------

    async def request(
        self, method: str, params: dict[str, Any], timeout: float | None = None
    ) -> Any:
        """Call a method and return its payload; GatewayError when the gateway says no,
        ConnectionLost when the socket ends first, TimeoutError when it does not answer."""
        pending = await self._send(method, params)
        return await asyncio.wait_for(
            pending.future, timeout or self.options.request_timeout
        )

    async def request_with_final(
        self, method: str, params: dict[str, Any], timeout: float | None = None
    ) -> tuple[Any, asyncio.Future[Any]]:
        """For `agent`: wait for the `accepted` answer, return it with a future for the
        second answer (the run's result)."""
        pending = await self._send(method, params, expect_final=True)
        assert pending.ack is not None
        done, _ = await asyncio.wait(
            {pending.ack, pending.future},
            timeout=timeout or self.options.request_timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if not done:
            raise TimeoutError(f"{method}: no answer")
        if pending.future.done():
            result = pending.future.result()  # raises the GatewayError, if any
            return result, pending.future
        return pending.ack.result(), pending.future

    async def _send(
        self, method: str, params: dict[str, Any], expect_final: bool = False
    ) -> _Pending:
        ws = self._ws
        if ws is None or self.hello is None:
            raise ConnectionLost("not connected")
        rid = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        pending = _Pending(
            method=method,
            future=loop.create_future(),
            expect_final=expect_final,
            ack=loop.create_future() if expect_final else None,
        )
        self._pending[rid] = pending
        try:
            await ws.send(protocol.request_frame(rid, method, params))
        except ConnectionClosed:
            self._pending.pop(rid, None)
            raise ConnectionLost("the gateway connection closed") from None
        return pending

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self._ws is not None:
            await self._ws.close(code, reason)


def _close_code(exc: ConnectionClosed) -> int | None:
    return exc.rcvd.code if exc.rcvd is not None else None


def _close_text(exc: ConnectionClosed) -> str:
    if exc.rcvd is None:
        return "no close frame"
    return f"code {exc.rcvd.code}" + (f": {exc.rcvd.reason}" if exc.rcvd.reason else "")


def _safe_url(url: str) -> str:
    """A URL for logs: no credentials, no query string."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"
