"""The chat page's WebSocket: `/ws/chat/<session pk>/`.

It checks the user (logged in, viewer role; the Origin is checked by the ASGI stack), joins
the session's group, and turns what the worker pushes into htmx out-of-band fragments:

- `gateway.chat` delta: a one-element fragment that appends `deltaText` to the reply bubble
  (protocol 4) or replaces its text with the cumulative text (protocol 3). The first delta
  of a run this socket has not seen yet brings the whole bubble (a run started elsewhere, or
  a page opened mid-run). Text is escaped by the template; nothing is stored here.
- `gateway.chat` status / `gateway.agent` lifecycle and run_status: the run bar's phase.
- `gateway.agent` tool: a compact tool card inside the reply bubble.
- `chat.stored`: the stored message, Markdown-rendered, replacing the streamed bubble.
- `chat.send_result` / `chat.abort_result`: a failed send or abort, shown (the worker has
  recorded it; consumers never write an outcome).

On (re)connect it first sends the current state: the newest stored messages as upserts, so
a page whose socket comes back shows what finished while it was away.

It renders only: what a payload says is read by chat/payloads.py, the stored transcript by
chat/reading.py, and every frame is a partial of chat/fragments.html (escaped there).
Per-socket state is only which runs this page is showing."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

from channels.db import database_sync_to_async
from django.template.loader import render_to_string

from chat import payloads, reading, store
from chat.models import Message, run_dom_id
from fleet import roles
from fleet.groups import session_group
from fleet.live import LiveConsumer
from fleet.models import Session

log = logging.getLogger(__name__)
FRAGMENTS = "chat/fragments.html"
FINISHED_MEMORY = 200


def _render_recent(session: Session) -> str:
    messages, more = reading.recent_messages(session)
    return _render(
        "messages",
        {"messages": messages, "more": more, "session_pk": session.pk},
    )


def _render_current(session: Session) -> str:
    """The newest stored messages as upserts (each replaces the page's copy, or is appended
    when the page lacks it: a reply that finished while the socket was away replaces its
    streaming bubble), and an idle run bar unless the newest message still waits for its
    reply (a run that streams re-draws its bar with its next delta)."""
    messages, _ = reading.recent_messages(session)
    frames = "".join(
        _render("message", {"message": message, "oob": True}) for message in messages
    )
    newest = messages[-1] if messages else None
    waiting = (
        newest is not None
        and newest.role == Message.Role.USER
        and newest.state != Message.State.ERROR
    )
    if not waiting:
        frames += _render("runbar", {"oob": True, "running": False})
    return frames


def _render(name: str, context: dict[str, Any]) -> str:
    return render_to_string(f"{FRAGMENTS}#{name}", context)


class ChatConsumer(LiveConsumer):
    socket_kind = "chat"
    session_pk: int
    group: str
    can_chat: bool

    async def connect(self) -> None:
        user = self.scope.get("user")
        self.group = ""
        allowed = await database_sync_to_async(roles.can_view)(user)
        if not allowed:
            await self.close(code=4003)
            return
        self.session_pk = int(self.scope["url_route"]["kwargs"]["pk"])
        session = await Session.objects.filter(pk=self.session_pk).afirst()
        if session is None:
            await self.close(code=4004)
            return
        self.can_chat = await database_sync_to_async(roles.can_chat)(user)
        self.streaming: dict[str, str] = {}  # run id -> phase shown
        self.bubbles: set[str] = set()  # runs whose reply bubble this page has
        self.finished: OrderedDict[str, None] = OrderedDict()
        self.group = session_group(self.session_pk)
        # Work that reads the database runs in order on a lane of its own, so that deltas
        # never wait behind a query (in `serve`, the worker shares the one sync thread).
        self.slow: asyncio.Queue[tuple[Any, dict[str, Any]]] = asyncio.Queue()
        self.slow_task = asyncio.create_task(self._slow_lane())
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        # The current state first: a page whose socket comes back (its web process
        # restarted, the network blinked) redraws what was stored meanwhile.
        self.slow.put_nowait((self._current_state, {"session": session}))
        if session.history_synced_at is None:
            self.slow.put_nowait((self._backfill, {"session": session, "user": user}))

    async def disconnect(self, code: int) -> None:
        task = getattr(self, "slow_task", None)
        if task is not None:
            task.cancel()
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None
    ) -> None:
        """The page sends nothing; sending goes through the POST view (CSRF, audit)."""

    # -- live stream ----------------------------------------------------------------------

    def _live_run(self, event: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """The run id and payload of a relayed stream event, unless its run has ended."""
        payload = event.get("payload")
        if not isinstance(payload, dict):
            return None
        run_id = payload.get("runId")
        if not isinstance(run_id, str) or run_id in self.finished:
            return None
        return run_id, payload

    async def gateway_chat(self, event: dict[str, Any]) -> None:
        live = self._live_run(event)
        if live is None:
            return
        run_id, payload = live
        state = payload.get("state")
        if state == "delta":
            await self._delta(run_id, payload)
            self.sent_for(event.get("sent_at"))
        elif state == "status":
            await self._phase(run_id, payloads.phase_text(payload.get("phase")))

    async def _delta(self, run_id: str, payload: dict[str, Any]) -> None:
        dom = run_dom_id(run_id)
        delta = payloads.delta_text(payload)
        if run_id not in self.bubbles:
            # The whole bubble, with all text so far: the page may not have it yet.
            text = payloads.cumulative_text(payload) or delta or ""
            self.bubbles.add(run_id)
            self.streaming[run_id] = "Answering…"
            await self.send(
                text_data=_render(
                    "placeholder", {"dom_id": dom, "oob": True, "text": text}
                )
                + self._runbar(run_id, "Answering…")
            )
        elif delta is not None:
            await self.send(
                text_data=_render(
                    "delta", {"dom_id": dom, "swap": "beforeend", "text": delta}
                )
            )
        else:
            await self.send(
                text_data=_render(
                    "delta",
                    {
                        "dom_id": dom,
                        "swap": "innerHTML",
                        "text": payloads.cumulative_text(payload),
                    },
                )
            )

    async def gateway_agent(self, event: dict[str, Any]) -> None:
        live = self._live_run(event)
        if live is None:
            return
        run_id, payload = live
        data = payloads.as_dict(payload.get("data"))
        stream = payload.get("stream")
        if stream == "lifecycle" and payloads.ends_run(data):
            return  # the stored message follows
        if stream in ("lifecycle", "run_status"):
            await self._phase(run_id, payloads.phase_text(data.get("phase")))
        elif stream == "tool":
            await self._tool(run_id, data)

    async def _phase(self, run_id: str, text: str) -> None:
        if self.streaming.get(run_id) == text:
            return
        self.streaming[run_id] = text
        await self.send(text_data=self._runbar(run_id, text))

    async def _tool(self, run_id: str, data: dict[str, Any]) -> None:
        dom = run_dom_id(run_id)
        frames = ""
        if run_id not in self.bubbles:
            self.bubbles.add(run_id)
            frames += _render("placeholder", {"dom_id": dom, "oob": True, "text": ""})
        card = payloads.tool_card(data)
        card["dom"] = run_dom_id(f"{run_id}/{card['id']}")[4:]
        frames += _render(
            "tool", {"tool": card, "oob": True, "into": f"{dom}-tools"}
        ) + self._runbar(run_id, f"Using {card['name']}…")
        self.streaming[run_id] = f"Using {card['name']}…"
        await self.send(text_data=frames)

    def _runbar(self, run_id: str, phase: str) -> str:
        return _render(
            "runbar",
            {
                "oob": True,
                "running": True,
                "phase": phase,
                "run_id": run_id,
                "can_chat": self.can_chat,
                "session_pk": self.session_pk,
            },
        )

    # -- stored messages ------------------------------------------------------------------

    async def _backfill(self, event: dict[str, Any]) -> None:
        """Catch-up on first view (or the first after a reconnect): the gateway's history,
        then the refreshed transcript if it brought anything new."""
        session = event["session"]
        if await store.abackfill(session, event["user"]):
            html = await database_sync_to_async(_render_recent)(session)
            await self.send(text_data=html)

    async def _current_state(self, event: dict[str, Any]) -> None:
        html = await database_sync_to_async(_render_current)(event["session"])
        if html:
            await self.send(text_data=html)

    async def _slow_lane(self) -> None:
        while True:
            handler, event = await self.slow.get()
            try:
                await handler(event)
            except Exception:  # one bad event must not stop the page's updates
                log.exception("chat consumer: %s failed", handler.__name__)

    async def chat_stored(self, event: dict[str, Any]) -> None:
        run_id = event.get("run_id")
        if isinstance(run_id, str) and run_id and event.get("state"):
            # A run's end: late deltas of it must not reopen the bubble.
            self.finished[run_id] = None
            if len(self.finished) > FINISHED_MEMORY:
                self.finished.popitem(last=False)
        self.slow.put_nowait((self._stored, event))

    async def _stored(self, event: dict[str, Any]) -> None:
        message = await database_sync_to_async(reading.load_message)(
            str(event.get("message_id", ""))
        )
        if message is None or message.session_id != self.session_pk:
            return
        frames = _render("message", {"message": message, "oob": True})
        run_id = event.get("run_id")
        if (
            message.role == Message.Role.ASSISTANT
            and isinstance(run_id, str)
            and run_id
        ):
            self.streaming.pop(run_id, None)
            self.bubbles.discard(run_id)
            self.finished[run_id] = None
            if len(self.finished) > FINISHED_MEMORY:
                self.finished.popitem(last=False)
            if self.streaming:
                latest = next(reversed(self.streaming))
                frames += self._runbar(latest, self.streaming[latest])
            else:
                frames += _render("runbar", {"oob": True, "running": False})
        await self.send(text_data=frames)

    async def approval_changed(self, event: dict[str, Any]) -> None:
        """An approval of this session was asked for or decided: redraw its cards."""
        self.slow.put_nowait((self._approvals, event))

    async def _approvals(self, event: dict[str, Any]) -> None:
        from approvals.chat import render_cards

        html = await database_sync_to_async(render_cards)(
            self.session_pk, self.scope.get("user"), True, str(event.get("note", ""))
        )
        await self.send(text_data=html)

    async def session_changed(self, event: dict[str, Any]) -> None:
        """The fleet pages show session rows; the chat page has nothing to redraw."""

    async def chat_send_result(self, event: dict[str, Any]) -> None:
        self.slow.put_nowait((self._send_result, event))

    async def _send_result(self, event: dict[str, Any]) -> None:
        """The outcome of a chat.send (this page's or another's), recorded by the worker
        before it pushed: shown here, never written."""
        message = await database_sync_to_async(reading.load_message)(
            str(event.get("message_id", ""))
        )
        if (
            message is None
            or message.session_id != self.session_pk
            or message.state != Message.State.ERROR
        ):
            return
        dom = run_dom_id(message.run_id or str(message.pk))
        self.streaming.pop(message.run_id, None)
        await self.send(
            text_data=_render("message", {"message": message, "oob": True})
            + _render("remove", {"dom_id": dom})
            + _render(
                "runbar", {"oob": True, "running": False, "notice": message.error}
            )
        )

    async def chat_abort_result(self, event: dict[str, Any]) -> None:
        """A refused abort (the worker recorded its audit result): say so."""
        reply = event.get("reply")
        if isinstance(reply, dict) and not reply.get("ok"):
            error = reply.get("error")
            reason = error.get("message") if isinstance(error, dict) else None
            notice = f"Could not stop the run: {reason or 'unknown error'}"
            await self.send(
                text_data=_render(
                    "runbar", {"oob": True, "running": False, "notice": notice}
                )
            )
