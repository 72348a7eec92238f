"""Device pairing from the first connect to a working connection, against the simulator's
pairing mode, through the real worker and the real fleet consumer: the pending request, its
reason and the approve command arrive on the page live; the worker retries steadily and
connects by itself once approved, keeping the device token; scope upgrades, a revoked or
rotated device token, a changed shared secret (close 4001), and an admin rotating the
Control Center's device identity (audited, admins only)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import Client
from django.urls import reverse

from fleet.forms import GatewayForm
from fleet.gateway import Closed, ConnectRefused, ErrorShape
from fleet.gateway.testing import FakeGateway
from fleet.models import AuditEvent, DeviceIdentity, Gateway
from fleet.worker import refusal_outcome, refusals
from tests.helpers import TEST_TOKEN_ENV, connect, until_state, wait_for

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("role_groups", "in_memory_layer"),
]

RETRY = 0.3


@pytest.fixture(autouse=True)
def _quick_pairing_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(refusals, "PAIRING_RETRY_SECONDS", RETRY)


@pytest.fixture
async def pairing_sim(gateway_token: str) -> Any:
    async with FakeGateway(token=gateway_token, pairing=True) as sim:
        yield sim


async def device_of(gateway: Gateway) -> DeviceIdentity:
    return await DeviceIdentity.objects.aget(gateway_id=gateway.pk)


async def card_html(communicator: Any, gateway: Gateway, needle: str) -> str:
    """Frames from the fleet socket until the gateway's card contains `needle`."""
    seen = []
    async with asyncio.timeout(15):
        while True:
            frame = await communicator.receive_from(timeout=15)
            seen.append(frame)
            if f'id="gateway-{gateway.pk}"' in frame and needle in frame:
                return str(frame)


def logged(caplog: Any, text: str) -> Any:
    async def check() -> bool:
        return text in caplog.text

    return check


async def pair(sim: FakeGateway, gateway: Gateway, reason: str = "not-paired") -> str:
    pending = await until_state(gateway, Gateway.State.PAIRING_REQUIRED)
    assert pending.pairing_reason == reason
    assert [r["requestId"] for r in sim.pending_requests] == [
        pending.pairing_request_id
    ]
    sim.approve(pending.pairing_request_id)
    await until_state(gateway, Gateway.State.CONNECTED)
    return pending.pairing_request_id


# -- from the first connect to a working connection -----------------------------------------


async def test_the_page_shows_the_request_live_and_the_worker_connects_once_approved(
    pairing_sim,
    make_gateway,
    running_worker,
    headers_for,  # noqa: F811
) -> None:
    gateway = await asyncio.to_thread(make_gateway, pairing_sim.url)
    communicator = await connect(
        "/ws/fleet/", await sync_to_async(headers_for)("carol")
    )
    await running_worker()

    # The card arrives by itself: the request id, the reason in words, the command.
    pending = await until_state(gateway, Gateway.State.PAIRING_REQUIRED)
    request_id = pending.pairing_request_id
    html = await card_html(communicator, gateway, request_id)
    assert "Pairing required." in html
    assert "not paired with the gateway yet" in html
    assert f"openclaw devices approve {request_id}" in html
    device = await device_of(gateway)
    assert device.device_id[:16] in html and device.fingerprint in html
    assert pairing_sim.pending_requests[0]["deviceId"] == device.device_id

    # A steady retry keeps the same request (the command shown stays valid).
    await asyncio.sleep(RETRY * 4)
    assert [r["requestId"] for r in pairing_sim.pending_requests] == [request_id]
    assert (await Gateway.objects.aget(pk=gateway.pk)).pairing_request_id == request_id

    # Approved on the gateway: connected without a restart, the page follows live.
    pairing_sim.approve(request_id)
    html = await card_html(communicator, gateway, "state-connected")
    assert "Pairing required." not in html and "paired" in html
    device = await device_of(gateway)
    assert device.device_token == pairing_sim.device_token_of(device.device_id)
    assert set(device.device_token_scopes) >= {"operator.read", "operator.admin"}
    await communicator.disconnect()


async def test_a_request_that_expires_or_is_rejected_is_replaced_on_the_card(
    pairing_sim, make_gateway, running_worker
) -> None:
    """The real gateway drops an unanswered request after 5 minutes; a person may also
    reject one. The next steady retry makes a new request, and that is what is shown."""
    gateway = await asyncio.to_thread(make_gateway, pairing_sim.url)
    await running_worker()
    first = (
        await until_state(gateway, Gateway.State.PAIRING_REQUIRED)
    ).pairing_request_id
    pairing_sim.reject(first)

    async def replaced() -> bool:
        g = await Gateway.objects.aget(pk=gateway.pk)
        return bool(g.pairing_request_id) and g.pairing_request_id != first

    await wait_for(replaced, timeout=10)
    current = await Gateway.objects.aget(pk=gateway.pk)
    assert current.state == Gateway.State.PAIRING_REQUIRED
    assert [r["requestId"] for r in pairing_sim.pending_requests] == [
        current.pairing_request_id
    ]
    assert (
        f"openclaw devices approve {current.pairing_request_id}" in current.last_error
    )
    pairing_sim.approve(current.pairing_request_id)
    await until_state(gateway, Gateway.State.CONNECTED)


async def test_it_shows_a_scope_upgrade_and_connects_once_that_is_approved(
    pairing_sim, make_gateway, running_worker
) -> None:
    gateway = await asyncio.to_thread(make_gateway, pairing_sim.url)
    await running_worker()
    first = await pair(pairing_sim, gateway)
    device = await device_of(gateway)

    # The gateway narrows the device to read only (and drops its sessions): asking for
    # read/write/admin again is a scope upgrade, a new request that a person approves.
    pairing_sim.set_device_scopes(device.device_id, ["operator.read"])
    upgrade = await until_state(gateway, Gateway.State.PAIRING_REQUIRED)
    assert upgrade.pairing_reason == "scope-upgrade"
    assert upgrade.pairing_request_id and upgrade.pairing_request_id != first
    assert "more scopes than were approved" in upgrade.last_error
    assert (
        f"openclaw devices approve {upgrade.pairing_request_id}" in upgrade.last_error
    )
    pairing_sim.approve(upgrade.pairing_request_id)
    await until_state(gateway, Gateway.State.CONNECTED)


@pytest.mark.parametrize("how", ["revoke", "rotate"])
async def test_a_revoked_or_rotated_device_token_falls_back_to_the_shared_token(
    how, pairing_sim, make_gateway, running_worker, caplog
) -> None:
    gateway = await asyncio.to_thread(make_gateway, pairing_sim.url)
    await running_worker()
    await pair(pairing_sim, gateway)
    device = await device_of(gateway)
    old_token = device.device_token
    assert old_token

    caplog.set_level(logging.INFO, logger="fleet.worker")
    getattr(pairing_sim, f"{how}_device_token")(device.device_id)
    # Closed with 4001: the state said what happened and what comes next ...
    await wait_for(logged(caplog, "device token was revoked or rotated"), timeout=10)

    if how == "revoke":
        # Like the real gateway: the device lost its operator role with the token, so the
        # shared-token reconnect is a role upgrade a person approves (no restart either).
        again = await until_state(gateway, Gateway.State.PAIRING_REQUIRED)
        assert again.pairing_reason == "role-upgrade"
        assert "a role it was not approved for" in again.last_error
        pairing_sim.approve(again.pairing_request_id)

    # ... and the worker is back on the shared token, with the token the gateway issues now.
    async def new_token() -> bool:
        current = await device_of(gateway)
        return bool(current.device_token) and current.device_token != old_token

    await wait_for(new_token, timeout=10)
    await until_state(gateway, Gateway.State.CONNECTED)
    assert (await device_of(gateway)).device_token == pairing_sim.device_token_of(
        device.device_id
    )


async def test_a_changed_shared_secret_uses_the_device_token_then_says_what_to_do(
    pairing_sim, make_gateway, running_worker, caplog
) -> None:
    gateway = await asyncio.to_thread(make_gateway, pairing_sim.url)
    await running_worker()
    await pair(pairing_sim, gateway)
    device = await device_of(gateway)

    caplog.set_level(logging.INFO, logger="fleet.worker")
    pairing_sim.set_token("a-new-shared-secret")
    await pairing_sim.close_all(4001, "gateway auth changed")
    await wait_for(logged(caplog, "shared secret changed (close 4001)"), timeout=10)

    # The old shared token is refused; the gateway offers the device token, which works:
    # connected, and the card says the environment needs the new token.
    async def on_device_token() -> bool:
        g = await Gateway.objects.aget(pk=gateway.pk)
        return g.state == Gateway.State.CONNECTED and "device token" in g.last_error

    await wait_for(on_device_token, timeout=10)
    note = (await Gateway.objects.aget(pk=gateway.pk)).last_error
    assert TEST_TOKEN_ENV in note and "restart the worker" in note

    # Now the gateway revokes that device token too: nothing valid is left. The state
    # says so and names the variable; no tight loop (the auth retry is a minute).
    pairing_sim.revoke_device_token(device.device_id)
    failed = await until_state(gateway, Gateway.State.AUTH_FAILED, timeout=15)
    assert TEST_TOKEN_ENV in failed.last_error
    assert "shared secret changed" in failed.last_error
    assert (await device_of(gateway)).device_token == ""


# -- the identity on the admin, and rotating it ------------------------------------------------


async def test_an_admin_rotates_the_identity_audited_and_the_worker_pairs_again(
    pairing_sim, make_gateway, running_worker, personas
) -> None:
    gateway = await asyncio.to_thread(make_gateway, pairing_sim.url)
    await running_worker()
    await pair(pairing_sim, gateway)
    old = await device_of(gateway)
    rotate_url = reverse("admin:fleet_gateway_rotate_identity", args=[gateway.pk])

    def as_user(name: str) -> Client:
        client = Client()
        client.force_login(personas[name])
        return client

    def admin_pages() -> tuple[str, str, int, int]:
        alice = as_user("alice")
        change = alice.get(reverse("admin:fleet_gateway_change", args=[gateway.pk]))
        confirm = alice.get(rotate_url)
        # A viewer and an operator never reach it (the admin site is for admins).
        refused = [as_user(n).post(rotate_url).status_code for n in ("carol", "bob")]
        assert all(code in (302, 403) for code in refused)
        done = alice.post(rotate_url, follow=True)
        return (
            change.content.decode(),
            confirm.content.decode() + done.content.decode(),
            change.status_code,
            done.status_code,
        )

    change_page, rotate_pages, change_status, done_status = await asyncio.to_thread(
        admin_pages
    )
    assert change_status == 200 and done_status == 200
    assert old.device_id in change_page and old.fingerprint in change_page
    assert "Rotate device identity" in change_page
    assert "New device identity" in rotate_pages

    new = await device_of(gateway)
    assert new.device_id != old.device_id and new.device_token == ""
    event = await AuditEvent.objects.aget(action="gateway.rotate_identity")
    assert event.result == AuditEvent.Result.OK and event.gateway_id == gateway.pk
    assert event.params == {
        "old_device_id": old.device_id,
        "new_device_id": new.device_id,
    }
    assert (
        await AuditEvent.objects.filter(
            action="gateway.rotate_identity", result=AuditEvent.Result.OK
        ).acount()
        == 1
    )

    # The worker reconnects with the new key by itself; the gateway asks to pair it.
    pending = await until_state(gateway, Gateway.State.PAIRING_REQUIRED)
    assert pairing_sim.pending_requests[0]["deviceId"] == new.device_id
    pairing_sim.approve(pending.pairing_request_id)
    await until_state(gateway, Gateway.State.CONNECTED)


# -- the pieces -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "words"),
    [
        ("not-paired", "not paired with the gateway yet"),
        ("role-upgrade", "a role it was not approved for"),
        ("scope-upgrade", "more scopes than were approved"),
        ("metadata-upgrade", "details (name, platform) changed"),
        ("something-new", "the gateway asks for pairing (something-new)"),
    ],
)
def test_each_pairing_reason_is_said_in_words(reason: str, words: str) -> None:
    refused = ConnectRefused(
        "pairing required",
        ErrorShape(
            "NOT_PAIRED",
            "pairing required",
            details={"code": "PAIRING_REQUIRED", "reason": reason, "requestId": "r-1"},
        ),
        close_code=1008,
    )
    outcome = refusal_outcome(refused, "GW_TOKEN")
    assert outcome.state == Gateway.State.PAIRING_REQUIRED
    assert words in outcome.message
    assert "openclaw devices approve r-1" in outcome.message
    assert outcome.delay == refusals.PAIRING_RETRY_SECONDS
    assert outcome.fields == {"pairing_request_id": "r-1", "pairing_reason": reason}
    shown = Gateway(pairing_request_id="r-1", pairing_reason=reason)
    assert words in shown.pairing_reason_text


@pytest.mark.parametrize(
    ("reason", "drops_device_token", "words"),
    [
        ("gateway auth changed", False, "shared secret changed (close 4001)"),
        ("Gateway Auth Changed ", False, "shared secret changed (close 4001)"),
        ("device removed", True, "device session (close 4001: device removed)"),
        ("", True, "device session (close 4001: no reason)"),
    ],
)
def test_a_close_4001_says_which_token_went(
    reason: str, drops_device_token: bool, words: str
) -> None:
    """The shared secret changing keeps the device token; anything else about our device
    drops it, so the next connect comes back with the shared token (and may pair again)."""
    outcome = refusals.close_outcome(Closed(4001, reason), "GW_TOKEN")
    assert words in outcome.message
    assert "GW_TOKEN" in outcome.message
    assert outcome.drop_device_token is drops_device_token
    assert outcome.delay == 1.0 and outcome.remember


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"tls_pin": "12:34"}, "tls_pin", "SHA-256 fingerprint"),
        ({"tls_pin": "ab" * 32, "url": "ws://gw:18789"}, "url", "wss://"),
        ({"tls_ca_file": "ca.pem"}, "tls_ca_file", "absolute path"),
        ({"tls_ca_file": "-----BEGIN CERTIFICATE-----"}, "tls_ca_file", "path"),
        (
            {"tls_ca_file": "/etc/ca.pem", "tls_ca_env": "GW_CA_BUNDLE"},
            "tls_ca_env",
            "not both",
        ),
        ({"tls_ca_env": "gw-ca"}, "tls_ca_env", "upper-case"),
    ],
)
def test_the_gateway_form_refuses_unusable_tls_settings(
    fields: dict[str, str], field: str, message: str
) -> None:
    data = {
        "name": "remote",
        "url": "wss://gw.example:18789",
        "rest_url": "",
        "token_env": "OPENCLAW_GATEWAY_TOKEN",
        "enabled": "on",
        **fields,
    }
    form = GatewayForm(data=data)
    assert not form.is_valid()
    assert message in " ".join(str(e) for e in form.errors[field])


def test_the_gateway_form_stores_a_pin_in_one_notation() -> None:
    pin = "AB" * 32
    form = GatewayForm(
        data={
            "name": "remote",
            "url": "wss://gw.example:18789",
            "token_env": "OPENCLAW_GATEWAY_TOKEN",
            "enabled": "on",
            "tls_pin": f"sha256:{pin.lower()}",
            "tls_ca_env": "GW_CA_BUNDLE",
        }
    )
    assert form.is_valid(), form.errors
    assert form.cleaned_data["tls_pin"] == ":".join(["AB"] * 32)
