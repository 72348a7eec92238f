"""Memory of the web and worker processes over a long event run, and the token relay's
overhead against a direct client on the real gateway.

    .venv/bin/python bench/bench_memory.py [--events 100000] [--rate 500] [--sessions 1000]
        [--sockets 20] [--warmup 0.1] [--pg-url ...] [--redis-url ...]
    .venv/bin/python bench/bench_memory.py --relay [--runs 20]

Memory: a web process (`daphne controlcenter.asgi:application`) and a worker process
(`manage.py gatewayworker`) on PostgreSQL (a database made for the run) and Redis, the
simulator in the bench process emitting --events `sessions.changed` (full rows, a new label
each, cycling over --sessions sessions) at --rate per second, and --sockets logged-in
browser sockets on the fleet page in a client process (bench_fanout.py's), so the web
process renders and pushes all along. VmRSS of both processes is read from
/proc/<pid>/status every --sample seconds. Reported per process: RSS after the initial sync,
after the warm-up (the first --warmup share of the events), at the end, the highest, and the
growth from warm-up to the end [target: at most 5 %].

--relay: starts the real OpenClaw gateway (scripts/realgw/start.sh, installed by
scripts/realgw/setup.sh; on free ports, a fresh state directory and a random token) and runs
bench/bench_chat.py --gateway against it: time to first token through the Control Center
against a client connected straight to the gateway (the ratio), and each delta's lag.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
    django_setup,
    free_port,
    loadavg,
    manage,
    production_env,
    rss_kib,
    stop,
    wait_port,
)


async def measure(
    args: argparse.Namespace, env: dict[str, str], logs: Path
) -> dict[str, Any]:
    from bench_fanout import manage_daphne, session_cookie
    from channels.db import database_sync_to_async

    from fleet.gateway.testing import FakeGateway
    from fleet.models import Session

    sim = FakeGateway(
        token=env["OPENCLAW_GATEWAY_TOKEN"], agents=5, sessions=args.sessions
    )
    await sim.start(host="127.0.0.1", port=0)
    port = free_port()
    procs = {
        "web (daphne)": manage_daphne(port, env, logs / "web.log"),
        "worker (gatewayworker)": manage(
            ["gatewayworker"],
            {**env, "OPENCLAW_GATEWAY_URL": sim.url},
            logs / "worker.log",
        ),
    }
    samples: dict[str, list[tuple[int, int]]] = {name: [] for name in procs}
    emitted = 0
    client = None
    try:
        wait_port(port, procs["web (daphne)"])
        deadline = time.monotonic() + 120
        while (
            await Session.objects.filter(gateway__url=sim.url).acount() < args.sessions
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not sync; see {logs}")
            await asyncio.sleep(0.5)
        row = (
            await Session.objects.filter(key=sim.main_session_key)
            .values("pk", "gateway_id")
            .afirst()
        )
        assert row is not None
        cookie = await database_sync_to_async(session_cookie)()
        if args.sockets:
            client = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).resolve().parent / "bench_fanout.py"),
                    "--clients",
                    "--count",
                    str(args.sockets),
                    "--url",
                    f"ws://127.0.0.1:{port}/ws/fleet/?gateway={row['gateway_id']}",
                    "--origin",
                    f"http://127.0.0.1:{port}",
                    "--cookie",
                    cookie,
                    "--marker",
                    "id=",
                ],
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert client.stdout is not None
            ready = await asyncio.to_thread(client.stdout.readline)
            if not ready.startswith("READY"):
                raise RuntimeError(f"the client process failed; see {logs}")
        keys = sim.session_keys()

        backlog: list[int] = []

        async def sample() -> None:
            for name, proc in procs.items():
                samples[name].append((emitted, rss_kib(proc.pid)))
            if emitted:
                # How far the worker is behind: the newest change it has written.
                applied = max(
                    [
                        int(label.rsplit("-", 1)[1])
                        async for label in Session.objects.filter(
                            gateway__url=sim.url, label__startswith=f"m{tag}-"
                        ).values_list("label", flat=True)
                    ],
                    default=-1,
                )
                backlog.append(emitted - 1 - applied)

        tag = secrets.token_hex(2)
        await sample()  # after the initial sync, sockets open
        load_start = loadavg()
        t0 = time.monotonic()
        next_sample = t0 + args.sample
        while emitted < args.events:
            # Emit what is due at --rate, in small bursts every 10 ms.
            due = min(args.events, int((time.monotonic() - t0) * args.rate))
            while emitted < due:
                await sim.emit_session_changed(
                    keys[emitted % len(keys)], label=f"m{tag}-{emitted}"
                )
                emitted += 1
            if time.monotonic() >= next_sample:
                await sample()
                next_sample += args.sample
            await asyncio.sleep(0.01)
        emit_seconds = time.monotonic() - t0
        # Until the worker has written the last change.
        last_key, last_label = keys[(emitted - 1) % len(keys)], f"m{tag}-{emitted - 1}"
        while not await Session.objects.filter(
            gateway__url=sim.url, key=last_key, label=last_label
        ).aexists():
            if time.monotonic() - t0 > emit_seconds + 120:
                raise RuntimeError("the worker did not catch up in 120 s")
            await asyncio.sleep(0.2)
        caught_up = time.monotonic() - t0 - emit_seconds
        await asyncio.sleep(2.0)  # pushes and renders of the last changes
        await sample()
        dropped = None
        if client is not None:
            assert client.stdin is not None and client.stdout is not None
            client.stdin.write("DONE\n")
            client.stdin.flush()
            out = await asyncio.to_thread(client.stdout.read)
            found = [line for line in out.splitlines() if line.startswith("RESULT ")]
            if found:
                dropped = json.loads(found[-1][len("RESULT ") :])["dropped"]
        return {
            "samples": samples,
            "emit_seconds": emit_seconds,
            "caught_up": caught_up,
            "max_backlog": max(backlog, default=0),
            "dropped": dropped,
            "load_start": load_start,
            "load_end": loadavg(),
        }
    finally:
        if client is not None and client.poll() is None:
            client.kill()
        for proc in procs.values():
            stop(proc)
        await sim.stop()


def memory(args: argparse.Namespace) -> None:
    logs = Path(tempfile.mkdtemp(prefix="cc-bench-memory-"))
    with production_env(
        "postgres",
        args.pg_url,
        args.redis_url,
        "bench_memory",
        "OPENCLAW_GATEWAY_TOKEN",
    ) as env:
        django_setup(env)
        try:
            result = asyncio.run(measure(args, env, logs))
        finally:
            from django.db import connections

            connections.close_all()

    warm_at = int(args.events * args.warmup)
    print(
        f"\n{args.events} `sessions.changed` at {args.rate}/s over {args.sessions} sessions "
        f"(emitted in {result['emit_seconds']:.0f} s; the worker caught up "
        f"{result['caught_up']:.1f} s after the last; at most {result['max_backlog']} events "
        f"behind at a sample), {args.sockets} fleet sockets "
        f"(dropped by the server: {result['dropped']}); daphne + gatewayworker, PostgreSQL, "
        f"Redis; RSS from /proc/<pid>/status every {args.sample:g} s (logs: {logs}):\n"
    )
    print(
        f"| process | RSS after sync | after warm-up ({warm_at} events) | at the end | highest "
        "| growth after warm-up (≤ 5 %) | load avg start / end |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, points in result["samples"].items():
        start = points[0][1]
        warm = next((rss for n, rss in points if n >= warm_at), points[-1][1])
        end = points[-1][1]
        high = max(rss for _, rss in points)
        growth = (end - warm) / warm * 100
        print(
            f"| {name} | {start / 1024:.1f} MiB | {warm / 1024:.1f} MiB | {end / 1024:.1f} MiB "
            f"| {high / 1024:.1f} MiB | **{growth:+.1f} %** "
            f"| {result['load_start']} / {result['load_end']} |"
        )
    if args.verbose:
        for name, points in result["samples"].items():
            print(f"\n{name}: " + ", ".join(f"{n}:{rss // 1024}" for n, rss in points))


async def seed_main_session(url: str, token: str) -> None:
    from fleet.gateway.client import ConnectOptions, GatewayConnection
    from fleet.gateway.identity import DeviceKey
    from fleet.gateway.protocol import Event

    finished = asyncio.Event()

    async def on_event(event: Event) -> None:
        payload = event.payload if isinstance(event.payload, dict) else {}
        if event.event == "chat" and payload.get("state") in (
            "final",
            "error",
            "aborted",
        ):
            finished.set()

    conn = GatewayConnection(
        ConnectOptions(url=url, token=token, device=DeviceKey.generate()), on_event
    )
    await conn.connect()
    reader = asyncio.create_task(conn.run())
    await conn.request(
        "chat.send",
        {
            "sessionKey": "agent:main:main",
            "message": "hello",
            "idempotencyKey": secrets.token_hex(8),
        },
    )
    await asyncio.wait_for(finished.wait(), 60)
    await conn.close()
    await reader


def relay(args: argparse.Namespace) -> None:
    root = os.environ.get("REALGW_ROOT", "/tmp/controlcenter-realgw")
    scripts = REPO / "scripts" / "realgw"
    if not (Path(root) / "oc").exists():
        raise SystemExit(
            "The real gateway is not installed: run scripts/realgw/setup.sh "
            "(REALGW_ROOT names the install folder)."
        )
    run_dir = Path(tempfile.mkdtemp(prefix="cc-bench-realgw-"))
    port, fake_port = free_port(), free_port()
    token_env = "BENCH_REALGW_GATEWAY_TOKEN"
    env = {
        **os.environ,
        "ROOT": root,
        "RUN_DIR": str(run_dir),
        "PORT": str(port),
        "FAKE_PORT": str(fake_port),
        "OPENCLAW_GATEWAY_TOKEN": secrets.token_urlsafe(24),
        "WAIT_SECONDS": "180",
    }
    env[token_env] = env["OPENCLAW_GATEWAY_TOKEN"]
    print(f"starting the real gateway on :{port} (load avg {loadavg()})", flush=True)
    subprocess.run([str(scripts / "start.sh"), "--background"], env=env, check=True)
    try:
        time.sleep(5)  # "gateway starting" refusals for a moment after /healthz
        # A fresh gateway has no sessions: one message makes agent:main:main.
        asyncio.run(seed_main_session(f"ws://127.0.0.1:{port}", env[token_env]))
        cmd = [
            sys.executable,
            str(REPO / "bench" / "bench_chat.py"),
            "--gateway",
            f"ws://127.0.0.1:{port}",
            "--token-env",
            token_env,
            "--runs",
            str(args.runs),
        ]
        print(f"load avg before: {loadavg()}", flush=True)
        subprocess.run(cmd, env=env, cwd=REPO, check=False)
        print(f"load avg after: {loadavg()}", flush=True)
    finally:
        subprocess.run([str(scripts / "stop.sh")], env=env, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=500.0, help="events per second")
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--sockets", type=int, default=20)
    parser.add_argument("--warmup", type=float, default=0.1, help="share of the events")
    parser.add_argument("--sample", type=float, default=1.0, help="seconds")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--verbose", action="store_true", help="print every sample")
    parser.add_argument(
        "--relay",
        action="store_true",
        help="the token relay on the real gateway instead",
    )
    parser.add_argument("--runs", type=int, default=20, help="chat runs with --relay")
    args = parser.parse_args()
    if args.relay:
        relay(args)
    else:
        memory(args)


if __name__ == "__main__":
    main()
