"""The audit log: logins from every path, read-only in the admin, filterable, CSV export."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from fleet.models import AuditEvent, Gateway

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(personas: dict[str, User]) -> Client:
    client = Client()
    client.force_login(personas["alice"])
    return client


def _csv(response: Any) -> list[list[str]]:
    body = b"".join(response.streaming_content).decode()
    return list(csv.reader(io.StringIO(body)))


def test_it_records_an_admin_login_with_the_address(personas: dict[str, User]) -> None:
    client = Client(REMOTE_ADDR="203.0.113.7")
    response = client.post(
        reverse("admin:login"), {"username": "alice", "password": "password"}
    )
    assert response.status_code == 302
    event = AuditEvent.objects.get(action="login.ok")
    assert event.user == personas["alice"]
    assert event.username == "alice"
    assert event.ip == "203.0.113.7"
    assert event.result == AuditEvent.Result.OK


def test_it_records_a_failed_login_without_the_password(
    personas: dict[str, User],
) -> None:
    client = Client(REMOTE_ADDR="198.51.100.9")
    client.post(
        reverse("admin:login"),
        {"username": "alice", "password": "Sup3r-secret-guess"},
    )
    event = AuditEvent.objects.get(action="login.failed")
    assert event.user is None
    assert event.username == "alice"
    assert event.ip == "198.51.100.9"
    assert event.result == AuditEvent.Result.ERROR
    stored = f"{event.params} {event.detail} {event.username}"
    assert "Sup3r-secret-guess" not in stored


def test_it_records_a_failed_login_for_an_unknown_name(db: Any) -> None:
    Client().post(reverse("admin:login"), {"username": "mallory", "password": "x"})
    assert AuditEvent.objects.get(action="login.failed").username == "mallory"


def test_it_records_each_accounts_login_once(personas: dict[str, User]) -> None:
    client = Client()
    client.post(reverse("login"), {"username": "bob", "password": "wrong"})
    client.post(reverse("login"), {"username": "bob", "password": "password"})
    assert AuditEvent.objects.filter(action="login.failed").count() == 1
    assert AuditEvent.objects.filter(action="login.ok").count() == 1


def test_it_throttles_the_admin_login_too(
    personas: dict[str, User], settings: Any
) -> None:
    settings.LOGIN_FAILURES_PER_ACCOUNT = 3
    client = Client()
    for _ in range(3):
        client.post(reverse("admin:login"), {"username": "alice", "password": "no"})
    response = client.post(
        reverse("admin:login"),
        {"username": "alice", "password": "password"},
        follow=True,
    )
    assert "Too many failed attempts" in response.content.decode()
    assert "_auth_user_id" not in client.session
    assert not AuditEvent.objects.filter(action="login.ok").exists()


def test_it_records_a_logout(personas: dict[str, User]) -> None:
    client = Client()
    client.force_login(personas["carol"])
    client.post(reverse("logout"))
    event = AuditEvent.objects.get(action="logout")
    assert event.user == personas["carol"]


def test_it_lists_and_filters_events(
    admin_client: Client, personas: dict[str, User]
) -> None:
    gateway = Gateway.objects.create(name="gw-a", url="ws://127.0.0.1:9")
    AuditEvent.objects.create(
        action="chat.send", user=personas["bob"], username="bob", gateway=gateway
    )
    AuditEvent.objects.create(
        action="session.reset", user=personas["alice"], username="alice"
    )
    url = reverse("admin:fleet_auditevent_changelist")
    page = admin_client.get(url).content.decode()
    assert "chat.send" in page and "session.reset" in page
    assert "Download CSV" in page
    by_action = admin_client.get(url, {"action": "chat.send"}).content.decode()
    assert '<td class="field-action">chat.send</td>' in by_action
    assert '<td class="field-action">session.reset</td>' not in by_action
    by_person = admin_client.get(
        url, {"user__id__exact": personas["alice"].pk}
    ).content.decode()
    assert '<td class="field-action">session.reset</td>' in by_person
    assert '<td class="field-action">chat.send</td>' not in by_person
    by_gateway = admin_client.get(
        url, {"gateway__id__exact": gateway.pk}
    ).content.decode()
    assert '<td class="field-action">chat.send</td>' in by_gateway
    assert '<td class="field-action">session.reset</td>' not in by_gateway


def test_it_keeps_the_audit_log_read_only(admin_client: Client) -> None:
    event = AuditEvent.objects.create(action="chat.send", username="bob")
    assert admin_client.get(reverse("admin:fleet_auditevent_add")).status_code == 403
    change = reverse("admin:fleet_auditevent_change", args=[event.pk])
    page = admin_client.get(change)
    assert page.status_code == 200
    assert 'name="_save"' not in page.content.decode()
    assert admin_client.post(change, {"action": "x"}).status_code == 403
    delete = reverse("admin:fleet_auditevent_delete", args=[event.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    assert AuditEvent.objects.filter(pk=event.pk, action="chat.send").exists()


def test_it_exports_the_current_filter_as_csv(admin_client: Client) -> None:
    for i in range(30):
        AuditEvent.objects.create(action="chat.send", username=f"user{i}")
    AuditEvent.objects.create(
        action="session.delete",
        username="alice",
        session_key="agent:main:x",
        params={"key": "agent:main:x"},
        detail='=HYPERLINK("http://evil")',
    )
    response = admin_client.get(
        reverse("admin:fleet_auditevent_export"), {"action": "session.delete"}
    )
    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    rows = _csv(response)
    assert rows[0] == [
        "when",
        "who",
        "action",
        "gateway",
        "session",
        "params",
        "result",
        "detail",
        "ip",
    ]
    assert len(rows) == 2
    assert rows[1][1:5] == ["alice", "session.delete", "", "agent:main:x"]
    assert rows[1][7].startswith("'=")  # no formula runs in a spreadsheet
    everything = _csv(admin_client.get(reverse("admin:fleet_auditevent_export")))
    assert len(everything) >= 32


def test_it_exports_selected_events_as_csv(admin_client: Client) -> None:
    keep = AuditEvent.objects.create(action="chat.abort", username="bob")
    AuditEvent.objects.create(action="chat.send", username="bob")
    response = admin_client.post(
        reverse("admin:fleet_auditevent_changelist"),
        {"action": "export_csv", "_selected_action": [keep.pk]},
    )
    rows = _csv(response)
    assert [r[2] for r in rows[1:]] == ["chat.abort"]


def test_it_refuses_the_export_to_an_operator(personas: dict[str, User]) -> None:
    client = Client()
    client.force_login(personas["bob"])
    response = client.get(reverse("admin:fleet_auditevent_export"))
    assert response.status_code == 302
