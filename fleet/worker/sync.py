"""The sync: re-read everything a gateway reports and reconcile it ("refresh, never guess").

Run after every hello-ok, after an event-seq gap or a database outage (the whole sync), and
after a rowless `sessions.changed` (the sessions only). Each function takes the live
connection and the gateway's id; the runner keeps no state here but its sync count.
"""

from __future__ import annotations

import logging
from typing import Any

from fleet import services
from fleet.dbretry import db
from fleet.gateway import GatewayConnection
from fleet.groups import apush, fleet_group

log = logging.getLogger(__name__)

SESSIONS_PAGE = 500


async def sync(
    conn: GatewayConnection,
    gateway_id: int,
    name: str,
    protocol: int | None,
    subscribe: bool,
) -> None:
    """Re-read everything we show and reconcile. We subscribe first, so that changes
    made while we page through the list queue up behind this sync and are applied after
    it, instead of being lost between the list and the subscription."""
    if subscribe:
        await conn.request("sessions.subscribe", {})
    agents = await conn.request("agents.list", {})
    agent_result = await db(services.reconcile_agents)(gateway_id, agents)
    rows = await all_sessions(conn, protocol)
    session_result = await db(services.reconcile_sessions)(
        gateway_id, rows, complete=True
    )
    presence = await conn.request("system-presence", {})
    presence_changed = await db(services.replace_presence)(gateway_id, presence)
    health = await conn.request("health", {})
    await db(services.record_health)(gateway_id, health)
    log.info(
        "gateway %s: synced %d agents, %d sessions (%d written)",
        name,
        len(agents.get("agents", [])) if isinstance(agents, dict) else 0,
        len(rows),
        session_result.rows_written,
    )
    await announce(gateway_id, agent_result, session_result)
    if presence_changed:
        await apush(fleet_group(), "fleet.presence", gateway_id=gateway_id)
    await apush(fleet_group(), "fleet.gateway", gateway_id=gateway_id)


async def resync_sessions(
    conn: GatewayConnection, gateway_id: int, protocol: int | None
) -> None:
    """The session list alone, after a `sessions.changed` that carried no row."""
    rows = await all_sessions(conn, protocol)
    result = await db(services.reconcile_sessions)(gateway_id, rows, complete=True)
    await announce(gateway_id, None, result)


async def all_sessions(conn: GatewayConnection, protocol: int | None) -> list[Any]:
    """Every page of `sessions.list`."""
    if protocol is not None and protocol < 4:
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


async def announce(
    gateway_id: int,
    agents: services.SyncResult | None,
    sessions: services.SyncResult | None,
) -> None:
    """After a reconcile: tell the pages what changed (nothing, when nothing did)."""
    if agents is not None and agents.rows_written:
        await apush(fleet_group(), "fleet.agents", gateway_id=gateway_id)
    if sessions is not None and sessions.rows_written:
        await apush(
            fleet_group(), "fleet.sessions", gateway_id=gateway_id, session_ids=None
        )
