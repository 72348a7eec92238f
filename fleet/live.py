"""The base of every live page consumer, and the subscription that the sockets of one
process share for a busy group."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from typing import Any, Protocol

from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer

log = logging.getLogger(__name__)


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


class Subscriber(Protocol):
    def take_note(self, message: dict[str, Any]) -> None: ...


# A note that tells every subscriber to refresh everything (sent after the subscription
# was broken: notes may have been missed meanwhile).
EVERYTHING: dict[str, Any] = {"type": "fleet.everything"}


class SharedGroup:
    """One channel-layer subscription to a group for all the sockets of this process that
    show it. A note then costs one layer message per process, not one per socket (with
    Redis: one push and one pop instead of hundreds), and is handed to each socket by a
    plain call.

    The reader outlives a broken layer: when Redis goes away it retries, joins the group
    again (Redis may have lost it), and tells every socket to refresh everything. It also
    joins again every `REJOIN_SECONDS`, before the layer's group expiry forgets it."""

    REJOIN_SECONDS = 3600.0
    RETRY_SECONDS = (0.5, 1.0, 2.0, 5.0)

    def __init__(self, group: str) -> None:
        self.group = group
        self.members: set[Subscriber] = set()
        self.layer = get_channel_layer()
        self.channel = ""
        self.reader: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()

    async def join(self, member: Subscriber) -> None:
        async with self.lock:
            if self.reader is None or self.reader.done():
                self.channel = await self.layer.new_channel()
                try:
                    await self.layer.group_add(self.group, self.channel)
                    joined = True
                except Exception as exc:  # noqa: BLE001 - the reader keeps trying
                    log.warning("channel layer failed for %s: %s", self.group, exc)
                    joined = False
                self.reader = asyncio.create_task(
                    self._read(joined), name=f"shared-group-{self.group}"
                )
            self.members.add(member)

    async def leave(self, member: Subscriber) -> None:
        async with self.lock:
            self.members.discard(member)
            if self.members or self.reader is None:
                return
            self.reader.cancel()
            self.reader = None
            with contextlib.suppress(Exception):  # a layer that is down forgets us
                await self.layer.group_discard(self.group, self.channel)

    async def _read(self, joined: bool) -> None:
        joined_at = asyncio.get_running_loop().time()
        failures = 0 if joined else 1
        while True:
            try:
                if failures:
                    await self.layer.group_add(self.group, self.channel)
                    joined_at = asyncio.get_running_loop().time()
                    log.info("channel layer back: %s rejoined", self.group)
                    self._hand_out(EVERYTHING)
                    failures = 0
                message = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the layer's transport failed
                if not failures:
                    log.warning("channel layer failed for %s: %s", self.group, exc)
                await asyncio.sleep(
                    self.RETRY_SECONDS[min(failures, len(self.RETRY_SECONDS) - 1)]
                )
                failures += 1
                continue
            self._hand_out(message)
            now = asyncio.get_running_loop().time()
            if now - joined_at > self.REJOIN_SECONDS:
                joined_at = now
                with contextlib.suppress(Exception):
                    await self.layer.group_add(self.group, self.channel)

    def _hand_out(self, message: dict[str, Any]) -> None:
        for member in list(self.members):
            try:
                member.take_note(message)
            except Exception:  # one socket's bug must not starve the others
                log.exception("live note failed")


# Per event loop, per group: the shared subscription of this process.
_shared_groups: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[str, SharedGroup]
] = weakref.WeakKeyDictionary()


def shared_group(group: str) -> SharedGroup:
    groups = _shared_groups.setdefault(asyncio.get_running_loop(), {})
    shared = groups.get(group)
    if shared is None or (
        not shared.members and shared.layer is not get_channel_layer()
    ):
        shared = groups[group] = SharedGroup(group)  # first, or the layer was replaced
    return shared
