"""Benchmark of fan-out latency across processes: from a `sessions.changed` leaving the
gateway simulator to the changed row arriving in 1, 100 and 500 browser sockets.

    .venv/bin/python bench/bench_fanout.py [--sockets 1,100,500] [--updates 30]
        [--gap 0.5] [--pg-url ...] [--redis-url redis://127.0.0.1:6379/9] [--db postgres]

Layout, as in production: a web process (`daphne controlcenter.asgi:application`) and a
worker process (`manage.py gatewayworker`) sharing PostgreSQL (a database made for the run)
and Redis (the channel layer, a prefix of its own). The simulator runs in the bench process,
which otherwise only waits. The WebSocket clients run in a separate client process (this
script with --clients), so that they do not share the bench's or the simulator's event loop.

Each of the N sockets is logged in (a session cookie of an admin made for the run) and open
on `/ws/fleet/?gateway=<id>`. One change at a time, --gap seconds apart (more than the
consumer's 0.25 s coalescing window): the simulator emits a new label for one session; a
socket's latency is the time until a frame holding that session's row (`id="session-<pk>"`)
with the new label arrives. Both processes read CLOCK_MONOTONIC (time.monotonic), which is
one clock for the whole machine. Also the CPU time the web and worker processes spent per
change (from /proc/<pid>/stat, over the changes and one second after), and the sockets the
server dropped. A change that arrives after the next one was sent is merged into it by the
consumer's coalescing: it then counts as "not arrived". Prints a markdown table with
p50/p99 and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (  # noqa: E402
    DEFAULT_PG_URL,
    DEFAULT_REDIS_URL,
    REPO,
    cpu_seconds,
    django_setup,
    free_port,
    loadavg,
    manage,
    pct,
    production_env,
    stop,
    wait_port,
)

LABEL = re.compile(r"fanout-\d+-\d+-[0-9a-f]+")


# -- the client process -------------------------------------------------------------------


async def clients(args: argparse.Namespace) -> None:
    """Open --count sockets, say READY, record when each label arrives at each socket, and
    after DONE on stdin (and every socket having every label, or --timeout) print them."""
    from websockets.asyncio.client import connect

    marker = args.marker
    arrivals: list[dict[str, float]] = []
    sockets = []
    # A few at a time: each connect makes the web process check the user and render the
    # page's state, and daphne drops a handshake the application has not accepted in 5 s.
    started = time.monotonic()
    for start in range(0, args.count, 10):
        batch = await asyncio.gather(
            *(
                connect(
                    args.url,
                    origin=args.origin,
                    additional_headers={"Cookie": f"sessionid={args.cookie}"},
                    max_size=None,
                    open_timeout=60,
                )
                for _ in range(start, min(args.count, start + 10))
            )
        )
        sockets.extend(batch)
    connect_seconds = time.monotonic() - started
    for _ in sockets:
        arrivals.append({})

    async def read(i: int, ws: Any) -> None:
        seen = arrivals[i]
        async for frame in ws:
            now = time.monotonic()
            if isinstance(frame, bytes) or marker not in frame:
                continue
            for label in LABEL.findall(frame):
                seen.setdefault(label, now)

    readers = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(sockets)]
    # The state sent on connect: let it arrive before the first change.
    await asyncio.sleep(1.0 + args.count * 0.005)
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.readline)
    expected = set(line.split()[1:]) if line.startswith("DONE") else set()
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and any(
        not expected <= seen.keys() for seen in arrivals
    ):
        await asyncio.sleep(0.05)
    dropped = sum(1 for task in readers if task.done())  # the server closed them
    for task in readers:
        task.cancel()
    for ws in sockets:
        await ws.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        "RESULT "
        + json.dumps(
            {
                "arrivals": arrivals,
                "cpu_seconds": usage.ru_utime + usage.ru_stime,
                "connect_seconds": connect_seconds,
                "dropped": dropped,
            }
        ),
        flush=True,
    )


# -- the bench ------------------------------------------------------------------------------


def session_cookie() -> str:
    from django.conf import settings
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.auth.models import Group, User
    from django.contrib.sessions.backends.db import SessionStore

    user = User.objects.create_user("bencher", password=secrets.token_urlsafe(12))
    user.groups.add(Group.objects.get(name="admin"))
    store = SessionStore()
    store[SESSION_KEY] = str(user.pk)
    # The project's own backend: a session naming another one is logged out.
    store[BACKEND_SESSION_KEY] = settings.AUTHENTICATION_BACKENDS[0]
    store[HASH_SESSION_KEY] = user.get_session_auth_hash()
    store.create()
    return str(store.session_key)


async def measure(
    args: argparse.Namespace, env: dict[str, str], logs: Path
) -> list[dict[str, Any]]:
    from channels.db import database_sync_to_async

    from fleet.gateway.testing import FakeGateway
    from fleet.models import Session

    sim = FakeGateway(token=env["OPENCLAW_GATEWAY_TOKEN"], agents=2, sessions=50)
    await sim.start(host="127.0.0.1", port=0)
    port = free_port()
    procs = {
        "web": manage_daphne(port, env, logs / "web.log"),
        "worker": manage(
            ["gatewayworker"],
            {**env, "OPENCLAW_GATEWAY_URL": sim.url},
            logs / "worker.log",
        ),
    }
    results: list[dict[str, Any]] = []
    try:
        wait_port(port, procs["web"])
        key = sim.main_session_key
        deadline = time.monotonic() + 60
        row = None
        while row is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not sync; see {logs}")
            await asyncio.sleep(0.5)
            row = (
                await Session.objects.filter(key=key)
                .values("pk", "gateway_id")
                .afirst()
            )
        cookie = await database_sync_to_async(session_cookie)()
        for count in args.sockets:
            client = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--clients",
                    "--count",
                    str(count),
                    "--url",
                    f"ws://127.0.0.1:{port}/ws/fleet/?gateway={row['gateway_id']}",
                    "--origin",
                    f"http://127.0.0.1:{port}",
                    "--cookie",
                    cookie,
                    "--marker",
                    f'id="session-{row["pk"]}"',
                ],
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert client.stdin is not None and client.stdout is not None
            ready = await asyncio.to_thread(client.stdout.readline)
            if not ready.startswith("READY"):
                raise RuntimeError(f"the client process failed ({ready!r}); see {logs}")
            emitted: dict[str, float] = {}
            load = loadavg()
            cpu0 = {name: cpu_seconds(p.pid) for name, p in procs.items()}
            for i in range(args.updates):
                label = f"fanout-{count}-{i}-{secrets.token_hex(3)}"
                emitted[label] = time.monotonic()
                await sim.emit_session_changed(key, label=label)
                await asyncio.sleep(args.gap)
            await asyncio.sleep(1.0)  # the last change arrives
            cpu = {
                name: (cpu_seconds(p.pid) - cpu0[name]) / args.updates
                for name, p in procs.items()
            }
            client.stdin.write("DONE " + " ".join(emitted) + "\n")
            client.stdin.flush()
            out = await asyncio.to_thread(client.stdout.read)
            client.wait(30)
            found = [line for line in out.splitlines() if line.startswith("RESULT ")]
            if not found:
                raise RuntimeError(f"the client process printed no result: {out!r}")
            data = json.loads(found[-1][len("RESULT ") :])
            latencies = []
            missing = 0
            missing_by_update: dict[int, int] = {}
            for seen in data["arrivals"]:
                for i, (label, t0) in enumerate(emitted.items()):
                    if label in seen:
                        latencies.append((seen[label] - t0) * 1000)
                    else:
                        missing += 1
                        missing_by_update[i] = missing_by_update.get(i, 0) + 1
            if missing and args.verbose:
                print(f"{count} sockets: not arrived, by change: {missing_by_update}")
            results.append(
                {
                    "sockets": count,
                    "updates": args.updates,
                    "latencies": latencies,
                    "missing": missing,
                    "client_cpu": data["cpu_seconds"],
                    "web_cpu_ms": cpu["web"] * 1000,
                    "worker_cpu_ms": cpu["worker"] * 1000,
                    "connect_seconds": data["connect_seconds"],
                    "dropped": data["dropped"],
                    "load": load,
                    "load_after": loadavg(),
                }
            )
    finally:
        for proc in procs.values():
            stop(proc)
        await sim.stop()
    return results


def manage_daphne(
    port: int, env: dict[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daphne",
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "controlcenter.asgi:application",
        ],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sockets", default="1,100,500")
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument(
        "--gap", type=float, default=0.5, help="seconds between changes (> 0.25)"
    )
    parser.add_argument("--db", default="postgres", help="postgres (or sqlite)")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--verbose", action="store_true")
    # The client process.
    parser.add_argument("--clients", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--origin", help=argparse.SUPPRESS)
    parser.add_argument("--cookie", help=argparse.SUPPRESS)
    parser.add_argument("--marker", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=20, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clients:
        asyncio.run(clients(args))
        return
    args.sockets = [int(c) for c in args.sockets.split(",") if c]

    logs = Path(tempfile.mkdtemp(prefix="cc-bench-fanout-"))
    with production_env(
        args.db, args.pg_url, args.redis_url, "bench_fanout", "OPENCLAW_GATEWAY_TOKEN"
    ) as env:
        django_setup(env)
        from django.db import connection

        vendor = connection.vendor
        try:
            rows = asyncio.run(measure(args, env, logs))
        finally:
            from django.db import connections

            connections.close_all()

    print(
        f"\n`sessions.changed` → fragment in N browser sockets: daphne + gatewayworker, "
        f"{vendor}, Redis; clients in their own process (logs: {logs}):\n"
    )
    print(
        "| sockets | changes | p50 | p99 | max | not arrived (sockets dropped) "
        "| CPU per change: web / worker | connect all | client CPU "
        "| load avg before / after |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lat = r["latencies"]
        print(
            f"| {r['sockets']} | {r['updates']} | {pct(lat, 50):.1f} ms | **{pct(lat, 99):.1f} ms** "
            f"| {max(lat):.1f} ms | {r['missing']} ({r['dropped']}) "
            f"| {r['web_cpu_ms']:.0f} / {r['worker_cpu_ms']:.0f} ms "
            f"| {r['connect_seconds']:.1f} s | {r['client_cpu']:.1f} s "
            f"| {r['load']} / {r['load_after']} |"
        )


if __name__ == "__main__":
    main()
