"""The worker against the gateway simulator, over real sockets: sync, live updates, seq
gaps, restarts, refusals, pairing, the REST fallback, garbage frames, and the lease."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from channels.layers import get_channel_layer

from fleet.models import Agent, Gateway, Session
from fleet.worker import refusals
from tests.helpers import TEST_TOKEN_ENV, state_of, until_state, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


async def listen(group: str) -> tuple[Any, str]:
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(group, channel)
    return layer, channel


async def receive_until(
    layer: Any,
    channel: str,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float = 5.0,
) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            message = await layer.receive(channel)
            if predicate(message):
                return message


async def test_it_syncs_agents_and_sessions_then_follows_changes(
    sim, make_gateway, running_worker
) -> None:
    gateway = await asyncio.to_thread(make_gateway, sim.url)
    layer, channel = await listen("fleet")
    await running_worker()
    connected = await until_state(gateway, Gateway.State.CONNECTED)
    assert (
        connected.protocol == 4
        and connected.server_version
        and connected.connected_since
    )
    await wait_for(live_sessions(gateway, 5))
    assert await Agent.objects.filter(gateway=gateway).acount() == 2
    assert ("sessions.subscribe", {}) in sim.calls

    key = sim.session_keys()[0]
    await sim.emit_session_changed(key, label="Renamed live", totalTokens=4242)

    async def renamed() -> bool:
        s = await Session.objects.aget(gateway=gateway, key=key)
        return s.label == "Renamed live" and s.total_tokens == 4242

    await wait_for(renamed)
    session = await Session.objects.aget(gateway=gateway, key=key)
    note = await receive_until(
        layer,
        channel,
        lambda m: (
            m["type"] == "fleet.sessions" and m.get("session_ids") == [session.pk]
        ),
    )
    assert note["gateway_id"] == gateway.pk
    assert note["counts"] is False  # a new label: the cards' counts stay as they are

    await sim.emit_session_changed(key, hasActiveRun=True, status="running")
    note = await receive_until(
        layer,
        channel,
        lambda m: m["type"] == "fleet.sessions" and m.get("counts") is True,
    )
    assert note["session_ids"] == [session.pk]


def live_sessions(gateway: Gateway, n: int) -> Callable[[], Any]:
    async def check() -> bool:
        return await Session.objects.filter(gateway=gateway, gone_at=None).acount() == n

    return check


async def test_it_resyncs_after_a_seq_gap(sim, make_gateway, running_worker) -> None:
    gateway = await asyncio.to_thread(make_gateway, sim.url)
    await running_worker()
    await until_state(gateway, Gateway.State.CONNECTED)
    await wait_for(live_sessions(gateway, 5))
    # The gateway drops a session without telling us, then an event goes missing.
    gone_key = sim.session_keys()[-1]
    sim.remove_session(gone_key, notify=False)
    await sim.skip_seq(3)

    async def marked_gone() -> bool:
        s = await Session.objects.aget(gateway=gateway, key=gone_key)
        return s.gone_at is not None

    await wait_for(marked_gone)


async def test_it_resyncs_on_a_rowless_sessions_changed(
    sim, make_gateway, running_worker
) -> None:
    gateway = await asyncio.to_thread(make_gateway, sim.url)
    await running_worker()
    await until_state(gateway, Gateway.State.CONNECTED)
    await wait_for(live_sessions(gateway, 5))
    sim.add_session(key="agent:main:added-quietly")
    await sim.emit_rowless_sessions_changed()
    await wait_for(
        lambda: Session.objects.filter(key="agent:main:added-quietly").aexists()
    )


async def test_it_reconnects_quietly_after_a_shutdown(
    sim, make_gateway, running_worker
) -> None:
    gateway = await asyncio.to_thread(make_gateway, sim.url)
    worker = await running_worker()
    await until_state(gateway, Gateway.State.CONNECTED)
    runner = next(iter(worker.runners.values()))[0]
    await wait_for(lambda: _true(runner.sync_count >= 1))
    await sim.shutdown(restart_expected_ms=200)
    await wait_for(lambda: _true(runner.sync_count >= 2), timeout=10)
    assert (await state_of(gateway)).state == Gateway.State.CONNECTED


async def _true(value: bool) -> bool:
    return value


async def test_it_says_when_the_token_is_refused_and_does_not_hammer(
    sim, make_gateway, running_worker, monkeypatch
) -> None:
    monkeypatch.setenv(TEST_TOKEN_ENV, "not-the-token")
    gateway = await asyncio.to_thread(make_gateway, sim.url)
    await running_worker()
    failed = await until_state(gateway, Gateway.State.AUTH_FAILED)
    assert "token mismatch" in failed.last_error
    assert TEST_TOKEN_ENV in failed.last_error  # it names the variable ...
    assert "not-the-token" not in failed.last_error  # ... never the value
    connects = sum(1 for method, _ in sim.calls if method == "connect")
    await asyncio.sleep(1.5)
    assert sum(1 for method, _ in sim.calls if method == "connect") == connects


async def test_it_says_when_no_token_is_set(
    sim, make_gateway, running_worker, monkeypatch
) -> None:
    monkeypatch.delenv(TEST_TOKEN_ENV)
    gateway = await asyncio.to_thread(make_gateway, sim.url)
    await running_worker()
    failed = await until_state(gateway, Gateway.State.AUTH_FAILED)
    assert TEST_TOKEN_ENV in failed.last_error


async def test_it_shows_pairing_and_connects_once_approved(
    gateway_token, make_gateway, running_worker, monkeypatch
) -> None:
    from fleet.gateway.testing import FakeGateway

    monkeypatch.setattr(refusals, "PAIRING_RETRY_SECONDS", 0.3)
    async with FakeGateway(token=gateway_token, pairing=True) as sim:
        gateway = await asyncio.to_thread(make_gateway, sim.url)
        await running_worker()
        pending = await until_state(gateway, Gateway.State.PAIRING_REQUIRED)
        assert pending.pairing_request_id
        assert (
            pending.approve_command
            == f"openclaw devices approve {pending.pairing_request_id}"
        )
        assert pending.approve_command in pending.last_error
        # The same request is kept while we retry, so the command shown stays valid.
        await asyncio.sleep(0.8)
        assert (
            await state_of(gateway)
        ).pairing_request_id == pending.pairing_request_id
        sim.approve(pending.pairing_request_id)
        connected = await until_state(gateway, Gateway.State.CONNECTED)
        assert connected.pairing_request_id == ""
        device = await connected.__class__.objects.select_related("device").aget(
            pk=gateway.pk
        )
        assert device.device.device_token  # kept for later connects


async def test_it_retries_a_gateway_that_is_still_starting(
    sim, make_gateway, running_worker
) -> None:
    sim.fail_next_connects(2, retry_after_ms=100)
    gateway = await asyncio.to_thread(make_gateway, sim.url)
    await running_worker()
    await until_state(gateway, Gateway.State.CONNECTED, timeout=5)


async def test_it_explains_a_protocol_mismatch(
    gateway_token, make_gateway, running_worker, monkeypatch
) -> None:
    monkeypatch.setattr("fleet.gateway.protocol.MAX_PROTOCOL", 3)
    monkeypatch.setattr("fleet.gateway.protocol.MIN_PROTOCOL", 3)
    from fleet.gateway.testing import FakeGateway

    async with FakeGateway(token=gateway_token, protocol=4) as sim:
        gateway = await asyncio.to_thread(make_gateway, sim.url)
        await running_worker()

        async def explained() -> bool:
            return "Protocol mismatch" in (await state_of(gateway)).last_error

        await wait_for(explained)
        assert (await state_of(gateway)).state == Gateway.State.OFFLINE


async def test_it_syncs_a_protocol_3_gateway(
    gateway_token, make_gateway, running_worker
) -> None:
    from fleet.gateway.testing import FakeGateway

    async with FakeGateway(token=gateway_token, protocol=3, sessions=7) as sim:
        gateway = await asyncio.to_thread(make_gateway, sim.url)
        await running_worker()
        connected = await until_state(gateway, Gateway.State.CONNECTED)
        assert connected.protocol == 3
        await wait_for(live_sessions(gateway, 7))
        # Protocol 3 refuses `offset`: we must never have sent it.
        assert all(
            "offset" not in params
            for method, params in sim.calls
            if method == "sessions.list"
        )


async def test_it_says_when_the_host_is_unreachable(
    gateway_token, make_gateway, running_worker
) -> None:
    gateway = await asyncio.to_thread(make_gateway, "ws://127.0.0.1:9")
    await running_worker()

    async def explained() -> bool:
        return "Cannot reach the gateway" in (await state_of(gateway)).last_error

    await wait_for(explained)


async def test_it_falls_back_to_rest_and_stands_down_when_the_websocket_returns(
    sim, make_gateway, running_worker
) -> None:
    sim.ws_enabled = False
    gateway = await asyncio.to_thread(make_gateway, sim.url)
    worker = await running_worker()
    fallback = await until_state(gateway, Gateway.State.REST_FALLBACK, timeout=15)
    assert "REST" in fallback.last_error
    await wait_for(live_sessions(gateway, 5))
    assert any(path == "/tools/invoke" for _, path in sim.http_calls)
    runner = next(iter(worker.runners.values()))[0]
    assert runner.fallback_active

    sim.ws_enabled = True
    await until_state(gateway, Gateway.State.CONNECTED, timeout=20)
    await wait_for(lambda: _true(not runner.fallback_active))
    polls = len(sim.http_calls)
    await asyncio.sleep(1.0)
    assert len(sim.http_calls) == polls  # stood down: no more polling


async def test_it_skips_malformed_frames_and_keeps_going(
    sim, make_gateway, running_worker
) -> None:
    gateway = await asyncio.to_thread(make_gateway, sim.url)
    worker = await running_worker()
    await until_state(gateway, Gateway.State.CONNECTED)
    await wait_for(live_sessions(gateway, 5))
    for garbage in [
        "not json",
        "[1,2]",
        '{"type":"event"}',
        '{"type":"res","id":5}',
        '{"type":"wat"}',
        '{"type":"event","event":"sessions.changed","payload":"nonsense"}',
    ]:
        await sim.send_raw(garbage)
    key = sim.session_keys()[0]
    await sim.emit_session_changed(key, label="still alive")

    async def applied() -> bool:
        return (
            await Session.objects.aget(gateway=gateway, key=key)
        ).label == "still alive"

    await wait_for(applied)
    runner = next(iter(worker.runners.values()))[0]
    assert runner.conn is not None and runner.conn.stats.malformed_frames >= 5
    assert (await state_of(gateway)).state == Gateway.State.CONNECTED


async def test_two_workers_never_hold_the_same_gateway(
    sim, make_gateway, running_worker
) -> None:
    gateway = await asyncio.to_thread(make_gateway, sim.url)
    first = await running_worker()
    await until_state(gateway, Gateway.State.CONNECTED)
    second = await running_worker()
    await asyncio.sleep(1.0)
    assert list(first.runners) == [gateway.pk] and second.runners == {}
    assert sim.connections == 1
    # The holder dies without releasing: the other takes over once the lease runs out.
    for runner, task in first.runners.values():
        task.cancel()
        if runner.conn is not None:
            await runner.conn.close()
    first.runners.clear()
    first.stop()

    async def taken_over() -> bool:
        return gateway.pk in second.runners

    await wait_for(taken_over, timeout=10)
    assert (await state_of(gateway)).lease_owner == second.owner


async def test_a_broken_gateway_does_not_stop_the_others(
    sim, make_gateway, running_worker
) -> None:
    broken = await asyncio.to_thread(make_gateway, "wss://[not a url")
    good = await asyncio.to_thread(make_gateway, sim.url)
    await running_worker()
    await until_state(good, Gateway.State.CONNECTED)
    assert (await state_of(broken)).state != Gateway.State.CONNECTED


async def test_it_answers_calls_from_the_web_and_refuses_without_the_role(
    sim, make_gateway, running_worker, personas
) -> None:
    from fleet import calls

    gateway = await asyncio.to_thread(make_gateway, sim.url)
    await running_worker()
    await until_state(gateway, Gateway.State.CONNECTED)
    models = await calls.acall(gateway.pk, "models.list", {}, user=personas["carol"])
    assert isinstance(models, dict)
    with pytest.raises(PermissionError):
        await calls.acall(
            gateway.pk,
            "sessions.reset",
            {"key": sim.main_session_key},
            user=personas["bob"],
        )
    with pytest.raises(calls.GatewayCallFailed) as failed:
        await calls.acall(
            gateway.pk,
            "sessions.delete",
            {"key": sim.main_session_key},
            user=personas["alice"],
        )
    assert "main session" in failed.value.message


async def test_calls_say_when_the_worker_is_down(sim, make_gateway, personas) -> None:
    from fleet import calls

    gateway = await asyncio.to_thread(
        make_gateway, sim.url, state=Gateway.State.CONNECTED
    )
    with pytest.raises(calls.GatewayUnavailable, match="worker is not running"):
        await calls.acall(gateway.pk, "models.list", {}, user=personas["carol"])


def test_the_worker_command_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "CONTROLCENTER_DATA_DIR": str(tmp_path),
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(20),
        "OPENCLAW_GATEWAY_URL": "ws://127.0.0.1:9",
    }
    env.pop("DATABASE_URL", None)
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"], cwd=root, env=env, check=True
    )
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "gatewayworker"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output = ""
        assert proc.stdout is not None
        for line in proc.stdout:
            output += line
            if "Cannot reach the gateway" in line or "starting" in line:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


async def summary_of(gateway: Gateway) -> tuple[int, int, dict[str, Any]]:
    g = await Gateway.objects.aget(pk=gateway.pk)
    return g.live_sessions, g.running_sessions, g.session_facets


def summary_is_exact(gateway: Gateway) -> Callable[[], Any]:
    """The counts and filter values kept on the gateway row equal a recount."""
    from asgiref.sync import sync_to_async

    from fleet.services import summary

    def exact() -> bool:
        g = Gateway.objects.get(pk=gateway.pk)
        return (g.live_sessions, g.running_sessions) == summary.counts_of(
            gateway.pk
        ) and g.session_facets == summary.facets_of(gateway.pk)

    return sync_to_async(exact)


async def test_the_gateway_row_keeps_its_counts_through_sync_events_reset_delete_and_repair(
    sim, make_gateway, running_worker, personas
) -> None:
    from fleet import calls

    gateway = await asyncio.to_thread(make_gateway, sim.url)
    await running_worker()
    await until_state(gateway, Gateway.State.CONNECTED)
    await wait_for(live_sessions(gateway, 5))
    await wait_for(summary_is_exact(gateway))
    live, running, facets = await summary_of(gateway)
    assert live == 5 and running == 0 and facets["kind"]

    # sessions.changed: a run starts, a new channel appears
    key = sim.session_keys()[1]
    await sim.emit_session_changed(
        key, hasActiveRun=True, status="running", channel="telegram"
    )

    async def running_one() -> bool:
        live, running, facets = await summary_of(gateway)
        return running == 1 and "telegram" in facets["channel"]

    await wait_for(running_one)
    # a new session, then a delete event
    sim.add_session(key="agent:main:fresh", channel="slack")

    async def six() -> bool:
        return (await summary_of(gateway))[0] == 6

    await wait_for(six)
    sim.remove_session("agent:main:fresh")

    async def five_again() -> bool:
        return (await summary_of(gateway))[0] == 5

    await wait_for(five_again)
    await wait_for(summary_is_exact(gateway))

    # reset through the worker: the gateway's events keep the row exact
    await calls.acall(
        gateway.pk, "sessions.reset", {"key": key}, user=personas["alice"]
    )
    await wait_for(summary_is_exact(gateway))

    # drift (a write behind the writers' backs), repaired by the next full sync
    await Gateway.objects.filter(pk=gateway.pk).aupdate(
        live_sessions=999, running_sessions=7, session_facets={}
    )
    await sim.skip_seq(3)
    await wait_for(summary_is_exact(gateway))
    assert (await summary_of(gateway))[0] == 5
