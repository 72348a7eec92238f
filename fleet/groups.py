"""Channel-layer group names, built in one place from primary keys so they always match
`^[a-zA-Z0-9\\-_.]+$` and stay short; and the one helper that pushes to them.

Pushes are small JSON notes ("session 42 changed"), not rendered HTML: each consumer renders
for its own user and coalesces bursts, reading the database the worker wrote first."""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

log = logging.getLogger(__name__)

FLEET = "fleet"


def fleet_group() -> str:
    return FLEET


def session_group(session_pk: int) -> str:
    return f"session.{int(session_pk)}"


async def apush(group: str, type_: str, **fields: Any) -> None:
    """Send an event to a group. A channel layer that is down (Redis gone) must not stop
    the caller: the database already holds the state, and consumers catch up on reconnect."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await layer.group_send(group, {"type": type_, **fields})
    except Exception as exc:  # noqa: BLE001 - any transport failure is logged, not raised
        log.warning("push to %s failed: %s", group, exc)


def push(group: str, type_: str, **fields: Any) -> None:
    async_to_sync(apush)(group, type_, **fields)
