"""The admin's reset and delete against the real OpenClaw gateway, on a session that a real
`chat.send` created: the service functions behind the admin actions, through the worker."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async

from chat.models import Message
from fleet import actions, calls
from fleet.models import AuditEvent, Gateway, Session
from tests.helpers import TEST_TOKEN_ENV, wait_for

pytestmark = [pytest.mark.realgw, pytest.mark.django_db(transaction=True)]


async def _in_view_thread(func: Any, *args: Any, **kwargs: Any) -> Any:
    # As under daphne: a sync view in its own thread, calling the worker on this loop.
    async with ThreadSensitiveContext():
        return await sync_to_async(func)(*args, **kwargs)


async def _session_from_a_real_chat(
    gw: Any, make_gateway: Any, running_worker: Any, personas: Any, monkeypatch: Any
) -> Session:
    from django.conf import settings

    # sessions.delete archives (compresses) the transcript: slower than the fast default.
    monkeypatch.setattr(settings, "GATEWAY_CALL_TIMEOUT", 60.0)
    monkeypatch.setenv(TEST_TOKEN_ENV, gw.token)
    gateway = await asyncio.to_thread(make_gateway, gw.url)
    await running_worker()

    async def connected() -> bool:
        g = await Gateway.objects.aget(pk=gateway.pk)
        return g.state == Gateway.State.CONNECTED

    await wait_for(connected, timeout=60)
    key = f"agent:main:cc-admin-{uuid.uuid4().hex[:8]}"
    await calls.acall(
        gateway.pk,
        "chat.send",
        {"sessionKey": key, "message": "hello", "idempotencyKey": uuid.uuid4().hex},
        user=personas["bob"],
    )

    async def finished() -> bool:
        s = await Session.objects.filter(gateway=gateway, key=key).afirst()
        return s is not None and not s.has_active_run and s.status == "done"

    await wait_for(finished, timeout=90)
    return await Session.objects.select_related("gateway").aget(
        gateway=gateway, key=key
    )


async def test_it_resets_a_real_session(
    real_gateway, make_gateway, running_worker, personas, monkeypatch
) -> None:
    session = await _session_from_a_real_chat(
        real_gateway, make_gateway, running_worker, personas, monkeypatch
    )
    assert (session.total_tokens or 0) > 0
    outcome = await _in_view_thread(
        actions.reset_session, session, user=personas["alice"]
    )
    assert outcome.ok, outcome.message
    assert outcome.payload["ok"] is True and outcome.payload["key"] == session.key
    assert outcome.payload["entry"]["totalTokens"] == 0

    # The gateway's sessions.changed (reason reset) brings the emptied row to ours.
    async def reset() -> bool:
        s = await Session.objects.aget(pk=session.pk)
        return s.total_tokens == 0

    await wait_for(reset, timeout=30)
    event = await AuditEvent.objects.aget(action="session.reset")
    assert event.result == AuditEvent.Result.OK and event.username == "alice"


async def test_it_deletes_a_real_session_and_keeps_ours(
    real_gateway, make_gateway, running_worker, personas, monkeypatch
) -> None:
    session = await _session_from_a_real_chat(
        real_gateway, make_gateway, running_worker, personas, monkeypatch
    )
    outcome = await _in_view_thread(
        actions.delete_session, session, user=personas["alice"]
    )
    assert outcome.ok, outcome.message
    assert outcome.payload["deleted"] is True
    kept = await Session.objects.aget(pk=session.pk)
    assert kept.deleted_at is not None and kept.gone_at is not None
    assert await Message.objects.filter(session=kept).aexists()
    listed = await calls.acall(
        session.gateway_id, "sessions.list", {}, user=personas["carol"]
    )
    assert session.key not in [row["key"] for row in listed["sessions"]]
    event = await AuditEvent.objects.aget(action="session.delete")
    assert event.result == AuditEvent.Result.OK


async def test_it_shows_the_real_refusal_to_delete_the_main_session(
    real_gateway, make_gateway, running_worker, personas, monkeypatch
) -> None:
    session = await _session_from_a_real_chat(
        real_gateway, make_gateway, running_worker, personas, monkeypatch
    )
    main = (
        await Session.objects.select_related("gateway")
        .filter(gateway_id=session.gateway_id, key="agent:main:main")
        .afirst()
    )
    if main is None:  # the real gateway lists its main session once it has run
        main = await Session.objects.acreate(
            gateway_id=session.gateway_id, key="agent:main:main", agent_key="main"
        )
        main = await Session.objects.select_related("gateway").aget(pk=main.pk)
    outcome = await _in_view_thread(
        actions.delete_session, main, user=personas["alice"]
    )
    assert not outcome.ok
    assert "Cannot delete the main session" in outcome.message
    refreshed = await Session.objects.aget(pk=main.pk)
    assert refreshed.deleted_at is None
