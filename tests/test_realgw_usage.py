"""Usage against the real OpenClaw gateway (2026.9.6, its fake model priced at 3 and 15 USD
per million tokens): runs through our chat are booked run by run (a row's estimatedCostUsd
is its last run's) and add up to the gateway's own total for the session; a reset then a delete of the session leave the day's total as it was; a restarted worker
books nothing twice."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from fleet import calls
from fleet.models import Agent, Gateway, Session
from tests.helpers import TEST_TOKEN_ENV, Chat, free_port, stored_reply, wait_for
from tests.processes import (  # the production layout's fixtures and helpers
    REPO,
    Layer,
    Proc,
    ProcessStack,
    channel_layer,  # noqa: F401 - a fixture
    database,  # noqa: F401 - a fixture
    until,
)
from tests.realgw import RealGateway
from usage.models import UsageDay, UsageEntry

pytestmark = [
    pytest.mark.realgw,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("role_groups"),
]


def _ledger(gateway: Gateway, key: str | None = None) -> Decimal:
    rows = UsageEntry.objects.filter(gateway=gateway)
    if key is not None:
        rows = rows.filter(session_key=key)
    return sum((e.cost_usd for e in rows), Decimal(0))


def _today(gateway: Gateway) -> Decimal:
    days = UsageDay.objects.filter(gateway=gateway, day=timezone.localdate())
    return sum((d.cost_usd for d in days), Decimal(0))


async def test_real_runs_are_booked_and_survive_reset_delete_and_a_restart(
    real_gateway: Any,
    make_gateway: Any,
    running_worker: Any,
    personas: Any,
    monkeypatch: Any,
) -> None:
    monkeypatch.setenv(TEST_TOKEN_ENV, real_gateway.token)
    gateway = await asyncio.to_thread(make_gateway, real_gateway.url)
    first = await running_worker()

    async def ready() -> bool:
        row = await Gateway.objects.aget(pk=gateway.pk)
        agent = await Agent.objects.filter(gateway=gateway, agent_id="main").aexists()
        return row.state == Gateway.State.CONNECTED and agent

    await wait_for(ready, timeout=30)
    key = f"agent:main:cc-usage-{uuid.uuid4().hex[:8]}"
    session = await Session.objects.select_related("gateway").acreate(
        gateway=gateway, key=key, agent_key="main"
    )
    page = Chat(session, personas["bob"])
    await page.open()
    try:
        for text in ("how much is this?", "and this one, a bit longer please?"):
            message_id = uuid.uuid4()
            assert (await page.send(text, message_id)).status_code == 200
            await page.frames_until(stored_reply(message_id), timeout=90)
    finally:
        await page.close()

    # The row's estimatedCostUsd is the last run's cost (2026.9.6): the session's total
    # is what the gateway adds up itself (its usage timeseries' cumulativeCost).
    async def matches() -> bool:
        row = await Session.objects.aget(pk=session.pk)
        booked = await sync_to_async(_ledger)(gateway, key)
        total = await asyncio.to_thread(_gateway_total, real_gateway, key)
        last = float(row.estimated_cost or 0)
        return 0 < last < total and abs(float(booked) - total) < 1e-5

    await wait_for(matches, timeout=60)
    row = await Session.objects.aget(pk=session.pk)
    assert row.estimated_cost and row.estimated_cost > 0
    # Two runs, each booked once under its id.
    runs = [
        r
        async for r in UsageEntry.objects.filter(session_key=key).values_list(
            "run_id", flat=True
        )
    ]
    assert len(runs) == 2 and all(runs) and len(set(runs)) == 2, runs
    assert await UsageEntry.objects.filter(
        session_key=key, person=personas["bob"]
    ).aexists()
    before = await sync_to_async(_today)(gateway)
    assert before > 0
    count = await UsageEntry.objects.acount()

    await calls.acall(
        gateway.pk, "sessions.reset", {"key": key}, user=personas["alice"]
    )

    async def was_reset() -> bool:
        now = await Session.objects.aget(pk=session.pk)
        return (now.session_id, now.input_tokens) != (row.session_id, row.input_tokens)

    await wait_for(was_reset, timeout=30)
    await asyncio.sleep(1.0)
    assert await sync_to_async(_today)(gateway) == before
    await calls.acall(
        gateway.pk, "sessions.delete", {"key": key}, user=personas["alice"]
    )

    async def gone() -> bool:
        now = await Session.objects.aget(pk=session.pk)
        return now.gone_at is not None

    await wait_for(gone, timeout=30)
    await asyncio.sleep(1.0)
    assert await sync_to_async(_today)(gateway) == before
    assert await UsageEntry.objects.acount() == count

    # Another worker takes over: it re-reads the counters and books nothing twice.
    first.stop()

    async def released() -> bool:
        return (
            await Gateway.objects.aget(pk=gateway.pk)
        ).state != Gateway.State.CONNECTED

    await wait_for(released, timeout=30)
    await running_worker()
    await wait_for(ready, timeout=30)
    await asyncio.sleep(2.0)
    assert await UsageEntry.objects.acount() == count
    assert await sync_to_async(_today)(gateway) == before


# -- a SIGKILLed worker process against the real gateway --------------------------------------

KILL_TOKEN_ENV = "CC_REALKILL_GATEWAY_TOKEN"
LEASE_SECONDS = 2.0
KILL_SETUP = """
from django.contrib.auth.models import Group, User
from fleet.models import Gateway
user = User.objects.create_user({username!r}, password={password!r})
user.groups.add(Group.objects.get(name="operator"))
gateway = Gateway.objects.create(name="real", url={url!r}, token_env={token_env!r})
print("gateway", gateway.pk)
"""


@dataclass
class _Layout(ProcessStack):
    """The process stack against the real gateway, on PostgreSQL and a Redis prefix of
    its own."""

    gw: RealGateway = field(kw_only=True)

    async def login(self) -> httpx.AsyncClient:
        http = httpx.AsyncClient(base_url=self.base, follow_redirects=False)
        page = await http.get("/accounts/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert token, page.text[:500]
        response = await http.post(
            "/accounts/login/",
            data={
                "username": self.username,
                "password": self.password,
                "csrfmiddlewaretoken": token.group(1),
            },
        )
        assert response.status_code == 302, response.text[:500]
        return http

    def holds(self, worker: Proc) -> bool:
        """`worker` holds the gateway and is connected (not a killed one's stale row)."""
        ((state, owner),) = self.query(
            "SELECT state, lease_owner FROM fleet_gateway WHERE id = %s",
            self.gateway_id,
        )
        return state == "connected" and f":{worker.pid}:" in f"{owner}:"

    def gateway_session(self, key: str) -> dict[str, Any] | None:
        """The session's row as the gateway itself lists it (its CLI, not our mirror)."""
        result = self.gw.cli(
            "gateway",
            "call",
            "sessions.list",
            "--json",
            "--params",
            json.dumps({"limit": 500}),
            timeout=60,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        rows = json.loads(result.stdout).get("sessions") or []
        return next((r for r in rows if r.get("key") == key), None)


@pytest.fixture
def layout(
    real_gateway: RealGateway, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[_Layout]:
    # tests/test_processes.py's module fixtures: a PostgreSQL database, a Redis prefix.
    db_url: str = request.getfixturevalue("database")
    layer: Layer = request.getfixturevalue("channel_layer")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "DATABASE_URL": db_url,
        "REDIS_URL": layer.url,
        "CHANNEL_LAYER_PREFIX": layer.prefix,
        "CONTROLCENTER_DATA_DIR": str(tmp_path),
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_DEBUG": "False",
        "OPENCLAW_GATEWAY_URL": "",
        "GATEWAY_LEASE_SECONDS": str(LEASE_SECONDS),
        "GATEWAY_WS_READY_TIMEOUT": "60",
        "GATEWAY_CALL_TIMEOUT": "20",
        "DB_APPLICATION_NAME": "cc-test-realkill",
        "LOG_LEVEL": "INFO",
        KILL_TOKEN_ENV: real_gateway.token,
    }
    layout: _Layout | None = None
    username, password = "olivia", secrets.token_urlsafe(12)
    try:
        for argv in (
            ["migrate", "--noinput", "-v0"],
            [
                "shell",
                "-c",
                KILL_SETUP.format(
                    username=username,
                    password=password,
                    url=real_gateway.url,
                    token_env=KILL_TOKEN_ENV,
                ),
            ],
        ):
            done = subprocess.run(
                [sys.executable, "manage.py", *argv],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        found = re.search(r"gateway (\d+)", done.stdout)
        assert found, done.stdout
        layout = _Layout(
            gw=real_gateway,
            env=env,
            db_url=db_url,
            base=f"http://127.0.0.1:{free_port()}",
            logs=tmp_path,
            gateway_id=int(found.group(1)),
            username=username,
            password=password,
        )
        yield layout
    finally:
        for proc in layout.procs if layout else []:
            if proc.popen.poll() is None:
                proc.popen.kill()
                proc.popen.wait()


def _final(conn: psycopg.Connection[Any], run_id: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM chat_message WHERE run_id = %s AND role = 'assistant'"
            " AND state = 'final'",
            (run_id,),
        ).fetchone()
        is not None
    )


def _kill_right_after_final(
    layout: _Layout, worker: Proc, run_id: str, timeout: float = 90.0
) -> dict[str, Any]:
    """Poll the database without a pause and SIGKILL `worker` the moment the run's final
    reply is stored: what the ledger held for the run at that moment tells which window of
    the final event's handling the kill hit."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(layout.db_url, autocommit=True) as conn:
        while not _final(conn, run_id):
            assert worker.popen.poll() is None, f"worker died:\n{worker.tail()}"
            assert time.monotonic() < deadline, f"no final reply:\n{worker.tail()}"
        worker.popen.send_signal(signal.SIGKILL)
        worker.popen.wait(10)
        ((by_run, rows),) = conn.execute(
            "SELECT count(*) FILTER (WHERE run_id = %s), count(*) FROM usage_usageentry",
            (run_id,),
        ).fetchall()
    return {"run_booked": by_run, "rows": rows}


def _gateway_total(gw: RealGateway, key: str) -> float:
    """The session's cumulative cost as the gateway adds it up (its usage timeseries)."""
    result = gw.cli(
        "gateway",
        "call",
        "sessions.usage.timeseries",
        "--json",
        "--params",
        json.dumps({"key": key}),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    points = json.loads(result.stdout).get("points") or []
    return float(points[-1]["cumulativeCost"]) if points else 0.0


@pytest.mark.timeout(600)
async def test_a_worker_process_sigkilled_mid_run_and_after_a_final_books_every_real_cost_once(
    layout: _Layout,
) -> None:
    """The production layout against the real gateway: runs through our chat; the worker
    SIGKILLed while a run streams (the gateway finishes it with nobody listening) and again
    the moment a run's final reply is stored (before its ledger row, or just after); a new
    worker each time, more runs. The ledger adds up to the gateway's own total for the
    session (each run's estimatedCostUsd), books each run id once, the day's total is its sum, nothing is negative."""
    web = layout.web()
    await until(layout.healthy, 60, "daphne answers /healthz", [web])
    worker = layout.worker()
    await until(lambda: layout.holds(worker), 90, "the worker connects", [worker])
    await until(
        lambda: bool(
            layout.query(
                "SELECT 1 FROM fleet_agent WHERE gateway_id = %s AND agent_id = 'main'",
                layout.gateway_id,
            )
        ),
        30,
        "the main agent is mirrored",
        [worker],
    )
    http = await layout.login()
    try:
        csrf = {"X-CSRFToken": http.cookies["csrftoken"]}
        made = await http.post(
            "/chat/new/",
            data={"gateway": str(layout.gateway_id), "agent": "main"},
            headers=csrf,
        )
        assert made.status_code == 302, made.text[:500]
        pk = int(made.headers["location"].rstrip("/").split("/")[-1])
        ((key,),) = layout.query("SELECT key FROM fleet_session WHERE id = %s", pk)

        async def send(text: str) -> str:
            message_id = str(uuid.uuid4())
            response = await http.post(
                f"/chat/{pk}/send/",
                data={"text": text, "message_id": message_id},
                headers=csrf,
            )
            assert response.status_code == 200, response.text[:500]
            return message_id

        def final(run_id: str) -> bool:
            with psycopg.connect(layout.db_url, autocommit=True) as conn:
                return _final(conn, run_id)

        # What the gateway itself says each run cost: on 2026.9.6 a session's counters
        # are its last run's usage (`lastRunId` names it), not a running total.
        cost_of: dict[str, float] = {}

        async def gateway_done(run_id: str) -> bool:
            row = await asyncio.to_thread(layout.gateway_session, key) or {}
            done = row.get("lastRunId") == run_id and row.get("status") == "done"
            if done:
                cost_of[run_id] = float(row.get("estimatedCostUsd") or 0)
            return done

        def model_requests() -> int:
            log = layout.gw.fake_model_log
            return log.read_text().count("\n") if log.exists() else 0

        # 1. An ordinary run, booked live.
        first = await send("[[fake:echo]] one two three four five [[/fake]]")
        await until(lambda: final(first), 90, "the first reply", [worker])
        await until(lambda: gateway_done(first), 60, "the gateway ends the first run")

        # 2. SIGKILL while a run streams (80 words, 50 ms apart): its final event and
        # its usage reach no worker; the gateway finishes it with nobody listening.
        requests = model_requests()
        words = " ".join(f"w{i}" for i in range(80))
        streaming = await send(f"[[fake:echo]] {words} [[/fake]]")
        await until(
            lambda: model_requests() > requests,
            90,
            "the model streams the second run",
            [worker],
        )
        await asyncio.sleep(1.0)
        worker.kill()
        assert not final(streaming), "the run ended before the kill"
        worker = layout.worker()
        await until(
            lambda: layout.holds(worker),
            LEASE_SECONDS + 90,
            "a new worker takes over",
            [worker],
        )
        await until(
            lambda: gateway_done(streaming), 90, "the gateway ends the killed run"
        )

        # 3. SIGKILL the moment a run's final reply is stored.
        third = await send("[[fake:echo]] six seven eight nine ten eleven [[/fake]]")
        window = await asyncio.to_thread(_kill_right_after_final, layout, worker, third)
        print(f"killed right after the final reply: {window}")
        await until(lambda: gateway_done(third), 60, "the gateway ends the third run")
        worker = layout.worker()
        await until(
            lambda: layout.holds(worker),
            LEASE_SECONDS + 90,
            "a third worker takes over",
            [worker],
        )

        # 4. One more run, sent the moment the worker is back (its catch-up may still be
        # under way), as long as the first: counters like the first run's.
        last = await send("[[fake:echo]] one two three four five [[/fake]]")
        await until(lambda: final(last), 90, "the last reply", [worker])
        await until(lambda: gateway_done(last), 60, "the gateway ends the last run")
    finally:
        await http.aclose()

    runs = [first, streaming, third, last]
    assert all(cost_of[r] > 0 for r in runs), cost_of
    expected = sum(cost_of[r] for r in runs)
    total = await asyncio.to_thread(_gateway_total, layout.gw, key)
    assert abs(total - expected) < 1e-6, (total, cost_of)  # the gateway's own sum

    def books() -> dict[str, Any]:
        ((booked, everything, negative, days, days_negative),) = layout.query(
            "SELECT (SELECT coalesce(sum(cost_usd), 0) FROM usage_usageentry"
            "        WHERE gateway_id = %s AND session_key = %s),"
            " (SELECT coalesce(sum(cost_usd), 0) FROM usage_usageentry"
            "        WHERE gateway_id = %s),"
            " (SELECT count(*) FROM usage_usageentry WHERE cost_usd < 0"
            "        OR input_tokens < 0 OR output_tokens < 0),"
            " (SELECT coalesce(sum(cost_usd), 0) FROM usage_usageday WHERE gateway_id = %s),"
            " (SELECT count(*) FROM usage_usageday WHERE cost_usd < 0 OR runs < 0"
            "        OR input_tokens < 0 OR output_tokens < 0)",
            layout.gateway_id,
            key,
            layout.gateway_id,
            layout.gateway_id,
        )
        twice = layout.query(
            "SELECT run_id, count(*) FROM usage_usageentry WHERE run_id <> ''"
            " GROUP BY run_id HAVING count(*) > 1"
        )
        by_run = dict(  # this session's: a shared real gateway holds others' runs
            layout.query(
                "SELECT run_id, count(*) FROM usage_usageentry WHERE run_id <> ''"
                " AND gateway_id = %s AND session_key = %s GROUP BY run_id",
                layout.gateway_id,
                key,
            )
        )
        return {
            "booked": float(booked),
            "days": float(days),
            "everything": float(everything),
            "negative": negative + days_negative,
            "twice": twice,
            "by_run": by_run,
        }

    async def settled() -> bool:
        return abs(books()["booked"] - expected) < 1e-6

    await until(settled, 60, "the ledger holds the gateway's cost", [worker])
    await asyncio.sleep(3.0)  # nothing books it a second time later
    found = books()
    print(f"gateway costs {cost_of}, ledger {found}")
    assert abs(found["booked"] - expected) < 1e-6, (cost_of, found)
    # The day's total is the ledger's sum (the gateway's: a shared real gateway may hold
    # other sessions with usage, which a first connect books from their history).
    assert found["days"] == found["everything"] >= found["booked"], found
    assert found["negative"] == 0, found
    assert found["twice"] == [], found
    # Each run booked once, under its id, at what the gateway says it cost.
    assert found["by_run"] == dict.fromkeys(runs, 1), found
    for run in runs:
        ((cost,),) = layout.query(
            "SELECT cost_usd FROM usage_usageentry WHERE run_id = %s", run
        )
        assert abs(float(cost) - cost_of[run]) < 1e-6, (run, cost, cost_of)
