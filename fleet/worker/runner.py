"""One gateway's runner: its connection loop, start to end, again and again.

A runner connects with backoff, tells people what a refusal means (refusals.py), writes the
hello, hands the events to its router (events.py), whose first one is the sync (sync.py),
and lets the REST fallback (fallback.py) read the gateway while the WebSocket is not ready.
To a capability it is the `GatewayLink` of its gateway: an id, a name, a protocol and
`call`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from fleet import capabilities, envrules, services
from fleet.dbretry import db
from fleet.envrules import tls_context, tls_failure_text
from fleet.gateway import SCOPES as PROTOCOL_SCOPES
from fleet.gateway import (
    Closed,
    ConnectionLost,
    ConnectOptions,
    ConnectRefused,
    ErrorShape,
    Event,
    GatewayConnection,
    GatewayError,
    HelloOk,
    PinnedSSLContext,
    TlsConfigError,
    find_tls_failure,
)
from fleet.groups import apush, fleet_group
from fleet.models import Gateway
from fleet.worker.events import EventRouter
from fleet.worker.fallback import RestFallback
from fleet.worker.refusals import (
    AUTH_RETRY_SECONDS,
    TLS_RETRY_SECONDS,
    Backoff,
    close_outcome,
    device_token_note,
    refusal_outcome,
    settings_refusal,
    shared_token_refused,
)
from fleet.worker.sync import sync as full_sync

log = logging.getLogger(__name__)
State = Gateway.State


def runner_config(gateway: Gateway) -> tuple[Any, ...]:
    """What a runner was started with: when any of it changes, the runner is restarted
    (a new URL, token variable, TLS setting, or a rotated device identity)."""
    return (
        gateway.url,
        gateway.rest_url,
        gateway.token_env,
        gateway.tls_ca_file,
        gateway.tls_ca_env,
        gateway.tls_pin,
        gateway.identity_rotated_at,
    )


class GatewayRunner:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway_id = gateway.pk
        self.name = gateway.name
        self.url = gateway.url
        self.rest_url = gateway.rest_url
        self.token_env = gateway.token_env
        self.tls = gateway.tls_settings
        self.config = runner_config(gateway)
        self.conn: GatewayConnection | None = None
        self.connected = asyncio.Event()
        self.stopping = asyncio.Event()
        self.backoff = Backoff()
        self.not_ready_since = time.monotonic()
        self.last_ws_error = ""
        self.drop_device_token = False
        # After the shared token was refused: authenticate with the device token instead
        # (until that is refused too); `auth_note` tells people why.
        self.use_device_token = False
        self.auth_note = ""
        self.protocol: int | None = None
        self.sync_count = 0
        self.events = EventRouter(self)
        self.fallback = RestFallback(self)

    @property
    def fallback_active(self) -> bool:
        return self.fallback.active

    @property
    def last_event_at(self) -> float | None:
        """When the last event came (time.time()); the worker books it on the lease."""
        return self.events.last_event_at

    # -- the connection loop ----------------------------------------------------------------

    async def run(self) -> None:
        state, why = settings_refusal(self.url, self.rest_url, self.token_env, self.tls)
        if why:
            # Nothing is read or sent; a change of the settings restarts the runner.
            log.warning("gateway %s: %s", self.name, why)
            await self.set_state(state, why)
            await self.stopping.wait()
            return
        supervisor = asyncio.create_task(
            self.fallback.supervise(), name=f"fallback-{self.name}"
        )
        try:
            while not self.stopping.is_set():
                delay = await self._connect_once()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stopping.wait(), delay)
        finally:
            supervisor.cancel()
            await self.fallback.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor

    async def stop(self) -> None:
        self.stopping.set()
        if self.conn is not None:
            await self.conn.close(1000, "worker stopping")

    async def _connect_once(self) -> float:
        """One connection, start to end; returns how long to wait before the next."""
        token = envrules.read_env(self.token_env, envrules.TOKEN)
        device, device_token = await db(services.device_key_for)(self.gateway_id)
        if self.drop_device_token:
            device_token, self.drop_device_token = "", False
            self.use_device_token = False
            await db(services.store_device_token)(self.gateway_id, "")
        if not token and not device_token:
            await self.set_state(
                State.AUTH_FAILED,
                f"No token: set {self.token_env or 'OPENCLAW_GATEWAY_TOKEN'} in the worker's environment"
                + (f" ({self.last_ws_error})." if self.last_ws_error else "."),
            )
            return AUTH_RETRY_SECONDS
        try:
            ssl_context = self.tls_context()
        except TlsConfigError as exc:
            await self._failed(State.TLS_FAILED, f"TLS settings: {exc}")
            return TLS_RETRY_SECONDS
        if not self.fallback.active:
            await self.set_state(
                State.CONNECTING, self.last_ws_error, keep_pairing=True
            )
        conn = GatewayConnection(
            ConnectOptions(
                url=self.url,
                token=token,
                device=device,
                device_token=device_token,
                prefer_device_token=self.use_device_token,
                ssl_context=ssl_context,
                display_name=envrules.DISPLAY_NAME,
                user_agent=envrules.USER_AGENT,
                scopes=(*PROTOCOL_SCOPES, *capabilities.connect_scopes()),
                caps=("tool-events", *capabilities.connect_caps()),
            ),
            self.events.on_event,
            self.events.on_events,
        )
        self.conn = conn
        try:
            hello = await conn.connect()
        except ConnectRefused as exc:
            return await self._refused(exc, bool(device_token))
        except (OSError, TimeoutError) as exc:
            failure = find_tls_failure(exc)
            if failure is not None:
                await self._failed(
                    State.TLS_FAILED, tls_failure_text(failure, self.tls)
                )
                return TLS_RETRY_SECONDS
            reason = str(exc) or exc.__class__.__name__
            await self._failed(
                State.OFFLINE,
                f"Cannot reach the gateway at {envrules.safe_url(self.url)}: {reason}",
            )
            return self.backoff.next()
        # Connected: hello first (the sync runs as the first queued event), then read.
        self.backoff.reset()
        await self._on_hello(hello)
        conn.enqueue(Event("client.hello", None, None))
        closed = await conn.run()
        self.connected.clear()
        self.not_ready_since = time.monotonic()
        self.conn = None
        await self.events.lost()
        if self.stopping.is_set():
            return 0
        return await self._after_close(closed)

    async def _refused(self, exc: ConnectRefused, have_device_token: bool) -> float:
        outcome = refusal_outcome(exc, self.token_env)
        self.drop_device_token = outcome.drop_device_token
        if outcome.retry_with_device_token:
            if have_device_token and not self.use_device_token:
                self.use_device_token = True
                self.auth_note = device_token_note(self.token_env)
            else:
                outcome = shared_token_refused(self.token_env)
        await self._failed(outcome.state, outcome.message, **outcome.fields)
        return outcome.delay if outcome.delay is not None else self.backoff.next()

    async def _after_close(self, closed: Closed) -> float:
        outcome = close_outcome(closed, self.token_env)
        if outcome.remember:
            self.last_ws_error = outcome.message
        if outcome.drop_device_token:
            self.drop_device_token = True
        if outcome.log_level is not None:
            log.log(outcome.log_level, "gateway %s: %s", self.name, outcome.message)
        await self.set_state(State.CONNECTING, outcome.message)
        return outcome.delay if outcome.delay is not None else self.backoff.next()

    def tls_context(self) -> PinnedSSLContext | None:
        """The TLS context for wss:// and https:// (made per connect: a CA bundle or the
        environment may have changed); None for plain ws://."""
        secure = self.url.startswith(("wss://", "https://")) or (
            self.rest_url.startswith("https://")
        )
        return tls_context(self.tls) if secure else None

    async def _failed(self, state: str, message: str, **fields: Any) -> None:
        self.last_ws_error = message
        log.info("gateway %s: %s", self.name, message)
        if (self.fallback.active or self.fallback.blocked) and state in (
            State.OFFLINE,
            State.CONNECTING,
        ):
            # The REST poller owns the state meanwhile (or its TLS failure stays shown).
            return
        if state in (State.PAIRING_REQUIRED, State.AUTH_FAILED, State.TLS_FAILED):
            # A person must act: a running REST poller would overwrite what they must read.
            await self.fallback.stop()
        await self.set_state(state, message, **fields)

    async def set_state(
        self, state: str, error: str = "", keep_pairing: bool = False, **fields: Any
    ) -> None:
        if keep_pairing:
            current = (
                await Gateway.objects.filter(pk=self.gateway_id)
                .values_list("state", flat=True)
                .afirst()
            )
            if current in (State.PAIRING_REQUIRED, State.AUTH_FAILED, State.TLS_FAILED):
                return
        if await db(services.set_state)(self.gateway_id, state, error, **fields):
            await apush(fleet_group(), "fleet.gateway", gateway_id=self.gateway_id)

    async def _on_hello(self, hello: HelloOk) -> None:
        self.protocol = hello.protocol
        self.last_ws_error = ""
        # Connected first: the fallback supervisor must not start a new poller while this
        # one is being stopped. A state write the poller already sent lands before ours:
        # both go through the same database thread, in order.
        self.connected.set()
        await self.fallback.stop()
        if hello.device_token:
            scopes = (
                hello.auth.get("scopes")
                if isinstance(hello.auth.get("scopes"), list)
                else []
            )
            await db(services.store_device_token)(
                self.gateway_id, hello.device_token, scopes
            )
        await db(services.record_hello)(
            self.gateway_id,
            protocol=hello.protocol,
            server_version=hello.server_version,
            main_session_key=hello.main_session_key,
        )
        if self.use_device_token and self.auth_note:
            # Connected, but on the device token: say so on the card until it is fixed.
            await db(services.set_state)(
                self.gateway_id, State.CONNECTED, self.auth_note
            )
        log.info(
            "gateway %s: connected, protocol %s, version %s",
            self.name,
            hello.protocol,
            hello.server_version,
        )
        await apush(fleet_group(), "fleet.gateway", gateway_id=self.gateway_id)

    # -- what the router and the web call -------------------------------------------------

    async def sync(self, conn: GatewayConnection, subscribe: bool) -> None:
        """The full sync (sync.py); the router runs it after a hello and a seq gap."""
        await full_sync(conn, self.gateway_id, self.name, self.protocol, subscribe)
        self.sync_count += 1

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        """A call for the web. UNAVAILABLE answers are retried after `retryAfterMs`."""
        for attempt in range(3):
            conn = self.conn
            if conn is None or not self.connected.is_set():
                raise GatewayError(
                    method, ErrorShape("UNAVAILABLE_HERE", self._not_connected_text())
                )
            try:
                return await conn.request(method, params)
            except GatewayError as exc:
                if (
                    exc.error.code == "UNAVAILABLE"
                    and exc.error.retryable
                    and attempt < 2
                ):
                    await asyncio.sleep(
                        min((exc.error.retry_after_ms or 500) / 1000, 5)
                    )
                    continue
                raise
            except ConnectionLost:
                raise GatewayError(
                    method,
                    ErrorShape(
                        "UNAVAILABLE_HERE",
                        "The gateway connection dropped during the call.",
                    ),
                ) from None
        raise AssertionError("unreachable")

    def _not_connected_text(self) -> str:
        if self.fallback.active:
            return f"The gateway {self.name} is in REST fallback: chat and session actions are unavailable."
        return f"The gateway {self.name} is not connected right now."
