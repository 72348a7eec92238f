"""The worker side of exec approvals: the events, the pending list after each (re)connect,
and the calls the web may ask for (fleet/capabilities.py)."""

from __future__ import annotations

from typing import Any

from approvals import services
from fleet import capabilities, roles
from fleet.dbretry import db


async def on_requested(link: capabilities.GatewayLink, payload: Any) -> None:
    await db(services.record_requested)(link.gateway_id, payload)


async def on_resolved(link: capabilities.GatewayLink, payload: Any) -> None:
    await db(services.record_resolved)(link.gateway_id, payload)


async def read_pending(link: capabilities.GatewayLink) -> None:
    """On every (re)connect: what is pending now, so no request is missed."""
    payload = await link.call("exec.approval.list", {})
    await db(services.sync_pending)(link.gateway_id, payload)


CAPABILITY = capabilities.Capability(
    name="approvals",
    events={
        "exec.approval.requested": on_requested,
        "exec.approval.resolved": on_resolved,
    },
    calls={
        "exec.approval.resolve": roles.OPERATOR,
        "exec.approval.list": roles.VIEWER,
        "approval.history": roles.VIEWER,
        "exec.approval.grants.list": roles.ADMIN,
        "exec.approval.grants.revoke": roles.ADMIN,
    },
    authorize={"exec.approval.resolve": services.authorize_resolve},
    connect_caps=("approvals",),
    connect_scopes=("operator.approvals",),
    on_ready=read_pending,
    periodic=(capabilities.Periodic(30.0, services.expire_due, "approvals-expire"),),
)
