"""The base of every live page consumer."""

from __future__ import annotations

from typing import Any

from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer


class LiveConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]
    """A WebSocket consumer whose handlers reach the database only through
    `database_sync_to_async`, which closes stale connections itself in the thread it uses.

    Channels' own `dispatch` also closes them before *every* message, with a hop into the
    one thread that all of a process's ORM work shares. A note fanned out to hundreds of
    sockets, or a token delta, would then queue behind views and renders for nothing: the
    streaming and fan-out latency came from there."""

    async def dispatch(self, message: dict[str, Any]) -> None:
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)
