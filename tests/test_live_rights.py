"""Open sockets hold their rights only while the account does: through the real ASGI stack
(Origin check, session auth, routing) with Channels communicators, a logout, a
deactivation, a lost role, a password reset and a downgrade close the user's sockets
within a second; a change that leaves the rights as they were closes nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import Group, User
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from fleet import roles
from fleet.live import CLOSE_ACCESS_LOST, CLOSE_RIGHTS_CHANGED
from fleet.models import Agent, Gateway, Session

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("role_groups"),
]

IN_MEMORY = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
WITHIN = 1.0  # seconds: the bound for a socket to close


@pytest.fixture(autouse=True)
def _in_memory_layer(settings: Any) -> None:
    settings.CHANNEL_LAYERS = IN_MEMORY


@pytest.fixture
def session_row(transactional_db: Any) -> Session:
    gw = Gateway.objects.create(
        name="alpha", url="ws://127.0.0.1:1", state=Gateway.State.CONNECTED, protocol=4
    )
    agent = Agent.objects.create(gateway=gw, agent_id="main")
    return Session.objects.create(
        gateway=gw,
        agent=agent,
        key="agent:main:one",
        label="one",
        updated_at=timezone.now(),
        history_synced_at=timezone.now(),  # no backfill through a worker
    )


def _logged_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _headers(client: Client) -> list[tuple[bytes, bytes]]:
    cookie = client.cookies["sessionid"].value
    return [
        (b"origin", b"http://localhost"),
        (b"cookie", f"sessionid={cookie}".encode()),
        (b"host", b"localhost"),
    ]


async def _open(path: str, client: Client) -> WebsocketCommunicator:
    from controlcenter.asgi import application

    communicator = WebsocketCommunicator(application, path, headers=_headers(client))
    connected, _ = await communicator.connect(timeout=5)
    assert connected, path
    return communicator


def _paths(session_row: Session) -> list[str]:
    return [
        "/ws/fleet/",
        f"/ws/sessions/{session_row.pk}/",
        f"/ws/chat/{session_row.pk}/",
    ]


async def _close_code(communicator: WebsocketCommunicator, within: float) -> int | None:
    """The code the server closed the socket with within `within` seconds (frames of state
    sent meanwhile are skipped), or None if it stayed open."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        left = deadline - loop.time()
        if left <= 0 or await communicator.receive_nothing(timeout=min(left, 0.05)):
            if loop.time() >= deadline:
                return None
            continue
        output = await communicator.receive_output(timeout=1)
        if output["type"] == "websocket.close":
            return int(output.get("code", 1000))


async def _settle(sockets: list[WebsocketCommunicator]) -> None:
    """Let each socket send its state on connect."""
    for communicator in sockets:
        assert await _close_code(communicator, 0.5) is None


async def _close_all(sockets: list[WebsocketCommunicator]) -> None:
    for communicator in sockets:
        await communicator.disconnect()


async def test_it_closes_every_socket_of_a_deactivated_user(
    personas: dict[str, User], session_row: Session
) -> None:
    bob = personas["bob"]
    client = await sync_to_async(_logged_in)(bob)
    sockets = [await _open(path, client) for path in _paths(session_row)]
    await _settle(sockets)

    bob.is_active = False
    await bob.asave()

    for communicator in sockets:
        assert await _close_code(communicator, WITHIN) == CLOSE_ACCESS_LOST
    await _close_all(sockets)


async def test_it_closes_the_sockets_of_a_user_who_loses_the_last_role(
    personas: dict[str, User], session_row: Session
) -> None:
    carol = personas["carol"]
    client = await sync_to_async(_logged_in)(carol)
    sockets = [await _open(path, client) for path in _paths(session_row)]
    await _settle(sockets)

    # From the group's side: Group.user_set, the other end of the m2m relation.
    viewer = await Group.objects.aget(name=roles.VIEWER)
    await sync_to_async(viewer.user_set.remove)(carol)

    for communicator in sockets:
        assert await _close_code(communicator, WITHIN) == CLOSE_ACCESS_LOST
    await _close_all(sockets)


async def test_it_closes_the_sockets_of_a_superuser_who_is_no_longer_one(
    session_row: Session,
) -> None:
    root = await sync_to_async(User.objects.create_superuser)("root", password="pw")
    client = await sync_to_async(_logged_in)(root)
    sockets = [await _open(path, client) for path in _paths(session_row)]
    await _settle(sockets)

    root.is_superuser = False
    await root.asave()

    for communicator in sockets:
        assert await _close_code(communicator, WITHIN) == CLOSE_ACCESS_LOST
    await _close_all(sockets)


async def test_it_makes_a_downgraded_socket_reconnect_with_its_new_rights(
    personas: dict[str, User], session_row: Session
) -> None:
    bob = personas["bob"]  # an operator: chat links on the fleet page
    client = await sync_to_async(_logged_in)(bob)
    fleet = await _open("/ws/fleet/", client)
    assert f'href="/chat/{session_row.pk}/"' in await fleet.receive_from(timeout=5) + (
        await fleet.receive_from(timeout=5)
    )
    chat = await _open(f"/ws/chat/{session_row.pk}/", client)
    await _settle([fleet, chat])

    viewer = await Group.objects.aget(name=roles.VIEWER)
    await sync_to_async(bob.groups.set)([viewer])

    # 1012: the htmx ws extension reconnects at once, and the new socket is a viewer's.
    assert await _close_code(fleet, WITHIN) == CLOSE_RIGHTS_CHANGED
    assert await _close_code(chat, WITHIN) == CLOSE_RIGHTS_CHANGED
    await _close_all([fleet, chat])
    again = await _open("/ws/fleet/", client)
    frames = [await again.receive_from(timeout=5) for _ in range(2)]
    assert f'id="session-{session_row.pk}"' in "".join(frames)
    assert "/chat/" not in "".join(frames)
    await again.disconnect()


async def test_it_closes_the_sockets_of_the_session_that_logs_out_only(
    personas: dict[str, User], session_row: Session
) -> None:
    bob = personas["bob"]
    laptop = await sync_to_async(_logged_in)(bob)
    phone = await sync_to_async(_logged_in)(bob)
    on_laptop = [await _open(path, laptop) for path in _paths(session_row)]
    on_phone = await _open("/ws/fleet/", phone)
    await _settle([*on_laptop, on_phone])

    response = await sync_to_async(laptop.post)(reverse("logout"))
    assert response.status_code == 302

    for communicator in on_laptop:
        assert await _close_code(communicator, WITHIN) == CLOSE_ACCESS_LOST
    assert await _close_code(on_phone, 0.5) is None  # still logged in there
    await _close_all([*on_laptop, on_phone])


async def test_it_closes_the_sockets_of_a_user_whose_password_was_reset(
    personas: dict[str, User], session_row: Session
) -> None:
    carol = personas["carol"]
    client = await sync_to_async(_logged_in)(carol)
    fleet = await _open("/ws/fleet/", client)
    await _settle([fleet])

    # The admin's password form: other sessions of the account end (Django's session
    # hash), and so do their sockets.
    admin = await sync_to_async(_logged_in)(personas["alice"])
    url = reverse("admin:auth_user_password_change", args=[carol.pk])
    response = await sync_to_async(admin.post)(
        url,
        {"password1": "a-new-long-passphrase", "password2": "a-new-long-passphrase"},
    )
    assert response.status_code == 302, response.content[:500]

    assert await _close_code(fleet, WITHIN) == CLOSE_ACCESS_LOST
    await fleet.disconnect()


async def test_it_keeps_the_sockets_when_the_rights_stay(
    personas: dict[str, User], session_row: Session
) -> None:
    bob = personas["bob"]
    client = await sync_to_async(_logged_in)(bob)
    sockets = [await _open(path, client) for path in _paths(session_row)]
    await _settle(sockets)

    bob.email = "bob@example.com"
    await bob.asave()  # a note, a check, the same role
    await sync_to_async(_logged_in)(bob)  # another login elsewhere

    for communicator in sockets:
        assert await _close_code(communicator, 0.7) is None
    await _close_all(sockets)


async def test_it_reconnects_the_socket_of_a_user_who_changed_their_own_password(
    personas: dict[str, User], session_row: Session
) -> None:
    carol = personas["carol"]
    client = await sync_to_async(_logged_in)(carol)
    fleet = await _open("/ws/fleet/", client)
    await _settle([fleet])

    response = await sync_to_async(client.post)(
        reverse("password_change"),
        {
            "old_password": "password",
            "new_password1": "a-new-long-passphrase",
            "new_password2": "a-new-long-passphrase",
        },
    )
    assert response.status_code == 302

    # Still logged in (under a new session key, in the cookie): reconnect, not signed out.
    assert await _close_code(fleet, WITHIN) == CLOSE_RIGHTS_CHANGED
    await fleet.disconnect()
    again = await _open("/ws/fleet/", client)
    await again.disconnect()
