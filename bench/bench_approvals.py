"""Exec approval fan-out: from `exec.approval.requested` leaving the simulator to the approval
card in N open chat pages (default 50), in one process (the shape of `serve --demo`: the
simulator, the worker and the pages' consumers on one event loop, SQLite, in-memory layer).

    .venv/bin/python bench/bench_approvals.py [--pages 50] [--requests 20]

t0 is taken just before the simulator broadcasts the request; each page's time is when its
socket receives the card frame that names the command. Reported: p50, p99, max over
pages x requests. Target: p99 under 200 ms on the 2-core machine."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from _common import loadavg, pct  # noqa: E402

TOKEN_ENV = "BENCH_APPROVALS_GATEWAY_TOKEN"


async def run(pages: int, requests: int) -> list[float]:
    from asgiref.sync import sync_to_async
    from channels.routing import URLRouter
    from channels.testing import WebsocketCommunicator
    from django.contrib.auth.models import Group, Permission, User

    from chat.routing import websocket_urlpatterns
    from fleet.gateway.testing import FakeGateway
    from fleet.models import Gateway, Session
    from fleet.worker import Worker

    sim = FakeGateway(token=os.environ[TOKEN_ENV], agents=1, sessions=3)
    await sim.start(host="127.0.0.1", port=0)

    def setup() -> tuple[Any, Any]:
        user = User.objects.create_user("bench-operator")
        group, _ = Group.objects.get_or_create(name="operator")
        group.permissions.add(
            Permission.objects.get(
                content_type__app_label="approvals", codename="decide"
            )
        )
        user.groups.add(group)
        gateway = Gateway.objects.create(name="bench", url=sim.url, token_env=TOKEN_ENV)
        return user, gateway

    user, gateway = await sync_to_async(setup)()
    worker = Worker(step_interval=0.2)
    worker_task = asyncio.create_task(worker.run())
    while (
        not sim._approval_clients()
        or not await Session.objects.filter(
            gateway=gateway, key=sim.main_session_key
        ).aexists()
    ):
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    session = await Session.objects.aget(gateway=gateway, key=sim.main_session_key)
    sockets = []
    for _ in range(pages):
        ws = WebsocketCommunicator(
            URLRouter(websocket_urlpatterns), f"/ws/chat/{session.pk}/"
        )
        ws.scope["user"] = user
        ok, _ = await ws.connect()
        assert ok
        sockets.append(ws)
    await asyncio.sleep(1.0)
    for ws in sockets:  # drop what the pages got on connect
        while not await ws.receive_nothing(timeout=0.05):
            await ws.receive_from()

    samples: list[float] = []

    async def card_on(ws: Any, needle: str, t0: float) -> float:
        while True:
            frame = await ws.receive_from(timeout=10)
            if needle in frame and 'id="chat-approvals"' in frame:
                return time.perf_counter() - t0

    for n in range(requests):
        needle = f"bench-{n}-{secrets.token_hex(3)}"
        t0 = time.perf_counter()
        sim.request_approval(f"echo {needle}", agent_id="main")
        # request_approval names the main session of the agent; the card names the command.
        samples += await asyncio.gather(*(card_on(ws, needle, t0) for ws in sockets))
        await asyncio.sleep(0.3)
        for ws in sockets:
            while not await ws.receive_nothing(timeout=0.01):
                await ws.receive_from()
    for ws in sockets:
        await ws.disconnect()
    worker.stop()
    await asyncio.wait_for(worker_task, 10)
    await sim.stop()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=50)
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-approvals-")
    os.environ["DATABASE_URL"] = f"sqlite:///{tmp}/db.sqlite3"
    os.environ.pop("REDIS_URL", None)
    os.environ[TOKEN_ENV] = secrets.token_urlsafe(16)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlcenter.settings")
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    samples = asyncio.run(run(args.pages, args.requests))
    ms = [s * 1000 for s in samples]
    print(
        f"approval card in {args.pages} pages x {args.requests} requests: "
        f"p50 {pct(ms, 50):.1f} ms, p99 {pct(ms, 99):.1f} ms, max {max(ms):.1f} ms "
        f"(load {loadavg()})"
    )


if __name__ == "__main__":
    main()
