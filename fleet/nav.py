"""Navigation badges: links in every page's navigation with a live count (open alerts;
later pending approvals). An app registers one from its `AppConfig.ready`:

    nav.register(NavBadge("alerts", "Alerts", "alerts", count_for_user))

and, when the count may have moved, pushes `{"type": "nav.badge", "badge": "alerts"}` to
the `nav` group (fleet.groups.push). Every page's base template renders the badges
(`{% nav_badges %}`) and opens `/ws/nav/`, whose consumer sends the current badges on
connect and a re-rendered badge after each note: HTML that htmx swaps by element id."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async
from django.template.loader import render_to_string
from django.urls import reverse

from fleet.consumers import _Coalescing
from fleet.live import EVERYTHING, shared_group

NAV_GROUP = "nav"
BADGE_TEMPLATE = "fleet/nav_badge.html"


@dataclass(frozen=True)
class NavBadge:
    name: str  # the element id is nav-badge-<name>; [a-z0-9-] only
    label: str
    url_name: str
    # The count this user sees; None: the link is not shown to them (no permission).
    count: Callable[[Any], int | None]
    template: str = BADGE_TEMPLATE


_badges: dict[str, NavBadge] = {}


def register(badge: NavBadge) -> None:
    """Add (or replace, by name: ``ready()`` may run twice in tests) a badge."""
    _badges[badge.name] = badge


def badges() -> list[NavBadge]:
    return list(_badges.values())


def render_badge(badge: NavBadge, user: Any) -> str:
    count = badge.count(user)
    return render_to_string(
        badge.template,
        {
            "badge": badge,
            "count": count,
            "shown": count is not None,
            "url": reverse(badge.url_name),
        },
    )


def render_badges(user: Any, names: set[str] | None = None) -> str:
    return "".join(
        render_badge(b, user) for b in badges() if names is None or b.name in names
    )


class NavConsumer(_Coalescing):
    """`/ws/nav/`: the navigation's badges, live, for every logged-in user with a role."""

    socket_kind = "nav"

    channel_layer_alias = None  # notes come through the process's shared subscription

    user: Any
    pending_names: set[str]
    pending_all = False

    async def connect(self) -> None:
        if await self._admit() is None:
            return
        self.user = self.scope["user"]
        self.pending_names = set()
        self.shared = shared_group(NAV_GROUP)
        await self.shared.join(self)
        await self.accept()
        self._last_push = asyncio.get_running_loop().time()
        html = await database_sync_to_async(render_badges)(self.user)
        if html:
            await self.send(text_data=html)

    async def disconnect(self, code: int) -> None:
        await super().disconnect(code)
        shared = getattr(self, "shared", None)
        if shared is not None:
            await shared.leave(self)

    def take_note(self, message: dict[str, Any]) -> None:
        if message.get("type") == "nav.badge" and isinstance(message.get("badge"), str):
            self.pending_names.add(message["badge"])
        elif message.get("type") == EVERYTHING["type"]:
            self.pending_all = True
        else:
            return
        self._schedule()

    def _has_pending(self) -> bool:
        return self.pending_all or bool(self.pending_names)

    async def _flush(self) -> None:
        names = None if self.pending_all else set(self.pending_names)
        self.pending_all, self.pending_names = False, set()
        html = await database_sync_to_async(render_badges)(self.user, names)
        if html:
            await self.send(text_data=html)
