"""`/ws/cron/`: the cron page's list, live, re-rendered after each `cron.changed` note
(the worker sends one after every event or reconcile that changed the mirror)."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from django.template.loader import render_to_string

from cron.services import GROUP
from cron.views import TEMPLATE, _gateway_filter, context_for
from fleet.consumers import _Coalescing
from fleet.live import EVERYTHING, shared_group


def render_list(user: Any, gateway_id: int | None) -> str:
    return render_to_string(f"{TEMPLATE}#cron-list", context_for(user, gateway_id))


class CronConsumer(_Coalescing):
    channel_layer_alias = None  # notes come through the process's shared subscription

    user: Any
    gateway_id: int | None = None
    pending = False

    async def connect(self) -> None:
        if await self._admit() is None:
            return
        self.user = self.scope["user"]
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        self.gateway_id = _gateway_filter((query.get("gateway") or [""])[0])
        self.shared = shared_group(GROUP)
        await self.shared.join(self)
        await self.accept()
        self._last_push = asyncio.get_running_loop().time()
        await self._send_list()

    async def disconnect(self, code: int) -> None:
        await super().disconnect(code)
        shared = getattr(self, "shared", None)
        if shared is not None:
            await shared.leave(self)

    def take_note(self, message: dict[str, Any]) -> None:
        if message.get("type") in ("cron.changed", EVERYTHING["type"]):
            self.pending = True
            self._schedule()

    def _has_pending(self) -> bool:
        return self.pending

    async def _flush(self) -> None:
        self.pending = False
        await self._send_list()

    async def _send_list(self) -> None:
        html = await database_sync_to_async(render_list)(self.user, self.gateway_id)
        await self.send(text_data=html)
