"""Exec approvals over real sockets to the simulator: the worker is an approval client, a run
waits for the decision and goes on, the roles are checked by the view, the consumer and the
worker, two deciders race, a worker restart keeps what is pending, text is escaped, and a
late decision is shown as such."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import uuid
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import Group, Permission

from approvals import services
from approvals.models import Approval
from approvals.routing import websocket_urlpatterns
from fleet import calls
from fleet.models import AuditEvent, Gateway, Session
from tests.helpers import (
    admin_request,
    body_of,
    chat_socket,
    client_for,
    frame_with,
    wait_for,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("role_groups", "decide_permission"),
]

XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture
def decide_permission(role_groups: Any) -> None:
    """What the data migration gives (a transactional test flushed it)."""
    permission = Permission.objects.get(
        content_type__app_label="approvals", codename="decide"
    )
    for name in ("operator", "admin"):
        Group.objects.get(name=name).permissions.add(permission)


async def connected(
    sim: Any, make_gateway: Any, running_worker: Any, workers: list[Any] | None = None
) -> Gateway:
    gateway = await sync_to_async(make_gateway)(sim.url)
    worker = await running_worker()
    if workers is not None:
        workers.append(worker)

    async def ready() -> bool:
        row = await Gateway.objects.aget(pk=gateway.pk)
        return row.state == Gateway.State.CONNECTED and bool(sim._approval_clients())

    await wait_for(ready, 15)
    await asyncio.sleep(0.2)  # on_ready's exec.approval.list
    return await Gateway.objects.aget(pk=gateway.pk)


async def pending_row(approval_id: str) -> Approval:
    async def stored() -> bool:
        return await Approval.objects.filter(approval_id=approval_id).aexists()

    await wait_for(stored, 10)
    return await Approval.objects.select_related("gateway").aget(
        approval_id=approval_id
    )


async def settled(pk: int) -> Approval:
    async def done() -> bool:
        row = await Approval.objects.aget(pk=pk)
        return row.state != Approval.State.PENDING

    await wait_for(done, 10)
    return await Approval.objects.aget(pk=pk)


async def decide(user: Any, approval: Approval, decision: str) -> Any:
    return await admin_request(
        await client_for(user),
        "post",
        f"/approvals/{approval.pk}/decide/",
        {"decision": decision},
    )


async def start_exec_run(sim: Any, gateway: Gateway, user: Any, text: str) -> str:
    """An operator sends a message from the chat page; returns the gateway's run id."""

    async def synced() -> bool:
        return await Session.objects.filter(
            gateway=gateway, key=sim.main_session_key
        ).aexists()

    await wait_for(synced, 10)
    session = await Session.objects.aget(gateway=gateway, key=sim.main_session_key)
    before = set(sim._runs)
    response = await (await client_for(user)).post(
        f"/chat/{session.pk}/send/", {"text": text, "message_id": str(uuid.uuid4())}
    )
    assert response.status_code in (200, 204, 302), response.content[:300]

    async def started() -> bool:
        return bool(set(sim._runs) - before)

    await wait_for(started, 10)
    return (set(sim._runs) - before).pop()


async def run_finished(sim: Any, run_id: str) -> str:
    run = sim._runs[run_id]
    await asyncio.wait_for(run.done.wait(), 10)
    return str(run.text)


async def test_the_worker_is_an_approval_client(sim, make_gateway, running_worker):
    await connected(sim, make_gateway, running_worker)
    conn = sim._approval_clients()[0]
    assert "approvals" in conn.caps
    assert "operator.approvals" in conn.scopes


async def test_a_run_waits_for_allow_once_and_goes_on(
    sim, make_gateway, running_worker, personas
):
    gateway = await connected(sim, make_gateway, running_worker)
    run_id = await start_exec_run(
        sim, gateway, personas["bob"], "please [[fake:exec uname -a]] now"
    )
    await wait_for(lambda: _true(bool(sim._approvals)), 10)
    approval = await pending_row(next(iter(sim._approvals)))
    assert approval.command == "uname -a"
    assert approval.run_id == run_id
    assert not sim._runs[run_id].finished  # the run waits

    page = await admin_request(await client_for(personas["bob"]), "get", "/approvals/")
    body = page.content.decode()
    assert "uname -a" in body and 'name="decision" value="allow-once"' in body
    assert 'name="decision" value="allow-always"' not in body  # admins only

    await decide(personas["bob"], approval, "allow-once")
    assert (await run_finished(sim, run_id)).startswith("Ran it: Linux")
    row = await settled(approval.pk)
    assert (row.state, row.decision, row.decided_by_name) == (
        "allowed",
        "allow-once",
        "bob",
    )
    assert row.resolved_by  # the gateway names the connection
    event = await AuditEvent.objects.aget(action=services.AUDIT_ACTION)
    assert event.username == "bob" and event.result == AuditEvent.Result.OK
    assert event.params["command"] == "uname -a"
    assert event.params["decision"] == "allow-once"

    history = await admin_request(
        await client_for(personas["carol"]), "get", "/approvals/"
    )
    assert "Nothing waits for a decision" in history.content.decode()
    assert "<td>bob</td>" in history.content.decode()


async def test_a_denied_run_ends_without_running(
    sim, make_gateway, running_worker, personas
):
    gateway = await connected(sim, make_gateway, running_worker)
    run_id = await start_exec_run(
        sim, gateway, personas["bob"], "please [[fake:exec uname -a]] now"
    )
    await wait_for(lambda: _true(bool(sim._approvals)), 10)
    approval = await pending_row(next(iter(sim._approvals)))
    await decide(personas["bob"], approval, "deny")
    text = await run_finished(sim, run_id)
    assert text.startswith("Not run: Exec denied") and "Linux" not in text
    assert (await settled(approval.pk)).state == Approval.State.DENIED


async def test_roles_are_checked_by_the_view_the_socket_and_the_worker(
    sim, make_gateway, running_worker, personas
):
    await connected(sim, make_gateway, running_worker)
    record, _ = sim.request_approval("ls /")
    approval = await pending_row(record["id"])

    # a viewer's POST
    response = await decide(personas["carol"], approval, "allow-once")
    assert response.status_code == 403
    # a viewer's page has no button
    page = await admin_request(
        await client_for(personas["carol"]), "get", "/approvals/"
    )
    assert (
        "ls /" in page.content.decode()
        and 'class="approval-actions"' not in page.content.decode()
    )
    # an operator's allow-always
    response = await decide(personas["bob"], approval, "allow-always")
    assert response.status_code == 403
    # a viewer's socket message
    ws = WebsocketCommunicator(URLRouter(websocket_urlpatterns), "/ws/approvals/")
    ws.scope["user"] = personas["carol"]
    connected_ok, _ = await ws.connect()
    assert connected_ok
    await ws.receive_from(timeout=5)
    await ws.send_to(
        text_data=json.dumps({"approval": approval.pk, "decision": "allow-once"})
    )
    frame = await ws.receive_from(timeout=5)
    assert "Refused" in frame
    await ws.disconnect()
    # the worker's own check, for a call that skipped the web's
    with pytest.raises(PermissionError):
        await sync_to_async(calls.check_role)(
            personas["bob"],
            "exec.approval.resolve",
            {"id": record["id"], "decision": "allow-always"},
        )
    worker = None
    from fleet.worker import Worker

    worker = Worker()
    reply = await worker_reply(
        worker,
        personas["bob"],
        gateway_id=approval.gateway_id,
        approval_id=record["id"],
    )
    assert reply["error"]["code"] == "FORBIDDEN"
    assert record["id"] in sim._approvals  # nothing reached the gateway
    assert (await Approval.objects.aget(pk=approval.pk)).pending


async def worker_reply(
    worker: Any, user: Any, *, gateway_id: int, approval_id: str
) -> Any:
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    reply_to = await layer.new_channel()
    await worker.handle_call(
        {
            "method": "exec.approval.resolve",
            "params": {"id": approval_id, "decision": "allow-always"},
            "gateway_id": gateway_id,
            "user_id": user.pk,
            "reply_to": reply_to,
        }
    )
    return await asyncio.wait_for(layer.receive(reply_to), 5)


async def test_an_admin_may_allow_always_and_revoke_the_grant(
    sim, make_gateway, running_worker, personas
):
    gateway = await connected(sim, make_gateway, running_worker)
    record, future = sim.request_approval("make deploy")
    approval = await pending_row(record["id"])
    await decide(personas["alice"], approval, "allow-always")
    assert await asyncio.wait_for(future, 5) == "allow-always"
    assert sim._approval_grants
    alice = await client_for(personas["alice"])
    page = await admin_request(alice, "get", f"/approvals/grants/{gateway.pk}/")
    assert "/usr/bin/make" in page.content.decode()
    grant_id = sim._approval_grants[0]["id"]
    await admin_request(
        alice, "post", f"/approvals/grants/{gateway.pk}/revoke/", {"grant": grant_id}
    )
    assert not sim._approval_grants
    event = await AuditEvent.objects.aget(action="approval.grant.revoke")
    assert event.username == "alice" and event.result == AuditEvent.Result.OK
    # a viewer or an operator may not see the grants page
    bob = await admin_request(
        await client_for(personas["bob"]), "get", f"/approvals/grants/{gateway.pk}/"
    )
    assert bob.status_code == 403


async def test_two_deciders_at_once_one_wins(
    sim, make_gateway, running_worker, personas
):
    await connected(sim, make_gateway, running_worker)
    record, future = sim.request_approval("rm -rf /tmp/cache")
    approval = await pending_row(record["id"])
    first, second = await asyncio.gather(
        decide(personas["alice"], approval, "deny"),
        decide(personas["bob"], approval, "allow-once"),
    )
    texts = [first.content.decode(), second.content.decode()]
    assert sum("lready" in t for t in texts) == 1, texts
    assert any(
        "already decided by" in t.lower() or "already being decided by" in t.lower()
        for t in texts
    )
    row = await settled(approval.pk)
    assert await asyncio.wait_for(future, 5) == row.decision
    assert await AuditEvent.objects.filter(action=services.AUDIT_ACTION).acount() == 1
    # a third, later, sees who won
    late = await decide(personas["bob"], approval, "deny")
    assert f"Already decided by {row.decided_by_name}" in late.content.decode()


async def test_a_decision_made_elsewhere_and_a_late_one_are_shown_as_such(
    sim, make_gateway, running_worker, personas
):
    await connected(sim, make_gateway, running_worker)
    record, _ = sim.request_approval("date")
    approval = await pending_row(record["id"])
    sim.settle_approval(record["id"], "allow-once", "gateway-ui")
    row = await settled(approval.pk)
    assert row.resolved_by == "gateway-ui" and row.decided_by is None
    response = await decide(personas["bob"], approval, "deny")
    assert response.status_code == 200
    assert "Already decided by gateway-ui" in response.content.decode()

    sim.approval_timeout_ms = 200
    record, _ = sim.request_approval("sleep 1")
    approval = await pending_row(record["id"])
    await asyncio.sleep(0.4)
    response = await decide(personas["bob"], approval, "allow-once")
    assert response.status_code == 200
    assert "Too late: this request has expired" in response.content.decode()


async def test_a_worker_restart_keeps_what_is_pending(
    sim, make_gateway, running_worker, personas, fast_worker_settings
):
    workers: list[Any] = []
    gateway = await connected(sim, make_gateway, running_worker, workers)
    record, future = sim.request_approval("uptime")
    approval = await pending_row(record["id"])
    # something the worker thought pending that the gateway decided while it was away
    stale = await Approval.objects.acreate(
        gateway=gateway, approval_id="gone-meanwhile", command="whoami"
    )
    # the worker stops (its connection ends), then a fresh one starts: a restart
    workers[0].stop()
    await wait_for(lambda: _true(not sim._approval_clients()), 15)
    assert record["id"] in sim._approvals  # still pending at the gateway
    await running_worker()
    await wait_for(lambda: _stale_closed(stale.pk), 20)
    assert (await Approval.objects.aget(pk=approval.pk)).pending
    page = await admin_request(await client_for(personas["bob"]), "get", "/approvals/")
    assert (
        "uptime" in page.content.decode()
        and 'name="decision" value="allow-once"' in page.content.decode()
    )
    await wait_for(lambda: _true(bool(sim._approval_clients())), 10)
    await decide(personas["bob"], approval, "allow-once")
    assert await asyncio.wait_for(future, 5) == "allow-once"


async def _stale_closed(pk: int) -> bool:
    return (await Approval.objects.aget(pk=pk)).state == Approval.State.EXPIRED


async def _true(value: bool) -> bool:
    return value


async def test_command_text_is_escaped_in_the_inbox_and_plain_in_the_export(
    sim, make_gateway, running_worker, personas
):
    await connected(sim, make_gateway, running_worker)
    record, _ = sim.request_approval(XSS)
    approval = await pending_row(record["id"])
    bob = await client_for(personas["bob"])
    body = (await admin_request(bob, "get", "/approvals/")).content.decode()
    assert XSS not in body and "&lt;img src=x onerror=alert(1)&gt;" in body
    await decide(personas["bob"], approval, "deny")
    await settled(approval.pk)
    body = (await admin_request(bob, "get", "/approvals/")).content.decode()
    assert XSS not in body and "&lt;img src=x onerror=alert(1)&gt;" in body
    export = await admin_request(bob, "get", "/approvals/export.csv")
    assert export["Content-Type"].startswith("text/csv")
    text = await body_of(export)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[0]["command"] == XSS and rows[0]["decided by"] == "bob"
    filtered = await admin_request(
        bob, "get", "/approvals/export.csv", {"person": "nobody"}
    )
    assert list(csv.DictReader(io.StringIO(await body_of(filtered)))) == []


async def test_the_nav_badge_counts_what_is_pending(
    sim, make_gateway, running_worker, personas
):
    await connected(sim, make_gateway, running_worker)
    sim.request_approval("one")
    sim.request_approval("two")

    async def two() -> bool:
        return await sync_to_async(services.pending_count)(personas["carol"]) == 2

    await wait_for(two, 10)
    assert await sync_to_async(services.pending_count)(personas["dave"]) is None


async def test_the_simulator_asks_only_approval_clients(sim):
    record, future = sim.request_approval("ls")
    assert future.result() == "expired:no-approval-route"
    assert sim._approval_history[0]["reason"] == "no-approval-route"


async def test_the_chat_page_shows_the_card_live_to_every_page(
    sim, make_gateway, running_worker, personas
):
    gateway = await connected(sim, make_gateway, running_worker)

    async def synced() -> bool:
        return await Session.objects.filter(
            gateway=gateway, key=sim.main_session_key
        ).aexists()

    await wait_for(synced, 10)
    session = await Session.objects.aget(gateway=gateway, key=sim.main_session_key)
    bob_ws = await chat_socket(session, personas["bob"])
    carol_ws = await chat_socket(session, personas["carol"])
    run_id = await start_exec_run(
        sim, gateway, personas["bob"], f"please [[fake:exec echo {XSS}]] now"
    )
    card = await frame_with(bob_ws, 'id="chat-approvals"', "approval-card")
    assert 'name="decision" value="allow-once"' in card
    assert "&lt;img src=x onerror=alert(1)&gt;" in card and XSS not in card
    assert 'class="countdown"' in card
    viewer_card = await frame_with(carol_ws, 'id="chat-approvals"', "approval-card")
    assert 'class="approval-actions"' not in viewer_card
    # the chat page itself renders the card too (a page opened now)
    page = await admin_request(
        await client_for(personas["carol"]), "get", f"/chat/{session.pk}/"
    )
    assert "approval-card" in page.content.decode()

    approval = await Approval.objects.aget(run_id=run_id)
    response = await admin_request(
        await client_for(personas["bob"]),
        "post",
        f"/approvals/{approval.pk}/decide/",
        {"decision": "allow-once", "next": f"/chat/{session.pk}/"},
    )
    assert response.redirect_chain[-1][0] == f"/chat/{session.pk}/"
    decided = await frame_with(
        carol_ws, 'id="chat-approvals"', "Allowed</strong> by bob"
    )
    assert 'class="approval-actions"' not in decided
    await frame_with(bob_ws, 'id="chat-approvals"', "Allowed</strong> by bob")
    assert (await run_finished(sim, run_id)).startswith("Ran it:")
    await bob_ws.disconnect()
    await carol_ws.disconnect()


async def test_the_demo_agent_asks_from_a_run_started_elsewhere(
    sim, make_gateway, running_worker, personas
):
    from fleet.management.commands.serve import _ask_for_approvals

    gateway = await connected(sim, make_gateway, running_worker)
    asker = asyncio.create_task(_ask_for_approvals(sim, 0.2))
    try:

        async def asked() -> bool:
            return await Approval.objects.filter(
                gateway=gateway, session_key=sim.main_session_key
            ).aexists()

        await wait_for(asked, 10)
    finally:
        asker.cancel()
    # The first it asked (the asker may have asked again meanwhile on a busy machine).
    approval = await Approval.objects.filter(gateway=gateway).order_by("pk").afirst()
    assert approval is not None and approval.command == "uname -a"
    await decide(personas["bob"], approval, "allow-once")
    assert (await settled(approval.pk)).state == Approval.State.ALLOWED


async def test_a_card_form_sent_by_htmx_gets_its_result_in_place(
    sim, make_gateway, running_worker, personas
):
    await connected(sim, make_gateway, running_worker)
    record, _ = sim.request_approval("hostname")
    approval = await pending_row(record["id"])
    client = await client_for(personas["bob"])
    async with ThreadSensitiveContext():
        response = await client.post(
            f"/approvals/{approval.pk}/decide/",
            {"decision": "deny"},
            headers={"HX-Request": "true"},
        )
    assert "Sent: denied." in response.content.decode()
    await settled(approval.pk)
    async with ThreadSensitiveContext():
        late = await client.post(
            f"/approvals/{approval.pk}/decide/",
            {"decision": "deny"},
            headers={"HX-Request": "true"},
        )
    assert "Already decided by bob" in late.content.decode()


def test_an_approval_waiting_too_long_raises_one_alert_until_decided(db: Any) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from alerts.evaluate import evaluate_once
    from alerts.models import Alert, AlertRule

    gateway = Gateway.objects.create(name="gw-wait", url="ws://127.0.0.1:9")
    other = Gateway.objects.create(name="gw-other", url="ws://127.0.0.1:8")
    now = timezone.now()
    waiting = Approval.objects.create(
        gateway=gateway,
        approval_id="a-1",
        command="<img src=x onerror=alert(1)>",
        agent_id="main",
        requested_at=now - timedelta(minutes=10),
        expires_at=now + timedelta(minutes=20),
    )
    Approval.objects.create(  # too young for the rule
        gateway=gateway, approval_id="a-2", command="ls", requested_at=now
    )
    Approval.objects.create(  # another gateway than the rule's
        gateway=other,
        approval_id="a-3",
        command="ls",
        requested_at=now - timedelta(minutes=10),
    )
    AlertRule.objects.create(
        name="approvals",
        kind=AlertRule.Kind.APPROVAL_WAITING,
        for_seconds=300,
        gateway=gateway,
        cooldown_seconds=0,
    )
    assert evaluate_once(now) == 1
    assert evaluate_once(now + timedelta(seconds=30)) == 0  # still waiting: no second
    alert = Alert.objects.get()
    assert alert.key == f"approval:{waiting.pk}" and alert.gateway_id == gateway.pk
    assert "onerror" in alert.detail  # stored as text; templates escape it

    Approval.objects.filter(pk=waiting.pk).update(state=Approval.State.ALLOWED)
    assert evaluate_once(now + timedelta(seconds=60)) == 1  # the recovery
    alert.refresh_from_db()
    assert alert.status == Alert.Status.RESOLVED


async def test_closing_many_at_once_tells_each_sessions_chat_page(
    in_memory_layer: None,
) -> None:
    """The expiry sweep and a reconnect's resync close approvals in bulk: each one's chat
    page is told to redraw its card, as after a single decision."""
    from channels.layers import get_channel_layer
    from django.utils import timezone

    from fleet.groups import session_group

    gw = await Gateway.objects.acreate(
        name="bulk", url="ws://127.0.0.1:1", token_env="X_GATEWAY_TOKEN"
    )
    one = await Session.objects.acreate(
        gateway=gw, key="agent:main:a", agent_key="main"
    )
    two = await Session.objects.acreate(
        gateway=gw, key="agent:main:b", agent_key="main"
    )
    past = timezone.now() - dt.timedelta(minutes=1)
    first = await Approval.objects.acreate(
        gateway=gw, approval_id="x1", session_key=one.key, expires_at=past
    )
    second = await Approval.objects.acreate(
        gateway=gw, approval_id="x2", session_key=two.key, expires_at=past
    )
    third = await Approval.objects.acreate(
        gateway=gw, approval_id="x3", session_key=one.key
    )
    layer = get_channel_layer()
    assert layer is not None
    channel = await layer.new_channel()
    for session in (one, two):
        await layer.group_add(session_group(session.pk), channel)

    async def told() -> int:
        message = await asyncio.wait_for(layer.receive(channel), 5)
        assert message["type"] == "approval.changed"
        return int(message["approval"])

    assert await sync_to_async(services.expire_due)() == 2
    assert {await told(), await told()} == {first.pk, second.pk}
    # A resync: the gateway no longer has the third.
    await sync_to_async(services.sync_pending)(gw.pk, {"approvals": []})
    assert await told() == third.pk
