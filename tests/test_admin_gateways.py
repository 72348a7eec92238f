"""Gateways in the admin: add, edit and disable them (the worker follows without a restart),
a connection test, token variable names that are never tokens, and an audit event each."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.test import AsyncClient, Client
from django.urls import reverse

from fleet.admin import validate_token_env
from fleet.models import AuditEvent, Gateway, Session
from tests.conftest import TEST_TOKEN_ENV
from tests.helpers import admin_request, wait_for


def _form_data(page: str) -> dict[str, str]:
    """The hidden inputs of an admin change form (the inline's management form)."""
    return dict(
        re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page)
    )


@pytest.mark.django_db(transaction=True)
async def test_it_adds_a_gateway_the_worker_connects_and_disables_it(
    sim: Any,
    running_worker: Callable[[], Awaitable[Any]],
    personas: dict[str, User],
) -> None:
    await running_worker()
    client = AsyncClient()
    await client.aforce_login(personas["alice"])
    response = await admin_request(
        client,
        "post",
        reverse("admin:fleet_gateway_add"),
        {
            "name": "added-here",
            "url": sim.url,
            "rest_url": "",
            "token_env": TEST_TOKEN_ENV,
            "enabled": "on",
        },
    )
    assert response.status_code == 200
    gateway = await Gateway.objects.aget(name="added-here")

    async def connected() -> bool:
        g = await Gateway.objects.aget(pk=gateway.pk)
        synced = await Session.objects.filter(gateway=gateway).acount()
        return g.state == Gateway.State.CONNECTED and synced == len(sim.session_keys())

    await wait_for(connected, 15)
    assert sim.clients == 1
    added = await AuditEvent.objects.aget(action="gateway.add")
    assert added.username == "alice" and added.gateway_id == gateway.pk
    assert added.params["token_env"] == TEST_TOKEN_ENV
    assert sim.token not in str(added.params)

    # The connection test asks the worker for health.
    test_url = reverse("admin:fleet_gateway_test_connection", args=[gateway.pk])
    page = (await admin_request(client, "get", test_url)).content.decode()
    assert "answered health: ok" in page
    assert ("health", {}) in sim.calls

    # Disabled with the list action: the worker lets go of it.
    response = await admin_request(
        client,
        "post",
        reverse("admin:fleet_gateway_changelist"),
        {"action": "disable_gateways", "_selected_action": [gateway.pk]},
    )
    assert "disabled: the worker lets go" in response.content.decode()

    async def released() -> bool:
        g = await Gateway.objects.aget(pk=gateway.pk)
        return g.lease_owner == "" and g.state == Gateway.State.OFFLINE

    await wait_for(released, 15)
    await wait_for(lambda: _async_value(sim.clients == 0), 10)
    changed = await AuditEvent.objects.aget(action="gateway.change")
    assert changed.params == {"enabled": False}

    # And the connection test now says why it cannot.
    page = (await admin_request(client, "get", test_url)).content.decode()
    assert "is disabled" in page and "State: Offline" in page


async def _async_value(value: bool) -> bool:
    return value


@pytest.mark.django_db(transaction=True)
async def test_it_follows_a_url_edited_in_the_change_form(
    sim: Any,
    make_gateway: Callable[..., Gateway],
    running_worker: Callable[[], Awaitable[Any]],
    personas: dict[str, User],
) -> None:
    gateway = await database_sync_to_async(make_gateway)("ws://127.0.0.1:9")
    await running_worker()

    async def state_is(state: str) -> bool:
        return (await Gateway.objects.aget(pk=gateway.pk)).state == state

    client = AsyncClient()
    await client.aforce_login(personas["alice"])
    url = reverse("admin:fleet_gateway_change", args=[gateway.pk])
    page = (await admin_request(client, "get", url)).content.decode()
    assert "Test connection" in page
    data = {
        **_form_data(page),
        "name": gateway.name,
        "url": sim.url,
        "rest_url": "",
        "token_env": TEST_TOKEN_ENV,
        "enabled": "on",
    }
    response = await admin_request(client, "post", url, data)
    assert response.status_code == 200
    assert "errornote" not in response.content.decode()
    await wait_for(lambda: state_is(Gateway.State.CONNECTED), 15)
    event = await AuditEvent.objects.aget(action="gateway.change")
    assert event.params == {"url": sim.url}


# -- without a worker -------------------------------------------------------------------------------


@pytest.fixture
def admin_client(personas: dict[str, User]) -> Client:
    client = Client()
    client.force_login(personas["alice"])
    return client


@pytest.mark.parametrize(
    "name", ["OPENCLAW_GATEWAY_TOKEN", "GW2_TOKEN", "PROD_EU_WEST_1_TOKEN", "_X"]
)
def test_it_accepts_environment_variable_names(name: str) -> None:
    assert validate_token_env(f" {name} ") == name


@pytest.mark.parametrize(
    "value",
    [
        "sk-live-4f9a8b7c6d5e4f3a2b1c",
        "a9F3kLmQ2zXw8RtY5uVb1NcD",
        "3f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c",
        "TOKEN_4F9A8B7C6D5E4F3A2B1C",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123",
        "Bearer abc",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOjF9.abc",
        "",
        "my_token",
        "1ST_TOKEN",
    ],
)
def test_it_refuses_token_values_and_bad_names(value: str) -> None:
    with pytest.raises(ValidationError):
        validate_token_env(value)


@pytest.mark.django_db
def test_it_does_not_save_a_gateway_with_a_token_pasted_as_its_variable(
    admin_client: Client,
) -> None:
    response = admin_client.post(
        reverse("admin:fleet_gateway_add"),
        {
            "name": "leaky",
            "url": "ws://127.0.0.1:18789",
            "token_env": "sk-live-4f9a8b7c6d5e4f3a2b1c",
            "enabled": "on",
        },
    )
    assert response.status_code == 200
    assert "looks like a token itself" in response.content.decode()
    assert not Gateway.objects.filter(name="leaky").exists()
    assert not AuditEvent.objects.filter(action="gateway.add").exists()


@pytest.mark.django_db
def test_it_refuses_a_url_that_is_not_a_gateway_address(admin_client: Client) -> None:
    response = admin_client.post(
        reverse("admin:fleet_gateway_add"),
        {"name": "x", "url": "ftp://host", "token_env": "X_TOKEN", "enabled": "on"},
    )
    assert (
        "Use a ws://, wss://, http:// or https:// address." in response.content.decode()
    )
    assert not Gateway.objects.exists()


@pytest.mark.django_db
def test_it_shows_the_connection_fields_read_only(admin_client: Client) -> None:
    gateway = Gateway.objects.create(
        name="gw",
        url="ws://127.0.0.1:9",
        state=Gateway.State.AUTH_FAILED,
        last_error="The gateway refused the token in <X_TOKEN>",
        server_version="2026.9.6",
        protocol=4,
    )
    page = admin_client.get(
        reverse("admin:fleet_gateway_change", args=[gateway.pk])
    ).content.decode()
    assert "Authentication failed" in page
    assert "&lt;X_TOKEN&gt;" in page
    assert "2026.9.6" in page
    assert 'name="state"' not in page
    assert 'name="last_error"' not in page
    assert 'name="token_env"' in page


@pytest.mark.django_db(transaction=True)
def test_it_explains_a_connection_test_without_a_worker(admin_client: Client) -> None:
    gateway = Gateway.objects.create(
        name="gw",
        url="ws://127.0.0.1:9",
        state=Gateway.State.OFFLINE,
        last_error="connection refused",
    )
    response = admin_client.get(
        reverse("admin:fleet_gateway_test_connection", args=[gateway.pk])
    )
    assert response.status_code == 200
    page = response.content.decode()
    assert "The gateway worker is not running" in page
    assert "State: Offline" in page and "connection refused" in page


@pytest.mark.django_db
def test_it_audits_deleting_a_gateway_with_a_summary(admin_client: Client) -> None:
    gateway = Gateway.objects.create(name="old", url="ws://127.0.0.1:9")
    Session.objects.bulk_create(
        [Session(gateway=gateway, key=f"agent:main:{i}") for i in range(50)]
    )
    url = reverse("admin:fleet_gateway_delete", args=[gateway.pk])
    confirm = admin_client.get(url).content.decode()
    assert "with all its agents, sessions and transcripts" in confirm
    assert "agent:main:17" not in confirm  # a summary, not 50 rows
    admin_client.post(url, {"post": "yes"})
    assert not Gateway.objects.filter(pk=gateway.pk).exists()
    event = AuditEvent.objects.get(action="gateway.delete")
    assert event.params["name"] == "old"
    assert "50 sessions" in event.detail
