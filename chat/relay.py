"""What the worker does with a gateway's chat traffic: `session.message` is stored (the
durable transcript), `chat` and `agent` events are relayed to the session's group for live
streaming. Called by the worker for every such event, in the order they arrived."""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async

from chat import services
from fleet.groups import apush, session_group


async def on_session_message(gateway_id: int, payload: Any) -> None:
    stored = await database_sync_to_async(services.store_session_message)(
        gateway_id, payload
    )
    if stored is not None:
        session_pk, message_id = stored
        await apush(
            session_group(session_pk), "chat.stored", message_id=str(message_id)
        )


async def on_chat_event(gateway_id: int, payload: Any) -> None:
    await _relay(gateway_id, "gateway.chat", payload)


async def on_agent_event(gateway_id: int, payload: Any) -> None:
    await _relay(gateway_id, "gateway.agent", payload)


async def on_connection_lost(gateway_id: int) -> None:
    """Runs in flight lose their terminal event when the socket drops."""


async def _relay(gateway_id: int, type_: str, payload: Any) -> None:
    if not isinstance(payload, dict) or not isinstance(payload.get("sessionKey"), str):
        return
    session_pk = await database_sync_to_async(services.session_pk_for)(
        gateway_id, payload["sessionKey"]
    )
    if session_pk is not None:
        await apush(session_group(session_pk), type_, payload=payload)
