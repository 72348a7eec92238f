"""The chat against the real OpenClaw gateway with its fake model: a message sent through the
Control Center streams back every delta of the reply in order, and the stored final text is
what the gateway's own chat.history holds."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from chat.models import Message
from fleet import calls
from fleet.gateway.protocol import chat_text
from fleet.models import Agent, Gateway, Session
from tests.helpers import (
    TEST_TOKEN_ENV,
    Chat,
    stored_reply,
    streamed_text,
    wait_for,
)

pytestmark = [
    pytest.mark.realgw,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("role_groups"),
]

REPLY = "Streaming works: one, two, three, four, five, six, seven, eight."


async def test_it_streams_every_delta_of_a_real_reply_and_stores_what_the_gateway_has(
    real_gateway: Any,
    make_gateway: Any,
    running_worker: Any,
    personas: Any,
    monkeypatch: Any,
) -> None:
    monkeypatch.setenv(TEST_TOKEN_ENV, real_gateway.token)
    gateway = await asyncio.to_thread(make_gateway, real_gateway.url)
    await running_worker()

    async def ready() -> bool:
        row = await Gateway.objects.aget(pk=gateway.pk)
        agent = await Agent.objects.filter(gateway=gateway, agent_id="main").aexists()
        return row.state == Gateway.State.CONNECTED and agent

    await wait_for(ready, timeout=30)
    key = f"agent:main:cc-chat-{uuid.uuid4().hex[:8]}"
    session = await Session.objects.select_related("gateway").acreate(
        gateway=gateway, key=key, agent_key="main"
    )
    page = Chat(session, personas["bob"])
    await page.open()
    try:
        message_id = uuid.uuid4()
        response = await page.send(f"[[fake:echo]] {REPLY} [[/fake]]", message_id)
        assert response.status_code == 200
        frames = await page.frames_until(stored_reply(message_id), timeout=90)
        assert streamed_text(frames[:-1], str(message_id)) == REPLY
        deltas = [f for f in frames if 'hx-swap-oob="beforeend"' in f]
        assert len(deltas) >= 3  # token by token, not one lump
    finally:
        await page.close()

    reply = await Message.objects.aget(run_id=str(message_id), role="assistant")
    assert reply.state == Message.State.FINAL
    history = await calls.acall(
        gateway.pk,
        "chat.history",
        {"sessionKey": key, "limit": 50},
        user=personas["carol"],
    )
    assistant = [m for m in history["messages"] if m.get("role") == "assistant"]
    assert chat_text(assistant[-1]) == reply.text == REPLY
