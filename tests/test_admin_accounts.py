"""Accounts in the admin: an admin who is not a superuser cannot touch a superuser's
account (change, password, delete, bulk delete) nor make anyone one, and hands out only the
role groups; and every account change is an audit event, whichever path made it, with no
password hash in its parameters."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.test import Client
from django.urls import reverse

from fleet import roles
from fleet.models import AuditEvent

pytestmark = pytest.mark.django_db

NEW_PASSWORD = "a-long-new-passphrase-7"


@pytest.fixture
def root(db: Any) -> User:
    return User.objects.create_superuser("root", password="password")


@pytest.fixture(autouse=True)
def _fresh_log(personas: dict[str, User], root: User) -> None:
    """The accounts above are made before each test; its events are what it did."""
    AuditEvent.objects.all().delete()


@pytest.fixture
def alice_client(personas: dict[str, User]) -> Client:
    """alice: the admin role, not a superuser."""
    client = Client()
    client.force_login(personas["alice"])
    return client


def _change_data(user: User, **overrides: Any) -> dict[str, Any]:
    """What the admin's change form posts for the account as it is, with overrides."""
    data: dict[str, Any] = {
        "username": user.username,
        "first_name": user.first_name,
        "last_name": user.last_name,
        "email": user.email,
        "groups": [g.pk for g in user.groups.all()],
        "date_joined_0": user.date_joined.strftime("%Y-%m-%d"),
        "date_joined_1": user.date_joined.strftime("%H:%M:%S"),
    }
    if user.is_active:
        data["is_active"] = "on"
    if user.is_superuser:
        data["is_superuser"] = "on"
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def _events(action: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action).order_by("created_at"))


def _assert_no_hash(*users: User) -> None:
    stored = json.dumps(list(AuditEvent.objects.values_list("params", flat=True)))
    for user in users:
        user.refresh_from_db()
        assert user.password not in stored
    assert "md5$" not in stored and "pbkdf2" not in stored


# -- superusers are out of an admin's reach -------------------------------------------------


def test_it_refuses_an_admin_the_change_form_of_a_superuser(
    alice_client: Client, root: User
) -> None:
    url = reverse("admin:auth_user_change", args=[root.pk])
    page = alice_client.get(url)
    assert page.status_code == 200  # may look
    assert b'name="_save"' not in page.content
    response = alice_client.post(url, _change_data(root, email="x@example.com"))
    assert response.status_code == 403
    root.refresh_from_db()
    assert root.email == "" and root.is_superuser and root.is_active


def test_it_refuses_an_admin_the_password_of_a_superuser(
    alice_client: Client, root: User
) -> None:
    url = reverse("admin:auth_user_password_change", args=[root.pk])
    assert alice_client.get(url).status_code == 403
    response = alice_client.post(
        url, {"password1": NEW_PASSWORD, "password2": NEW_PASSWORD}
    )
    assert response.status_code == 403
    root.refresh_from_db()
    assert root.check_password("password")
    assert not _events("password.reset")


def test_it_refuses_an_admin_the_deletion_of_a_superuser(
    alice_client: Client, root: User
) -> None:
    url = reverse("admin:auth_user_delete", args=[root.pk])
    assert alice_client.get(url).status_code == 403
    assert alice_client.post(url, {"post": "yes"}).status_code == 403
    assert User.objects.filter(pk=root.pk).exists()


def test_it_refuses_an_admin_a_bulk_delete_that_includes_a_superuser(
    alice_client: Client, root: User, personas: dict[str, User]
) -> None:
    url = reverse("admin:auth_user_changelist")
    selection = [root.pk, personas["dave"].pk]
    confirm = alice_client.post(
        url, {"action": "delete_selected", "_selected_action": selection}
    )
    assert b"would require deleting the following protected" not in confirm.content
    assert b"your account doesn" in confirm.content.lower()  # "doesn't have permission"
    response = alice_client.post(
        url,
        {"action": "delete_selected", "_selected_action": selection, "post": "yes"},
    )
    assert response.status_code == 403
    assert User.objects.filter(pk__in=selection).count() == 2


def test_it_lets_a_superuser_manage_a_superuser(root: User) -> None:
    other = User.objects.create_superuser("other-root", password="password")
    client = Client()
    client.force_login(root)
    url = reverse("admin:auth_user_password_change", args=[other.pk])
    response = client.post(url, {"password1": NEW_PASSWORD, "password2": NEW_PASSWORD})
    assert response.status_code == 302
    other.refresh_from_db()
    assert other.check_password(NEW_PASSWORD)
    client.post(reverse("admin:auth_user_delete", args=[other.pk]), {"post": "yes"})
    assert not User.objects.filter(pk=other.pk).exists()


def test_it_does_not_let_an_admin_make_a_superuser(
    alice_client: Client, personas: dict[str, User]
) -> None:
    for user in (personas["dave"], personas["alice"]):
        url = reverse("admin:auth_user_change", args=[user.pk])
        response = alice_client.post(url, _change_data(user, is_superuser="on"))
        assert response.status_code == 302
        user.refresh_from_db()
        assert not user.is_superuser
    assert not _events("role.granted")


def test_it_lets_an_admin_hand_out_the_roles_only(
    alice_client: Client, personas: dict[str, User]
) -> None:
    dave = personas["dave"]
    powerful = Group.objects.create(name="powerful")
    powerful.permissions.add(Permission.objects.get(codename="delete_user"))
    url = reverse("admin:auth_user_change", args=[dave.pk])
    form = alice_client.get(url).content.decode()
    assert f'value="{powerful.pk}"' not in form
    response = alice_client.post(url, _change_data(dave, groups=[powerful.pk]))
    assert response.status_code == 200  # the form again, with the error
    assert not dave.groups.exists()

    operator = Group.objects.get(name=roles.OPERATOR)
    response = alice_client.post(url, _change_data(dave, groups=[operator.pk]))
    assert response.status_code == 302
    assert roles.role_of(User.objects.get(pk=dave.pk)) == roles.OPERATOR


# -- every account change is audited ---------------------------------------------------------


def test_it_audits_an_account_made_in_the_admin(
    alice_client: Client, personas: dict[str, User]
) -> None:
    response = alice_client.post(
        reverse("admin:auth_user_add"),
        {
            "username": "erin",
            "usable_password": "true",
            "password1": NEW_PASSWORD,
            "password2": NEW_PASSWORD,
        },
    )
    assert response.status_code == 302
    erin = User.objects.get(username="erin")
    (event,) = _events("user.created")
    assert event.user == personas["alice"] and event.username == "alice"
    assert event.params["account"] == "erin" and event.params["account_id"] == erin.pk
    assert event.result == AuditEvent.Result.OK
    assert not _events("password.reset") and not _events("password.changed")
    _assert_no_hash(erin)


def test_it_audits_changes_and_roles_granted_and_removed(
    alice_client: Client, personas: dict[str, User]
) -> None:
    dave = personas["dave"]
    operator = Group.objects.get(name=roles.OPERATOR)
    url = reverse("admin:auth_user_change", args=[dave.pk])
    alice_client.post(url, _change_data(dave, email="dave@example.com"))
    dave.refresh_from_db()
    alice_client.post(url, _change_data(dave, groups=[operator.pk]))
    dave.refresh_from_db()
    alice_client.post(url, _change_data(dave, groups=[], is_active=None))

    (changed, deactivated) = _events("user.changed")
    assert changed.params["changes"] == {
        "email": {"from": "", "to": "dave@example.com"}
    }
    assert deactivated.params["changes"] == {"is_active": {"from": True, "to": False}}
    (granted,) = _events("role.granted")
    assert granted.params["roles"] == [roles.OPERATOR]
    assert granted.params["account"] == "dave" and granted.username == "alice"
    (removed,) = _events("role.removed")
    assert removed.params["roles"] == [roles.OPERATOR]


def test_it_audits_roles_changed_from_the_group_side_and_superuser_status(
    personas: dict[str, User],
) -> None:
    carol = personas["carol"]
    Group.objects.get(name=roles.ADMIN).user_set.add(carol)
    Group.objects.get(name=roles.VIEWER).user_set.clear()
    carol.is_superuser = True
    carol.save()

    granted = _events("role.granted")
    assert [e.params["roles"] for e in granted] == [[roles.ADMIN], ["superuser"]]
    (removed,) = _events("role.removed")
    assert removed.params == {
        "account": "carol",
        "account_id": carol.pk,
        "roles": [roles.VIEWER],
    }
    assert all(e.user is None for e in granted)  # no request: nobody to name


def test_it_audits_a_password_reset_by_an_admin_without_the_hash(
    alice_client: Client, personas: dict[str, User]
) -> None:
    bob = personas["bob"]
    url = reverse("admin:auth_user_password_change", args=[bob.pk])
    response = alice_client.post(
        url, {"password1": NEW_PASSWORD, "password2": NEW_PASSWORD}
    )
    assert response.status_code == 302
    (event,) = _events("password.reset")
    assert event.username == "alice" and event.params["account"] == "bob"
    assert not _events("user.changed")
    _assert_no_hash(bob)
    assert NEW_PASSWORD not in json.dumps(event.params)


def test_it_audits_a_password_changed_by_its_owner(personas: dict[str, User]) -> None:
    client = Client()
    client.force_login(personas["carol"])
    response = client.post(
        reverse("password_change"),
        {
            "old_password": "password",
            "new_password1": NEW_PASSWORD,
            "new_password2": NEW_PASSWORD,
        },
    )
    assert response.status_code == 302
    (event,) = _events("password.changed")
    assert event.username == "carol" and event.params["account"] == "carol"
    _assert_no_hash(personas["carol"])


def test_it_does_not_audit_a_login_as_an_account_change(
    personas: dict[str, User],
) -> None:
    client = Client()
    assert client.login(username="bob", password="password")
    assert not AuditEvent.objects.exclude(action__startswith="login").exists()


def test_it_audits_deletions_one_by_one_and_in_bulk(
    alice_client: Client, personas: dict[str, User]
) -> None:
    dave, carol = personas["dave"], personas["carol"]
    alice_client.post(
        reverse("admin:auth_user_delete", args=[dave.pk]), {"post": "yes"}
    )
    alice_client.post(
        reverse("admin:auth_user_changelist"),
        {"action": "delete_selected", "_selected_action": [carol.pk], "post": "yes"},
    )
    assert not User.objects.filter(pk__in=[dave.pk, carol.pk]).exists()
    events = _events("user.deleted")
    assert [e.params["account"] for e in events] == ["dave", "carol"]
    assert all(e.username == "alice" for e in events)
