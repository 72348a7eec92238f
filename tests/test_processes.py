"""The production layout as separate processes on the machine's PostgreSQL and Redis: daphne
(web) and `manage.py gatewayworker` (one or two) as subprocesses sharing a database made for
this module and a Redis database of their own, against the gateway simulator (in this
process, so the test can drive it and see what it was asked).

Browsers are real WebSocket clients (`websockets`) logged in with a session cookie and sending
an Origin, like a page. Worker faults are real signals: SIGKILL (no cleanup at all) and
SIGTERM (what `docker stop` sends). The fixtures and helpers for all this live in
tests/processes.py (test_many_gateways uses them too).

Needs PostgreSQL (TEST_POSTGRES_URL, default postgres://postgres@127.0.0.1:5432/postgres, a
role that may create databases) and Redis (TEST_REDIS_URL, default redis://127.0.0.1:6379);
skips without them, except under CI=true."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from chat.models import run_dom_id
from fleet.gateway.testing import FakeGateway
from fleet.gateway.testing import data as simdata
from tests.helpers import free_port, streamed_text
from tests.processes import (
    STARTUP_TIMEOUT,
    TOKEN_ENV,
    Browser,
    Layer,
    Proc,
    Stack,
    channel_layer,
    database,
    run_manage,
    until,
)

__all__ = ["channel_layer", "database"]  # fixtures, used by name

LEASE_SECONDS = 2.0

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(120),
    # The simulator's uvicorn sits on websockets.legacy, which warns on every connection.
    pytest.mark.filterwarnings(
        "ignore:remove second argument of ws_handler:DeprecationWarning"
    ),
]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def sim() -> AsyncIterator[FakeGateway]:
    gateway = FakeGateway(
        token=secrets.token_urlsafe(16), agents=2, sessions=5, delta_interval=0.005
    )
    await gateway.start(host="127.0.0.1", port=0)
    try:
        yield gateway
    finally:
        await gateway.stop()


SETUP = """
from django.contrib.auth.models import Group, User
from fleet.models import Gateway
user = User.objects.create_user({username!r}, password={password!r})
user.groups.add(Group.objects.get(name="operator"))
gateway = Gateway.objects.create(name="sim", url={url!r}, token_env={token_env!r})
print("gateway", gateway.pk)
"""


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(
    database: str,
    channel_layer: Layer,
    sim: FakeGateway,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    data_dir = tmp_path_factory.mktemp("processes")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(data_dir),
        "LANG": "C.UTF-8",
        "DATABASE_URL": database,
        "REDIS_URL": channel_layer.url,
        "CHANNEL_LAYER_PREFIX": channel_layer.prefix,
        "CONTROLCENTER_DATA_DIR": str(data_dir),
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_DEBUG": "False",
        "OPENCLAW_GATEWAY_URL": "",
        "GATEWAY_LEASE_SECONDS": str(LEASE_SECONDS),
        # Keep the REST fallback out of these tests: they are about the WebSocket.
        "GATEWAY_WS_READY_TIMEOUT": "60",
        "GATEWAY_CALL_TIMEOUT": "10",
        "DB_APPLICATION_NAME": "cc-test-processes",
        "LOG_LEVEL": "INFO",
        TOKEN_ENV: sim.token,
    }
    await run_manage(env, "migrate", "--noinput", "-v0")
    username, password = "olivia", secrets.token_urlsafe(12)
    out = await run_manage(
        env,
        "shell",
        "-c",
        SETUP.format(
            username=username, password=password, url=sim.url, token_env=TOKEN_ENV
        ),
    )
    gateway_id = int(re.search(r"gateway (\d+)", out).group(1))  # type: ignore[union-attr]
    port = free_port()
    stack = Stack(
        sim=sim,
        env=env,
        db_url=database,
        base=f"http://127.0.0.1:{port}",
        logs=data_dir,
        gateway_id=gateway_id,
        username=username,
        password=password,
    )
    web = stack.web()
    try:
        await until(stack.healthy, STARTUP_TIMEOUT, "daphne answers /healthz", [web])
        yield stack
    finally:
        for proc in stack.procs:
            if proc.popen.poll() is None:
                proc.popen.kill()
                proc.popen.wait()


@pytest_asyncio.fixture(loop_scope="module")
async def workers(stack: Stack) -> AsyncIterator[list[Proc]]:
    """Workers a test started; those still running are stopped with SIGTERM afterwards, so
    they release the gateway and the next test's worker need not wait for the lease."""
    started: list[Proc] = []
    yield started
    for proc in started:
        if proc.popen.poll() is None:
            await proc.terminate()
    await until(lambda: stack.sim.clients == 0, 10, "the gateway has no client")


async def start_worker(stack: Stack, workers: list[Proc]) -> Proc:
    syncs = stack.syncs()
    proc = stack.worker()
    proc.syncs_before = syncs
    workers.append(proc)
    return proc


async def connected(stack: Stack, holder: Proc, timeout: float = 15.0) -> float:
    """Wait until `holder` holds the gateway, is connected and has synced since it started
    (the database may still say "connected" from a worker that was killed)."""

    def ready() -> bool:
        gw = stack.gateway()
        return (
            gw["state"] == "connected"
            and stack.holder_pid() == holder.pid
            and stack.sim.clients == 1
            and stack.syncs() > holder.syncs_before
        )

    return await until(
        ready, timeout, f"{holder.name} {holder.pid} holds the gateway", [holder]
    )


@pytest_asyncio.fixture(loop_scope="module")
async def browser(stack: Stack) -> AsyncIterator[Browser]:
    b = Browser(stack)
    await b.login()
    yield b
    await b.close()


# -- the tests ---------------------------------------------------------------------------------


async def test_it_pushes_a_gateway_change_from_the_worker_process_to_a_browser_on_the_web_process(
    stack: Stack, workers: list[Proc], browser: Browser
) -> None:
    worker = await start_worker(stack, workers)
    await connected(stack, worker)
    async with browser.socket("/ws/fleet/") as sock:
        await sock.frame_with('id="session-rows"')  # the current state on connect
        label = f"moved-{secrets.token_hex(4)}"
        key = stack.sim.session_keys()[-1]
        started = time.monotonic()
        await stack.sim.emit_session_changed(key, label=label)
        await sock.frame_with(label)
        took = time.monotonic() - started
        # A quiet spell longer than channels_redis's blocking wait for a message (5 s)
        # leaves the socket working.
        await asyncio.sleep(6)
        quiet = f"after-quiet-{secrets.token_hex(4)}"
        await stack.sim.emit_session_changed(key, label=quiet)
        await sock.frame_with(quiet)
    assert stack.query(
        "SELECT label FROM fleet_session WHERE gateway_id = %s AND key = %s",
        stack.gateway_id,
        key,
    ) == [(quiet,)]
    assert took < 5, f"the change took {took:.2f} s to reach the browser"


async def test_it_streams_a_chat_across_the_two_processes(
    stack: Stack, workers: list[Proc], browser: Browser
) -> None:
    worker = await start_worker(stack, workers)
    await connected(stack, worker)
    ((pk, synced),) = stack.query(
        "SELECT id, history_synced_at FROM fleet_session WHERE gateway_id = %s AND key = %s",
        stack.gateway_id,
        stack.sim.main_session_key,
    )
    assert synced is None
    page = await browser.http.get(f"/chat/{pk}/")
    assert page.status_code == 200
    async with browser.socket(f"/ws/chat/{pk}/") as sock:
        # On first view the socket back-fills the transcript: chat.history, asked of the
        # worker process over Redis.
        await until(
            lambda: (
                stack.query(
                    "SELECT 1 FROM fleet_session WHERE id = %s AND history_synced_at IS NOT NULL",
                    pk,
                )
                != []
            ),
            12,
            "the chat socket back-fills the transcript through the worker",
            [worker],
        )
        start = len(sock.frames)
        message_id = str(uuid.uuid4())
        response = await browser.http.post(
            f"/chat/{pk}/send/",
            data={"text": "hello across processes", "message_id": message_id},
            headers={"X-CSRFToken": browser.http.cookies["csrftoken"]},
        )
        assert response.status_code == 200, response.text[:500]
        assert f'id="{run_dom_id(message_id)}"' in response.text  # the placeholder
        final = (
            f'<article id="{run_dom_id(message_id)}" class="msg assistant state-final"'
        )
        end = await sock.frame_with(final, timeout=15, start=start)
        frames = sock.frames[start:end]
    assert streamed_text(frames, message_id) == simdata.REPLY
    assert sum('hx-swap-oob="beforeend"' in f for f in frames) >= 10
    assert stack.query(
        "SELECT state, text FROM chat_message WHERE run_id = %s AND role = 'assistant'",
        message_id,
    ) == [("final", simdata.REPLY)]


async def test_it_redraws_a_reply_that_finished_while_the_web_process_restarted(
    stack: Stack, workers: list[Proc], browser: Browser
) -> None:
    worker = await start_worker(stack, workers)
    await connected(stack, worker)
    ((pk,),) = stack.query(
        "SELECT id FROM fleet_session WHERE gateway_id = %s AND key = %s",
        stack.gateway_id,
        stack.sim.main_session_key,
    )
    (web,) = [p for p in stack.procs if p.name == "web" and p.popen.poll() is None]
    message_id = str(uuid.uuid4())
    reply = "finished while the web was down"
    async with browser.socket(f"/ws/chat/{pk}/") as sock:
        response = await browser.http.post(
            f"/chat/{pk}/send/",
            data={
                "text": f"[[fake:slow]][[fake:echo]]{reply}",
                "message_id": message_id,
            },
            headers={"X-CSRFToken": browser.http.cookies["csrftoken"]},
        )
        assert response.status_code == 200, response.text[:500]
        await sock.frame_with(f'id="{run_dom_id(message_id)}-text"', timeout=15)
        web.kill()  # mid-run: the page's socket drops
    await until(
        lambda: (
            stack.query(
                "SELECT 1 FROM chat_message WHERE run_id = %s AND role = 'assistant' "
                "AND state = 'final'",
                message_id,
            )
            != []
        ),
        20,
        "the worker stores the reply while the web is down",
        [worker],
    )
    restarted = stack.web()
    await until(stack.healthy, STARTUP_TIMEOUT, "daphne answers again", [restarted])
    # The page's socket comes back (htmx's ws extension reconnects by itself).
    async with browser.socket(f"/ws/chat/{pk}/") as sock:
        final = (
            f'<article id="{run_dom_id(message_id)}" class="msg assistant state-final"'
        )
        frame = sock.frames[await sock.frame_with(final)]
    assert reply in frame
    assert 'hx-swap-oob="true" data-upsert' in frame  # replaces the streamed bubble


async def test_it_lets_one_of_two_workers_hold_the_gateway_and_the_other_take_over(
    stack: Stack, workers: list[Proc], browser: Browser
) -> None:
    first, second = (
        await start_worker(stack, workers),
        await start_worker(stack, workers),
    )

    def held() -> bool:
        return (
            stack.gateway()["state"] == "connected"
            and stack.sim.clients == 1
            and stack.syncs() > first.syncs_before
        )

    await until(held, 15, "one of two workers connected", [first, second])
    holder = first if stack.holder_pid() == first.pid else second
    other = second if holder is first else first
    assert stack.holder_pid() == holder.pid
    subscribes = stack.subscribe_calls()

    async with browser.socket("/ws/fleet/") as sock:
        await sock.frame_with('id="session-rows"')
        # Both workers renew and check their leases several times meanwhile.
        key = stack.sim.session_keys()[-1]
        await stack.sim.emit_session_changed(
            key, label="warm-up"
        )  # moves it to the top
        await sock.frame_with("warm-up")
        labels = [f"once-{i}-{secrets.token_hex(3)}" for i in range(4)]
        for label in labels:
            await stack.sim.emit_session_changed(key, label=label)
            await sock.frame_with(label)
            assert stack.sim.clients == 1
            await asyncio.sleep(LEASE_SECONDS / 2)
        await asyncio.sleep(1.0)  # room for a second copy to arrive, if one were sent
        assert [sock.count(label) for label in labels] == [1] * len(labels)
        assert stack.holder_pid() == holder.pid
        assert stack.subscribe_calls() == subscribes  # nobody else subscribed

        # The holder dies without a word; the other takes over once the lease runs out.
        syncs = stack.syncs()
        holder.kill()
        took = await until(
            lambda: (
                stack.holder_pid() == other.pid
                and stack.gateway()["state"] == "connected"
                and stack.syncs() > syncs
            ),
            LEASE_SECONDS + 10,
            "the second worker takes the gateway over",
            [other],
        )
        assert took < LEASE_SECONDS + 6, f"took over after {took:.2f} s"
        assert stack.sim.clients == 1
        label = f"after-{secrets.token_hex(3)}"
        await stack.sim.emit_session_changed(key, label=label)
        await sock.frame_with(label)
        await asyncio.sleep(1.0)
        assert sock.count(label) == 1


async def test_it_resyncs_everything_after_a_sigkill_and_restart(
    stack: Stack, workers: list[Proc]
) -> None:
    worker = await start_worker(stack, workers)
    await connected(stack, worker)
    lists = stack.list_calls()
    worker.kill()
    await until(lambda: stack.sim.clients == 0, 5, "the killed worker's socket closes")

    # What changes on the gateway while no worker listens reaches us by no event.
    sim = stack.sim
    keys = [k for k in sim.session_keys() if k != sim.main_session_key]
    changed_key, removed_key = keys[0], keys[-1]
    label = f"while-down-{secrets.token_hex(3)}"
    await sim.emit_session_changed(changed_key, label=label)
    added = sim.add_session(label="added while down", notify=False)
    sim.remove_session(removed_key, notify=False)

    restarted = await start_worker(stack, workers)
    # The database still says "connected" (nobody was left to say otherwise) until the
    # new worker takes the expired lease, connects and syncs again.
    took = await connected(stack, restarted, timeout=LEASE_SECONDS + 15)
    assert stack.list_calls() > lists, "no sessions.list after the restart"

    def converged() -> bool:
        rows = dict(
            stack.query(
                "SELECT key, label FROM fleet_session WHERE gateway_id = %s AND gone_at IS NULL",
                stack.gateway_id,
            )
        )
        return set(rows) == set(sim.session_keys()) and rows.get(changed_key) == label

    await until(converged, 10, "the database matches the gateway", [restarted])
    assert stack.query(
        "SELECT label FROM fleet_session WHERE key = %s", added["key"]
    ) == [("added while down",)]
    assert stack.query(
        "SELECT gone_at IS NOT NULL FROM fleet_session WHERE key = %s", removed_key
    ) == [(True,)]
    # One row per key: the resync updated rows, it added no copies.
    assert (
        stack.query(
            "SELECT key FROM fleet_session WHERE gateway_id = %s GROUP BY key HAVING count(*) > 1",
            stack.gateway_id,
        )
        == []
    )
    assert took < LEASE_SECONDS + 10


async def test_it_exits_cleanly_within_five_seconds_on_sigterm(
    stack: Stack, workers: list[Proc]
) -> None:
    worker = await start_worker(stack, workers)
    await connected(stack, worker)
    took = await worker.terminate()
    assert took < 5, f"SIGTERM took {took:.2f} s"
    assert worker.popen.returncode == 0, worker.tail()
    assert "gateway worker stopped" in worker.tail()
    # It let go of the gateway on the way out: another worker need not wait for the lease.
    gw = stack.gateway()
    assert gw["lease_owner"] == "" and gw["state"] == "offline"
    assert gw["last_error"] == "The gateway worker stopped."
    await until(lambda: stack.sim.clients == 0, 2, "the gateway socket is closed")


async def test_a_worker_killed_mid_run_and_restarted_books_every_cost_once(
    stack: Stack, workers: list[Proc], browser: Browser
) -> None:
    """Chat runs, a SIGKILL while one streams (the gateway finishes it with nobody
    listening), a restart, one more run: the ledger holds the session's cost exactly."""
    sim = stack.sim
    key = sim.main_session_key
    worker = await start_worker(stack, workers)
    await connected(stack, worker)
    ((pk,),) = stack.query(
        "SELECT id FROM fleet_session WHERE gateway_id = %s AND key = %s",
        stack.gateway_id,
        key,
    )

    async def send(text: str) -> str:
        message_id = str(uuid.uuid4())
        response = await browser.http.post(
            f"/chat/{pk}/send/",
            data={"text": text, "message_id": message_id},
            headers={"X-CSRFToken": browser.http.cookies["csrftoken"]},
        )
        assert response.status_code == 200, response.text[:500]
        return message_id

    def stored(message_id: str) -> bool:
        return (
            stack.query(
                "SELECT 1 FROM chat_message WHERE run_id = %s AND role = 'assistant' AND state = 'final'",
                message_id,
            )
            != []
        )

    first = await send("a first run")
    await until(lambda: stored(first), 15, "the first reply is stored", [worker])
    await send("[[fake:long]] a run the worker does not live to see")
    await until(lambda: bool(sim.active_runs()), 10, "the run streams", [worker])
    worker.kill()  # while the run streams: its final event reaches no one
    await until(lambda: sim.clients == 0, 5, "the killed worker's socket closes")
    await until(lambda: not sim.active_runs(), 15, "the gateway finishes the run")

    restarted = await start_worker(stack, workers)
    await connected(stack, restarted, timeout=LEASE_SECONDS + 15)
    last = await send("a run after the restart")
    await until(lambda: stored(last), 15, "the last reply is stored", [restarted])

    def gateway_cost() -> float:
        """The gateway's total for the session (its row's cost is the last run's)."""
        return sim.usage_total(key)

    def last_run_cost() -> float:
        row = sim.session(key)
        assert row is not None
        return float(row["estimatedCostUsd"])

    def ledger() -> tuple[float, float, float]:
        """(the ledger's sum for the session, the session's stored cost, the gateway's
        daily totals)"""
        ((booked,),) = stack.query(
            "SELECT coalesce(sum(cost_usd), 0) FROM usage_usageentry WHERE gateway_id = %s AND session_key = %s",
            stack.gateway_id,
            key,
        )
        ((raw,),) = stack.query("SELECT raw FROM fleet_session WHERE id = %s", pk)
        ((entries, days),) = stack.query(
            "SELECT (SELECT coalesce(sum(cost_usd), 0) FROM usage_usageentry WHERE gateway_id = %s),"
            " (SELECT coalesce(sum(cost_usd), 0) FROM usage_usageday WHERE gateway_id = %s)",
            stack.gateway_id,
            stack.gateway_id,
        )
        assert entries == days, "the daily totals and the ledger disagree"
        return float(booked), float(raw.get("estimatedCostUsd") or 0), float(days)

    def booked_once() -> bool:
        booked, stored_cost, _ = ledger()
        cost = gateway_cost()
        return abs(booked - cost) < 1e-6 and abs(stored_cost - last_run_cost()) < 1e-6

    await until(booked_once, 15, "the ledger holds the session's cost", [restarted])
    assert gateway_cost() > 0
    await asyncio.sleep(2.0)  # nothing books it a second time later
    assert booked_once(), ledger()
