"""The gateway client on its own, over real sockets to the simulator."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

from fleet.gateway import ConnectOptions, DeviceKey, Event, GatewayConnection
from fleet.worker import Backoff


async def connected(sim) -> GatewayConnection:
    async def ignore(event: Event) -> None:
        pass

    conn = GatewayConnection(
        ConnectOptions(url=sim.url, token=sim.token, device=DeviceKey.generate()),
        ignore,
    )
    await conn.connect()
    return conn


async def test_it_waits_for_both_answers_of_the_agent_call(sim) -> None:
    conn = await connected(sim)
    reader = asyncio.create_task(conn.run())
    key = uuid.uuid4().hex
    ack, final = await conn.request_with_final(
        "agent",
        {"idempotencyKey": key, "sessionKey": sim.main_session_key, "message": "hello"},
    )
    assert ack["status"] == "accepted" and ack["runId"] == key
    result = await asyncio.wait_for(final, 10)
    assert result["status"] == "ok" and result["runId"] == key
    await conn.close()
    await reader


async def test_it_drops_a_connection_that_went_silent(sim) -> None:
    conn = await connected(sim)
    assert conn.hello is not None
    # The simulator ticks every 30 s; pretend the gateway promised 100 ms.
    conn.hello = dataclasses.replace(conn.hello, tick_interval_ms=100)
    closed = await asyncio.wait_for(conn.run(), 5)
    assert closed.code == 4000 and closed.reason == "tick timeout"


def test_backoff_doubles_to_thirty_seconds_with_jitter() -> None:
    backoff = Backoff()
    delays = [backoff.next() for _ in range(8)]
    bases = [1, 2, 4, 8, 16, 30, 30, 30]
    assert all(base / 2 <= d <= base for d, base in zip(delays, bases, strict=True))
    backoff.reset()
    assert backoff.next() <= 1


async def test_it_hands_over_queued_sessions_changed_together_in_order(sim) -> None:
    """A burst of sessions.changed that queued up while the handler was busy arrives as
    batches (to on_events), in order, and the events between them keep their place."""
    seen: list[tuple[str, object]] = []
    batches: list[int] = []
    release = asyncio.Event()

    async def one(event: Event) -> None:
        if event.event == "client.hold":
            await release.wait()  # the handler is busy: the burst queues up behind it
        seen.append((event.event, _label(event)))

    async def many(events: list[Event]) -> None:
        batches.append(len(events))
        seen.extend((e.event, _label(e)) for e in events)

    conn = GatewayConnection(
        ConnectOptions(url=sim.url, token=sim.token, device=DeviceKey.generate()),
        one,
        many,
    )
    await conn.connect()
    reader = asyncio.create_task(conn.run())
    await conn.request("sessions.subscribe", {})
    conn.enqueue(Event("client.hold", None, None))
    key = sim.main_session_key
    for i in range(30):
        await sim.emit_session_changed(key, label=f"l{i}")
    await sim.emit_rowless_sessions_changed()  # same event name: batched too
    for i in range(30, 40):
        await sim.emit_session_changed(key, label=f"l{i}")

    async def arrived() -> None:
        while sum(1 for name, _ in seen if name == "sessions.changed") < 41:
            await asyncio.sleep(0.01)

    await asyncio.sleep(0.3)  # all frames read and queued behind the held handler
    release.set()
    await asyncio.wait_for(arrived(), 10)
    labels = [label for name, label in seen if name == "sessions.changed"]
    assert labels == [f"l{i}" for i in range(30)] + [None] + [
        f"l{i}" for i in range(30, 40)
    ]
    assert batches and max(batches) > 1
    await conn.close()
    await reader


def _label(event: Event) -> object:
    payload = event.payload if isinstance(event.payload, dict) else {}
    return payload.get("label")
