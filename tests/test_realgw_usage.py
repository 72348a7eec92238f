"""Usage against the real OpenClaw gateway (2026.9.6, its fake model priced at 3 and 15 USD
per million tokens): runs through our chat are booked at the session's estimatedCostUsd; a
reset then a delete of the session leave the day's total as it was; a restarted worker
books nothing twice."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from fleet import calls
from fleet.models import Agent, Gateway, Session
from tests.helpers import TEST_TOKEN_ENV, Chat, stored_reply, wait_for
from usage.models import UsageDay, UsageEntry

pytestmark = [
    pytest.mark.realgw,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("role_groups"),
]


def _ledger(gateway: Gateway, key: str | None = None) -> Decimal:
    rows = UsageEntry.objects.filter(gateway=gateway)
    if key is not None:
        rows = rows.filter(session_key=key)
    return sum((e.cost_usd for e in rows), Decimal(0))


def _today(gateway: Gateway) -> Decimal:
    days = UsageDay.objects.filter(gateway=gateway, day=timezone.localdate())
    return sum((d.cost_usd for d in days), Decimal(0))


async def test_real_runs_are_booked_and_survive_reset_delete_and_a_restart(
    real_gateway: Any,
    make_gateway: Any,
    running_worker: Any,
    personas: Any,
    monkeypatch: Any,
) -> None:
    monkeypatch.setenv(TEST_TOKEN_ENV, real_gateway.token)
    gateway = await asyncio.to_thread(make_gateway, real_gateway.url)
    first = await running_worker()

    async def ready() -> bool:
        row = await Gateway.objects.aget(pk=gateway.pk)
        agent = await Agent.objects.filter(gateway=gateway, agent_id="main").aexists()
        return row.state == Gateway.State.CONNECTED and agent

    await wait_for(ready, timeout=30)
    key = f"agent:main:cc-usage-{uuid.uuid4().hex[:8]}"
    session = await Session.objects.select_related("gateway").acreate(
        gateway=gateway, key=key, agent_key="main"
    )
    page = Chat(session, personas["bob"])
    await page.open()
    try:
        for text in ("how much is this?", "and this one, a bit longer please?"):
            message_id = uuid.uuid4()
            assert (await page.send(text, message_id)).status_code == 200
            await page.frames_until(stored_reply(message_id), timeout=90)
    finally:
        await page.close()

    async def matches() -> bool:
        row = await Session.objects.aget(pk=session.pk)
        booked = await sync_to_async(_ledger)(gateway, key)
        cost = row.estimated_cost
        return bool(cost) and abs(float(booked) - float(cost or 0)) < 1e-5

    await wait_for(matches, timeout=30)
    row = await Session.objects.aget(pk=session.pk)
    assert row.estimated_cost and row.estimated_cost > 0
    assert await UsageEntry.objects.filter(
        session_key=key, person=personas["bob"]
    ).aexists()
    before = await sync_to_async(_today)(gateway)
    assert before > 0
    count = await UsageEntry.objects.acount()

    await calls.acall(
        gateway.pk, "sessions.reset", {"key": key}, user=personas["alice"]
    )

    async def was_reset() -> bool:
        now = await Session.objects.aget(pk=session.pk)
        return (now.session_id, now.input_tokens) != (row.session_id, row.input_tokens)

    await wait_for(was_reset, timeout=30)
    await asyncio.sleep(1.0)
    assert await sync_to_async(_today)(gateway) == before
    await calls.acall(
        gateway.pk, "sessions.delete", {"key": key}, user=personas["alice"]
    )

    async def gone() -> bool:
        now = await Session.objects.aget(pk=session.pk)
        return now.gone_at is not None

    await wait_for(gone, timeout=30)
    await asyncio.sleep(1.0)
    assert await sync_to_async(_today)(gateway) == before
    assert await UsageEntry.objects.acount() == count

    # Another worker takes over: it re-reads the counters and books nothing twice.
    first.stop()

    async def released() -> bool:
        return (
            await Gateway.objects.aget(pk=gateway.pk)
        ).state != Gateway.State.CONNECTED

    await wait_for(released, timeout=30)
    await running_worker()
    await wait_for(ready, timeout=30)
    await asyncio.sleep(2.0)
    assert await UsageEntry.objects.acount() == count
    assert await sync_to_async(_today)(gateway) == before
