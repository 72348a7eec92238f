"""Secrets stay in the worker: a marker token and hostile gateway settings (the CA variable
set to the token's own variable, an address with credentials, a token variable that is no
gateway token), run through the real worker against the simulator and a listening trap on
real sockets; then the database, every page a viewer opens, the frames a viewer's sockets
receive, and the log are searched for the marker. Also: plain ws:// off loopback is refused
before a byte goes out, and an address with credentials from the environment is not stored."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.db import connection
from django.test import AsyncClient, Client
from django.urls import reverse

# Imported here, not in the test: setting Django up again (get_asgi_application) would
# reconfigure logging and drop caplog's handler.
from controlcenter.asgi import application
from fleet import services
from fleet.gateway.testing import FakeGateway
from fleet.models import Gateway, Session
from tests.helpers import TEST_TOKEN_ENV, admin_request, wait_for

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("role_groups"),
]

IN_MEMORY = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
# A secret of the worker's that is no gateway token (its value is the marker too).
OTHER_SECRET_ENV = "CC_SECRETS_TEST_PASSWORD"


@pytest.fixture(autouse=True)
def _in_memory_layer(settings: Any) -> None:
    settings.CHANNEL_LAYERS = IN_MEMORY


class Trap:
    """A TCP listener on loopback that counts every connection made to it: a gateway the
    worker must never contact."""

    def __init__(self) -> None:
        self.hits = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        async def handle(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            self.hits += 1
            writer.close()

        self._server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def trap() -> AsyncIterator[Trap]:
    listener = Trap()
    await listener.start()
    try:
        yield listener
    finally:
        await listener.stop()


def _socket_headers(user: User) -> list[tuple[bytes, bytes]]:
    client = Client()
    client.force_login(user)
    return [
        (b"origin", b"http://localhost"),
        (b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode()),
        (b"host", b"localhost"),
    ]


async def _open_socket(path: str, user: User) -> WebsocketCommunicator:
    headers = await sync_to_async(_socket_headers)(user)
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, _ = await communicator.connect(timeout=5)
    assert connected, path
    return communicator


async def _drain(communicator: WebsocketCommunicator, quiet: float = 0.5) -> list[str]:
    """Every frame queued so far and until the socket is quiet (receive_nothing waits
    without cancelling the consumer, receive_from with a timeout would not)."""
    frames: list[str] = []
    while not await communicator.receive_nothing(timeout=quiet):
        frames.append(str(await communicator.receive_from(timeout=5)))
    return frames


def _database_text() -> str:
    """Every row of every table, as text."""
    rows: list[str] = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")
            rows.extend(f"{table}: {row!r}" for row in cursor.fetchall())
    return "\n".join(rows)


async def _last_error_has(gateway: Gateway, words: str) -> Gateway:
    async def check() -> bool:
        return words in (await Gateway.objects.aget(pk=gateway.pk)).last_error

    try:
        await wait_for(check, 15)
    except AssertionError:
        current = await Gateway.objects.aget(pk=gateway.pk)
        raise AssertionError(
            f"{gateway.name} never said {words!r}: {current.state} ({current.last_error})"
        ) from None
    return await Gateway.objects.aget(pk=gateway.pk)


async def _until_state(gateway: Gateway, state: str, timeout: float = 10.0) -> Gateway:
    async def check() -> bool:
        return (await Gateway.objects.aget(pk=gateway.pk)).state == state

    try:
        await wait_for(check, timeout)
    except AssertionError:
        current = await Gateway.objects.aget(pk=gateway.pk)
        raise AssertionError(
            f"{gateway.name} never reached {state}: {current.state} ({current.last_error})"
        ) from None
    return await Gateway.objects.aget(pk=gateway.pk)


async def test_it_never_lets_the_token_reach_the_database_a_page_a_frame_or_the_log(
    sim: FakeGateway,
    gateway_token: str,
    trap: Trap,
    make_gateway: Callable[..., Gateway],
    running_worker: Any,
    personas: dict[str, User],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    marker = gateway_token  # the token of the simulator, in TEST_TOKEN_ENV
    url_secret = "pw-" + secrets.token_hex(12)
    monkeypatch.setenv(OTHER_SECRET_ENV, marker)
    caplog.set_level(logging.DEBUG)

    # The admin form refuses the hostile settings, saying why.
    admin = AsyncClient()
    await admin.aforce_login(personas["alice"])
    add = reverse("admin:fleet_gateway_add")
    base = {"rest_url": "", "token_env": TEST_TOKEN_ENV, "enabled": "on"}
    refused = await admin_request(
        admin,
        "post",
        add,
        {
            **base,
            "name": "hostile-ca",
            "url": f"wss://127.0.0.1:{trap.port}",
            "tls_ca_env": TEST_TOKEN_ENV,
        },
    )
    assert "names ending in _CA_BUNDLE" in refused.content.decode()
    refused = await admin_request(
        admin,
        "post",
        add,
        {**base, "name": "hostile-url", "url": f"ws://cc:{url_secret}@127.0.0.1:1/"},
    )
    assert "may not hold a user name or password" in refused.content.decode()
    refused = await admin_request(
        admin,
        "post",
        add,
        {**base, "name": "hostile-env", "url": sim.url, "token_env": OTHER_SECRET_ENV},
    )
    assert "names ending in _GATEWAY_TOKEN" in refused.content.decode()
    assert not await Gateway.objects.filter(name__startswith="hostile").aexists()

    # The same settings written around the form (a shell, an older version): the worker
    # refuses them itself. One good gateway beside them fills the pages with sessions.
    hostile_url = f"ws://cc:{url_secret}@127.0.0.1:{trap.port}/?key={url_secret}"
    make = sync_to_async(make_gateway)
    good = await make(sim.url, name="good")
    ca_is_token = await make(
        f"wss://127.0.0.1:{trap.port}", name="ca-is-token", tls_ca_env=TEST_TOKEN_ENV
    )
    in_url = await make(hostile_url, name="creds-in-url")
    other_env = await make(
        f"ws://127.0.0.1:{trap.port}", name="other-secret", token_env=OTHER_SECRET_ENV
    )

    carol = personas["carol"]  # a viewer
    fleet_socket = await _open_socket("/ws/fleet/", carol)
    frames = await _drain(fleet_socket)
    await running_worker()

    async def synced() -> bool:
        g = await Gateway.objects.aget(pk=good.pk)
        rows = await Session.objects.filter(gateway=good).acount()
        return g.state == Gateway.State.CONNECTED and rows == len(sim.session_keys())

    await wait_for(synced, 15)
    refusal = "is not a variable this deployment lets"
    shown = await _last_error_has(ca_is_token, refusal)
    assert shown.state == Gateway.State.TLS_FAILED
    assert "names ending in _CA_BUNDLE" in shown.last_error
    shown = await _last_error_has(in_url, "may not hold a user name or password")
    assert shown.state == Gateway.State.OFFLINE
    shown = await _last_error_has(other_env, refusal)
    assert shown.state == Gateway.State.AUTH_FAILED

    # Every page a viewer can open, and the socket of one session.
    session = await Session.objects.filter(gateway=good).afirst()
    assert session is not None
    session_socket = await _open_socket(f"/ws/sessions/{session.pk}/", carol)
    viewer = AsyncClient()
    await viewer.aforce_login(carol)
    pages = {}
    for path in (
        "/",
        "/?gone=on",
        reverse("healthz"),
        reverse("session-detail", args=[session.pk]),
        reverse("chat:session", args=[session.pk]),
        reverse("chat:search") + "?q=main",
    ):
        response = await admin_request(viewer, "get", path)
        assert response.status_code == 200, path
        pages[path] = response.content.decode()
    # And the admin's gateway pages, which show each row's settings and state (the change
    # form's address field holds the hostile row's own address: the admin edits it there).
    for gateway in (good, ca_is_token, in_url, other_env):
        path = reverse("admin:fleet_gateway_change", args=[gateway.pk])
        page = (await admin_request(admin, "get", path)).content.decode()
        field = f'name="url" value="{hostile_url}"'
        assert gateway != in_url or field in page
        pages[path] = page.replace(field, "")
    frames += await _drain(fleet_socket)
    frames += await _drain(session_socket)
    await fleet_socket.disconnect()
    await session_socket.disconnect()

    # The surfaces were exercised: the refusals reached the page and the frames...
    assert refusal in pages["/"] and "may not hold a user name" in pages["/"]
    assert any(refusal in f for f in frames), "no frame carried a gateway's state"
    assert session.key in pages[reverse("session-detail", args=[session.pk])]
    # ... and the marker is on none of them, nor in the database or the log.
    log_text = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert refusal in log_text
    database = await sync_to_async(_database_text)()
    assert marker not in database
    # The only copy of the URL's secret is the hostile row's own address.
    assert url_secret not in database.replace(hostile_url, "")
    for where, text in {
        **pages,
        "the fleet and session frames": "\n".join(frames),
        "the log": log_text,
    }.items():
        assert marker not in text, where
        assert url_secret not in text, where
    # Nothing was sent to the addresses the worker refused.
    assert trap.hits == 0


async def test_it_reads_a_token_variable_the_deployment_lists(
    sim: FakeGateway,
    gateway_token: str,
    make_gateway: Callable[..., Gateway],
    running_worker: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CONTROLCENTER_ALLOWED_ENV replaces the suffix rule: a listed name is read, and the
    default name, not listed, is refused by the worker before it is read."""
    monkeypatch.setenv("CC_LISTED_SECRET", gateway_token)
    monkeypatch.setenv("CONTROLCENTER_ALLOWED_ENV", "CC_LISTED_SECRET")
    listed = await sync_to_async(make_gateway)(sim.url, token_env="CC_LISTED_SECRET")
    unlisted = await sync_to_async(make_gateway)(sim.url)  # TEST_TOKEN_ENV
    await running_worker()
    await _until_state(listed, Gateway.State.CONNECTED)
    refused = await _until_state(unlisted, Gateway.State.AUTH_FAILED)
    assert "listed in CONTROLCENTER_ALLOWED_ENV" in refused.last_error
    assert sim.clients == 1


def _own_address() -> str:
    """This machine's address off loopback (no packet is sent), or "" when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            address = str(probe.getsockname()[0])
        except OSError:
            return ""
    return "" if address.startswith("127.") else address


async def test_it_sends_no_token_in_clear_off_loopback_unless_the_host_is_named(
    gateway_token: str,
    make_gateway: Callable[..., Gateway],
    running_worker: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    address = _own_address()
    if not address:
        pytest.skip("this machine has no address off loopback")
    sim = FakeGateway(token=gateway_token, agents=1, sessions=2)
    await sim.start(host=address, port=0)
    try:
        monkeypatch.delenv("CONTROLCENTER_INSECURE_HOSTS", raising=False)
        gateway = await sync_to_async(make_gateway)(f"ws://{address}:{sim.port}")
        worker = await running_worker()
        shown = await _last_error_has(gateway, "the token would cross the network")
        assert shown.state == Gateway.State.OFFLINE
        assert "wss://" in shown.last_error
        await asyncio.sleep(1.0)  # the worker had its chance to connect
        assert sim.connections == 0
        assert gateway_token not in caplog.text
        worker.stop()
        with contextlib.suppress(TimeoutError):
            await wait_for(_lease_released(gateway), 10)

        # The deployment names the host (a VPN address, the Docker host): allowed.
        monkeypatch.setenv("CONTROLCENTER_INSECURE_HOSTS", f"other.example, {address}")
        await running_worker()
        await _until_state(gateway, Gateway.State.CONNECTED, timeout=15)
    finally:
        await sim.stop()


def _lease_released(gateway: Gateway) -> Callable[[], Any]:
    async def check() -> bool:
        return (await Gateway.objects.aget(pk=gateway.pk)).lease_owner == ""

    return check


@pytest.mark.parametrize(
    ("url", "rest_url"),
    [
        ("ws://cc:{secret}@127.0.0.1:18789", ""),
        ("ws://127.0.0.1:18789/?token={secret}", ""),
        ("ws://127.0.0.1:18789", "http://cc:{secret}@127.0.0.1:18789"),
    ],
)
def test_it_does_not_store_a_gateway_from_the_environment_with_credentials(
    url: str,
    rest_url: str,
    settings: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "pw-" + secrets.token_hex(12)
    settings.OPENCLAW_GATEWAY_URL = url.format(secret=secret)
    settings.GATEWAY_REST_URL = rest_url.format(secret=secret)
    caplog.set_level(logging.INFO)
    assert services.ensure_env_gateway() is None
    assert not Gateway.objects.exists()
    assert "was not added" in caplog.text
    assert secret not in caplog.text


def test_it_stores_a_plain_gateway_from_the_environment_for_the_worker_to_refuse(
    settings: Any,
) -> None:
    """Plain ws:// off loopback from OPENCLAW_GATEWAY_URL is kept (the fleet page then says
    why the worker does not connect); the worker's own check is the test above."""
    settings.OPENCLAW_GATEWAY_URL = "ws://gateway.example:18789"
    settings.GATEWAY_REST_URL = ""
    gateway = services.ensure_env_gateway()
    assert gateway is not None and gateway.token_env == "OPENCLAW_GATEWAY_TOKEN"
