"""`/ws/approvals/`: the inbox, live. It listens to the navigation's notes (fleet/nav.py):
requests, decisions and expiries push `nav.badge` "approvals". A decision sent over the
socket (`{"approval": pk, "decision": ...}`) is checked here like a POST."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from channels.db import database_sync_to_async
from django.template.loader import render_to_string

from approvals import services
from approvals.models import Approval
from approvals.views import TEMPLATE, context_for
from fleet.consumers import _Coalescing
from fleet.live import EVERYTHING, shared_group


def render_inbox(user: Any, notice: str = "") -> str:
    context = context_for(user)
    context["notice"] = notice
    return render_to_string(f"{TEMPLATE}#approval-inbox", context)


def decide_from_socket(user: Any, pk: Any, decision: str) -> str:
    approval = Approval.objects.filter(pk=int(pk) if str(pk).isdigit() else 0).first()
    if approval is None:
        return "That approval no longer exists."
    try:
        return services.decide(approval, user, decision)
    except services.NotAllowed as exc:
        return f"Refused: {exc}"


class ApprovalsConsumer(_Coalescing):
    channel_layer_alias = None  # notes come through the process's shared subscription

    user: Any
    pending = False

    async def connect(self) -> None:
        if await self._admit() is None:
            return
        self.user = self.scope["user"]
        self.shared = shared_group(services.NAV_GROUP)
        await self.shared.join(self)
        await self.accept()
        self._last_push = asyncio.get_running_loop().time()
        await self.send(text_data=await database_sync_to_async(render_inbox)(self.user))

    async def disconnect(self, code: int) -> None:
        await super().disconnect(code)
        shared = getattr(self, "shared", None)
        if shared is not None:
            await shared.leave(self)

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None
    ) -> None:
        try:
            message = json.loads(text_data or "{}")
        except ValueError:
            return
        if not isinstance(message, dict) or "decision" not in message:
            return
        notice = await database_sync_to_async(decide_from_socket)(
            self.user, message.get("approval"), str(message.get("decision", ""))
        )
        await self.send(
            text_data=await database_sync_to_async(render_inbox)(self.user, notice)
        )

    def take_note(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if (kind == "nav.badge" and message.get("badge") == services.BADGE) or (
            kind == EVERYTHING["type"]
        ):
            self.pending = True
            self._schedule()

    def _has_pending(self) -> bool:
        return self.pending

    async def _flush(self) -> None:
        self.pending = False
        await self.send(text_data=await database_sync_to_async(render_inbox)(self.user))
