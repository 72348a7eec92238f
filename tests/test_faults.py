"""Faults, each against real parts: the gateway simulator over real sockets, a redis-server
of the test's own, PostgreSQL. After each, nothing is lost and the state converges:
- the gateway restarts in the middle of a chat run;
- Redis goes away and comes back;
- the database is briefly unavailable to the worker (PostgreSQL);
- a gateway sends garbage, an oversized frame, a flood of events.
(The worker killed with SIGKILL/SIGTERM is tested with real processes elsewhere.)"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.test import AsyncClient, Client

from chat import relay, sending, store
from chat.models import Message, run_dom_id

# Imported here, not in a test: loading it runs django.setup(), which configures logging
# afresh and would detach the handler of pytest's caplog.
from controlcenter.asgi import application
from fleet.gateway import MAX_FRAME_BYTES
from fleet.models import Gateway, Session
from fleet.worker import GatewayRunner, Worker
from tests.helpers import Chat, RedisServer, stored_reply, wait_for

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("role_groups"),
]


async def _true(value: bool) -> bool:
    return value


async def held(
    sim: Any, make_gateway: Any, running_worker: Any
) -> tuple[Gateway, Worker, GatewayRunner]:
    """A gateway row for the simulator, held by a running worker, connected and synced."""
    gateway = await sync_to_async(make_gateway)(sim.url)
    worker = await running_worker()

    async def ready() -> bool:
        row = await Gateway.objects.aget(pk=gateway.pk)
        runner = worker.runners.get(gateway.pk)
        return (
            row.state == Gateway.State.CONNECTED
            and runner is not None
            and runner[0].sync_count >= 1
        )

    await wait_for(ready, 15)
    return gateway, worker, worker.runners[gateway.pk][0]


async def converged(gateway: Gateway, sim: Any) -> bool:
    """Our live sessions are exactly the gateway's, one row each, with its labels."""
    rows = [s async for s in Session.objects.filter(gateway=gateway, gone_at=None)]
    keys = [s.key for s in rows]
    if len(keys) != len(set(keys)) or set(keys) != set(sim.session_keys()):
        return False
    return all(s.label == (sim.session(s.key) or {}).get("label", "") for s in rows)


def still_running(worker: Worker, gateway: Gateway) -> bool:
    entry = worker.runners.get(gateway.pk)
    return entry is not None and not entry[1].done() and not worker.stopping.is_set()


# -- 1. the gateway restarts in the middle of a chat run -----------------------------------------


async def test_a_gateway_restart_mid_run_ends_it_as_interrupted_and_nothing_doubles(
    sim, make_gateway, running_worker, personas
) -> None:
    gateway, worker, runner = await held(sim, make_gateway, running_worker)
    session = await Session.objects.select_related("gateway").aget(
        gateway=gateway, key=sim.main_session_key
    )
    page = Chat(session, personas["bob"])
    await page.open()
    await page.frames_until('id="messages" hx-swap-oob="innerHTML"')  # back-filled
    message_id = uuid.uuid4()
    run_id = str(message_id)
    await page.send("[[fake:slow]] a long answer, please", message_id)
    await page.frames_until(f'id="{run_dom_id(run_id)}-text"')  # streaming

    # The gateway goes down (shutdown event, close 1012), stays down a moment, comes back.
    syncs = runner.sync_count
    port = sim.port
    await sim.stop()
    frames = await page.frames_until(stored_reply(message_id, "error"))
    assert "connection dropped" in frames[-1]  # the page shows the run as interrupted
    await asyncio.sleep(0.5)
    await sim.start(port=port)

    async def back() -> bool:
        row = await Gateway.objects.aget(pk=gateway.pk)
        return row.state == Gateway.State.CONNECTED and runner.sync_count > syncs

    await wait_for(back, 20)
    assert still_running(worker, gateway)
    await wait_for(lambda: converged(gateway, sim))

    reply = await Message.objects.aget(run_id=run_id, role=Message.Role.ASSISTANT)
    assert reply.state == Message.State.ERROR
    assert reply.error == store.INTERRUPTED
    assert reply.text and "Hello" in reply.text  # what had streamed is kept

    # The page socket reconnects and back-fills the transcript: nothing appears twice.
    await page.close()
    again = Chat(session, personas["bob"])
    await again.open()

    async def backfilled() -> bool:
        row = await Session.objects.aget(pk=session.pk)
        return row.history_synced_at is not None

    await wait_for(backfilled)
    await again.close()
    assert await Message.objects.filter(pk=message_id).acount() == 1
    assert (
        await Message.objects.filter(
            session=session, run_id=run_id, role=Message.Role.ASSISTANT
        ).acount()
        == 1
    )
    ids = [
        m
        async for m in Message.objects.filter(session=session)
        .exclude(gateway_message_id="")
        .values_list("gateway_message_id", flat=True)
    ]
    assert len(ids) == len(set(ids))
    texts = [
        m
        async for m in Message.objects.filter(
            session=session, role=Message.Role.USER
        ).values_list("text", flat=True)
    ]
    assert texts.count("[[fake:slow]] a long answer, please") == 1
    body = (await again.client.get(f"/chat/{session.pk}/")).content.decode()
    assert body.count(f'id="{run_dom_id(run_id)}"') == 1

    # And the chat works again.
    fresh = Chat(session, personas["bob"])
    await fresh.open()
    next_id = uuid.uuid4()
    await fresh.send("still there?", next_id)
    await fresh.frames_until(stored_reply(next_id))
    await fresh.close()
    done = await Message.objects.aget(run_id=str(next_id), role="assistant")
    assert done.state == Message.State.FINAL


# -- 2. Redis goes away and comes back -------------------------------------------------------------


@pytest.fixture
def redis_server(own_redis: RedisServer, settings: Any) -> Iterator[RedisServer]:
    server = own_redis
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [server.url],
                "prefix": f"cc-faults-{secrets.token_hex(4)}",
            },
        }
    }
    yield server  # own_redis stops it


def socket_headers(user: User) -> list[tuple[bytes, bytes]]:
    client = Client()
    client.force_login(user)
    cookie = client.cookies["sessionid"].value
    return [
        (b"origin", b"http://localhost"),
        (b"cookie", f"sessionid={cookie}".encode()),
        (b"host", b"localhost"),
    ]


async def fleet_socket(user: User, attempts: int = 1) -> WebsocketCommunicator:
    """The fleet page's socket, open and past its first frame. With attempts > 1 it tries
    again on failure, like the page's htmx ws extension: after a Redis restart the
    first try can meet a pooled connection Redis already closed."""
    headers = await sync_to_async(socket_headers)(user)
    for attempt in range(1, attempts + 1):
        communicator = WebsocketCommunicator(application, "/ws/fleet/", headers=headers)
        try:
            connected, _ = await communicator.connect(timeout=5)
        except Exception:
            if attempt == attempts:
                raise
            await asyncio.sleep(0.2)
            continue
        assert connected
        await communicator.receive_from(timeout=5)  # the current state
        return communicator
    raise AssertionError("unreachable")


async def frame_with(
    communicator: WebsocketCommunicator, needle: str, timeout: float = 10
) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        frame = await communicator.receive_from(
            timeout=max(deadline - loop.time(), 0.1)
        )
        if needle in frame:
            return frame


async def test_redis_going_away_and_coming_back(
    redis_server, sim, make_gateway, running_worker, personas, caplog
) -> None:
    caplog.set_level(logging.WARNING)
    gateway, worker, runner = await held(sim, make_gateway, running_worker)
    key = sim.main_session_key
    session = await Session.objects.aget(gateway=gateway, key=key)
    viewer = await fleet_socket(personas["carol"])
    await sim.emit_session_changed(key, label="before the outage")
    await frame_with(viewer, "before the outage")

    redis_server.stop()
    # The worker keeps writing the database; its pushes fail quietly.
    for i in range(10):
        await sim.emit_session_changed(key, label=f"during the outage {i}")

    async def written() -> bool:
        row = await Session.objects.aget(pk=session.pk)
        return row.label == "during the outage 9"

    await wait_for(written)
    assert still_running(worker, gateway)
    assert (await Gateway.objects.aget(pk=gateway.pk)).state == Gateway.State.CONNECTED

    def push_warnings() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "fleet.groups" and "failed" in r.getMessage()
        ]

    await wait_for(lambda: _true(bool(push_warnings())))
    await asyncio.sleep(0.5)
    assert len(push_warnings()) == 1, push_warnings()  # once, not once per push

    # Pages still load, from the database.
    carol = AsyncClient()
    await sync_to_async(carol.force_login)(personas["carol"])
    page = await carol.get("/")
    assert page.status_code == 200
    assert "during the outage 9" in page.content.decode()
    assert (await carol.get("/healthz")).status_code == 200
    assert (await carol.get(f"/chat/{session.pk}/")).status_code == 200

    # A call to the worker cannot travel: a clear error, not a 500; the message is kept.
    bob = Chat(session, personas["bob"])
    await sync_to_async(bob.client.force_login)(bob.user)
    failed_id = uuid.uuid4()
    response = await bob.send("through a dead Redis", failed_id)
    assert response.status_code == 200
    assert "channel layer (Redis)" in response.content.decode()
    failed = await Message.objects.aget(pk=failed_id)
    assert failed.state == Message.State.ERROR and "Redis" in failed.error
    with contextlib.suppress(Exception):  # its channel layer died under it
        await viewer.disconnect()

    # Redis is back (empty: a restart). Pages' sockets reconnect (the htmx ws extension
    # does, with backoff) and get live updates again. Right after the restart a socket may
    # still meet a pooled connection Redis closed, and die: like a browser, try again.
    redis_server.start()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    attempt = 0
    while True:
        attempt += 1
        label = f"after the outage {attempt}"
        try:
            viewer = await fleet_socket(personas["carol"], attempts=5)
            await sim.emit_session_changed(key, label=label)
            await frame_with(viewer, label, timeout=10)
            await viewer.disconnect()
            break
        except Exception:
            with contextlib.suppress(Exception):
                await viewer.disconnect()
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.5)
    assert any("go through again" in r.getMessage() for r in caplog.records)

    # And the worker takes calls again (its command channel recovers by itself): a chat
    # message goes to the gateway, and its reply is stored.
    sent_id = uuid.uuid4()

    async def sent() -> bool:
        response = await bob.send("hello again", sent_id)
        return "channel layer" not in response.content.decode()

    await wait_for(sent, 15, interval=0.5)

    async def answered() -> bool:
        return await Message.objects.filter(
            run_id=str(sent_id), role=Message.Role.ASSISTANT, state="final"
        ).aexists()

    await wait_for(answered, 15)
    assert still_running(worker, gateway)


# -- 3. the database goes away for a few seconds (PostgreSQL) ------------------------------------


class DatabaseBlock:
    """Makes the test database refuse connections, and ends those it has."""

    def __init__(self, admin: Any, name: str) -> None:
        self.admin, self.name = admin, name

    def block(self) -> None:
        from psycopg import sql

        self.admin.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(
                sql.Identifier(self.name)
            )
        )
        self.admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            [self.name],
        )

    def unblock(self) -> None:
        from psycopg import sql

        self.admin.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(
                sql.Identifier(self.name)
            )
        )


@pytest.fixture
def database_block(transactional_db: Any) -> Iterator[DatabaseBlock]:
    from django.db import connection, connections

    if connection.vendor != "postgresql":
        pytest.skip(
            "needs PostgreSQL: run with DATABASE_URL=postgres://... "
            "(scripts/test.sh does, in its PostgreSQL pass)"
        )
    import psycopg

    params = connection.settings_dict
    admin = psycopg.connect(
        host=params["HOST"] or "127.0.0.1",
        port=int(params["PORT"] or 5432),
        user=params["USER"],
        password=params["PASSWORD"] or None,
        dbname="postgres",
        autocommit=True,
    )
    blocker = DatabaseBlock(admin, params["NAME"])
    try:
        yield blocker
    finally:
        blocker.unblock()
        admin.close()
        # Connections of this thread that the block ended: closed, so teardown reconnects.
        connections.close_all()


async def test_the_worker_rides_out_a_database_outage(
    database_block, sim, make_gateway, running_worker, caplog
) -> None:
    caplog.set_level(logging.INFO)
    gateway, worker, runner = await held(sim, make_gateway, running_worker)
    keys = sim.session_keys()
    await wait_for(lambda: converged(gateway, sim))
    syncs = runner.sync_count

    await asyncio.to_thread(database_block.block)
    try:
        # Events arrive while the worker cannot write them...
        await sim.emit_session_changed(keys[0], label="while the database was away")
        await sim.emit_session_changed("agent:main:born-in-the-outage", label="new")
        # ...and one change only a resync can see.
        sim.remove_session(keys[-1], notify=False)
        await asyncio.sleep(3)
        assert still_running(worker, gateway)
    finally:
        await asyncio.to_thread(database_block.unblock)

    async def resynced() -> bool:
        return runner.sync_count > syncs and await converged(gateway, sim)

    await wait_for(resynced, 20)
    gone = await Session.objects.aget(gateway=gateway, key=keys[-1])
    assert gone.gone_at is not None  # only the resync after the outage could see that
    assert still_running(worker, gateway)
    assert (await Gateway.objects.aget(pk=gateway.pk)).state == Gateway.State.CONNECTED
    messages = [r.message for r in caplog.records]
    assert any("database unavailable" in m for m in messages), messages
    assert any("database back" in m for m in messages), messages


async def test_a_run_that_ends_during_a_database_outage_still_stores_its_reply(
    database_block, sim, make_gateway, running_worker, personas, caplog
) -> None:
    caplog.set_level(logging.INFO)
    gateway, worker, runner = await held(sim, make_gateway, running_worker)
    session = await Session.objects.select_related("gateway").aget(
        gateway=gateway, key=sim.main_session_key
    )
    message, _ = await sync_to_async(sending.create_user_message)(
        session,
        personas["bob"],
        "[[fake:slow]][[fake:echo]]ends in the dark",
        uuid.uuid4(),
    )
    run_id = str(message.pk)
    assert await sending.asend_message(session, personas["bob"], message) == ""

    async def streaming() -> bool:
        sent = await Message.objects.aget(pk=message.pk)
        accepted = sent.state in (Message.State.SENT, Message.State.FINAL)
        return accepted and run_id in relay.runs_in_flight(gateway.pk)

    await wait_for(streaming)
    await asyncio.to_thread(database_block.block)
    blocked = asyncio.get_running_loop().time()
    try:
        # The run's end arrives while nothing can be written (about 3 s of slow chunks).
        await wait_for(
            lambda: _true(run_id not in relay.runs_in_flight(gateway.pk)), 15
        )
        await asyncio.sleep(
            max(0.0, 3.0 - (asyncio.get_running_loop().time() - blocked))
        )
        assert not relay_gave_up(caplog)
    finally:
        await asyncio.to_thread(database_block.unblock)

    async def stored() -> bool:
        return await Message.objects.filter(
            session=session, run_id=run_id, role=Message.Role.ASSISTANT, state="final"
        ).aexists()

    await wait_for(stored, 20)
    reply = await Message.objects.aget(
        session=session, run_id=run_id, role=Message.Role.ASSISTANT
    )
    assert reply.text == "ends in the dark"
    assert still_running(worker, gateway)
    messages = [r.message for r in caplog.records]
    assert any("database back" in m for m in messages), messages


def relay_gave_up(caplog: Any) -> bool:
    """The relay gave up on a write (it logs "storing failed" and drops the row)."""
    return any("storing failed" in r.getMessage() for r in caplog.records)


# -- 4. a gateway sends garbage ---------------------------------------------------------------------


GARBAGE: list[str | bytes] = [
    "not json",
    "",
    "[1,2]",
    "null",
    '{"type":"event","payload":{}}',  # no event name
    '{"type":"event","event":"tick","seq":-1}',
    '{"type":"res","id":5}',
    '{"type":"res","id":"nobody-asked","ok":true,"payload":{}}',
    '{"type":"req","id":"1","method":"sessions.list"}',  # the gateway asking us
    '{"type":"wat","event":"sessions.changed"}',
    '{"type":"event","event":"no.such.event","payload":{"x":1}}',
    '{"type":"event","event":"sessions.changed","payload":"nonsense"}',
    '{"type":"event","event":"sessions.changed","payload":{"session":"x"}}',
    '{"type":"event","event":"presence","payload":{"presence":"x"}}',
    '{"type":"event","event":"presence","payload":[1,"two",null]}',
    '{"type":"event","event":"health","payload":42}',
    '{"type":"event","event":"chat","payload":{"runId":5,"state":"delta"}}',
    '{"type":"event","event":"chat","payload":{"runId":"r","sessionKey":"agent:main:main","state":"final"}}',
    '{"type":"event","event":"agent","payload":{"stream":"tool","data":"x"}}',
    '{"type":"event","event":"session.message","payload":{"sessionKey":"agent:main:main","message":7}}',
    '{"type":"event","event":"tick","payload":NaN}',
    '{"type":"event","event":"x","payload":"' + "\\u0000" * 3 + '"}',
    "[" * 50_000,
    b"\xff\xfe\x00 binary garbage",
    b'{"type":"event","event":"tick","payload":{}}',  # fine, if binary
]


async def test_garbage_from_a_gateway_is_skipped_on_the_same_connection(
    sim, make_gateway, running_worker
) -> None:
    gateway, worker, runner = await held(sim, make_gateway, running_worker)
    conn = runner.conn
    assert conn is not None
    for garbage in GARBAGE:
        await sim.send_raw(garbage)
    key = sim.session_keys()[0]
    await sim.emit_session_changed(key, label="still alive")
    await wait_for(lambda: converged(gateway, sim))
    assert runner.conn is conn  # the same connection, still up
    assert conn.stats.malformed_frames >= 10
    assert still_running(worker, gateway)
    assert (await Gateway.objects.aget(pk=gateway.pk)).state == Gateway.State.CONNECTED


async def test_an_oversized_frame_closes_cleanly_and_the_worker_reconnects(
    sim, make_gateway, running_worker, caplog
) -> None:
    caplog.set_level(logging.INFO)
    gateway, worker, runner = await held(sim, make_gateway, running_worker)
    conn, syncs = runner.conn, runner.sync_count
    big = '{"type":"event","event":"x","payload":"' + "a" * MAX_FRAME_BYTES + '"}'
    await sim.send_raw(big)
    del big

    async def reconnected() -> bool:
        row = await Gateway.objects.aget(pk=gateway.pk)
        return (
            runner.conn is not None
            and runner.conn is not conn
            and runner.sync_count > syncs
            and row.state == Gateway.State.CONNECTED
        )

    await wait_for(reconnected, 20)
    assert any("1009" in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]
    key = sim.session_keys()[0]
    await sim.emit_session_changed(key, label="after the big one")
    await wait_for(lambda: converged(gateway, sim))
    assert still_running(worker, gateway)


async def test_a_flood_of_events_converges(sim, make_gateway, running_worker) -> None:
    gateway, worker, runner = await held(sim, make_gateway, running_worker)
    keys = sim.session_keys()
    for i in range(600):
        await sim.emit_session_changed(
            keys[i % len(keys)], label=f"flood {i}", totalTokens=i
        )
        if i % 200 == 0:
            await asyncio.sleep(0)  # let the simulator's writers run
    await wait_for(lambda: converged(gateway, sim), 60)
    last = await Session.objects.aget(gateway=gateway, key=keys[599 % len(keys)])
    assert last.label == "flood 599" and last.total_tokens == 599
    assert still_running(worker, gateway)
    assert (await Gateway.objects.aget(pk=gateway.pk)).state == Gateway.State.CONNECTED
