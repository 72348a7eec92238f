"""The base of every live page consumer, and the subscription that the sockets of one
process share for a busy group.

A socket holds the rights it was opened with only while they last: every live consumer
watches its user's group (`fleet.groups.user_group`), which is told when the user logs out
and when the account or its roles change (`notify_user`, from fleet/signals.py). On a note
the socket reads its session and user afresh and

- closes with `CLOSE_ACCESS_LOST` when its own session logged out (the logout note names
  it), the session's password hash no longer matches (someone set a new password), the
  account is gone or inactive, or it has no role left; the page stays closed (the htmx
  ws extension does not reconnect on a 4xxx code);
- closes with `CLOSE_RIGHTS_CHANGED` (1012, "service restart") when the role changed, or
  the session got a new key (the user's own password change, a new login): the page
  reconnects at once with the browser's cookie and the new socket is admitted afresh. Downgrading
  a socket in place would mean re-deriving every right each consumer computed at connect
  (chat links, admin links, the run bar's Stop button) in each of them; a reconnect does
  exactly the admission again, in one place, and costs one round of the current state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from importlib import import_module
from typing import Any, Protocol

from asgiref.sync import async_to_sync
from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib import auth
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils.crypto import constant_time_compare, salted_hmac

from fleet import socketstats
from fleet.groups import apush, user_group
from fleet.roles import role_of

log = logging.getLogger(__name__)

USER_CHANGED = "user.changed"
CLOSE_ACCESS_LOST = 4003
CLOSE_RIGHTS_CHANGED = 1012


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

    # -- the user's rights, watched while the socket is open ---------------------------------

    _watch: UserWatch | None = None

    # -- counted for /metrics while accepted (fleet.socketstats) -----------------------------

    socket_kind = "other"
    _counted = False

    async def accept(self, subprotocol: str | None = None, headers: Any = None) -> None:
        await super().accept(subprotocol=subprotocol, headers=headers)
        if not self._counted:
            self._counted = True
            socketstats.opened(self.socket_kind)

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            socketstats.closed(self.socket_kind)

    def sent_for(self, sent_at: Any) -> None:
        """A frame went out for a note the worker stamped at `sent_at`."""
        socketstats.observe(self.socket_kind, sent_at)

    async def websocket_connect(self, message: dict[str, Any]) -> None:
        # Watch before the subclass admits the socket: a change that lands between its
        # check and the accept is then still seen.
        user = self.scope.get("user")
        if user is not None and user.is_authenticated:
            watch = UserWatch(self, user.pk)
            self._watch = watch
            await watch.start()
        await super().websocket_connect(message)

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        self._uncount()
        try:
            await super().websocket_disconnect(message)
        finally:
            await self._unwatch()

    async def close(
        self, code: int | bool | None = None, reason: str | None = None
    ) -> None:
        self._uncount()
        await self._unwatch()
        await super().close(code=code, reason=reason)

    async def _unwatch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            await watch.stop()


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


class UserWatch:
    """One socket's membership of its user's group (shared by the process's sockets of that
    user) and what it does on a note: read the rights again and close if they changed."""

    def __init__(self, consumer: LiveConsumer, user_pk: int) -> None:
        self.consumer = consumer
        self.user_pk = user_pk
        self.tag = session_tag(consumer.scope)
        self.role: str | None = None
        self.shared: SharedGroup | None = None
        self.task: asyncio.Task[None] | None = None
        self.again = False

    async def start(self) -> None:
        self.shared = shared_group(user_group(self.user_pk))
        await self.shared.join(self)
        # Read after joining: a change after this read brings a note.
        self.role = (await database_sync_to_async(socket_access)(self.consumer.scope))[
            1
        ]

    async def stop(self) -> None:
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        shared, self.shared = self.shared, None
        if shared is not None:
            await shared.leave(self)

    def take_note(self, message: dict[str, Any]) -> None:
        if (
            message.get("type") == USER_CHANGED
            and self.tag
            and (message.get("session") == self.tag)
        ):
            # This socket's own session logged out: no read needed (and the session may
            # not be flushed yet when the note arrives).
            self._start(CLOSE_ACCESS_LOST)
        elif message.get("type") in (USER_CHANGED, EVERYTHING["type"]):
            self._start(None)

    async def _verdict(self) -> int | None:
        """The close code the socket's session and rights call for now, or None."""
        read = database_sync_to_async(socket_access)
        state, role = await read(self.consumer.scope)
        if state == STALE:
            await asyncio.sleep(STALE_GRACE)
            state, role = await read(self.consumer.scope)
        if state in (LOST, STALE):
            return CLOSE_ACCESS_LOST  # reconnecting would be refused
        if state == GONE or role != self.role:
            # A session given a new key: the browser's cookie may hold it, and the page
            # reconnects with it (or is refused). A new role: admitted again with it.
            return CLOSE_RIGHTS_CHANGED
        return None

    def _start(self, code: int | None) -> None:
        if self.task is not None and not self.task.done():
            self.again = True
            if code is None:
                return
            self.task.cancel()
        self.task = asyncio.create_task(self._check(code))

    async def _check(self, code: int | None) -> None:
        try:
            while code is None:
                self.again = False
                code = await self._verdict()
                if code is None and not self.again:
                    return
            log.info("closing a socket of user %s: %s", self.user_pk, code)
            await self.consumer.close(code=code)
        except asyncio.CancelledError:
            raise
        except Exception:  # a database hiccup: the safe side is a fresh admission
            log.exception("rights check failed; closing the socket")
            await self.consumer.close(code=CLOSE_RIGHTS_CHANGED)


def session_tag(scope: dict[str, Any] | None = None, key: str | None = None) -> str:
    """A stand-in for a session key in notes (which cross Redis): an HMAC of it."""
    if key is None and scope is not None:
        session = scope.get("session")
        key = getattr(session, "session_key", None) if session is not None else None
    if not key:
        return ""
    return salted_hmac("fleet.live.session", key).hexdigest()[:32]


# What a fresh read says about a socket's session (besides its role).
OK, LOST, GONE, STALE = "ok", "lost", "gone", "stale"
# A session whose password hash no longer matches may be its own user's, between saving
# the new password and `update_session_auth_hash`: read it again after this long.
STALE_GRACE = 0.25


def socket_access(scope: dict[str, Any]) -> tuple[str, str | None]:
    """The socket's session and role read afresh, as Django checks a request's session
    (`auth.get_user`), but without its side effects (it flushes a stale session):

    - (OK, role), or (LOST, None) when the user is gone, inactive or has no role;
    - (GONE, None): the session is no longer stored, or now holds another user (logged
      out, or given a new key by a login or the user's own password change);
    - (STALE, None): its password hash no longer matches (a new password)."""
    user = scope.get("user")
    if user is None or not user.is_authenticated:
        return LOST, None
    session = scope.get("session")
    key = getattr(session, "session_key", None) if session is not None else None
    user_model = auth.get_user_model()
    if not key:  # a scope made without the session middleware (a consumer on its own)
        fresh = user_model._default_manager.filter(pk=user.pk).first()
        role = role_of(fresh)
        return (OK, role) if role is not None else (LOST, None)
    data = import_module(settings.SESSION_ENGINE).SessionStore(key).load()
    try:
        user_id = user_model._meta.pk.to_python(data[auth.SESSION_KEY])
        backend_path = data[auth.BACKEND_SESSION_KEY]
    except (KeyError, ValidationError):
        return GONE, None
    if user_id != user.pk:
        return GONE, None
    if backend_path not in settings.AUTHENTICATION_BACKENDS:
        return LOST, None
    fresh = auth.load_backend(backend_path).get_user(user_id)
    if fresh is None:
        return LOST, None
    session_hash = data.get(auth.HASH_SESSION_KEY)
    if not session_hash or not any(
        constant_time_compare(session_hash, known)
        for known in (
            fresh.get_session_auth_hash(),
            *fresh.get_session_auth_fallback_hash(),
        )
    ):
        return STALE, None
    role = role_of(fresh)
    return (OK, role) if role is not None else (LOST, None)


_pushes: set[asyncio.Task[None]] = set()  # referenced until done


def notify_user(user_pk: int | None, session_key: str | None = None) -> None:
    """Tell the user's open sockets to check their rights, once the change is committed
    (a socket that read before the commit would keep the old rights)."""
    if user_pk is None:
        return
    note: dict[str, Any] = {}
    tag = session_tag(key=session_key)
    if tag:
        note["session"] = tag

    def send() -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            async_to_sync(apush)(user_group(user_pk), USER_CHANGED, **note)
            return
        # Sync ORM code on a thread with a running loop (allowed by
        # DJANGO_ALLOW_ASYNC_UNSAFE): AsyncToSync refuses it; push from that loop.
        task = loop.create_task(apush(user_group(user_pk), USER_CHANGED, **note))
        _pushes.add(task)
        task.add_done_callback(_pushes.discard)

    transaction.on_commit(send)


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
