"""What a runner does with the events of its connection.

The worker's own handlers (the sync and the fleet's rows) run first, then each capability's
handlers from the table in fleet/capabilities.py. Runs of `sessions.changed` are persisted
in one transaction each; after a sync the capabilities catch up on a task of their own; a
database outage while handling queues a resync.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fleet import capabilities, services
from fleet.capabilities import GatewayLink
from fleet.dbretry import DB_ERRORS, db, outages
from fleet.gateway import ConnectionLost, Event, GatewayConnection, GatewayError
from fleet.groups import apush, fleet_group, session_group
from fleet.worker.sync import resync_sessions

log = logging.getLogger(__name__)


class EventHost(GatewayLink, Protocol):
    """What the router needs of its runner: the link the capabilities are handed, the
    live connection (None between connections) and the full sync."""

    conn: GatewayConnection | None

    async def sync(self, conn: GatewayConnection, subscribe: bool) -> None: ...


class EventRouter:
    def __init__(self, host: EventHost) -> None:
        self.host = host
        self.last_event_at: float | None = None
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

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def gateway_id(self) -> int:
        return self.host.gateway_id

    # -- what the connection hands over ------------------------------------------------------

    async def on_event(self, event: Event) -> None:
        await self._outage_safe(event.event, self._handle_event(event))

    async def on_events(self, events: list[Event]) -> None:
        """A run of queued `sessions.changed` (see BATCH_EVENTS in the client)."""
        self.last_event_at = time.time()
        payloads = [e.payload for e in events]
        await self._outage_safe(events[0].event, self._on_sessions_changed(payloads))
        # Capabilities see the run too (usage books the counters it carries), as one run:
        # a database hop per event would undo the batching.
        name = events[0].event
        for handler in capabilities.batch_handlers(name):
            await self._outage_safe(
                name, self._capability(name, handler(self.host, payloads))
            )

    async def lost(self) -> None:
        """The connection ended: the catch-up stops, each capability hears of it."""
        await self._stop_catching_up()
        for capability in capabilities.all_capabilities():
            if capability.on_lost is not None:
                await self._outage_safe("client.lost", capability.on_lost(self.host))

    # -- routing -----------------------------------------------------------------------------

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
        conn = self.host.conn
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
        # Each capability hears the event even when one before it met a database outage;
        # the outage goes up after all of them (the resync logic handles it).
        outage: BaseException | None = None
        for handler in capabilities.event_handlers(name):
            try:
                await self._capability(name, handler(self.host, event.payload))
            except DB_ERRORS as exc:
                outage = outage or exc
        if outage is not None:
            raise outage

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

    # -- the worker's own events -------------------------------------------------------------

    async def _on_hello_event(self, payload: Any) -> None:
        conn = self.host.conn
        if conn is None:
            return
        await self._guarded_sync(conn, subscribe=True)
        await self._capabilities_ready()

    async def _on_seq_gap(self, payload: Any) -> None:
        log.info("gateway %s: event seq gap %s; resyncing", self.name, payload)
        conn = self.host.conn
        if conn is not None:
            await self._guarded_sync(conn, subscribe=False)
            # Capabilities whose events may have been dropped reconcile too (cron).
            await self._capabilities_ready()

    async def _guarded_sync(self, conn: GatewayConnection, subscribe: bool) -> None:
        try:
            await self.host.sync(conn, subscribe)
        except (GatewayError, ConnectionLost, TimeoutError, ValueError) as exc:
            log.warning("gateway %s: sync failed: %s", self.name, exc)
            if isinstance(exc, GatewayError | ValueError | TimeoutError):
                await conn.close(4000, "sync failed")

    async def _on_session_changed(self, payload: Any) -> None:
        await self._on_sessions_changed([payload])

    async def _on_presence(self, payload: Any) -> None:
        if await db(services.replace_presence)(self.gateway_id, payload):
            await apush(fleet_group(), "fleet.presence", gateway_id=self.gateway_id)

    async def _on_health(self, payload: Any) -> None:
        if await db(services.record_health)(self.gateway_id, payload):
            await apush(fleet_group(), "fleet.gateway", gateway_id=self.gateway_id)

    async def _on_sessions_changed(self, payloads: list[Any]) -> None:
        """Persist in one transaction per run (up to a rowless event, which resyncs the
        list before the rest is applied), then push each changed session once."""
        conn = self.host.conn
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
                await resync_sessions(conn, self.gateway_id, self.host.protocol)

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

    # -- the capabilities' catch-up ----------------------------------------------------------

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
                if capability.on_ready is not None and self.host.conn is not None:
                    await self._outage_safe(
                        "client.ready",
                        self._capability(
                            capability.name, capability.on_ready(self.host)
                        ),
                    )
            if not self._catch_up_again:
                return

    async def _stop_catching_up(self) -> None:
        task, self._catching_up = self._catching_up, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
