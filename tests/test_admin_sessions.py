"""Session actions in the admin, against the simulator with a running worker: the right call
with the right params, the result shown as a message, and an audit event for each."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import User
from django.test import AsyncClient, Client
from django.urls import reverse
from django.utils import timezone

from chat.models import Message
from fleet.models import AuditEvent, Gateway, Session
from tests.helpers import admin_request, wait_for

CHANGELIST = "/admin/fleet/session/"


def _calls(sim: Any, method: str) -> list[dict[str, Any]]:
    return [params for name, params in sim.calls if name == method]


@pytest.fixture
async def fleet(
    sim: Any,
    make_gateway: Callable[..., Gateway],
    running_worker: Callable[[], Awaitable[Any]],
    personas: dict[str, User],
) -> dict[str, Any]:
    """A connected, synced gateway on the simulator, and alice logged in to the admin."""
    gateway = await database_sync_to_async(make_gateway)(sim.url)
    await running_worker()

    async def synced() -> bool:
        g = await Gateway.objects.aget(pk=gateway.pk)
        count = await Session.objects.filter(gateway=gateway, gone_at=None).acount()
        return g.state == Gateway.State.CONNECTED and count == len(sim.session_keys())

    await wait_for(synced, 15)
    client = AsyncClient()
    await client.aforce_login(personas["alice"])
    return {"gateway": gateway, "client": client, "sim": sim}


async def _session(gateway: Gateway, key: str) -> Session:
    return await Session.objects.select_related("gateway").aget(
        gateway=gateway, key=key
    )


def _other_key(sim: Any) -> str:
    return next(k for k in sim.session_keys() if k != sim.main_session_key)


async def _last_event(action: str) -> AuditEvent:
    return await AuditEvent.objects.filter(action=action).alatest("created_at")


@pytest.mark.django_db(transaction=True)
async def test_it_asks_for_confirmation_before_resetting(fleet: dict[str, Any]) -> None:
    sim, gateway = fleet["sim"], fleet["gateway"]
    key = _other_key(sim)
    session = await _session(gateway, key)
    response = await admin_request(
        fleet["client"],
        "post",
        CHANGELIST,
        {"action": "reset_sessions", "_selected_action": [session.pk]},
    )
    assert response.status_code == 200
    page = response.content.decode()
    assert "Reset these sessions?" in page
    assert key in page
    assert gateway.name in page
    assert _calls(sim, "sessions.reset") == []
    assert not await AuditEvent.objects.filter(action="session.reset").aexists()


@pytest.mark.django_db(transaction=True)
async def test_it_resets_a_session_through_the_worker(fleet: dict[str, Any]) -> None:
    sim, gateway = fleet["sim"], fleet["gateway"]
    key = _other_key(sim)
    session = await _session(gateway, key)
    response = await admin_request(
        fleet["client"],
        "post",
        CHANGELIST,
        {"action": "reset_sessions", "_selected_action": [session.pk], "post": "yes"},
    )
    assert response.status_code == 200
    assert f"Reset {key} on {gateway.name}." in response.content.decode()
    assert _calls(sim, "sessions.reset") == [{"key": key}]
    event = await _last_event("session.reset")
    assert event.result == AuditEvent.Result.OK
    assert event.username == "alice"
    assert event.session_id == session.pk
    assert event.gateway_id == gateway.pk
    assert event.params == {"method": "sessions.reset", "key": key}


@pytest.mark.django_db(transaction=True)
async def test_it_lets_the_worker_record_an_action_the_admin_stopped_waiting_for(
    fleet: dict[str, Any], settings: Any
) -> None:
    # The gateway answers after the admin's request gave up: the audit event still ends
    # with the gateway's answer, written by the worker, not with the request's guess.
    sim, gateway = fleet["sim"], fleet["gateway"]
    settings.GATEWAY_CALL_TIMEOUT = 0.5
    sim.answer_delays["sessions.reset"] = 2.0
    key = _other_key(sim)
    session = await _session(gateway, key)
    response = await admin_request(
        fleet["client"],
        "post",
        CHANGELIST,
        {"action": "reset_sessions", "_selected_action": [session.pk], "post": "yes"},
    )
    assert "did not answer within" in response.content.decode()
    event = await _last_event("session.reset")
    assert event.result == AuditEvent.Result.ERROR  # the request's note meanwhile

    async def answered() -> bool:
        await event.arefresh_from_db()
        return event.result == AuditEvent.Result.OK

    await wait_for(answered)
    assert _calls(sim, "sessions.reset") == [{"key": key}]
    assert event.detail == f"key={key}"  # from the gateway's answer


@pytest.mark.django_db(transaction=True)
async def test_it_resets_a_selection_of_sessions(fleet: dict[str, Any]) -> None:
    sim, gateway = fleet["sim"], fleet["gateway"]
    keys = [k for k in sim.session_keys() if k != sim.main_session_key][:3]
    pks = [(await _session(gateway, k)).pk for k in keys]
    response = await admin_request(
        fleet["client"],
        "post",
        CHANGELIST,
        {"action": "reset_sessions", "_selected_action": pks, "post": "yes"},
    )
    page = response.content.decode()
    for key in keys:
        assert f"Reset {key} on {gateway.name}." in page
    assert sorted(p["key"] for p in _calls(sim, "sessions.reset")) == sorted(keys)
    assert await AuditEvent.objects.filter(action="session.reset").acount() == 3


@pytest.mark.django_db(transaction=True)
async def test_it_deletes_on_the_gateway_and_keeps_our_copy(
    fleet: dict[str, Any],
) -> None:
    sim, gateway = fleet["sim"], fleet["gateway"]
    key = _other_key(sim)
    session = await _session(gateway, key)
    await Message.objects.acreate(session=session, role="user", text="keep me")
    response = await admin_request(
        fleet["client"],
        "post",
        CHANGELIST,
        {"action": "delete_sessions", "_selected_action": [session.pk], "post": "yes"},
    )
    assert response.status_code == 200
    assert "Deleted " + key in response.content.decode()
    assert _calls(sim, "sessions.delete") == [{"key": key}]
    assert key not in sim.session_keys()
    session = await Session.objects.aget(pk=session.pk)
    assert session.deleted_at is not None
    assert session.gone_at is not None
    assert await Message.objects.filter(session=session, text="keep me").aexists()
    event = await _last_event("session.delete")
    assert event.result == AuditEvent.Result.OK
    assert "deleted=True" in event.detail


@pytest.mark.django_db(transaction=True)
async def test_it_shows_the_gateway_refusing_to_delete_the_main_session(
    fleet: dict[str, Any],
) -> None:
    sim, gateway = fleet["sim"], fleet["gateway"]
    session = await _session(gateway, sim.main_session_key)
    confirm = await admin_request(
        fleet["client"],
        "post",
        CHANGELIST,
        {"action": "delete_sessions", "_selected_action": [session.pk]},
    )
    assert "the gateway refuses to delete it" in confirm.content.decode()
    response = await admin_request(
        fleet["client"],
        "post",
        CHANGELIST,
        {"action": "delete_sessions", "_selected_action": [session.pk], "post": "yes"},
    )
    assert response.status_code == 200
    assert "Cannot delete the main session" in response.content.decode()
    assert _calls(sim, "sessions.delete") == [{"key": sim.main_session_key}]
    session = await Session.objects.aget(pk=session.pk)
    assert session.deleted_at is None and session.gone_at is None
    event = await _last_event("session.delete")
    assert event.result == AuditEvent.Result.ERROR
    assert "Cannot delete the main session" in event.detail


@pytest.mark.django_db(transaction=True)
async def test_it_renames_through_the_gateway_and_the_event_path(
    fleet: dict[str, Any],
) -> None:
    sim, gateway = fleet["sim"], fleet["gateway"]
    key = _other_key(sim)
    session = await _session(gateway, key)
    confirm = await admin_request(
        fleet["client"],
        "post",
        CHANGELIST,
        {"action": "rename_sessions", "_selected_action": [session.pk]},
    )
    assert f'name="label_{session.pk}"' in confirm.content.decode()
    response = await admin_request(
        fleet["client"],
        "post",
        CHANGELIST,
        {
            "action": "rename_sessions",
            "_selected_action": [session.pk],
            "post": "yes",
            f"label_{session.pk}": "Quarterly <b>report</b>",
        },
    )
    page = response.content.decode()
    assert "the row updates when the gateway confirms" in page
    assert "<b>report</b>" not in page  # escaped
    assert _calls(sim, "sessions.patch") == [
        {"key": key, "label": "Quarterly <b>report</b>"}
    ]

    async def confirmed() -> bool:
        s = await Session.objects.aget(pk=session.pk)
        return s.label == "Quarterly <b>report</b>"

    await wait_for(confirmed, 10)
    event = await _last_event("session.rename")
    assert event.result == AuditEvent.Result.OK
    assert event.params["label"] == "Quarterly <b>report</b>"


@pytest.mark.django_db(transaction=True)
async def test_it_sends_a_label_edited_in_the_change_form(
    fleet: dict[str, Any],
) -> None:
    sim, gateway = fleet["sim"], fleet["gateway"]
    key = _other_key(sim)
    session = await _session(gateway, key)
    url = reverse("admin:fleet_session_change", args=[session.pk])
    page = await admin_request(fleet["client"], "get", url)
    assert page.status_code == 200
    response = await admin_request(
        fleet["client"], "post", url, {"label": "From the form", "_continue": "1"}
    )
    assert response.status_code == 200
    text = response.content.decode()
    assert "Rename of" in text and "the row updates when the gateway confirms" in text
    assert "was changed successfully" not in text
    assert _calls(sim, "sessions.patch") == [{"key": key, "label": "From the form"}]

    async def confirmed() -> bool:
        s = await Session.objects.aget(pk=session.pk)
        return s.label == "From the form"

    await wait_for(confirmed, 10)


@pytest.mark.django_db(transaction=True)
async def test_it_changes_the_model_to_one_the_gateway_lists(
    fleet: dict[str, Any],
) -> None:
    sim, gateway = fleet["sim"], fleet["gateway"]
    key = _other_key(sim)
    session = await _session(gateway, key)
    confirm = await admin_request(
        fleet["client"],
        "post",
        CHANGELIST,
        {"action": "change_model", "_selected_action": [session.pk]},
    )
    page = confirm.content.decode()
    assert _calls(sim, "models.list") == [{}]
    assert 'value="anthropic/claude-sonnet-4-5"' in page
    assert _calls(sim, "sessions.patch") == []
    response = await admin_request(
        fleet["client"],
        "post",
        CHANGELIST,
        {
            "action": "change_model",
            "_selected_action": [session.pk],
            "post": "yes",
            f"model_{gateway.pk}": "anthropic/claude-sonnet-4-5",
        },
    )
    assert "set to anthropic/claude-sonnet-4-5" in response.content.decode()
    assert _calls(sim, "sessions.patch") == [
        {"key": key, "model": "anthropic/claude-sonnet-4-5"}
    ]

    async def confirmed() -> bool:
        s = await Session.objects.aget(pk=session.pk)
        return s.model == "claude-sonnet-4-5" and s.model_provider == "anthropic"

    await wait_for(confirmed, 10)
    event = await _last_event("session.model")
    assert event.result == AuditEvent.Result.OK


@pytest.mark.django_db(transaction=True)
async def test_it_refuses_a_model_the_gateway_does_not_list(
    fleet: dict[str, Any],
) -> None:
    sim, gateway = fleet["sim"], fleet["gateway"]
    session = await _session(gateway, _other_key(sim))
    response = await admin_request(
        fleet["client"],
        "post",
        CHANGELIST,
        {
            "action": "change_model",
            "_selected_action": [session.pk],
            "post": "yes",
            f"model_{gateway.pk}": "evil/model",
        },
    )
    page = response.content.decode()
    assert "does not offer the model evil/model" in page
    assert "No model chosen" not in page
    assert _calls(sim, "sessions.patch") == []


@pytest.mark.django_db(transaction=True)
async def test_it_aborts_a_running_run(fleet: dict[str, Any]) -> None:
    sim, gateway = fleet["sim"], fleet["gateway"]
    key = _other_key(sim)
    session = await _session(gateway, key)
    sim.start_external_run(key, "[[fake:slow]] take your time")
    response = await admin_request(
        fleet["client"],
        "post",
        CHANGELIST,
        {"action": "abort_runs", "_selected_action": [session.pk], "post": "yes"},
    )
    assert f"Aborted the running run of {key}" in response.content.decode()
    assert _calls(sim, "chat.abort") == [{"sessionKey": key}]
    event = await _last_event("session.abort")
    assert event.result == AuditEvent.Result.OK
    assert event.params == {"method": "chat.abort", "sessionKey": key}


@pytest.mark.django_db(transaction=True)
async def test_it_says_so_when_nothing_was_running(fleet: dict[str, Any]) -> None:
    sim, gateway = fleet["sim"], fleet["gateway"]
    session = await _session(gateway, _other_key(sim))
    response = await admin_request(
        fleet["client"],
        "post",
        CHANGELIST,
        {"action": "abort_runs", "_selected_action": [session.pk], "post": "yes"},
    )
    assert "Nothing was running" in response.content.decode()


# -- without a worker: messages, never a 500 ------------------------------------------------------


@pytest.fixture
def lone_session(db: Any) -> Session:
    gateway = Gateway.objects.create(
        name="lonely", url="ws://127.0.0.1:9", state=Gateway.State.CONNECTED
    )
    return Session.objects.create(
        gateway=gateway, key="agent:main:work", label="Work", agent_key="main"
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "action", ["reset_sessions", "delete_sessions", "abort_runs", "rename_sessions"]
)
def test_it_shows_an_unavailable_gateway_as_a_message(
    personas: dict[str, User], lone_session: Session, action: str
) -> None:
    client = Client()
    client.force_login(personas["alice"])
    response = client.post(
        CHANGELIST,
        {
            "action": action,
            "_selected_action": [lone_session.pk],
            "post": "yes",
            f"label_{lone_session.pk}": "New",
        },
        follow=True,
    )
    assert response.status_code == 200
    assert "The gateway worker is not running" in response.content.decode()
    event = AuditEvent.objects.get(action__startswith="session.")
    assert event.result == AuditEvent.Result.ERROR
    assert event.detail.startswith("unavailable:")
    lone_session.refresh_from_db()
    assert lone_session.deleted_at is None


@pytest.mark.django_db(transaction=True)
def test_it_does_not_save_the_label_itself(
    personas: dict[str, User], lone_session: Session
) -> None:
    client = Client()
    client.force_login(personas["alice"])
    url = reverse("admin:fleet_session_change", args=[lone_session.pk])
    response = client.post(url, {"label": "Changed here"}, follow=True)
    assert response.status_code == 200
    assert "The gateway worker is not running" in response.content.decode()
    lone_session.refresh_from_db()
    assert lone_session.label == "Work"


@pytest.mark.django_db(transaction=True)
def test_it_has_no_local_delete_or_add(
    personas: dict[str, User], lone_session: Session
) -> None:
    client = Client()
    client.force_login(personas["alice"])
    page = client.get(CHANGELIST).content.decode()
    assert 'value="delete_selected"' not in page
    assert client.get(reverse("admin:fleet_session_add")).status_code == 403
    delete_url = reverse("admin:fleet_session_delete", args=[lone_session.pk])
    assert client.post(delete_url, {"post": "yes"}).status_code == 403
    assert Session.objects.filter(pk=lone_session.pk).exists()


# -- a big table -----------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_it_lists_ten_thousand_sessions_quickly(
    personas: dict[str, User], django_assert_max_num_queries: Any
) -> None:
    gateways = [
        Gateway.objects.create(name=f"gw{i}", url=f"ws://127.0.0.1:{9000 + i}")
        for i in range(3)
    ]
    now = timezone.now()
    Session.objects.bulk_create(
        [
            Session(
                gateway=gateways[i % 3],
                key=f"agent:main:s{i}",
                agent_key="main",
                label=f"Session {i}" if i % 2 else "",
                status=("done", "running", "failed")[i % 3],
                kind="direct",
                channel=("webchat", "slack")[i % 2],
                model="fake-model",
                total_tokens=i,
                updated_at=now - timedelta(seconds=i),
                gone_at=now if i % 10 == 0 else None,
            )
            for i in range(10_000)
        ],
        batch_size=2000,
    )
    client = Client()
    client.force_login(personas["alice"])
    queries: list[dict[str, Any]] = [
        {},
        {"gone": "live"},
        {"status": "running", "gateway__id__exact": gateways[1].pk},
        {"q": "Session 99"},
    ]
    for query in queries:
        with django_assert_max_num_queries(14):
            started = time.perf_counter()
            response = client.get(CHANGELIST, query)
            elapsed = time.perf_counter() - started
        assert response.status_code == 200
        assert elapsed < 3.0, f"{query}: {elapsed:.2f} s"
    page = client.get(CHANGELIST, {"gone": "gone"}).content.decode()
    assert "agent:main:s0" in page and "gone" in page
    assert "agent:main:s1<" not in page
