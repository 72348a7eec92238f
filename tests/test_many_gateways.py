"""Many gateways, several workers (issue 16): twelve simulated gateways (in this process, so
the test can drive them) and three `manage.py gatewayworker` processes on PostgreSQL and
Redis, with daphne and a logged-in fleet socket. The workers share the gateways 4/4/4; a
SIGKILLed worker's four are taken over by the two others within the lease time plus a step;
every change reaches the page exactly once, and a change made while nobody held its gateway
is not lost (the new holder's sync brings it).

Needs PostgreSQL and Redis like tests/test_processes.py (its fixtures and helpers are in
tests/processes.py);
skips without them, except under CI=true."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from fleet.gateway.testing import FakeGateway
from tests.helpers import free_port
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

GATEWAYS = 12
WORKERS = 3
LEASE_SECONDS = 3.0
STEP_SECONDS = LEASE_SECONDS / 3  # the worker's lease step (fleet/worker/supervisor.py)

__all__ = ["channel_layer", "database"]  # fixtures, used by name

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(240),
    pytest.mark.filterwarnings(
        "ignore:remove second argument of ws_handler:DeprecationWarning"
    ),
]

SETUP = """
from django.contrib.auth.models import Group, User
from fleet.models import Gateway
user = User.objects.create_user({username!r}, password={password!r})
user.groups.add(Group.objects.get(name="admin"))
for i, url in enumerate({urls!r}):
    Gateway.objects.create(name=f"gw-{{i:02d}}", url=url, token_env={token_env!r})
print("gateways", Gateway.objects.count())
"""


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def sims() -> AsyncIterator[list[FakeGateway]]:
    token = secrets.token_urlsafe(16)  # one token: the workers read one variable
    gateways = [
        FakeGateway(token=token, agents=1, sessions=2, seed=i + 1)
        for i in range(GATEWAYS)
    ]
    for g in gateways:
        await g.start(host="127.0.0.1", port=0)
    try:
        yield gateways
    finally:
        for g in gateways:
            await g.stop()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(
    database: str,
    channel_layer: Layer,
    sims: list[FakeGateway],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    data_dir = tmp_path_factory.mktemp("many")
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
        "GATEWAY_WS_READY_TIMEOUT": "60",
        "GATEWAY_CALL_TIMEOUT": "10",
        "DB_APPLICATION_NAME": "cc-test-many",
        "LOG_LEVEL": "INFO",
        TOKEN_ENV: sims[0].token,
    }
    await run_manage(env, "migrate", "--noinput", "-v0")
    username, password = "mira", secrets.token_urlsafe(12)
    out = await run_manage(
        env,
        "shell",
        "-c",
        SETUP.format(
            username=username,
            password=password,
            urls=[s.url for s in sims],
            token_env=TOKEN_ENV,
        ),
    )
    assert f"gateways {GATEWAYS}" in out, out
    port = free_port()
    stack = Stack(
        sim=sims[0],
        env=env,
        db_url=database,
        base=f"http://127.0.0.1:{port}",
        logs=data_dir,
        gateway_id=0,
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


def holders(stack: Stack) -> dict[str, int | None]:
    """Each gateway's name and the pid of the worker that holds it, connected (else None)."""
    rows = stack.query(
        "SELECT name, state, lease_owner FROM fleet_gateway "
        "WHERE lease_expires_at > now() ORDER BY name"
    )
    held: dict[str, int | None] = {f"gw-{i:02d}": None for i in range(GATEWAYS)}
    for name, state, owner in rows:
        if state == "connected" and owner:
            held[name] = int(owner.split(":")[1])
    return held


def leased_by(stack: Stack, names: list[str], pids: set[int]) -> bool:
    """Whether each of these gateways has a live lease held by one of these workers."""
    rows = stack.query(
        "SELECT name, lease_owner FROM fleet_gateway WHERE lease_expires_at > now()"
    )
    owners = {name: owner for name, owner in rows if owner}
    return all(n in owners and int(owners[n].split(":")[1]) in pids for n in names)


def split(stack: Stack, sims: list[FakeGateway], pids: list[int]) -> bool:
    held = holders(stack)
    counts = Counter(held.values())
    fair = -(-GATEWAYS // len(pids))
    return (
        None not in counts
        and set(counts) == set(pids)
        and all(counts[pid] == fair for pid in pids)
        and all(s.clients == 1 for s in sims)
    )


async def test_three_workers_share_twelve_gateways_and_two_take_over_a_killed_ones(
    stack: Stack, sims: list[FakeGateway]
) -> None:
    workers: list[Proc] = [stack.worker() for _ in range(WORKERS)]
    pids = [w.pid for w in workers]
    took = await until(
        lambda: split(stack, sims, pids), 60, "the leases split 4/4/4", workers
    )
    assert took < 60
    # Stable: a few lease steps later the split has not moved (no handing back and forth).
    before = holders(stack)
    await asyncio.sleep(3 * STEP_SECONDS)
    assert holders(stack) == before
    assert all(s.clients == 1 for s in sims)

    browser = Browser(stack)
    await browser.login()
    # The share is in /healthz for a logged-in user, and only the counts for anyone.
    detail = (await browser.http.get("/healthz")).json()
    live = [w for w in detail["workers"] if w["alive"]]
    assert sorted(len(w["gateways"]) for w in live) == [4, 4, 4]
    async with httpx.AsyncClient(base_url=stack.base) as anonymous:
        public = (await anonymous.get("/healthz")).json()
    assert "workers" not in public and "gateways" not in public
    assert public["states"] == {"connected": GATEWAYS}

    by_name = {f"gw-{i:02d}": sims[i] for i in range(GATEWAYS)}
    try:
        async with browser.socket("/ws/fleet/") as sock:
            await sock.frame_with('id="session-rows"')
            # Every gateway's change reaches the page once.
            for name, sim in by_name.items():
                label = f"one-{name}-{secrets.token_hex(3)}"
                await sim.emit_session_changed(sim.session_keys()[-1], label=label)
                await sock.frame_with(label)

            victim = workers[0]
            theirs = sorted(n for n, pid in holders(stack).items() if pid == victim.pid)
            assert len(theirs) == 4
            victim.kill()
            # While nobody holds them, their gateways change: not lost.
            during = {}
            for name in theirs:
                sim = by_name[name]
                during[name] = f"gap-{name}-{secrets.token_hex(3)}"
                await sim.emit_session_changed(
                    sim.session_keys()[-1], label=during[name]
                )
            others = [w for w in workers if w is not victim]
            # The takeover (a lease held by a live worker) within the lease time plus a
            # step and a little slack; connecting and syncing comes after and depends on
            # the machine's load, so it gets a bound of its own.
            took = await until(
                lambda: leased_by(stack, theirs, {w.pid for w in others}),
                LEASE_SECONDS + 20,
                "the two others lease the killed worker's four",
                others,
            )
            assert took < LEASE_SECONDS + STEP_SECONDS + 2, f"took {took:.2f} s"
            await until(
                lambda: split(stack, sims, [w.pid for w in others]),
                30,
                "the two others connect the killed worker's four",
                others,
            )
            for label in during.values():  # the new holder's sync brought it
                await sock.frame_with(label)
                (row,) = stack.query(
                    "SELECT count(*) FROM fleet_session WHERE label = %s", label
                )
                assert row == (1,)
            # Nothing pushed twice: one change on each gateway, one at a time, is in
            # exactly one frame until the next (whose re-rendered list shows it again).
            for name, sim in by_name.items():
                label = f"after-{name}-{secrets.token_hex(3)}"
                await sim.emit_session_changed(sim.session_keys()[0], label=label)
                await sock.frame_with(label)
                await asyncio.sleep(0.4)  # room for a second copy, if one were sent
                assert sock.count(label) == 1, label
                assert sim.clients == 1
            # The admin's list shows which worker holds which gateway.
            page = (await browser.http.get("/admin/fleet/workerheartbeat/")).text
            assert re.search(r"6: gw-\d\d", page), page[:2000]
    finally:
        await browser.close()
        for w in workers:
            if w.popen.poll() is None:
                await w.terminate()
