"""The REST fallback: while the WebSocket is not ready, read the gateway over HTTP.

If the WebSocket is not ready within GATEWAY_WS_READY_TIMEOUT (at start or after a loss),
a poller reads `/readyz`, `agents_list` and `sessions_list` every GATEWAY_REST_POLL_INTERVAL
and feeds the same persist functions as the sync. It stands down the moment the WebSocket
is ready again, and never starts while a person must act (auth, pairing, TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from django.conf import settings

from fleet import envrules, services
from fleet.dbretry import db, retry_db
from fleet.envrules import GatewayTls, tls_failure_text
from fleet.gateway import (
    PinnedSSLContext,
    RestClient,
    RestError,
    TlsConfigError,
    rest_base_url,
)
from fleet.models import Gateway
from fleet.worker.refusals import TLS_RETRY_SECONDS
from fleet.worker.sync import announce

log = logging.getLogger(__name__)
State = Gateway.State


class FallbackHost(Protocol):
    """What the fallback needs of its runner: the gateway's settings, whether (and since
    when not) the WebSocket is ready, its last error, and the state writer."""

    gateway_id: int
    name: str
    url: str
    rest_url: str
    token_env: str
    tls: GatewayTls
    connected: asyncio.Event
    not_ready_since: float
    last_ws_error: str

    def tls_context(self) -> PinnedSSLContext | None: ...

    async def set_state(self, state: str, error: str = "") -> None: ...


class RestFallback:
    def __init__(self, host: FallbackHost) -> None:
        self.host = host
        self.task: asyncio.Task[None] | None = None
        # After the REST side refused TLS: no new poller (and its tls_failed state stays on
        # show) until this monotonic time.
        self.blocked_until = 0.0

    @property
    def active(self) -> bool:
        return self.task is not None and not self.task.done()

    @property
    def blocked(self) -> bool:
        return time.monotonic() < self.blocked_until

    async def supervise(self) -> None:
        """Start a poller whenever the WebSocket has not been ready for long enough; runs
        for the runner's whole life (cancelled when it ends)."""
        host = self.host
        timeout = settings.GATEWAY_WS_READY_TIMEOUT
        while True:
            await asyncio.sleep(min(0.5, timeout / 4))
            if host.connected.is_set() or self.active:
                continue
            if time.monotonic() - host.not_ready_since < timeout:
                continue
            if self.blocked:
                continue  # its TLS was refused a moment ago
            state = await retry_db(
                Gateway.objects.filter(pk=host.gateway_id)
                .values_list("state", flat=True)
                .afirst,
                "the fallback check",
            )
            if state in (State.AUTH_FAILED, State.PAIRING_REQUIRED, State.TLS_FAILED):
                continue  # a person must act; polling would not help
            if host.connected.is_set():
                continue  # the hello came while we read the state: no poller after it
            log.info(
                "gateway %s: WebSocket not ready after %.0f s; starting the REST fallback",
                host.name,
                timeout,
            )
            self.task = asyncio.create_task(self._poll(), name=f"rest-{host.name}")

    async def stop(self) -> None:
        task, self.task = self.task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            log.info("gateway %s: REST fallback stood down", self.host.name)

    async def _poll(self) -> None:
        host = self.host
        token = envrules.read_env(host.token_env, envrules.TOKEN)
        try:
            # The same trust and pin as the WebSocket, checked before the token is sent.
            context = host.tls_context()
        except TlsConfigError as exc:
            await host.set_state(State.TLS_FAILED, f"TLS settings: {exc}")
            return
        client = RestClient(
            rest_base_url(host.url, host.rest_url),
            token,
            verify=context if context is not None else True,
        )
        interval = settings.GATEWAY_REST_POLL_INTERVAL
        try:
            while True:
                try:
                    await self.poll_once(client)
                except RestError as exc:
                    if exc.tls is not None:
                        # A person must act: stop polling (the supervisor leaves a
                        # tls_failed gateway alone; the WebSocket retries once a minute).
                        self.blocked_until = time.monotonic() + TLS_RETRY_SECONDS
                        await host.set_state(
                            State.TLS_FAILED,
                            "REST fallback: " + tls_failure_text(exc.tls, host.tls),
                        )
                        return
                    else:
                        await host.set_state(
                            State.OFFLINE,
                            f"{host.last_ws_error} REST fallback failed too: {exc}".strip(),
                        )
                await asyncio.sleep(interval)
        finally:
            await client.aclose()

    async def poll_once(self, client: RestClient) -> None:
        host = self.host
        await client.readyz()
        agents = await client.invoke("agents_list")
        sessions = await client.invoke("sessions_list")
        agent_result = await db(services.reconcile_agents)(
            host.gateway_id, agents, merge=True
        )
        rows = (
            sessions.get("sessions")
            if isinstance(sessions.get("sessions"), list)
            else []
        )
        session_result = await db(services.reconcile_sessions)(
            host.gateway_id, rows, complete=True, merge=True
        )
        await host.set_state(
            State.REST_FALLBACK,
            f"WebSocket not ready ({host.last_ws_error or 'no answer'}); reading the gateway over REST every "
            f"{settings.GATEWAY_REST_POLL_INTERVAL:g} s.",
        )
        await announce(host.gateway_id, agent_result, session_result)
