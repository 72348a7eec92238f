"""Only admins (the role, or a superuser) get into the admin; staff status alone does not."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from fleet.models import AuditEvent, Gateway, Session

pytestmark = pytest.mark.django_db


@pytest.fixture
def session_row(db: Any) -> Session:
    gateway = Gateway.objects.create(name="gw", url="ws://127.0.0.1:9")
    return Session.objects.create(gateway=gateway, key="agent:main:work", label="Work")


ADMIN_PAGES = [
    "admin:index",
    "admin:fleet_session_changelist",
    "admin:fleet_gateway_changelist",
    "admin:fleet_gateway_add",
    "admin:fleet_auditevent_changelist",
    "admin:fleet_auditevent_export",
    "admin:auth_user_changelist",
    "admin:chat_message_changelist",
]


def _client(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.parametrize("name", ["bob", "carol", "dave"])
@pytest.mark.parametrize("page", ADMIN_PAGES)
def test_it_keeps_non_admins_out_of_every_admin_page(
    personas: dict[str, User], name: str, page: str
) -> None:
    response = _client(personas[name]).get(reverse(page))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


@pytest.mark.parametrize("name", ["bob", "carol"])
def test_it_keeps_out_non_admins_who_are_staff(
    personas: dict[str, User], name: str
) -> None:
    user = personas[name]
    user.is_staff = True
    user.save()
    response = _client(user).get(reverse("admin:fleet_session_changelist"))
    assert response.status_code == 302


@pytest.mark.parametrize("page", ADMIN_PAGES)
def test_it_lets_in_an_admin_without_staff_status(
    personas: dict[str, User], page: str
) -> None:
    alice = personas["alice"]
    assert not alice.is_staff
    response = _client(alice).get(reverse(page))
    assert response.status_code == 200


def test_it_lets_in_a_superuser(db: Any) -> None:
    root = User.objects.create_superuser("root", password="password")
    response = _client(root).get(reverse("admin:fleet_session_changelist"))
    assert response.status_code == 200


@pytest.mark.parametrize("name", ["bob", "carol", "dave"])
@pytest.mark.parametrize(
    "action", ["reset_sessions", "delete_sessions", "abort_runs", "rename_sessions"]
)
def test_it_refuses_a_posted_action_form_from_non_admins(
    personas: dict[str, User], session_row: Session, name: str, action: str
) -> None:
    response = _client(personas[name]).post(
        reverse("admin:fleet_session_changelist"),
        {
            "action": action,
            "_selected_action": [session_row.pk],
            "post": "yes",
            f"label_{session_row.pk}": "hacked",
        },
    )
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))
    assert not AuditEvent.objects.filter(action__startswith="session.").exists()


@pytest.mark.parametrize("name", ["bob", "carol"])
def test_it_refuses_a_posted_change_form_from_non_admins(
    personas: dict[str, User], session_row: Session, name: str
) -> None:
    response = _client(personas[name]).post(
        reverse("admin:fleet_session_change", args=[session_row.pk]),
        {"label": "hacked"},
    )
    assert response.status_code == 302
    assert not AuditEvent.objects.filter(action__startswith="session.").exists()


@pytest.mark.parametrize("name", ["bob", "carol"])
def test_it_refuses_gateway_changes_from_non_admins(
    personas: dict[str, User], name: str
) -> None:
    response = _client(personas[name]).post(
        reverse("admin:fleet_gateway_add"),
        {"name": "evil", "url": "ws://127.0.0.1:1", "token_env": "X_TOKEN"},
    )
    assert response.status_code == 302
    assert not Gateway.objects.filter(name="evil").exists()


def test_it_refuses_the_admin_login_form_to_a_viewer(personas: dict[str, User]) -> None:
    client = Client()
    response = client.post(
        reverse("admin:login"),
        {"username": "carol", "password": "password", "next": "/admin/"},
    )
    assert response.status_code == 200
    assert "does not have the admin role" in response.content.decode()
    assert "_auth_user_id" not in client.session


def test_it_accepts_the_admin_login_form_for_an_admin(
    personas: dict[str, User],
) -> None:
    client = Client()
    response = client.post(
        reverse("admin:login"),
        {"username": "alice", "password": "password", "next": "/admin/"},
    )
    assert response.status_code == 302
    assert client.get("/admin/").status_code == 200
