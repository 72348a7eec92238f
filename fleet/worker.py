"""The gateway worker: one live connection per gateway it holds.

`Worker` claims gateways through a lease in the database (so two workers never hold the
same one), runs a `GatewayRunner` for each, and takes commands from the web on a channel of
its own. A runner connects with backoff, syncs after every hello-ok, persists each event
and then pushes, and falls back to REST polling while the WebSocket is not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth import get_user_model

from fleet import calls, capabilities, envrules, leases, services
from fleet.dbretry import DB_ERRORS, db, outages, retry_db
from fleet.envrules import tls_context, tls_failure_text
from fleet.gateway import (
    CLOSE_AUTH_CHANGED,
    CLOSE_SERVICE_RESTART,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN_LATER,
    MAX_FRAME_BYTES,
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
    RestClient,
    RestError,
    TlsConfigError,
    find_tls_failure,
    rest_base_url,
)
from fleet.gateway import SCOPES as PROTOCOL_SCOPES
from fleet.groups import apush, fleet_group, session_group
from fleet.models import PAIRING_REASONS, Gateway

log = logging.getLogger(__name__)
State = Gateway.State

SESSIONS_PAGE = 500
AUTH_RETRY_SECONDS = 60.0
# While a pairing request waits for a person: a steady, slow retry (no backoff growth), so
# the worker connects within seconds of the approval without hammering the gateway.
PAIRING_RETRY_SECONDS = 10.0
PROTOCOL_RETRY_SECONDS = 60.0
# A refused certificate (untrusted, or not the pinned one) needs a person too.
TLS_RETRY_SECONDS = 60.0
# Close 4001 with this reason: the gateway's shared secret changed. Any other 4001 reason
# ("device removed", "client invalidated: device-token-revoked", ...) is about our device.
AUTH_CHANGED_REASON = "gateway auth changed"
# Why a worker let a gateway go while running: its share shrank (fleet/leases.py).
HANDED_OVER = "Handed over to another worker: the workers share the gateways."


class Backoff:
    """1 s doubling to 30 s, each delay drawn between half and all of it (jitter)."""

    def __init__(self, first: float = 1.0, cap: float = 30.0) -> None:
        self.first, self.cap, self.attempts = first, cap, 0

    def next(self) -> float:
        base = min(self.cap, self.first * 2**self.attempts)
        self.attempts += 1
        return random.uniform(base / 2, base)

    def reset(self) -> None:
        self.attempts = 0


@dataclass(frozen=True)
class Outcome:
    """What a refused connect means: the state to show, the words, when to try again."""

    state: str
    message: str
    delay: float | None  # None: the usual backoff
    fields: dict[str, Any]
    drop_device_token: bool = False
    # The gateway refused the shared token but offers a retry with our device token.
    retry_with_device_token: bool = False


def refusal_outcome(exc: ConnectRefused, token_env: str) -> Outcome:
    error: ErrorShape | None = exc.error
    code = error.detail_code if error else ""
    if error is not None and (error.code == "NOT_PAIRED" or code == "PAIRING_REQUIRED"):
        request_id = str(error.details.get("requestId") or "")
        reason = str(error.details.get("reason") or "not-paired")
        words = PAIRING_REASONS.get(reason, f"the gateway asks for pairing ({reason})")
        if request_id:
            message = (
                f"Pairing required: {words}. On the gateway host, run: "
                f"openclaw devices approve {request_id} "
                "(the Control Center connects by itself once it is approved)."
            )
        else:
            message = (
                f"Pairing required: {words} ({error.message}). On the gateway host, run "
                "openclaw devices list, then openclaw devices approve <requestId>."
            )
        return Outcome(
            State.PAIRING_REQUIRED,
            message,
            PAIRING_RETRY_SECONDS,
            {"pairing_request_id": request_id[:200], "pairing_reason": reason[:50]},
        )
    if code == "AUTH_DEVICE_TOKEN_MISMATCH":
        return Outcome(
            State.CONNECTING,
            "The gateway no longer accepts this Control Center's device token (revoked or "
            f"rotated on the gateway); trying the shared token from {token_env}.",
            1.0,
            {},
            drop_device_token=True,
        )
    if (
        code == "AUTH_TOKEN_MISMATCH"
        and error is not None
        and error.details.get("canRetryWithDeviceToken") is True
    ):
        return Outcome(
            State.CONNECTING,
            f"The gateway refused the shared token in {token_env} (token mismatch: its shared "
            "secret may have changed); retrying with this Control Center's device token.",
            1.0,
            {},
            retry_with_device_token=True,
        )
    if code == "AUTH_TOKEN_MISSING":
        return Outcome(
            State.AUTH_FAILED,
            f"The gateway wants a token and none was sent: set {token_env} in the worker's environment.",
            AUTH_RETRY_SECONDS,
            {},
        )
    if (
        code == "AUTH_TOKEN_MISMATCH"
        or code.startswith("AUTH_")
        or code.startswith("DEVICE_")
    ):
        what = (
            "token mismatch"
            if code == "AUTH_TOKEN_MISMATCH"
            else code.lower().replace("_", " ")
        )
        return Outcome(
            State.AUTH_FAILED,
            f"The gateway refused our credentials ({what}). Check {token_env} in the worker's environment.",
            float(error.retry_after_ms) / 1000
            if error and error.retry_after_ms
            else AUTH_RETRY_SECONDS,
            {},
        )
    if code == "PROTOCOL_MISMATCH" or (error is None and exc.close_code == 1002):
        expected = error.details.get("expectedProtocol") if error else None
        return Outcome(
            State.OFFLINE,
            f"Protocol mismatch: the gateway speaks protocol {expected or 'another version'}, "
            "the Control Center speaks 3 to 4.",
            PROTOCOL_RETRY_SECONDS,
            {},
        )
    if (
        error is not None and error.retryable
    ) or exc.close_code == CLOSE_TRY_AGAIN_LATER:
        delay = error.retry_after_ms / 1000 if error and error.retry_after_ms else 1.0
        return Outcome(
            State.CONNECTING, f"The gateway is starting: {exc}", max(delay, 0.1), {}
        )
    return Outcome(
        State.OFFLINE, f"The gateway refused the connection: {exc}", None, {}
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
        self.fallback_task: asyncio.Task[None] | None = None
        self.last_ws_error = ""
        self.drop_device_token = False
        # After the shared token was refused: authenticate with the device token instead
        # (until that is refused too); `auth_note` tells people why.
        self.use_device_token = False
        self.auth_note = ""
        # After the REST side refused TLS: no new poller (and its tls_failed state stays on
        # show) until this monotonic time.
        self.rest_blocked_until = 0.0
        self.last_event_at: float | None = None
        self.protocol: int | None = None
        self.sync_count = 0
        self.db_outages_seen = outages.count
        self._pushing: asyncio.Task[None] | None = None
        self._catching_up: asyncio.Task[None] | None = None
        self._catch_up_again = False
        # What the worker itself does with an event (the sync and the fleet's own rows);
        # what an event means to a capability (chat, approvals, ...) is in its table
        # (fleet/capabilities.py). Both run, the worker's first.
        self._own_events: dict[str, Callable[[Any], Awaitable[None]]] = {
            "client.hello": self._on_hello_event,
            "client.seq_gap": self._on_seq_gap,
            "sessions.changed": self._on_session_changed,
            "presence": self._on_presence,
            "health": self._on_health,
        }

    # -- the connection loop ----------------------------------------------------------------

    def refusal(self) -> tuple[str, str]:
        """(state, why) when this gateway's settings may not be used at all (a variable the
        deployment does not allow, a token that would go out in clear or to an address with
        credentials in it); ("", "") when they may. The admin form refuses the same; this
        is for a row written around it."""
        if self.token_env and (
            why := envrules.env_name_refusal(self.token_env, envrules.TOKEN)
        ):
            return State.AUTH_FAILED, why
        if self.tls.ca_env and (
            why := envrules.env_name_refusal(self.tls.ca_env, envrules.CA_BUNDLE)
        ):
            return State.TLS_FAILED, f"TLS settings: {why}"
        why = envrules.url_refusal(self.url) or (
            envrules.url_refusal(self.rest_url, "The REST fallback address")
            if self.rest_url
            else ""
        )
        return (State.OFFLINE, why) if why else ("", "")

    async def run(self) -> None:
        state, why = self.refusal()
        if why:
            # Nothing is read or sent; a change of the settings restarts the runner.
            log.warning("gateway %s: %s", self.name, why)
            await self._set_state(state, why)
            await self.stopping.wait()
            return
        supervisor = asyncio.create_task(
            self._supervise_fallback(), name=f"fallback-{self.name}"
        )
        try:
            while not self.stopping.is_set():
                delay = await self._connect_once()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stopping.wait(), delay)
        finally:
            supervisor.cancel()
            await self._stop_fallback()
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
            await self._set_state(
                State.AUTH_FAILED,
                f"No token: set {self.token_env or 'OPENCLAW_GATEWAY_TOKEN'} in the worker's environment"
                + (f" ({self.last_ws_error})." if self.last_ws_error else "."),
            )
            return AUTH_RETRY_SECONDS
        try:
            ssl_context = self._tls_context()
        except TlsConfigError as exc:
            await self._failed(State.TLS_FAILED, f"TLS settings: {exc}")
            return TLS_RETRY_SECONDS
        if not self.fallback_active:
            await self._set_state(
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
            self._on_event,
            self._on_events,
        )
        self.conn = conn
        try:
            hello = await conn.connect()
        except ConnectRefused as exc:
            outcome = refusal_outcome(exc, self.token_env)
            self.drop_device_token = outcome.drop_device_token
            if outcome.retry_with_device_token:
                if device_token and not self.use_device_token:
                    self.use_device_token = True
                    self.auth_note = (
                        f"Connected with this Control Center's device token: the gateway "
                        f"refused the shared token in {self.token_env} (its shared secret "
                        f"changed?). Put the new token in {self.token_env} and restart the "
                        "worker; the REST fallback and a new pairing need it."
                    )
                else:
                    outcome = Outcome(
                        State.AUTH_FAILED,
                        f"The gateway refused the shared token in {self.token_env} (token "
                        "mismatch) and this Control Center holds no device token it accepts. "
                        f"If the gateway's shared secret changed, put the new token in "
                        f"{self.token_env} and restart the worker.",
                        AUTH_RETRY_SECONDS,
                        {},
                    )
            await self._failed(outcome.state, outcome.message, **outcome.fields)
            return outcome.delay if outcome.delay is not None else self.backoff.next()
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
        await self._stop_catching_up()
        for capability in capabilities.all_capabilities():
            if capability.on_lost is not None:
                await self._outage_safe("client.lost", capability.on_lost(self))
        if self.stopping.is_set():
            return 0
        return await self._after_close(closed)

    async def _after_close(self, closed: Closed) -> float:
        if closed.code == CLOSE_SERVICE_RESTART or closed.shutdown is not None:
            expected = (closed.shutdown or {}).get("restartExpectedMs")
            self.last_ws_error = "The gateway is restarting."
            await self._set_state(State.CONNECTING, self.last_ws_error)
            return (
                min(max(float(expected) / 1000, 0.5), 30)
                if isinstance(expected, int | float)
                else 1.0
            )
        if closed.code == CLOSE_TRY_AGAIN_LATER:
            await self._set_state(
                State.CONNECTING, "The gateway asked us to try again shortly."
            )
            return 1.0
        if closed.code == CLOSE_AUTH_CHANGED:
            if closed.reason.strip().lower() == AUTH_CHANGED_REASON:
                # The shared secret changed: try again with what the environment holds
                # now; if the gateway refuses it, the device token is tried next, and a
                # refusal of both shows as auth_failed saying what to do.
                self.last_ws_error = (
                    "The gateway's shared secret changed (close 4001): reconnecting. If "
                    f"{self.token_env} still holds the old token, put the new one there "
                    "and restart the worker."
                )
            else:
                # Our device token was revoked or rotated, or the device removed: forget
                # the token and come back with the shared one (the gateway may ask for
                # pairing again; the card then shows the approve command).
                self.drop_device_token = True
                self.last_ws_error = (
                    f"The gateway ended this Control Center's device session (close 4001: "
                    f"{closed.reason or 'no reason'}): its device token was revoked or "
                    f"rotated, or the device removed. Reconnecting with the shared token "
                    f"from {self.token_env}; approve a new pairing request if one appears."
                )
            log.info("gateway %s: %s", self.name, self.last_ws_error)
            await self._set_state(State.CONNECTING, self.last_ws_error)
            return 1.0
        self.last_ws_error = f"The connection closed (code {closed.code}{': ' + closed.reason if closed.reason else ''})."
        if closed.code == CLOSE_TOO_BIG:
            self.last_ws_error = (
                f"The gateway sent a frame over the {MAX_FRAME_BYTES // 2**20} MiB limit, "
                "so the connection was closed (code 1009); reconnecting."
            )
        log.warning("gateway %s: %s", self.name, self.last_ws_error)
        await self._set_state(State.CONNECTING, self.last_ws_error)
        return self.backoff.next()

    def _tls_context(self) -> PinnedSSLContext | None:
        """The TLS context for wss:// and https:// (made per connect: a CA bundle or the
        environment may have changed); None for plain ws://."""
        secure = self.url.startswith(("wss://", "https://")) or (
            self.rest_url.startswith("https://")
        )
        return tls_context(self.tls) if secure else None

    async def _failed(self, state: str, message: str, **fields: Any) -> None:
        self.last_ws_error = message
        log.info("gateway %s: %s", self.name, message)
        if (
            self.fallback_active or time.monotonic() < self.rest_blocked_until
        ) and state in (State.OFFLINE, State.CONNECTING):
            # The REST poller owns the state meanwhile (or its TLS failure stays shown).
            return
        if state in (State.PAIRING_REQUIRED, State.AUTH_FAILED, State.TLS_FAILED):
            # A person must act: a running REST poller would overwrite what they must read.
            await self._stop_fallback()
        await self._set_state(state, message, **fields)

    async def _set_state(
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
        await self._stop_fallback()
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

    # -- sync ------------------------------------------------------------------------------

    async def sync(self, conn: GatewayConnection, subscribe: bool) -> None:
        """Re-read everything we show and reconcile. We subscribe first, so that changes
        made while we page through the list queue up behind this sync and are applied after
        it, instead of being lost between the list and the subscription."""
        if subscribe:
            await conn.request("sessions.subscribe", {})
        agents = await conn.request("agents.list", {})
        agent_result = await db(services.reconcile_agents)(self.gateway_id, agents)
        rows = await self._all_sessions(conn)
        session_result = await db(services.reconcile_sessions)(
            self.gateway_id, rows, complete=True
        )
        presence = await conn.request("system-presence", {})
        presence_changed = await db(services.replace_presence)(
            self.gateway_id, presence
        )
        health = await conn.request("health", {})
        await db(services.record_health)(self.gateway_id, health)
        self.sync_count += 1
        log.info(
            "gateway %s: synced %d agents, %d sessions (%d written)",
            self.name,
            len(agents.get("agents", [])) if isinstance(agents, dict) else 0,
            len(rows),
            session_result.rows_written,
        )
        await self._announce(agent_result, session_result)
        if presence_changed:
            await apush(fleet_group(), "fleet.presence", gateway_id=self.gateway_id)
        await apush(fleet_group(), "fleet.gateway", gateway_id=self.gateway_id)

    async def _all_sessions(self, conn: GatewayConnection) -> list[Any]:
        if self.protocol is not None and self.protocol < 4:
            # Protocol 3 has no paging (and refuses `offset`): one call has them all.
            page = await conn.request("sessions.list", {})
            return list(page.get("sessions") or []) if isinstance(page, dict) else []
        rows: list[Any] = []
        offset = 0
        while True:
            page = await conn.request(
                "sessions.list", {"limit": SESSIONS_PAGE, "offset": offset}
            )
            if not isinstance(page, dict):
                raise ValueError("sessions.list answered without an object")
            batch = page.get("sessions") or []
            rows.extend(batch)
            next_offset = page.get("nextOffset")
            if not page.get("hasMore") or not batch:
                return rows
            offset = (
                next_offset
                if isinstance(next_offset, int) and next_offset > offset
                else offset + len(batch)
            )

    # -- events ------------------------------------------------------------------------------

    async def _on_event(self, event: Event) -> None:
        await self._outage_safe(event.event, self._handle_event(event))

    async def _on_events(self, events: list[Event]) -> None:
        """A run of queued `sessions.changed` (see BATCH_EVENTS in the client)."""
        self.last_event_at = time.time()
        payloads = [e.payload for e in events]
        await self._outage_safe(events[0].event, self._on_sessions_changed(payloads))
        # Capabilities see the run too (usage books the counters it carries), as one run:
        # a database hop per event would undo the batching.
        name = events[0].event
        for handler in capabilities.batch_handlers(name):
            await self._outage_safe(
                name, self._capability(name, handler(self, payloads))
            )

    async def _outage_safe(self, name: str, handling: Awaitable[None]) -> None:
        """Handle events; after a database outage (survived by retrying, or not: the events
        are then dropped), queue a resync, so whatever went missing meanwhile is read again."""
        is_sync = name in ("client.hello", "client.seq_gap")
        if is_sync:
            self.db_outages_seen = outages.count
        try:
            await handling
        except DB_ERRORS as exc:
            log.error(
                "gateway %s: the database is unavailable; %s event dropped, a resync follows (%s)",
                self.name,
                name,
                exc,
            )
            self.db_outages_seen = -1
            if is_sync:
                return  # the next event tries again, rather than a hot loop of syncs
        conn = self.conn
        if self.db_outages_seen != outages.count and conn is not None:
            log.info("gateway %s: resyncing after a database outage", self.name)
            self.db_outages_seen = outages.count
            conn.enqueue(Event("client.seq_gap", {"reason": "database outage"}, None))

    async def _handle_event(self, event: Event) -> None:
        self.last_event_at = time.time()
        name = event.event
        own = self._own_events.get(name)
        if own is not None:
            await own(event.payload)
        for handler in capabilities.event_handlers(name):
            await self._capability(name, handler(self, event.payload))

    async def _on_hello_event(self, payload: Any) -> None:
        conn = self.conn
        if conn is None:
            return
        await self._guarded_sync(conn, subscribe=True)
        await self._capabilities_ready()

    async def _on_seq_gap(self, payload: Any) -> None:
        log.info("gateway %s: event seq gap %s; resyncing", self.name, payload)
        conn = self.conn
        if conn is not None:
            await self._guarded_sync(conn, subscribe=False)
            # Capabilities whose events may have been dropped reconcile too (cron).
            await self._capabilities_ready()

    async def _capabilities_ready(self) -> None:
        """After a sync each capability catches up (reads what is pending, books what grew
        meanwhile) on a task beside the event stream: a catch-up that calls the gateway two
        hundred times or books a thousand rows must not hold the live events back. What
        the capabilities store is idempotent, so an event may come before or after its
        catch-up. A sync while one runs makes it go round once more when it ends."""
        if self._catching_up is not None and not self._catching_up.done():
            self._catch_up_again = True
            return
        self._catching_up = asyncio.create_task(
            self._catch_up(), name=f"catch-up-{self.name}"
        )

    async def _catch_up(self) -> None:
        while True:
            self._catch_up_again = False
            for capability in capabilities.all_capabilities():
                if capability.on_ready is not None and self.conn is not None:
                    await self._outage_safe(
                        "client.ready",
                        self._capability(capability.name, capability.on_ready(self)),
                    )
            if not self._catch_up_again:
                return

    async def _stop_catching_up(self) -> None:
        task, self._catching_up = self._catching_up, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _on_session_changed(self, payload: Any) -> None:
        await self._on_sessions_changed([payload])

    async def _on_presence(self, payload: Any) -> None:
        if await db(services.replace_presence)(self.gateway_id, payload):
            await apush(fleet_group(), "fleet.presence", gateway_id=self.gateway_id)

    async def _on_health(self, payload: Any) -> None:
        if await db(services.record_health)(self.gateway_id, payload):
            await apush(fleet_group(), "fleet.gateway", gateway_id=self.gateway_id)

    async def _capability(self, what: str, handling: Awaitable[None]) -> None:
        """A capability's handler: a database outage goes up (the resync logic handles it);
        any other failure is logged and the connection goes on."""
        try:
            await handling
        except DB_ERRORS:
            raise
        except (GatewayError, ConnectionLost, TimeoutError) as exc:
            log.warning("gateway %s: %s: %s", self.name, what, exc)
        except Exception:
            log.exception("gateway %s: %s handler failed", self.name, what)

    async def _on_sessions_changed(self, payloads: list[Any]) -> None:
        """Persist in one transaction per run (up to a rowless event, which resyncs the
        list before the rest is applied), then push each changed session once."""
        conn = self.conn
        while payloads:
            batch = await db(services.apply_sessions_changed)(self.gateway_id, payloads)
            payloads = payloads[batch.consumed :]
            if batch.session_ids:
                # The pushes go out on a task while the next run is persisted (each after
                # its own commit); at most one run's pushes are in flight.
                if self._pushing is not None:
                    await self._pushing
                self._pushing = asyncio.create_task(
                    self._push_sessions(batch.session_ids, batch.counts_changed)
                )
            if batch.resync and conn is not None:
                await self._resync_sessions(conn)

    async def _push_sessions(self, session_ids: list[int], counts: bool) -> None:
        await apush(
            fleet_group(),
            "fleet.sessions",
            gateway_id=self.gateway_id,
            session_ids=session_ids,
            counts=counts,
        )
        for pk in session_ids:
            await apush(session_group(pk), "session.changed", session_id=pk)

    async def _guarded_sync(self, conn: GatewayConnection, subscribe: bool) -> None:
        try:
            await self.sync(conn, subscribe)
        except (GatewayError, ConnectionLost, TimeoutError, ValueError) as exc:
            log.warning("gateway %s: sync failed: %s", self.name, exc)
            if isinstance(exc, GatewayError | ValueError | TimeoutError):
                await conn.close(4000, "sync failed")

    async def _resync_sessions(self, conn: GatewayConnection) -> None:
        rows = await self._all_sessions(conn)
        result = await db(services.reconcile_sessions)(
            self.gateway_id, rows, complete=True
        )
        await self._announce(None, result)

    async def _announce(
        self, agents: services.SyncResult | None, sessions: services.SyncResult | None
    ) -> None:
        """After a reconcile: tell the pages what changed (nothing, when nothing did)."""
        if agents is not None and agents.rows_written:
            await apush(fleet_group(), "fleet.agents", gateway_id=self.gateway_id)
        if sessions is not None and sessions.rows_written:
            await apush(
                fleet_group(),
                "fleet.sessions",
                gateway_id=self.gateway_id,
                session_ids=None,
            )

    # -- commands from the web -------------------------------------------------------------

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
        if self.fallback_active:
            return f"The gateway {self.name} is in REST fallback: chat and session actions are unavailable."
        return f"The gateway {self.name} is not connected right now."

    # -- REST fallback ---------------------------------------------------------------------

    @property
    def fallback_active(self) -> bool:
        return self.fallback_task is not None and not self.fallback_task.done()

    async def _supervise_fallback(self) -> None:
        timeout = settings.GATEWAY_WS_READY_TIMEOUT
        while True:
            await asyncio.sleep(min(0.5, timeout / 4))
            if self.connected.is_set() or self.fallback_active:
                continue
            if time.monotonic() - self.not_ready_since < timeout:
                continue
            if time.monotonic() < self.rest_blocked_until:
                continue  # its TLS was refused a moment ago
            state = await retry_db(
                Gateway.objects.filter(pk=self.gateway_id)
                .values_list("state", flat=True)
                .afirst,
                "the fallback check",
            )
            if state in (State.AUTH_FAILED, State.PAIRING_REQUIRED, State.TLS_FAILED):
                continue  # a person must act; polling would not help
            if self.connected.is_set():
                continue  # the hello came while we read the state: no poller after it
            log.info(
                "gateway %s: WebSocket not ready after %.0f s; starting the REST fallback",
                self.name,
                timeout,
            )
            self.fallback_task = asyncio.create_task(
                self._poll_rest(), name=f"rest-{self.name}"
            )

    async def _stop_fallback(self) -> None:
        task, self.fallback_task = self.fallback_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            log.info("gateway %s: REST fallback stood down", self.name)

    async def _poll_rest(self) -> None:
        token = envrules.read_env(self.token_env, envrules.TOKEN)
        try:
            # The same trust and pin as the WebSocket, checked before the token is sent.
            context = self._tls_context()
        except TlsConfigError as exc:
            await self._set_state(State.TLS_FAILED, f"TLS settings: {exc}")
            return
        client = RestClient(
            rest_base_url(self.url, self.rest_url),
            token,
            verify=context if context is not None else True,
        )
        interval = settings.GATEWAY_REST_POLL_INTERVAL
        try:
            while True:
                try:
                    await self.poll_rest_once(client)
                except RestError as exc:
                    if exc.tls is not None:
                        # A person must act: stop polling (the supervisor leaves a
                        # tls_failed gateway alone; the WebSocket retries once a minute).
                        self.rest_blocked_until = time.monotonic() + TLS_RETRY_SECONDS
                        await self._set_state(
                            State.TLS_FAILED,
                            "REST fallback: " + tls_failure_text(exc.tls, self.tls),
                        )
                        return
                    else:
                        await self._set_state(
                            State.OFFLINE,
                            f"{self.last_ws_error} REST fallback failed too: {exc}".strip(),
                        )
                await asyncio.sleep(interval)
        finally:
            await client.aclose()

    async def poll_rest_once(self, client: RestClient) -> None:
        await client.readyz()
        agents = await client.invoke("agents_list")
        sessions = await client.invoke("sessions_list")
        agent_result = await db(services.reconcile_agents)(
            self.gateway_id, agents, merge=True
        )
        rows = (
            sessions.get("sessions")
            if isinstance(sessions.get("sessions"), list)
            else []
        )
        session_result = await db(services.reconcile_sessions)(
            self.gateway_id, rows, complete=True, merge=True
        )
        await self._set_state(
            State.REST_FALLBACK,
            f"WebSocket not ready ({self.last_ws_error or 'no answer'}); reading the gateway over REST every "
            f"{settings.GATEWAY_REST_POLL_INTERVAL:g} s.",
        )
        await self._announce(agent_result, session_result)


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


def worker_owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    """Holds the gateways it can claim; see the module docstring."""

    def __init__(
        self, owner: str | None = None, step_interval: float | None = None
    ) -> None:
        self.owner = owner or worker_owner_id()
        self.step_interval = step_interval or max(
            settings.GATEWAY_LEASE_SECONDS / 3, 0.2
        )
        self.runners: dict[int, tuple[GatewayRunner, asyncio.Task[None]]] = {}
        self.channel = ""
        self.stopping = asyncio.Event()
        self._call_tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        await db(services.ensure_env_gateway)()
        layer = get_channel_layer()
        self.channel = (
            # The default prefix (see fleet/calls.py): `serve` on Redis shares the process
            # with consumers, whose channels would otherwise starve this one.
            await layer.new_channel() if layer is not None else ""
        )
        commands = asyncio.create_task(self._receive_commands(), name="worker-commands")
        periodic = [  # the capabilities' steps (fleet/capabilities.py): alerts, ...
            asyncio.create_task(
                self._periodic(p.seconds, p.step), name=f"worker-{p.name}"
            )
            for capability in capabilities.all_capabilities()
            for p in capability.periodic
        ]
        try:
            while not self.stopping.is_set():
                try:
                    await self.step()
                except DB_ERRORS as exc:  # retried for a while already; try next step
                    log.error(
                        "worker: lease step failed, the database is down: %s", exc
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), self.step_interval)
        finally:
            for task in (commands, *periodic):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.shutdown()

    async def _periodic(self, interval: float, step: capabilities.PeriodicStep) -> None:
        """Run one capability periodic step every `interval` seconds. Its own thread
        (not the worker's one ORM thread), since a step may wait on the network; a failing
        step is logged and tried again on the next tick."""
        call = database_sync_to_async(step, thread_sensitive=False)
        what = getattr(step, "__qualname__", "a periodic step")
        while not self.stopping.is_set():
            try:
                await retry_db(call, what)
            except Exception:
                log.exception(
                    "worker: %s failed; tried again in %.0f s", what, interval
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval)

    def stop(self) -> None:
        self.stopping.set()

    async def step(self) -> None:
        """Claim or renew each enabled gateway; start, restart or stop runners to match."""
        gateways = {g.pk: g for g in await db(services.gateways_to_run)()}
        share = await db(leases.beat)(self.owner, len(self.runners))
        for pk in list(self.runners):
            runner, task = self.runners[pk]
            gateway = gateways.get(pk)
            stale = gateway is None or runner_config(gateway) != runner.config
            if stale or task.done():
                await self._stop_runner(
                    pk,
                    "The gateway's settings changed."
                    if gateway
                    else "The gateway was disabled.",
                )
        for pk, gateway in gateways.items():
            if pk not in self.runners and len(self.runners) >= share.share:
                continue  # our share is full: leave it to the other workers
            if not await db(services.claim_gateway)(pk, self.owner, self.channel):
                if pk in self.runners:
                    # Taken over by another worker, or disabled since the list above was
                    # read (the claim asks for an enabled row). The release changes only
                    # a row this worker still holds, so it lets go of the disabled one and
                    # leaves the taken one alone.
                    log.warning(
                        "gateway %s: lease lost (another worker took it, or it was "
                        "disabled meanwhile)",
                        gateway.name,
                    )
                    await self._stop_runner(pk, "The gateway was disabled.")
                continue
            if pk in self.runners:
                runner = self.runners[pk][0]
                if runner.last_event_at is not None:
                    await db(services.touch_events)(
                        pk, datetime.fromtimestamp(runner.last_event_at, tz=UTC)
                    )
                continue
            runner = GatewayRunner(gateway)
            task = asyncio.create_task(
                self._run_guarded(runner), name=f"gateway-{gateway.name}"
            )
            self.runners[pk] = (runner, task)
        for pk in leases.surplus(list(self.runners), share):  # a new worker appeared
            await self._stop_runner(pk, HANDED_OVER)

    async def _run_guarded(self, runner: GatewayRunner) -> None:
        """A crash in one gateway's runner is logged and that gateway restarted by the next
        step; the other gateways go on."""
        try:
            await runner.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "gateway %s: the runner crashed; it restarts on the next step",
                runner.name,
            )
            await asyncio.sleep(1)

    async def _stop_runner(self, pk: int, reason: str, release: bool = True) -> None:
        runner, task = self.runners.pop(pk)
        await runner.stop()
        try:
            await asyncio.wait_for(task, 5)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
        except Exception:
            log.exception("gateway %s: runner ended with an error", runner.name)
        if release:
            await db(services.release_gateway)(pk, self.owner, reason)
            await apush(fleet_group(), "fleet.gateway", gateway_id=pk)

    async def shutdown(self) -> None:
        for pk in list(self.runners):
            await self._stop_runner(pk, "The gateway worker stopped.")
        with contextlib.suppress(*DB_ERRORS):
            await db(leases.leave)(self.owner)
        for task in list(self._call_tasks):
            task.cancel()

    # -- commands ----------------------------------------------------------------------------

    async def _receive_commands(self) -> None:
        layer = get_channel_layer()
        if layer is None or not self.channel:
            return
        failing_since: float | None = None
        while True:
            try:
                message = await layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except (
                Exception
            ) as exc:  # the channel layer (Redis) is down: keep syncing, retry
                now = time.monotonic()
                if failing_since is None or now - failing_since >= 60:
                    # Once, then once a minute: not a line per second while Redis is gone.
                    failing_since = now
                    log.warning("worker: cannot read commands (%s); retrying", exc)
                await asyncio.sleep(1)
                continue
            if failing_since is not None:
                log.warning("worker: reading commands again")
                failing_since = None
            if message.get("type") == "gateway.call":
                task = asyncio.create_task(self.handle_call(message))
                self._call_tasks.add(task)
                task.add_done_callback(self._call_tasks.discard)

    async def handle_call(self, message: dict[str, Any]) -> None:
        method = str(message.get("method", ""))
        raw_params = message.get("params")
        params: dict[str, Any] = raw_params if isinstance(raw_params, dict) else {}
        reply: dict[str, Any]
        try:
            await self._check_caller(message.get("user_id"), method, params)
            entry = self.runners.get(int(message.get("gateway_id") or 0))
            if entry is None:
                raise GatewayError(
                    method,
                    ErrorShape(
                        "UNAVAILABLE_HERE", "This worker does not hold that gateway."
                    ),
                )
            payload = await entry[0].call(method, params)
            reply = {"ok": True, "payload": payload}
        except PermissionError as exc:
            reply = {"ok": False, "error": {"code": "FORBIDDEN", "message": str(exc)}}
        except GatewayError as exc:
            reply = {
                "ok": False,
                "error": {"code": exc.error.code, "message": exc.error.message},
            }
        except TimeoutError:
            reply = {
                "ok": False,
                "error": {
                    "code": "TIMEOUT",
                    "message": f"The gateway did not answer {method} in time.",
                },
            }
        await self._record(message.get("record"), method, reply)
        layer = get_channel_layer()
        if layer is None:
            return
        with contextlib.suppress(Exception):
            if message.get("reply_to"):
                await layer.send(
                    message["reply_to"], {"type": "gateway.reply", **reply}
                )
        notify = message.get("notify")
        if isinstance(notify, dict) and isinstance(notify.get("group"), str):
            extra = {k: v for k, v in notify.items() if k not in ("group", "type")}
            await apush(
                notify["group"],
                str(notify.get("type", "gateway.reply")),
                reply=reply,
                **extra,
            )

    @staticmethod
    async def _record(record: Any, method: str, reply: dict[str, Any]) -> None:
        """Write the call's outcome with the recorder its caller named, once, before anyone
        is told: the database holds the outcome whether or not a page or a caller waits."""
        if not isinstance(record, dict):
            return
        recorder = calls.recorder(str(record.get("with", "")))
        if recorder is None:
            log.error("%s: no recorder named %r", method, record.get("with"))
            return
        try:
            await db(recorder)(record, reply)
        except Exception:  # the outcome is lost, but the caller still gets its answer
            log.exception("%s: recording the outcome failed", method)

    @staticmethod
    async def _check_caller(
        user_id: Any, method: str, params: dict[str, Any] | None = None
    ) -> None:
        """The role is checked by the web and again here, before anything reaches the gateway."""
        user = (
            await get_user_model().objects.filter(pk=user_id, is_active=True).afirst()
            if user_id
            else None
        )
        await db(calls.check_role)(user, method, params)


async def run_worker(stop: asyncio.Event, worker: Worker | None = None) -> None:
    """Run a worker until `stop` is set (the commands wire signals to it)."""
    worker = worker or Worker()
    task = asyncio.create_task(worker.run(), name="gateway-worker")
    await stop.wait()
    worker.stop()
    await task
