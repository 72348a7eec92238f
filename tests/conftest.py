"""Shared fixtures: personas for the three roles, a running gateway simulator, a gateway
row pointing at it, a worker running against it on the test's event loop, and a
redis-server of a test's own."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from django.contrib.auth.models import Group, User
from django.test import Client

from fleet import roles
from fleet.models import Gateway, Session
from tests.helpers import (
    IN_MEMORY,
    TEST_TOKEN_ENV,
    Chat,
    RedisServer,
    ci,
    connected_gateway,
)

# Fixtures of the real-parts harness, shared by every test module.
pytest_plugins = ["tests.realgw", "tests.browser"]


def pytest_configure(config: pytest.Config) -> None:
    """No connection pool in the test process itself: its async tests' `sync_to_async`
    threads keep their connections for the thread's life (production hands them back at
    the end of each request and ORM step), which would drain a pool, and a pooled
    connection left open keeps Django from dropping the test database. The daphne and
    worker processes the tests start use the pool as in production (settings.py)."""
    from django.conf import settings

    for database in settings.DATABASES.values():
        database.get("OPTIONS", {}).pop("pool", None)


@pytest.fixture(autouse=True)
def _fast_password_hasher(settings: Any) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def role_groups(transactional_db: Any) -> None:
    """The role groups: a transactional test flushes the tables, and with them the groups the
    data migration made. Modules of transactional tests use it with `usefixtures`."""
    for name in roles.ROLES:
        Group.objects.get_or_create(name=name)


@pytest.fixture
def personas(db: Any) -> dict[str, User]:
    """alice (admin), bob (operator), carol (viewer), dave (no role)."""
    people = {}
    for name, role in (
        ("alice", roles.ADMIN),
        ("bob", roles.OPERATOR),
        ("carol", roles.VIEWER),
    ):
        user = User.objects.create_user(name, password="password")
        # Transactional tests flush the tables, roles made by the migration included.
        user.groups.add(Group.objects.get_or_create(name=role)[0])
        people[name] = user
    people["dave"] = User.objects.create_user("dave", password="password")
    return people


@pytest.fixture
def gateway_token(monkeypatch: pytest.MonkeyPatch) -> str:
    token = secrets.token_urlsafe(16)
    monkeypatch.setenv(TEST_TOKEN_ENV, token)
    return token


@pytest.fixture
async def sim(gateway_token: str) -> AsyncIterator[Any]:
    from fleet.gateway.testing import FakeGateway

    gw = FakeGateway(token=gateway_token, agents=2, sessions=5, delta_interval=0.005)
    await gw.start(host="127.0.0.1", port=0)
    try:
        yield gw
    finally:
        await gw.stop()


@pytest.fixture
def make_gateway(transactional_db: Any) -> Callable[..., Gateway]:
    def make(url: str, **fields: Any) -> Gateway:
        fields.setdefault("name", f"gw-{secrets.token_hex(3)}")
        fields.setdefault("token_env", TEST_TOKEN_ENV)
        return Gateway.objects.create(url=url, **fields)

    return make


@pytest.fixture
def fast_worker_settings(settings: Any) -> Any:
    settings.GATEWAY_LEASE_SECONDS = 3.0
    settings.GATEWAY_WS_READY_TIMEOUT = 1.0
    settings.GATEWAY_REST_POLL_INTERVAL = 0.3
    settings.GATEWAY_CALL_TIMEOUT = 5.0
    return settings


@pytest.fixture
async def running_worker(
    fast_worker_settings: Any,
) -> AsyncIterator[Callable[[], Awaitable[Any]]]:
    """Start a Worker on this event loop (call the fixture's value); stopped afterwards."""
    from fleet.worker import Worker

    started: list[tuple[Any, asyncio.Task[None]]] = []

    async def start() -> Any:
        worker = Worker(step_interval=0.2)
        task = asyncio.create_task(worker.run())
        started.append((worker, task))
        return worker

    yield start
    for worker, task in started:
        worker.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
    # A test's own `aget`s leave a connection open on the loop's ORM thread, which the
    # worker's lease steps no longer pass through (they have their own thread): close it,
    # so the test database can be dropped.
    from channels.db import database_sync_to_async

    await database_sync_to_async(lambda: None)()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, started; the test may stop and start it again."""
    if shutil.which("redis-server") is None:
        message = "needs redis-server on PATH (apt-get install redis-server)"
        if ci():
            pytest.fail(message)
        pytest.skip(message)
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def chat(
    sim: Any, make_gateway: Any, running_worker: Any, personas: Any
) -> AsyncIterator[Chat]:
    """A session page of bob's on the simulator's main session, back-filled and ready."""
    gateway = await connected_gateway(sim, make_gateway, running_worker)
    session = await Session.objects.select_related("gateway").aget(
        gateway=gateway, key=sim.main_session_key
    )
    page = Chat(session, personas["bob"])
    await page.open()
    # The socket back-fills the transcript from chat.history on connect, then redraws it.
    page.backfill = await page.frames_until('id="messages" hx-swap-oob="innerHTML"')
    yield page
    await page.close()


@pytest.fixture
def in_memory_layer(settings: Any) -> None:
    """The in-memory channel layer, for tests whose sockets and pushes stay in-process."""
    settings.CHANNEL_LAYERS = IN_MEMORY


@pytest.fixture
def headers_for(
    personas: dict[str, User],
) -> Callable[[str], list[tuple[bytes, bytes]]]:
    """The headers of a logged-in browser's socket: its origin, session cookie and host."""

    def make(name: str, origin: str = "http://localhost") -> list[tuple[bytes, bytes]]:
        client = Client()
        client.force_login(personas[name])
        cookie = client.cookies["sessionid"].value
        return [
            (b"origin", origin.encode()),
            (b"cookie", f"sessionid={cookie}".encode()),
            (b"host", b"localhost"),
        ]

    return make
