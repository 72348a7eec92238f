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

from fleet.forms import validate_token_env
from fleet.models import AuditEvent, Gateway, Session
from tests.helpers import TEST_TOKEN_ENV, admin_request, wait_for


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


@pytest.mark.django_db
def test_it_counts_what_the_apps_register_as_deleted_with_a_gateway(
    admin_client: Client,
) -> None:
    """The summary's message count comes from chat's registration (chat/admin.py): the
    gateway admin does not name chat."""
    from chat.models import Message

    gateway = Gateway.objects.create(name="old", url="ws://127.0.0.1:9")
    other = Gateway.objects.create(name="other", url="ws://127.0.0.1:8")
    session = Session.objects.create(gateway=gateway, key="agent:main:a")
    kept = Session.objects.create(gateway=other, key="agent:main:b")
    for i in range(3):
        Message.objects.create(session=session, role="user", text=f"hello {i}")
    Message.objects.create(session=kept, role="user", text="stays")
    url = reverse("admin:fleet_gateway_delete", args=[gateway.pk])
    confirm = admin_client.get(url).content.decode()
    summary = re.sub(r"\s+", " ", confirm)
    assert "<li>Sessions: 1</li>" in summary
    assert "<li>Messages: 3</li>" in summary


# -- what a gateway's settings may name and point at --------------------------------------------


def _gateway_form(**fields: str) -> Any:
    from fleet.forms import GatewayForm

    data = {
        "name": "remote",
        "url": "wss://gw.example:18789",
        "rest_url": "",
        "token_env": "OPENCLAW_GATEWAY_TOKEN",
        "enabled": "on",
        **fields,
    }
    return GatewayForm(data=data)


def _errors(form: Any, field: str) -> str:
    assert not form.is_valid()
    return " ".join(str(e) for e in form.errors.get(field, []))


@pytest.mark.django_db
@pytest.mark.parametrize(
    "name", ["DJANGO_SECRET_KEY", "DATABASE_URL", "POSTGRES_PASSWORD", "REDIS_URL"]
)
@pytest.mark.parametrize("field", ["token_env", "tls_ca_env"])
def test_it_refuses_to_name_a_variable_that_is_not_a_gateway_secret(
    name: str, field: str
) -> None:
    words = _errors(_gateway_form(**{field: name}), field)
    suffix = "_GATEWAY_TOKEN" if field == "token_env" else "_CA_BUNDLE"
    assert f"{name} is not a variable this deployment lets" in words
    assert f"names ending in {suffix}" in words


@pytest.mark.django_db
def test_it_refuses_the_token_variable_as_the_ca_variable() -> None:
    words = _errors(_gateway_form(tls_ca_env="OPENCLAW_GATEWAY_TOKEN"), "tls_ca_env")
    assert "names ending in _CA_BUNDLE" in words


@pytest.mark.django_db
def test_it_accepts_gateway_token_and_ca_bundle_names() -> None:
    form = _gateway_form(
        token_env="CONTROLCENTER_DEMO_GATEWAY_TOKEN", tls_ca_env="EU_CA_BUNDLE"
    )
    assert form.is_valid(), form.errors


@pytest.mark.django_db
def test_it_accepts_only_the_listed_names_when_the_deployment_lists_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONTROLCENTER_ALLOWED_ENV", "GW_SECRET, GW_CA")
    assert _gateway_form(token_env="GW_SECRET", tls_ca_env="GW_CA").is_valid()
    words = _errors(_gateway_form(token_env="OPENCLAW_GATEWAY_TOKEN"), "token_env")
    assert "listed in CONTROLCENTER_ALLOWED_ENV" in words
    # The Control Center's own secrets stay refused even when listed.
    monkeypatch.setenv("CONTROLCENTER_ALLOWED_ENV", "DJANGO_SECRET_KEY")
    assert "DJANGO_SECRET_KEY" in _errors(
        _gateway_form(token_env="DJANGO_SECRET_KEY"), "token_env"
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url",
    ["ws://gw.example:18789", "http://10.0.0.5:18789", "ws://host.docker.internal:1"],
)
def test_it_refuses_a_plain_address_off_loopback(url: str) -> None:
    words = _errors(_gateway_form(url=url), "url")
    assert "the token would cross the network in clear" in words
    assert "CONTROLCENTER_INSECURE_HOSTS" in words


@pytest.mark.django_db
def test_it_refuses_a_plain_rest_address_off_loopback() -> None:
    words = _errors(_gateway_form(rest_url="http://gw.example:18789"), "rest_url")
    assert "in clear" in words


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url",
    [
        "ws://127.0.0.1:18789",
        "ws://127.8.9.10:18789",
        "ws://localhost:18789",
        "ws://[::1]:18789",
        "wss://gw.example:18789",
        "https://gw.example",
    ],
)
def test_it_accepts_loopback_and_encrypted_addresses(url: str) -> None:
    assert _gateway_form(url=url).is_valid(), _gateway_form(url=url).errors


@pytest.mark.django_db
def test_it_accepts_a_plain_address_to_a_host_the_deployment_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "CONTROLCENTER_INSECURE_HOSTS", "host.docker.internal,100.64.0.7"
    )
    for url in ("ws://host.docker.internal:18789", "ws://100.64.0.7:18789"):
        assert _gateway_form(url=url).is_valid(), url
    assert "in clear" in _errors(_gateway_form(url="ws://100.64.0.8:1"), "url")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("wss://admin:hunter2@gw.example:18789", "user name or password"),
        ("wss://hunter2@gw.example:18789", "user name or password"),
        ("wss://gw.example:18789/?token=hunter2", "query string"),
        ("ws://127.0.0.1:18789/#hunter2", "query string"),
    ],
)
@pytest.mark.parametrize("field", ["url", "rest_url"])
def test_it_refuses_an_address_with_credentials_or_a_query(
    url: str, words: str, field: str
) -> None:
    if field == "rest_url":
        url = url.replace("wss://", "https://").replace("ws://", "http://")
    errors = _errors(_gateway_form(**{field: url}), field)
    assert words in errors
    assert "hunter2" not in errors


@pytest.mark.django_db
def test_it_audits_only_the_safe_form_of_an_address(admin_client: Client) -> None:
    """A row written around the form (an older version, a shell) with credentials in its
    address: deleting it records the address without them, and the confirmation page
    shows none either."""
    gateway = Gateway.objects.create(
        name="old", url="ws://admin:hunter2@127.0.0.1:9/x?token=hunter2"
    )
    url = reverse("admin:fleet_gateway_delete", args=[gateway.pk])
    assert "hunter2" not in admin_client.get(url).content.decode()
    admin_client.post(url, {"post": "yes"})
    event = AuditEvent.objects.get(action="gateway.delete")
    assert event.params["url"] == "ws://127.0.0.1:9/x"
    assert "hunter2" not in str(event.params)


@pytest.mark.django_db
def test_it_says_on_the_gateway_page_that_the_worker_will_not_read_a_variable(
    admin_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DJANGO_SECRET_KEY_FILE", "/nonexistent")
    gateway = Gateway.objects.create(
        name="gw", url="ws://127.0.0.1:9", token_env="DATABASE_URL"
    )
    page = admin_client.get(
        reverse("admin:fleet_gateway_change", args=[gateway.pk])
    ).content.decode()
    assert "The worker does not read it" in page
