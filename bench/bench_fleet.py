"""Benchmark of the fleet pages and their live updates.

    .venv/bin/python bench/bench_fleet.py [--sessions 10000] [--requests 200]
        [--updates 40] [--sockets 1,50,200]

1. Server time per request (Django test Client, logged in, in-process) for the fleet page
   and for session-list pages (htmx partial: first page, a deep page, a search, a filter)
   with 10,000 sessions in a fresh SQLite database.
2. The time from a `sessions.changed` leaving the gateway simulator to the fragment arriving
   in 1, 50 and 200 WebSocket clients of one `manage.py serve` process (daphne + worker,
   in-memory channel layer), p50/p99 over --updates changes.

Everything runs in a temporary data folder; nothing is kept."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
    return ordered[index]


def fmt(values: list[float]) -> str:
    return f"p50 {pct(values, 50):6.1f} ms   p99 {pct(values, 99):6.1f} ms   (n={len(values)})"


def fill(n_sessions: int) -> None:
    from django.utils import timezone

    from fleet.models import Agent, Gateway, Session

    # Disabled: it only holds the rows for the page timings. Enabled, the worker in the
    # update benchmark would keep failing to reach it, and each state change it pushed
    # would hold the measured notes in the sockets' coalescing window.
    gw = Gateway.objects.create(
        name="bench",
        url="ws://127.0.0.1:9",
        state="connected",
        protocol=4,
        enabled=False,
    )
    agents = [
        Agent.objects.create(gateway=gw, agent_id=f"agent{i}", model="fake-model")
        for i in range(5)
    ]
    now = timezone.now()
    kinds = ("direct", "group", "global")
    channels = ("telegram", "slack", "whatsapp", "discord", "webchat", "cron")
    rows = [
        Session(
            gateway=gw,
            key=f"agent:agent{i % 5}:{channels[i % 6]}:direct:{i:06d}",
            agent=agents[i % 5],
            agent_key=f"agent{i % 5}",
            label=f"session {i}",
            display_name=f"Person {i}",
            kind=kinds[i % 3],
            channel=channels[i % 6],
            model="fake-model",
            status="running" if i % 97 == 0 else "done",
            has_active_run=i % 97 == 0,
            input_tokens=1000 + i,
            output_tokens=300 + i,
            total_tokens=1300 + 2 * i,
            context_tokens=128000,
            updated_at=now - timedelta(seconds=i * 7),
        )
        for i in range(n_sessions)
    ]
    Session.objects.bulk_create(rows, batch_size=1000)


def bench_pages(requests: int) -> dict[str, list[float]]:
    from django.contrib.auth.models import Group, User
    from django.test import Client

    user = User.objects.create_user("bencher", password=secrets.token_urlsafe(8))
    user.groups.add(Group.objects.get(name="admin"))
    client = Client()
    client.force_login(user)
    htmx = {"HX-Request": "true"}
    cases: dict[str, tuple[str, dict[str, str]]] = {
        "fleet page (/)": ("/", {}),
        "list page 1 (htmx)": ("/", htmx),
        "list page 100 (htmx)": ("/?page=100", htmx),
        "list search q=Person 12 (htmx)": ("/?q=Person+12", htmx),
        "list filter status+channel (htmx)": ("/?status=running&channel=slack", htmx),
    }
    results: dict[str, list[float]] = {}
    for name, (url, headers) in cases.items():
        for _ in range(5):  # warm up
            assert client.get(url, headers=headers).status_code == 200
        times = []
        for _ in range(requests):
            t0 = time.perf_counter()
            response = client.get(url, headers=headers)
            times.append((time.perf_counter() - t0) * 1000)
            assert response.status_code == 200
        results[name] = times
    return results


def cpu_ms(pid: int) -> float:
    """User plus system CPU time of a process so far, in ms: a figure that, unlike latency,
    other load on the machine barely moves."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def session_cookie() -> str:
    from django.conf import settings
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.auth.models import User
    from django.contrib.sessions.backends.db import SessionStore

    user = User.objects.get(username="bencher")
    store = SessionStore()
    store[SESSION_KEY] = str(user.pk)
    # The project's own backend: a session naming another one is logged out.
    store[BACKEND_SESSION_KEY] = settings.AUTHENTICATION_BACKENDS[0]
    store[HASH_SESSION_KEY] = user.get_session_auth_hash()
    store.create()
    return str(store.session_key)


async def ask(clients: asyncio.subprocess.Process, line: str) -> str:
    """One command to the socket process, and its one-line answer."""
    assert clients.stdin is not None and clients.stdout is not None
    clients.stdin.write(line.encode() + b"\n")
    await clients.stdin.drain()
    return (await asyncio.wait_for(clients.stdout.readline(), 60)).decode()


async def bench_updates(
    data_dir: Path, socket_counts: list[int], updates: int
) -> dict[int, tuple[list[float], float]]:
    from channels.db import database_sync_to_async

    from fleet.gateway.testing import FakeGateway
    from fleet.models import Session

    token = secrets.token_urlsafe(16)
    sim = FakeGateway(token=token, agents=2, sessions=50)
    await sim.start(host="127.0.0.1", port=0)
    port = free_port()
    env = {
        **os.environ,
        "CONTROLCENTER_DATA_DIR": str(data_dir),
        "OPENCLAW_GATEWAY_URL": sim.url,
        "OPENCLAW_GATEWAY_TOKEN": token,
        "REDIS_URL": "",
        "DJANGO_DEBUG": "False",
        "LOG_LEVEL": "WARNING",
    }
    log = open(data_dir / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port), "--no-migrate"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    results: dict[int, list[float]] = {}
    cpu: dict[int, float] = {}
    try:
        key = sim.main_session_key

        async def row_pk() -> int | None:
            return (
                await Session.objects.filter(key=key, gateway__url=sim.url)
                .values_list("pk", flat=True)
                .afirst()
            )

        deadline = time.monotonic() + 60
        pk = None
        while pk is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the worker did not sync the simulator in 60 s")
            await asyncio.sleep(0.5)
            pk = await row_pk()
        cookie = await database_sync_to_async(session_cookie)()
        marker = f'id="session-{pk}"'
        # The list shows this gateway only, so the changed row is on the visible page.
        gateway_id = (
            await Session.objects.filter(pk=pk)
            .values_list("gateway_id", flat=True)
            .aget()
        )
        url = f"ws://127.0.0.1:{port}/ws/fleet/?gateway={gateway_id}"
        for count in socket_counts:
            # The sockets live in a process of their own, so that reading 200 frames does
            # not hold up the simulator (perf_counter is CLOCK_MONOTONIC: one clock for both).
            clients = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--clients",
                str(count),
                "--url",
                url,
                "--marker",
                marker,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "BENCH_COOKIE": cookie},
            )
            assert clients.stdin is not None and clients.stdout is not None

            assert (
                await asyncio.wait_for(clients.stdout.readline(), 120)
            ) == b"ready\n"
            times: list[float] = []
            cpu_before = cpu_ms(proc.pid)
            for i in range(updates):
                label = f"bench-{count}-{i}-{secrets.token_hex(3)}"
                assert await ask(clients, f"arm {label}") == "armed\n"
                t0 = time.perf_counter()
                await sim.emit_session_changed(key, label=label)
                arrived = [float(t) for t in (await ask(clients, "collect")).split()]
                times.extend((t - t0) * 1000 for t in arrived)
                if os.environ.get("BENCH_VERBOSE"):
                    print(f"    update {i}: max {max(arrived) - t0:.4f} s", flush=True)
                # Leave the coalescing window so each change is measured on its own.
                await asyncio.sleep(0.35)
            results[count] = times
            cpu[count] = (cpu_ms(proc.pid) - cpu_before) / updates
            await ask(clients, "quit")
            await clients.wait()
    finally:
        proc.terminate()
        proc.wait(15)
        await sim.stop()
    return {count: (times, cpu[count]) for count, times in results.items()}


async def run_clients(count: int, url: str, marker: str) -> None:
    """The socket side: connect `count` sockets, then per line on stdin: `arm <label>`
    starts waiting for the row with that label on every socket; `collect` prints when each
    saw it (perf_counter, one line)."""
    from websockets.asyncio.client import connect

    origin = url.replace("ws://", "http://").split("/ws/")[0]
    sockets = [
        await connect(
            url,
            origin=origin,  # type: ignore[arg-type]
            additional_headers={"Cookie": f"sessionid={os.environ['BENCH_COOKIE']}"},
            max_size=None,
        )
        for _ in range(count)
    ]
    # Drain the state sent on connect.
    await asyncio.sleep(1.0 + count * 0.01)
    for ws in sockets:
        while True:
            try:
                await asyncio.wait_for(ws.recv(), 0.05)
            except TimeoutError:
                break

    async def wait_for_row(ws: Any, label: str) -> float:
        while True:
            frame = await ws.recv()
            if marker in frame and label in frame:
                return time.perf_counter()

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    print("ready", flush=True)
    waiters: list[asyncio.Task[float]] = []
    while line := (await reader.readline()).decode().strip():
        command, _, arg = line.partition(" ")
        if command == "arm":
            waiters = [asyncio.create_task(wait_for_row(ws, arg)) for ws in sockets]
            await asyncio.sleep(0.05)
            print("armed", flush=True)
        elif command == "collect":
            arrived = await asyncio.wait_for(asyncio.gather(*waiters), 30)
            print(" ".join(f"{t:.6f}" for t in arrived), flush=True)
        elif command == "quit":
            print("bye", flush=True)
            break
    for ws in sockets:
        await ws.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--updates", type=int, default=40)
    parser.add_argument("--sockets", default="1,50,200")
    parser.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--marker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clients:
        asyncio.run(run_clients(args.clients, args.url, args.marker))
        return

    data_dir = Path(tempfile.mkdtemp(prefix="cc-bench-"))
    os.environ["CONTROLCENTER_DATA_DIR"] = str(data_dir)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlcenter.settings")
    os.environ["DJANGO_DEBUG"] = "True"  # static files from the finders
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"  # setup code below is plain sync
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.test.utils import setup_test_environment

    settings.DEBUG = False  # no query log in the timings
    setup_test_environment()
    call_command("migrate", interactive=False, verbosity=0)
    t0 = time.perf_counter()
    fill(args.sessions)
    print(
        f"filled {args.sessions} sessions in {time.perf_counter() - t0:.1f} s "
        f"({settings.DATABASES['default']['ENGINE'].rsplit('.', 1)[-1]})"
    )
    print(f"\nServer time per request, {args.requests} requests each, logged in:")
    for name, times in bench_pages(args.requests).items():
        print(f"  {name:36s} {fmt(times)}")

    counts = [int(c) for c in args.sockets.split(",") if c]
    print(
        f"\nsessions.changed -> fragment in the browser sockets, {args.updates} changes:"
    )
    for count, (times, cpu) in asyncio.run(
        bench_updates(data_dir, counts, args.updates)
    ).items():
        print(
            f"  {count:4d} socket{'s' if count > 1 else ' '}  {fmt(times)}"
            f"   server CPU {cpu:5.1f} ms/update"
        )
    print(f"load average: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()
