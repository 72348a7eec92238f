"""Live fleet pages over the htmx `ws` extension.

A consumer per page does auth, group membership, and forwarding: on connect it sends the
current state; on each worker note (small JSON: "session 42 changed") it re-renders the
affected fragments from the page's own template partials, for its own user and filters,
and sends them as HTML that htmx swaps out-of-band by element id.

Bursts are coalesced: a note arriving within `PUSH_INTERVAL` of the last push waits for
the next slot and is merged with whatever else arrives meanwhile, so a socket gets at most
a few frames per second; the last frame always reflects the state after the last note.

The fleet pages of one process share one subscription to the worker's notes
(`fleet.live.shared_group`): a note is one channel-layer message per process, handed to
each socket by a plain call. Many sockets usually show the same thing (same filters, same
role), and their renders are shared while in flight (`_shared`): one database read and one render per view,
not per socket. A socket only joins a render that started after its own note arrived, so
it never receives a state older than the note it was told about."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from channels.db import database_sync_to_async
from django.http import QueryDict
from django.template.loader import render_to_string

from fleet import queries
from fleet.groups import fleet_group, session_group
from fleet.live import EVERYTHING, LiveConsumer, shared_group
from fleet.models import Session
from fleet.roles import can_admin, can_chat, can_view

log = logging.getLogger(__name__)

# At most one frame per socket per this many seconds (the first one goes at once).
PUSH_INTERVAL = 0.25
# The fleet page's, shorter: at fifty gateways notes come all the time, and its renders are
# shared between sockets (see COALESCE_WINDOW), so a shorter interval costs per view.
FLEET_PUSH_INTERVAL = 0.1
# Flushes start on a grid of loop time. The sockets of one process get each note in the
# same call (the shared subscription), so sockets flushing on the same grid time hold the
# same notes and share the render (`_shared`): one per view and slot, not one per socket on
# its own clock. An idle socket flushes at once; a busy one at the next multiple of its
# push interval (one grid for all busy sockets, whenever each connected).
COALESCE_WINDOW = 0.02


def _grid(t: float, step: float) -> float:
    """The first multiple of `step` at or after `t` (within rounding)."""
    return math.ceil(t / step - 1e-6) * step


def _slot(now: float, last_push: float, interval: float) -> float:
    if now >= last_push + interval:
        # Idle: at once. The process's sockets got this note in one call, so their
        # flushes start in the same loop iteration and share the render anyway.
        return now
    return _grid(last_push + interval, interval)


FLEET_TEMPLATE = "fleet/fleet.html"
SESSION_TEMPLATE = "fleet/session.html"

T = TypeVar("T")

# In-flight renders of this process, by (event loop, view key), each with the loop time it
# started; and the render queued behind each (see `_shared`). Entries live only while the
# render runs or waits: this shares work between sockets, it is not a cache of state.
_inflight: dict[tuple[int, Hashable], tuple[float, asyncio.Future[Any]]] = {}
_queued: dict[tuple[int, Hashable], asyncio.Future[Any]] = {}


async def _shared(
    key: Hashable, not_before: float, work: Callable[[], Awaitable[T]]
) -> T:
    """The result of `work` for this view, from a render that started at or after
    `not_before` (so never older than the caller's note). A render in flight that started
    earlier is not joined; the caller waits for the next one instead, which starts when
    that one ends and is shared by every caller arriving meanwhile: 200 sockets connecting
    during a render cost two renders, not 200 queued on the database thread."""
    loop = asyncio.get_running_loop()
    full_key = (id(loop), key)
    entry = _inflight.get(full_key)
    if entry is not None and not entry[1].done():
        if entry[0] >= not_before:
            result: T = await asyncio.shield(entry[1])
            return result
        queued = _queued.get(full_key)
        if queued is None:
            queued = asyncio.ensure_future(_after(entry[1], full_key, work))
            _queued[full_key] = queued
            queued.add_done_callback(_retrieved)
        later: T = await asyncio.shield(queued)
        return later
    return await asyncio.shield(_start(full_key, work))


def _start(
    full_key: tuple[int, Hashable], work: Callable[[], Awaitable[T]]
) -> asyncio.Future[T]:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = asyncio.ensure_future(work())
    _inflight[full_key] = (loop.time(), future)

    def forget(done: asyncio.Future[T]) -> None:
        if _inflight.get(full_key, (0.0, None))[1] is done:
            del _inflight[full_key]
        _retrieved(done)

    future.add_done_callback(forget)
    return future


async def _after(
    previous: asyncio.Future[Any],
    full_key: tuple[int, Hashable],
    work: Callable[[], Awaitable[T]],
) -> T:
    await asyncio.wait([previous])  # its outcome is its own callers' business
    if _queued.get(full_key) is asyncio.current_task():
        del _queued[full_key]
    return await _start(full_key, work)


def _retrieved(done: asyncio.Future[Any]) -> None:
    if not done.cancelled():
        done.exception()  # mark retrieved; the awaiting sockets log it


@dataclass(frozen=True)
class Viewer:
    """What a socket's renders depend on besides the database: filters and role links."""

    query: str
    can_chat: bool
    can_admin: bool

    @property
    def filters(self) -> dict[str, Any]:
        return queries.parse_filters(QueryDict(self.query))

    def context(self, **extra: Any) -> dict[str, Any]:
        return {
            "can_chat": self.can_chat,
            "can_admin": self.can_admin,
            **extra,
        }


def _roles(user: Any) -> tuple[bool, bool, bool]:
    return can_view(user), can_chat(user), can_admin(user)


# -- the fleet page -------------------------------------------------------------------------


@dataclass
class FleetRender:
    frames: list[str]
    visible: list[int]
    gateway_order: tuple[int, ...] = ()


def render_fleet_state(viewer: Viewer) -> FleetRender:
    """Everything the page shows that changes: the gateway cards (agents, presence) and
    the visible page of the session list."""
    filters = viewer.filters
    page = queries.session_page(filters)
    gateways = queries.fleet_gateways()
    frames = [
        render_to_string(
            f"{FLEET_TEMPLATE}#gateways", viewer.context(**gateways.context())
        ),
        *_render_list(viewer, page),
    ]
    return FleetRender(frames=frames, visible=page.ids, gateway_order=gateways.order)


def _render_list(viewer: Viewer, page: queries.SessionPage) -> list[str]:
    # Separate frames: htmx parses a frame in a <template>, whose first tag decides the
    # parsing mode, so table parts (<tbody>, <tr>) must not share a frame with a <div>.
    # `live_query` marks each part with the filters it was rendered for: a page that has
    # swapped its list for other filters drops parts still in flight for the old ones.
    ctx = viewer.context(page=page, live_query=viewer.query)
    return [
        render_to_string(f"{FLEET_TEMPLATE}#session-rows", ctx),
        render_to_string(f"{FLEET_TEMPLATE}#session-pager", ctx),
    ]


@dataclass
class SessionsRender:
    visible: list[int]
    rows: dict[int, str]
    page_frames: list[str] | None


def render_sessions_update(
    viewer: Viewer, changed: frozenset[int] | None, known: tuple[int, ...]
) -> SessionsRender:
    """The rows that changed, in place when the page still shows the same rows in the
    same order; else the whole visible page (a row moved, appeared or left)."""
    filters = viewer.filters
    visible = queries.visible_ids(filters)
    if changed is None or tuple(visible) != known:
        page = queries.session_page(filters)
        return SessionsRender(
            visible=page.ids, rows={}, page_frames=_render_list(viewer, page)
        )
    rows: dict[int, str] = {
        s.pk: render_to_string(f"{FLEET_TEMPLATE}#session-row", viewer.context(s=s))
        for s in queries.sessions_by_ids(sorted(changed.intersection(visible)))
    }
    return SessionsRender(visible=visible, rows=rows, page_frames=None)


@dataclass
class GatewaysRender:
    html: str
    order: tuple[int, ...]


def render_gateway_cards(
    viewer: Viewer, gateway_ids: frozenset[int], known: tuple[int, ...] = ()
) -> GatewaysRender:
    """The cards (or, for many gateways, the table rows) that changed; the whole region
    when a gateway appeared or left, or when the table's order moved (problems first)."""
    gateways = queries.fleet_gateways()
    order = gateways.order
    if not gateway_ids <= set(order) or (gateways.rows is not None and order != known):
        return GatewaysRender(
            render_to_string(
                f"{FLEET_TEMPLATE}#gateways", viewer.context(**gateways.context())
            ),
            order,
        )
    if gateways.rows is not None:
        # One frame of <tr>s: it parses as table rows (a frame's first tag decides).
        html = "".join(
            render_to_string(f"{FLEET_TEMPLATE}#gateway-row", viewer.context(row=row))
            for row in gateways.rows
            if row.gateway.pk in gateway_ids
        )
    else:
        html = "".join(
            render_to_string(
                f"{FLEET_TEMPLATE}#gateway-card", viewer.context(card=card)
            )
            for card in gateways.cards or []
            if card.gateway.pk in gateway_ids
        )
    return GatewaysRender(html, order)


@dataclass
class FleetPending:
    gateways: set[int] = field(default_factory=set)
    all_gateways: bool = False
    sessions: set[int] = field(default_factory=set)
    all_sessions: bool = False
    received_at: float = 0.0
    sent_at: Any = None  # the oldest note's stamp (fleet.groups.apush), for /metrics

    def __bool__(self) -> bool:
        return bool(
            self.gateways or self.all_gateways or self.sessions or self.all_sessions
        )


class _Coalescing(LiveConsumer):
    """Collects notes and pushes at most once per PUSH_INTERVAL, the first at once."""

    _flusher: asyncio.Task[None] | None = None
    _last_push: float = -1e9
    push_interval = PUSH_INTERVAL

    async def _admit(self) -> tuple[bool, bool] | None:
        """(can_chat, can_admin) for a logged-in user with a role; otherwise the socket is
        closed and None returned."""
        user = self.scope.get("user")
        if user is not None and user.is_authenticated:
            allowed, chat, admin = await database_sync_to_async(_roles)(user)
            if allowed:
                return chat, admin
        await self.close()
        return None

    def _schedule(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._has_pending():
                slot = _slot(loop.time(), self._last_push, self.push_interval)
                await asyncio.sleep(max(0.0, slot - loop.time()))
                # The slot, not the time the send ended: sockets that flushed together
                # stay on the same slots.
                self._last_push = slot
                try:
                    await self._flush()
                except Exception:
                    # Keep the socket: the next note (or a reconnect) brings the state.
                    log.exception("live update failed")
        finally:
            self._flusher = None

    def _has_pending(self) -> bool:
        raise NotImplementedError

    async def _flush(self) -> None:
        raise NotImplementedError

    async def disconnect(self, code: int) -> None:
        # Channels leaves `self.groups` itself after this.
        if self._flusher is not None:
            self._flusher.cancel()


class FleetConsumer(_Coalescing):
    """`/ws/fleet/?<the page's filters>`: the fleet page's live fragments."""

    socket_kind = "fleet"
    push_interval = FLEET_PUSH_INTERVAL

    # No channel of its own: notes come through the process's shared subscription, which
    # also outlives a channel layer that goes away (a socket's own channel would not).
    channel_layer_alias = None

    viewer: Viewer
    known: tuple[int, ...] = ()
    gateway_order: tuple[int, ...] = ()  # the table's rows as this socket last got them

    async def connect(self) -> None:
        admitted = await self._admit()
        if admitted is None:
            return
        chat, admin = admitted
        raw = self.scope.get("query_string", b"").decode("latin-1")
        self.viewer = Viewer(_viewer_query(raw), can_chat=chat, can_admin=admin)
        self.pending = FleetPending()
        # Every fleet page of this process shares one subscription to the fleet group.
        self.shared = shared_group(fleet_group())
        await self.shared.join(self)
        await self.accept()
        await self.send_current_state()

    async def disconnect(self, code: int) -> None:
        await super().disconnect(code)
        shared = getattr(self, "shared", None)
        if shared is not None:
            await shared.leave(self)

    async def send_current_state(self) -> None:
        loop = asyncio.get_running_loop()
        state = await _shared(
            ("fleet-state", self.viewer),
            loop.time(),
            lambda: database_sync_to_async(render_fleet_state)(self.viewer),
        )
        self.known = tuple(state.visible)
        self.gateway_order = state.gateway_order
        self._last_push = loop.time()
        for frame in state.frames:
            await self.send(text_data=frame)

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None
    ) -> None:
        """The page tells us which filters and page its list now shows (after an htmx
        list swap), so live rows match what the browser has."""
        try:
            message = json.loads(text_data or "")
            query = str(message.get("query", ""))[:1000]
        except (ValueError, AttributeError):
            return
        self.viewer = Viewer(
            _viewer_query(query),
            can_chat=self.viewer.can_chat,
            can_admin=self.viewer.can_admin,
        )
        self.known = tuple(
            await database_sync_to_async(queries.visible_ids)(self.viewer.filters)
        )

    # -- notes from the worker ("fleet" group), handed over by the shared subscription --

    def take_note(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        pending = self.pending
        if kind == "fleet.sessions":
            ids = message.get("session_ids")
            if isinstance(ids, list):
                pending.sessions.update(i for i in ids if isinstance(i, int))
                # The cards count sessions: re-render them when the counts may have moved.
                gateway_id = message.get("gateway_id")
                if isinstance(gateway_id, int) and message.get("counts", True):
                    pending.gateways.add(gateway_id)
            else:
                pending.all_sessions = pending.all_gateways = True
        elif kind in ("fleet.gateway", "fleet.agents", "fleet.presence"):
            # Agents and presence are shown inside the gateway card.
            gateway_id = message.get("gateway_id")
            if isinstance(gateway_id, int):
                pending.gateways.add(gateway_id)
            else:
                pending.all_gateways = True
        elif kind == EVERYTHING["type"]:
            pending.all_sessions = pending.all_gateways = True
        else:
            return
        pending.received_at = asyncio.get_running_loop().time()
        if pending.sent_at is None:
            pending.sent_at = message.get("sent_at")
        self._schedule()

    def _has_pending(self) -> bool:
        return bool(self.pending)

    async def _flush(self) -> None:
        pending, self.pending = self.pending, FleetPending()
        viewer, since = self.viewer, pending.received_at
        parts: list[str] = []
        if pending.all_gateways or pending.gateways:
            ids = frozenset(pending.gateways)
            if pending.all_gateways:
                ids = frozenset({-1})  # not a gateway: renders the whole region
            order = self.gateway_order
            cards = await _shared(
                # The cards do not depend on the list's filters, only on the role.
                ("cards", viewer.can_chat, viewer.can_admin, ids, order),
                since,
                lambda: database_sync_to_async(render_gateway_cards)(
                    viewer, ids, order
                ),
            )
            self.gateway_order = cards.order
            parts.append(cards.html)
        if pending.all_sessions or pending.sessions:
            changed = None if pending.all_sessions else frozenset(pending.sessions)
            known = self.known
            result = await _shared(
                ("sessions", viewer, changed, known),
                since,
                lambda: database_sync_to_async(render_sessions_update)(
                    viewer, changed, known
                ),
            )
            if self.viewer is not viewer:
                # The page swapped its list for other filters while this render ran: these
                # rows are the old list's, and sent now they would cover the new one. The
                # next flush renders the list the page shows now.
                self.pending.all_sessions = True
            else:
                self.known = tuple(result.visible)
                if result.page_frames is not None:
                    parts.extend(result.page_frames)
                elif result.rows:
                    # All rows in one frame: one that starts with <tr> parses as rows.
                    parts.append("".join(result.rows[pk] for pk in sorted(result.rows)))
        for frame in parts:
            await self.send(text_data=frame)
        if parts:
            self.sent_for(pending.sent_at)


def _viewer_query(raw: str) -> str:
    """A normalised query string (validated filters, then page) from the browser's."""
    filters = queries.parse_filters(QueryDict(raw))
    return queries.filters_query(filters, page=filters.get("page"))


# -- one session's page ---------------------------------------------------------------------


def render_session_parts(
    session_pk: int, viewer: Viewer, fields: bool, transcript: bool
) -> str | None:
    session = (
        Session.objects.select_related("gateway", "agent").filter(pk=session_pk).first()
    )
    if session is None:
        return None
    html = ""
    if fields:
        html += render_to_string(
            f"{SESSION_TEMPLATE}#session-fields", viewer.context(session=session)
        )
    if transcript:
        html += render_to_string(
            f"{SESSION_TEMPLATE}#transcript",
            viewer.context(session=session),
        )
    return html


class SessionConsumer(_Coalescing):
    """`/ws/sessions/<pk>/`: one session's fields and recent transcript, live."""

    socket_kind = "session"

    session_pk: int
    viewer: Viewer
    fields_pending = False
    transcript_pending = False
    received_at = 0.0

    async def connect(self) -> None:
        admitted = await self._admit()
        if admitted is None:
            return
        chat, admin = admitted
        self.session_pk = int(self.scope["url_route"]["kwargs"]["pk"])
        self.viewer = Viewer("", can_chat=chat, can_admin=admin)
        html = await database_sync_to_async(render_session_parts)(
            self.session_pk, self.viewer, True, True
        )
        if html is None:
            await self.close()
            return
        self.groups = [session_group(self.session_pk)]
        await self.channel_layer.group_add(self.groups[0], self.channel_name)
        await self.accept()
        self._last_push = asyncio.get_running_loop().time()
        await self.send(text_data=html)

    def _note(self) -> None:
        self.received_at = asyncio.get_running_loop().time()
        self._schedule()

    async def session_changed(self, event: dict[str, Any]) -> None:
        self.fields_pending = True
        self._note()

    async def chat_stored(self, event: dict[str, Any]) -> None:
        self.transcript_pending = True
        self._note()

    async def gateway_chat(self, event: dict[str, Any]) -> None:
        # Streaming is the chat page's job; a run's end shows up as a stored message.
        return

    gateway_agent = gateway_chat

    def _has_pending(self) -> bool:
        return self.fields_pending or self.transcript_pending

    async def _flush(self) -> None:
        fields, transcript = self.fields_pending, self.transcript_pending
        self.fields_pending = self.transcript_pending = False
        pk, viewer = self.session_pk, self.viewer
        html = await _shared(
            ("session", pk, viewer, fields, transcript),
            self.received_at,
            lambda: database_sync_to_async(render_session_parts)(
                pk, viewer, fields, transcript
            ),
        )
        if html:
            await self.send(text_data=html)
