"""`/ws/alerts/`: the alerts page's list, live. It listens to the navigation's notes
(fleet/nav.py): the evaluator, the sender and the actions push `nav.badge` "alerts"."""

from __future__ import annotations

import asyncio
from typing import Any

from channels.db import database_sync_to_async
from django.template.loader import render_to_string

from alerts.notify import BADGE, NAV_GROUP
from alerts.views import TEMPLATE, context_for
from fleet.consumers import _Coalescing
from fleet.live import EVERYTHING, shared_group


def render_list(user: Any) -> str:
    return render_to_string(f"{TEMPLATE}#alert-list", context_for(user))


class AlertsConsumer(_Coalescing):
    socket_kind = "alerts"
    channel_layer_alias = None  # notes come through the process's shared subscription

    user: Any
    pending = False

    async def connect(self) -> None:
        if await self._admit() is None:
            return
        self.user = self.scope["user"]
        self.shared = shared_group(NAV_GROUP)
        await self.shared.join(self)
        await self.accept()
        self._last_push = asyncio.get_running_loop().time()
        await self.send(text_data=await database_sync_to_async(render_list)(self.user))

    async def disconnect(self, code: int) -> None:
        await super().disconnect(code)
        shared = getattr(self, "shared", None)
        if shared is not None:
            await shared.leave(self)

    def take_note(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if (kind == "nav.badge" and message.get("badge") == BADGE) or (
            kind == EVERYTHING["type"]
        ):
            self.pending = True
            self._schedule()

    def _has_pending(self) -> bool:
        return self.pending

    async def _flush(self) -> None:
        self.pending = False
        await self.send(text_data=await database_sync_to_async(render_list)(self.user))
