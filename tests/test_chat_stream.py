"""The run tracker (chat/stream.py): one per gateway, so two gateways' runs never meet.
The tracker itself needs no database (the first tests); the relay around it stores runs
through the database and pushes to the session's group (the last ones)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer

from chat import store, stream
from chat.models import Message
from chat.relay import ChatRelay
from fleet.groups import session_group
from fleet.models import Session

KEY = "agent:main:main"


def test_two_trackers_keep_the_same_run_id_apart() -> None:
    one, two = stream.RunTracker(1), stream.RunTracker(2)
    a = one.start("run-1", session_pk=10, session_key=KEY)
    b = two.start("run-1", session_pk=20, session_key=KEY)
    a.add_delta({"deltaText": "hello"})
    b.add_delta({"deltaText": "other"})
    assert one.run("run-1") is a and two.run("run-1") is b
    assert (a.text, a.session_pk) == ("hello", 10)
    assert (b.text, b.session_pk) == ("other", 20)
    # The end of gateway 1's run leaves gateway 2's in flight, and not "finished".
    assert one.finish("run-1") is a
    assert one.has_finished("run-1") and one.run("run-1") is None
    assert not two.has_finished("run-1") and two.run("run-1") is b
    # So does a lost connection: only that gateway's runs and sessions go.
    one.remember_session(KEY, 10)
    two.remember_session(KEY, 20)
    one.start("run-2", session_pk=10, session_key=KEY)
    lost = one.lost()
    assert list(lost) == ["run-2"] and one.runs == {}
    assert one.session_pk(KEY) is None and two.session_pk(KEY) == 20
    assert list(two.runs) == ["run-1"]


def test_a_run_keeps_text_model_usage_and_tool_cards() -> None:
    run = stream.RunTracker(1).start("r", session_pk=1, session_key=KEY)
    run.add_delta({"message": {"content": "hel"}})  # protocol 3: cumulative
    run.add_delta({"message": {"content": "hello"}})
    run.add_delta({"message": {"content": ""}})  # nothing: kept as it was
    assert run.text == "hello"
    run.add_delta({"deltaText": " there"})  # protocol 4: appended
    assert run.text == "hello there"
    assert run.add_agent(
        {"stream": "lifecycle", "data": {"startedAt": 5, "model": "gpt-5"}}
    )
    assert run.add_agent({"stream": "usage", "data": {"input": 3, "model": "x"}})
    tool = {"toolCallId": "c1", "name": "exec", "phase": "start", "args": {"a": 1}}
    assert run.add_agent({"stream": "tool", "seq": 7, "data": tool})
    # The same frame again (as `session.tool`): not new.
    assert not run.add_agent({"stream": "tool", "seq": 7, "data": tool})
    assert run.add_agent(
        {"stream": "tool", "seq": 8, "data": {**tool, "phase": "result", "result": 2}}
    )
    assert (run.started_at_ms, run.model, run.usage) == (5, "gpt-5", {"input": 3})
    assert run.tools == {
        "c1": {
            "id": "c1",
            "name": "exec",
            "phase": "result",
            "args": {"a": 1},
            "result": 2,
            "isError": False,
        }
    }


def test_a_tracker_finds_the_one_run_of_a_session_and_forgets_stale_runs() -> None:
    tracker = stream.RunTracker(1)
    tracker.start("a", session_pk=1, session_key=KEY)
    assert tracker.only_run_in(KEY) == "a"
    tracker.start("b", session_pk=1, session_key=KEY)
    assert tracker.only_run_in(KEY) == ""  # two: it cannot tell
    assert tracker.only_run_in("agent:main:other") == ""
    tracker.runs["a"].started = time.monotonic() - stream.MAX_RUN_SECONDS - 1
    tracker.start("c", session_pk=1, session_key="agent:main:other")
    assert sorted(tracker.runs) == ["b", "c"]  # "a" never ended: pruned


async def test_a_trackers_store_lane_runs_jobs_in_order() -> None:
    tracker = stream.RunTracker(1)
    done: list[int] = []

    def job(n: int, pause: float) -> stream.Job:
        async def run() -> None:
            await asyncio.sleep(pause)
            if n == 2:
                raise RuntimeError("one bad row")
            done.append(n)

        return run

    for n, pause in ((1, 0.02), (2, 0.0), (3, 0.0)):
        tracker.enqueue(job(n, pause))
    await tracker.drain()
    assert done == [1, 3]  # in order; the failure stopped nothing


# -- the relay: a tracker per gateway, through the database ------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("in_memory_layer")
async def test_the_relay_keeps_two_gateways_runs_apart(make_gateway: Any) -> None:
    gateways = [
        await sync_to_async(make_gateway)(f"ws://127.0.0.1:{port}") for port in (1, 2)
    ]
    sessions = [
        await Session.objects.acreate(gateway=g, key=KEY, agent_key="main")
        for g in gateways
    ]
    one, two = (g.pk for g in gateways)
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(session_group(sessions[1].pk), channel)

    relay = ChatRelay()
    # The same run id on both gateways (ids are the gateway's own).
    for gateway_id, text in ((one, "from one"), (two, "from two")):
        await relay.on_chat_event(
            gateway_id,
            {"runId": "r", "sessionKey": KEY, "state": "delta", "deltaText": text},
        )
    assert relay.tracker(one).runs["r"].session_pk == sessions[0].pk
    assert relay.tracker(two).runs["r"].session_pk == sessions[1].pk
    pushed = await asyncio.wait_for(layer.receive(channel), 2)
    assert pushed["type"] == "gateway.chat"
    assert pushed["payload"]["deltaText"] == "from two"  # gateway 1's went elsewhere

    await relay.on_chat_event(one, {"runId": "r", "sessionKey": KEY, "state": "final"})
    await relay.tracker(one).drain()
    assert "r" not in relay.tracker(one).runs and "r" in relay.tracker(two).runs
    await relay.on_connection_lost(two)
    await relay.tracker(two).drain()

    replies = [
        await Message.objects.aget(session=s, role=Message.Role.ASSISTANT)
        for s in sessions
    ]
    assert (replies[0].text, replies[0].state) == ("from one", "final")
    assert (replies[1].text, replies[1].state) == ("from two", "error")
    assert replies[1].error == store.INTERRUPTED
    stored = await asyncio.wait_for(layer.receive(channel), 2)
    assert stored["type"] == "chat.stored" and stored["run_id"] == "r"
    assert stored["message_id"] == str(replies[1].pk)
