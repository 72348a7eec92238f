"""The chat end to end against the gateway simulator over real sockets: a worker holds the
gateway, the views send through it, the consumer streams what the relay pushes."""

from __future__ import annotations

import asyncio
import html
import re
import uuid
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.test import AsyncClient

from chat import sending, store
from chat.models import Message, run_dom_id
from fleet.gateway.testing import data as simdata
from fleet.models import AuditEvent, Gateway, Session
from tests.helpers import Chat, connected_gateway, stored_reply, streamed_text, wait_for

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("role_groups"),
]


async def test_it_streams_a_reply_in_order_and_stores_it_before_pushing(chat, sim):
    message_id = uuid.uuid4()
    response = await chat.send("hello there", message_id)
    assert response.status_code == 200
    body = response.content.decode()
    assert f'id="msg-{message_id}"' in body
    assert f'id="{run_dom_id(str(message_id))}"' in body  # the reply placeholder
    assert "hello there" in body

    frames = await chat.frames_until(stored_reply(message_id))
    assert streamed_text(frames[:-1], str(message_id)) == simdata.REPLY
    # Each delta after the first is one tiny fragment.
    assert sum('hx-swap-oob="beforeend"' in f for f in frames) >= 10
    stored = frames[-1]
    assert f'id="{run_dom_id(str(message_id))}"' in stored
    assert "Hello from the fake model!" in stored

    reply = await Message.objects.aget(run_id=str(message_id), role="assistant")
    assert reply.state == Message.State.FINAL
    assert reply.text == simdata.REPLY
    assert reply.duration_ms is not None
    assert reply.model == simdata.DEFAULT_MODEL

    # The gateway's transcript echoes fill in our rows instead of adding new ones.
    async def echoed() -> bool:
        user = await Message.objects.aget(pk=message_id)
        reply = await Message.objects.aget(run_id=str(message_id), role="assistant")
        return bool(user.gateway_message_id and reply.gateway_message_id)

    await wait_for(echoed)
    assert await Message.objects.filter(run_id=str(message_id)).acount() == 2
    user = await Message.objects.aget(pk=message_id)
    assert user.sender_id == chat.user.pk
    assert user.state == Message.State.FINAL

    # A back-fill from chat.history afterwards adds nothing.
    history = await sync_to_async(sim.transcript)(chat.session.key)
    changed = await sync_to_async(store.store_history)(
        chat.session.pk, {"messages": history}
    )
    assert changed == 0


async def test_it_stops_a_run(chat, sim):
    message_id = uuid.uuid4()
    await chat.send("[[fake:slow]] take your time", message_id)
    await chat.frames_until(f'id="{run_dom_id(str(message_id))}-text"')  # first delta
    response = await chat.client.post(
        f"/chat/{chat.session.pk}/abort/", {"run_id": str(message_id)}
    )
    assert response.status_code == 204
    frames = await chat.frames_until(stored_reply(message_id, "aborted"))
    assert "Stopped." in frames[-1]
    reply = await Message.objects.aget(run_id=str(message_id), role="assistant")
    assert reply.state == Message.State.ABORTED
    assert reply.text and simdata.REPLY.startswith(reply.text)
    audit = AuditEvent.objects.filter(session=chat.session).order_by("created_at")

    async def audited() -> bool:
        return [(e.action, e.result) async for e in audit] == [
            ("chat.send", "ok"),
            ("chat.abort", "ok"),
        ]

    await wait_for(audited)


async def test_it_shows_a_failed_run(chat):
    message_id = uuid.uuid4()
    await chat.send("[[fake:fail]] please", message_id)
    frames = await chat.frames_until(stored_reply(message_id, "error"))
    assert simdata.FAIL_MESSAGE in html.unescape(frames[-1])
    assert 'role="alert"' in frames[-1]
    reply = await Message.objects.aget(run_id=str(message_id), role="assistant")
    assert reply.state == Message.State.ERROR
    assert reply.error == simdata.FAIL_MESSAGE


async def test_it_runs_a_double_submit_once(chat, sim):
    message_id = uuid.uuid4()
    first, second = await asyncio.gather(
        chat.send("only once", message_id), chat.send("only once", message_id)
    )
    assert first.status_code == second.status_code == 200
    await chat.frames_until(stored_reply(message_id))
    third = await chat.send("only once", message_id)
    assert third.status_code == 200
    assert await Message.objects.filter(pk=message_id).acount() == 1
    transcript = await sync_to_async(sim.transcript)(chat.session.key)
    runs = [m for m in transcript if m["__openclaw"].get("runId") == str(message_id)]
    assert [m["role"] for m in runs] == ["user", "assistant"]
    assert (
        await Message.objects.filter(
            session=chat.session, run_id=str(message_id)
        ).acount()
        == 2
    )


async def test_it_shows_tool_calls_as_cards(chat):
    message_id = uuid.uuid4()
    await chat.send("[[fake:tool]] list my notes", message_id)
    frames = await chat.frames_until(stored_reply(message_id))
    cards = [f for f in frames if 'class="tool' in f]
    assert cards and "<code>exec</code>" in cards[0]
    assert any("groceries.md" in f for f in cards)
    reply = await Message.objects.aget(run_id=str(message_id), role="assistant")
    assert reply.tool_calls[0]["name"] == "exec"
    assert "groceries.md" in frames[-1]  # the stored message keeps its tool card


async def test_it_streams_a_run_started_elsewhere(chat, sim):
    run_id = sim.start_external_run(chat.session.key, "from another client")
    frames = await chat.frames_until(stored_reply(run_id))
    bubble = next(f for f in frames if run_dom_id(run_id) in f)
    assert "data-upsert" in bubble  # the page did not have it: chat.js appends it
    assert streamed_text(frames[:-1], run_id) == simdata.REPLY
    assert any("from another client" in f for f in frames)  # the user's message too


async def test_it_shows_tool_cards_of_a_run_started_elsewhere(chat, sim):
    # Its `agent` tool frames go only to the client that started it: the cards come
    # from `session.tool`, which the worker gets as a sessions.subscribe subscriber.
    run_id = sim.start_external_run(chat.session.key, "[[fake:tool]] from elsewhere")
    frames = await chat.frames_until(stored_reply(run_id))
    cards = [f for f in frames[:-1] if 'class="tool' in f]
    assert cards and "<code>exec</code>" in cards[0]
    assert any("groceries.md" in f for f in cards)
    reply = await Message.objects.aget(run_id=run_id, role="assistant")
    assert [t["name"] for t in reply.tool_calls] == ["exec"]


async def test_it_relays_each_tool_frame_once(chat, sim):
    # The worker started this run, so each tool frame arrives as `agent` and again as
    # `session.tool`: the page gets it once.
    message_id = uuid.uuid4()
    await chat.send("[[fake:tool]] list my notes", message_id)
    frames = await chat.frames_until(stored_reply(message_id))
    cards = [f for f in frames[:-1] if 'class="tool' in f]
    assert len(cards) == 2  # start, result


async def test_it_marks_runs_interrupted_when_the_connection_drops(chat, sim):
    message_id = uuid.uuid4()
    await chat.send("[[fake:slow]] long one", message_id)
    await chat.frames_until(f'id="{run_dom_id(str(message_id))}-text"')
    await sim.close_all(1011, "boom")
    frames = await chat.frames_until(stored_reply(message_id, "error"))
    assert "connection dropped" in frames[-1]
    reply = await Message.objects.aget(run_id=str(message_id), role="assistant")
    assert reply.error == store.INTERRUPTED
    session = await Session.objects.aget(pk=chat.session.pk)
    assert session.history_synced_at is None


async def test_it_says_clearly_when_the_worker_is_down(sim, make_gateway, personas):
    gateway = await sync_to_async(make_gateway)(sim.url, state=Gateway.State.CONNECTED)
    session = await Session.objects.acreate(gateway=gateway, key="agent:main:main")
    page = Chat(session, personas["bob"])
    await sync_to_async(page.client.force_login)(page.user)
    message_id = uuid.uuid4()
    response = await page.send("anyone there?", message_id)
    body = html.unescape(response.content.decode())
    assert "worker is not running" in body
    assert 'id="composer"' in body and "anyone there?" in body  # usable, text kept
    assert '<button type="submit" class="send">Send</button>' in body
    message = await Message.objects.aget(pk=message_id)
    assert message.state == Message.State.ERROR
    assert "worker is not running" in message.error


async def test_it_says_clearly_when_the_gateway_is_in_rest_fallback(chat):
    await Gateway.objects.filter(pk=chat.session.gateway_id).aupdate(
        state=Gateway.State.REST_FALLBACK
    )
    message_id = uuid.uuid4()
    response = await chat.send("hello?", message_id)
    body = html.unescape(response.content.decode())
    assert "REST fallback" in body
    message = await Message.objects.aget(pk=message_id)
    assert message.state == Message.State.ERROR
    assert "REST fallback" in message.error


async def test_it_backfills_history_once_without_duplicates(chat, sim):
    key = chat.session.key
    expected = len(await sync_to_async(sim.transcript)(key))
    assert expected > 0

    async def synced() -> bool:
        session = await Session.objects.aget(pk=chat.session.pk)
        return session.history_synced_at is not None

    await wait_for(synced)  # the page's socket back-filled on connect
    assert chat.backfill[-1].count('class="msg ') == expected
    assert await Message.objects.filter(session=chat.session).acount() == expected
    await Session.objects.filter(pk=chat.session.pk).aupdate(history_synced_at=None)
    again = Chat(chat.session, chat.user)
    await again.open()
    await wait_for(synced)
    await again.close()
    assert await Message.objects.filter(session=chat.session).acount() == expected
    page = await chat.client.get(f"/chat/{chat.session.pk}/")
    assert page.content.decode().count('class="msg ') == expected


async def test_it_keeps_viewers_read_only(chat, personas):
    viewer = AsyncClient()
    await sync_to_async(viewer.force_login)(personas["carol"])
    page = await viewer.get(f"/chat/{chat.session.pk}/")
    assert page.status_code == 200
    assert 'id="composer"' not in page.content.decode()
    response = await viewer.post(
        f"/chat/{chat.session.pk}/send/",
        {"text": "hi", "message_id": str(uuid.uuid4())},
    )
    assert response.status_code == 403
    response = await viewer.post(f"/chat/{chat.session.pk}/abort/", {})
    assert response.status_code == 403
    nobody = AsyncClient()
    await sync_to_async(nobody.force_login)(personas["dave"])
    assert (await nobody.get(f"/chat/{chat.session.pk}/")).status_code == 403
    sent_here = Message.objects.filter(session=chat.session, sender__isnull=False)
    assert await sent_here.acount() == 0


# -- outcomes are the worker's to record ---------------------------------------------------


async def test_it_records_a_send_with_no_page_open(
    sim, make_gateway, running_worker, personas
):
    gateway = await connected_gateway(sim, make_gateway, running_worker)
    session = await Session.objects.select_related("gateway").aget(
        gateway=gateway, key=sim.main_session_key
    )
    bob = personas["bob"]
    # Through the send view, with no chat page (no socket) open.
    client = AsyncClient()
    await sync_to_async(client.force_login)(bob)
    message_id = uuid.uuid4()
    response = await client.post(
        f"/chat/{session.pk}/send/",
        {"text": "nobody watches", "message_id": message_id},
    )
    assert response.status_code == 200

    async def sent() -> bool:
        message = await Message.objects.aget(pk=message_id)
        event = await AuditEvent.objects.aget(params__message_id=str(message_id))
        return (
            message.state in (Message.State.SENT, Message.State.FINAL)
            and event.result == AuditEvent.Result.OK
        )

    await wait_for(sent)

    # And as a script would: the service, over the channel layer straight to the worker.
    # The gateway refuses this one (no text).
    refused, _ = await sync_to_async(sending.create_user_message)(
        session, bob, "   ", uuid.uuid4()
    )
    assert await sending.asend_message(session, bob, refused) == ""

    async def failed() -> bool:
        message = await Message.objects.aget(pk=refused.pk)
        event = await AuditEvent.objects.aget(params__message_id=str(refused.pk))
        return (
            message.state == Message.State.ERROR
            and event.result == AuditEvent.Result.ERROR
        )

    await wait_for(failed)
    message = await Message.objects.aget(pk=refused.pk)
    assert "message or attachment required" in message.error
    event = await AuditEvent.objects.aget(params__message_id=str(refused.pk))
    assert "message or attachment required" in event.detail


class Writes:
    """The outcome writes of this process's shared database thread (the one the worker's
    and the consumers' database_sync_to_async calls run in): a message marked sent or
    failed, an audit event finished."""

    MARK = re.compile(r'^UPDATE "chat_message" SET "state" = \S+, "error" = ')
    AUDIT = re.compile(r'^UPDATE "fleet_auditevent" SET "result" = ')

    def __init__(self) -> None:
        self.statements: list[str] = []

    def __call__(
        self, execute: Any, sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        self.statements.append(sql)
        return execute(sql, params, many, context)

    def count(self, pattern: re.Pattern[str]) -> int:
        return sum(1 for sql in self.statements if pattern.match(sql))

    async def install(self) -> None:
        await database_sync_to_async(self._wrappers)(add=True)

    async def remove(self) -> None:
        await database_sync_to_async(self._wrappers)(add=False)

    def _wrappers(self, *, add: bool) -> None:
        # Evaluated in the database thread: `connection` is that thread's connection.
        from django.db import connection

        if add:
            connection.execute_wrappers.append(self)
        else:
            connection.execute_wrappers.remove(self)


async def test_it_records_a_send_once_however_many_pages_watch(chat):
    others = [Chat(chat.session, chat.user) for _ in range(2)]
    for page in others:
        await page.open()
    writes = Writes()
    await writes.install()
    try:
        message_id = uuid.uuid4()
        await chat.send("three pages watch", message_id)
        for page in (chat, *others):
            # Each page handles the send's outcome before the stored reply (one lane).
            await page.frames_until(stored_reply(message_id))
    finally:
        await writes.remove()
        for page in others:
            await page.close()
    assert writes.count(Writes.MARK) == 1, writes.statements
    assert writes.count(Writes.AUDIT) == 1, writes.statements
    sent = await Message.objects.aget(pk=message_id)
    assert sent.state in (Message.State.SENT, Message.State.FINAL)
    event = await AuditEvent.objects.aget(action="chat.send")
    assert event.result == AuditEvent.Result.OK


async def test_it_refuses_an_abort_with_an_over_long_run_id(chat, sim):
    message_id = uuid.uuid4()
    await chat.send("[[fake:slow]][[fake:echo]]one two three", message_id)
    await chat.frames_until(f'id="{run_dom_id(str(message_id))}-text"')  # streaming
    response = await chat.client.post(
        f"/chat/{chat.session.pk}/abort/", {"run_id": "r" * 201}
    )
    assert response.status_code == 400
    assert "too long" in response.content.decode()
    assert not [name for name, _ in sim.calls if name == "chat.abort"]
    assert not await AuditEvent.objects.filter(action="chat.abort").aexists()
    # The run was not stopped: it finishes.
    frames = await chat.frames_until(stored_reply(message_id), timeout=15)
    assert "one two three" in frames[-1]


async def test_it_redraws_what_finished_while_the_socket_was_away(chat):
    message_id = uuid.uuid4()
    await chat.send("[[fake:slow]][[fake:echo]]while you were away", message_id)
    await chat.frames_until(f'id="{run_dom_id(str(message_id))}-text"')  # streaming
    await chat.close()  # the socket drops mid-run

    async def finished() -> bool:
        return await Message.objects.filter(
            run_id=str(message_id), role="assistant", state="final"
        ).aexists()

    await wait_for(finished, 15)
    again = Chat(chat.session, chat.user)
    await again.open()
    try:
        frames = await again.frames_until(stored_reply(message_id))
    finally:
        await again.close()
    assert (
        'hx-swap-oob="true" data-upsert' in frames[-1]
    )  # replaces the streamed bubble
    assert "while you were away" in frames[-1]
    assert '<div id="runbar" class="runbar" hx-swap-oob="true">' in frames[-1]  # idle
