"""Exec approvals against the real OpenClaw 2026.9.6 with the project's harness (exec mode
ask, the `[[fake:exec CMD]]` directive): an operator's message from the chat page makes the
gateway ask, the card reaches the operator's and a viewer's chat pages (buttons only for the
operator), Allow once lets the run go on (`Ran it: ...` streams in), Deny ends a run without
running it, the inbox's history names the operator, and the audit export has the decision."""

from __future__ import annotations

import asyncio
import csv
import io
import uuid
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Group, Permission
from django.urls import reverse

from approvals.models import Approval
from chat.models import Message
from fleet import calls
from fleet.gateway.protocol import chat_text
from fleet.models import Agent, Gateway, Session
from tests.helpers import (
    TEST_TOKEN_ENV,
    Chat,
    admin_request,
    body_of,
    chat_socket,
    client_for,
    frame_with,
    stored_reply,
    streamed_text,
    wait_for,
)

pytestmark = [
    pytest.mark.realgw,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("role_groups"),
]


def grant_decide() -> None:
    permission = Permission.objects.get(
        content_type__app_label="approvals", codename="decide"
    )
    for name in ("operator", "admin"):
        Group.objects.get(name=name).permissions.add(permission)


async def decide(user: Any, approval: Approval, decision: str) -> Any:
    return await admin_request(
        await client_for(user),
        "post",
        f"/approvals/{approval.pk}/decide/",
        {"decision": decision},
    )


async def asked(gateway: Gateway, key: str, seen: set[int]) -> Approval:
    async def arrived() -> bool:
        return await (
            Approval.objects.filter(gateway=gateway, session_key=key)
            .exclude(pk__in=seen)
            .aexists()
        )

    await wait_for(arrived, 90)
    return await (
        Approval.objects.filter(gateway=gateway, session_key=key)
        .exclude(pk__in=seen)
        .afirst()
    )  # type: ignore[return-value]


async def test_the_real_gateway_asks_and_the_team_decides(
    real_gateway: Any,
    make_gateway: Any,
    running_worker: Any,
    personas: Any,
    monkeypatch: Any,
) -> None:
    await sync_to_async(grant_decide)()
    monkeypatch.setenv(TEST_TOKEN_ENV, real_gateway.token)
    gateway = await asyncio.to_thread(make_gateway, real_gateway.url)
    await running_worker()

    async def ready() -> bool:
        row = await Gateway.objects.aget(pk=gateway.pk)
        agent = await Agent.objects.filter(gateway=gateway, agent_id="main").aexists()
        return row.state == Gateway.State.CONNECTED and agent

    await wait_for(ready, timeout=60)
    await asyncio.sleep(0.5)  # on_ready's exec.approval.list
    key = f"agent:main:cc-approve-{uuid.uuid4().hex[:8]}"
    session = await Session.objects.select_related("gateway").acreate(
        gateway=gateway, key=key, agent_key="main"
    )
    page = Chat(session, personas["bob"])
    await page.open()
    viewer = await chat_socket(session, personas["carol"])
    seen: set[int] = set()
    try:
        # Allow once: the run goes on and its reply streams in.
        message_id = uuid.uuid4()
        response = await page.send("please [[fake:exec uname -a]] now", message_id)
        assert response.status_code == 200
        approval = await asked(gateway, key, seen)
        seen.add(approval.pk)
        assert approval.command == "uname -a"
        assert "allow-once" in approval.allowed_decisions
        card = await frame_with(viewer, 'id="chat-approvals"', "uname -a")
        assert 'class="approval-actions"' not in card  # a viewer has no button
        await decide(personas["bob"], approval, "allow-once")
        frames = await page.frames_until(stored_reply(message_id), timeout=120)
        assert streamed_text(frames[:-1], str(message_id)).startswith("Ran it: Linux")
        await frame_with(viewer, 'id="chat-approvals"', "Allowed</strong> by bob")
        row = await Approval.objects.aget(pk=approval.pk)
        assert (row.state, row.decided_by_name) == (Approval.State.ALLOWED, "bob")
        assert row.resolved_by  # the gateway's own resolvedBy

        # Deny (in a session of its own): the run ends without running the command.
        key2 = f"agent:main:cc-deny-{uuid.uuid4().hex[:8]}"
        session2 = await Session.objects.select_related("gateway").acreate(
            gateway=gateway, key=key2, agent_key="main"
        )
        page2 = Chat(session2, personas["bob"])
        await page2.open()
        denied_id = uuid.uuid4()
        await page2.send("please [[fake:exec uname -r]] now", denied_id)
        second = await asked(gateway, key2, seen)
        await page2.close()
        await decide(personas["bob"], second, "deny")

        async def reply_stored() -> bool:
            return await Message.objects.filter(
                run_id=str(denied_id), role="assistant", state=Message.State.FINAL
            ).aexists()

        await wait_for(reply_stored, 120)
        reply = await Message.objects.aget(run_id=str(denied_id), role="assistant")
        assert "Linux" not in reply.text
        said = ""

        async def denied_reply() -> bool:
            nonlocal said
            history = await calls.acall(
                gateway.pk,
                "chat.history",
                {"sessionKey": key2, "limit": 50},
                user=personas["carol"],
            )
            said = " ".join(
                chat_text(m)
                for m in history["messages"]
                if m.get("role") in ("assistant", "toolResult", "tool")
            )
            return "Not run" in said or "denied" in said.lower()

        await wait_for(denied_reply, 60, interval=1.0)
        assert "Linux" not in said
        assert (await Approval.objects.aget(pk=second.pk)).state == "denied"
    finally:
        await page.close()
        await viewer.disconnect()

    inbox = await admin_request(
        await client_for(personas["carol"]), "get", "/approvals/"
    )
    body = inbox.content.decode()
    assert "uname -a" in body and "<td>bob</td>" in body
    alice = await client_for(personas["alice"])
    export = await admin_request(alice, "get", reverse("admin:fleet_auditevent_export"))
    rows = list(csv.reader(io.StringIO(await body_of(export))))
    decisions = [r for r in rows if "approval.decide" in r]
    assert len(decisions) == 2
    assert any("allow-once" in ",".join(r) and "bob" in r for r in decisions)
