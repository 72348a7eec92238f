"""Interop with the real OpenClaw gateway (2026.9.6, protocol 4; and 2026.4.12, protocol 3,
when installed): the worker syncs agent `main` and the sessions a real `chat.send` creates,
and follows the live `sessions.changed` of that run."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from chat.models import Message
from fleet import calls
from fleet.models import Agent, Gateway, Session
from tests.helpers import TEST_TOKEN_ENV, wait_for

pytestmark = [pytest.mark.realgw, pytest.mark.django_db(transaction=True)]


async def _sync_and_follow_a_run(
    gw: Any, make_gateway: Any, running_worker: Any, personas: Any, monkeypatch: Any
) -> Gateway:
    monkeypatch.setenv(TEST_TOKEN_ENV, gw.token)
    gateway = await asyncio.to_thread(make_gateway, gw.url)
    await running_worker()

    async def connected() -> bool:
        return (
            await Gateway.objects.aget(pk=gateway.pk)
        ).state == Gateway.State.CONNECTED

    await wait_for(connected, timeout=30)
    await wait_for(
        lambda: Agent.objects.filter(gateway=gateway, agent_id="main").aexists(),
        timeout=15,
    )

    key = f"agent:main:cc-interop-{uuid.uuid4().hex[:8]}"
    ack = await calls.acall(
        gateway.pk,
        "chat.send",
        {
            "sessionKey": key,
            "message": "[[fake:echo]] interop works [[/fake]]",
            "idempotencyKey": uuid.uuid4().hex,
        },
        user=personas["bob"],
    )
    assert ack["status"] in ("started", "ok")

    # The session appears through the live sessions.changed events (no resync involved) ...
    await wait_for(
        lambda: Session.objects.filter(gateway=gateway, key=key).aexists(), timeout=60
    )

    # ... and follows the run to its end: not running any more, with tokens counted.
    async def finished() -> bool:
        s = await Session.objects.aget(gateway=gateway, key=key)
        return not s.has_active_run and s.status == "done"

    await wait_for(finished, timeout=90)
    assert await Message.objects.filter(session__key=key, role="assistant").aexists()
    return gateway


async def test_it_syncs_and_follows_the_real_gateway(
    real_gateway, make_gateway, running_worker, personas, monkeypatch
) -> None:
    gateway = await _sync_and_follow_a_run(
        real_gateway, make_gateway, running_worker, personas, monkeypatch
    )
    current = await Gateway.objects.aget(pk=gateway.pk)
    assert current.protocol == 4 and current.server_version.startswith("2026.")
    assert current.main_session_key == "agent:main:main"


async def test_it_syncs_and_follows_a_protocol_3_gateway(
    real_gateway_v3, make_gateway, running_worker, personas, monkeypatch
) -> None:
    gateway = await _sync_and_follow_a_run(
        real_gateway_v3, make_gateway, running_worker, personas, monkeypatch
    )
    assert (await Gateway.objects.aget(pk=gateway.pk)).protocol == 3
