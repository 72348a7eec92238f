"""Benchmark of many gateways on one worker, then two (issue 16).

    .venv/bin/python bench/bench_many.py [--gateways 50] [--sessions 1000] [--steady 30]
        [--sockets 200] [--updates 20] [--pg-url ...] [--redis-url ...]

50 simulated gateways (all in one child process of their own, one FakeGateway each on its
own port, driven over a pipe: this process's loop only measures) with --sessions sessions
each; PostgreSQL (a database made for the run) and Redis (a prefix of the
run's own); `manage.py gatewayworker` and daphne as child processes, as in production.

1. One worker. Its RSS with no gateway, then all gateways enabled at once: the time until
   every gateway is connected and every session is in the database (the initial sync).
2. Steady state: one `sessions.changed` per second per gateway for --steady seconds: the
   worker's CPU (% of one core), RSS and its growth per gateway, threads, and database
   connections open (pg_stat_activity by application_name).
3. The fleet page (50 gateways: the compact table) with a logged-in client: p50 / p99.
4. --updates changes to one session, 0.5 s apart, to --sockets fleet sockets in a client
   process (bench_fanout.py's): p50 / p99 from the change leaving the simulator to the row in
   each socket.
5. A second worker: the time until the leases split (each at most ceil(n / 2) + margin, all
   connected), then the steady state again, figures per worker.
Prints markdown tables with the load average. A phase that fails is reported as such and
the next one still runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
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
    rss_kib,
    stop,
    wait_port,
)
from bench_fanout import manage_daphne  # noqa: E402

TOKEN_ENV = "BENCH_MANY_GATEWAY_TOKEN"
APP_NAME = "cc-bench-many-worker"


def session_cookie() -> str:
    """An admin's session, made directly (the backend named as settings name it)."""
    from django.conf import settings
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.auth.models import Group, User
    from django.contrib.sessions.backends.db import SessionStore

    user = User.objects.create_user("bencher", password=secrets.token_urlsafe(12))
    user.groups.add(Group.objects.get(name="admin"))
    store = SessionStore()
    store[SESSION_KEY] = str(user.pk)
    store[BACKEND_SESSION_KEY] = settings.AUTHENTICATION_BACKENDS[0]
    store[HASH_SESSION_KEY] = user.get_session_auth_hash()
    store.create()
    return str(store.session_key)


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def db_connections(env: dict[str, str]) -> dict[str, int]:
    import psycopg

    name = env["DATABASE_URL"].rsplit("/", 1)[1]
    with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
        rows = conn.execute(
            "SELECT application_name, count(*) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid() GROUP BY 1",
            (name,),
        ).fetchall()
    return {str(k): int(v) for k, v in rows}


async def wait_for(pred: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while True:
        result = pred()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"not within {timeout:.0f} s: {what}")
        await asyncio.sleep(0.25)


async def sims_child(gateways: int, sessions: int) -> None:
    """The simulators, in a process of their own (`--sims-child`): prints one `URL <url>`
    per gateway, `KEY <the key the fan-out changes>` and `READY`, then answers one JSON
    command a line on stdin: `steady` (one sessions.changed per second per gateway for
    `seconds`), `emit` (change that key's label), `stop`."""
    from fleet.gateway.testing import FakeGateway

    token = os.environ[TOKEN_ENV]
    sims = [
        FakeGateway(token=token, agents=2, sessions=sessions, seed=i + 1)
        for i in range(gateways)
    ]
    for sim in sims:
        await sim.start(host="127.0.0.1", port=0)
        print("URL", sim.url, flush=True)
    fanout_key = sims[0].session_keys()[-1]
    print("KEY", fanout_key, flush=True)
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    rng = random.Random(7)
    keys = [s.session_keys() for s in sims]
    try:
        while line := await reader.readline():
            command = json.loads(line)
            if command["op"] == "emit":
                await sims[0].emit_session_changed(fanout_key, label=command["label"])
            elif command["op"] == "steady":
                started = time.monotonic()
                tick = 0
                while time.monotonic() - started < command["seconds"]:
                    for sim, ks in zip(sims, keys, strict=True):
                        await sim.emit_session_changed(
                            rng.choice(ks),
                            label=f"steady-{tick}-{secrets.token_hex(2)}",
                        )
                    tick += 1
                    await asyncio.sleep(max(0.0, started + tick - time.monotonic()))
            elif command["op"] == "stop":
                break
            print("OK", flush=True)
    finally:
        for sim in sims:
            await sim.stop()


class Sims:
    """The driver of the simulators' process."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.urls: list[str] = []
        self.fanout_key = ""

    @classmethod
    async def start(cls, args: argparse.Namespace, env: dict[str, str]) -> Sims:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).resolve()),
            "--sims-child",
            "--gateways",
            str(args.gateways),
            "--sessions",
            str(args.sessions),
            cwd=REPO,
            env={**os.environ, **env},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        sims = cls(proc)
        while True:
            line = await sims._line(600)
            if line.startswith("URL "):
                sims.urls.append(line[4:])
            elif line.startswith("KEY "):
                sims.fanout_key = line[4:]
            elif line == "READY":
                return sims

    async def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not raw:
            raise RuntimeError("the simulators' process ended")
        return raw.decode().strip()

    async def command(self, timeout: float = 60, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        await self.proc.stdin.drain()
        while (await self._line(timeout)) != "OK":
            pass

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(RuntimeError, TimeoutError, OSError):
                await self.command(timeout=10, op="stop")
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def steady(
    sims: Sims, seconds: float, workers: dict[str, subprocess.Popen[bytes]]
) -> dict[str, dict[str, float]]:
    """One sessions.changed per gateway per second; the workers' CPU over the period."""
    cpu0 = {n: cpu_seconds(p.pid) for n, p in workers.items()}
    started = time.monotonic()
    await sims.command(timeout=seconds + 120, op="steady", seconds=seconds)
    wall = time.monotonic() - started
    return {
        n: {
            "cpu_pct": (cpu_seconds(p.pid) - cpu0[n]) / wall * 100,
            "rss_mib": rss_kib(p.pid) / 1024,
            "threads": threads(p.pid),
        }
        for n, p in workers.items()
    }


async def measure(args: argparse.Namespace, env: dict[str, str], logs: Path) -> None:
    from channels.db import database_sync_to_async

    from fleet.models import Gateway, Session

    print(f"starting {args.gateways} simulated gateways x {args.sessions} sessions ...")
    sims = await Sims.start(args, env)

    def make() -> None:
        for i, url in enumerate(sims.urls):
            Gateway.objects.create(
                name=f"gw-{i:02d}", url=url, token_env=TOKEN_ENV, enabled=False
            )

    await database_sync_to_async(make)()
    worker_env = {**env, "DB_APPLICATION_NAME": APP_NAME}
    port = free_port()
    procs: dict[str, subprocess.Popen[bytes]] = {
        "web": manage_daphne(port, env, logs / "web.log"),
        "worker-1": manage(["gatewayworker"], worker_env, logs / "worker-1.log"),
    }
    out: dict[str, Any] = {"load_start": loadavg()}
    try:
        wait_port(port, procs["web"])
        await asyncio.sleep(5)
        base_rss = rss_kib(procs["worker-1"].pid)
        out["rss_empty_mib"] = base_rss / 1024
        total = args.gateways * args.sessions

        async def synced() -> bool:
            connected = await Gateway.objects.filter(state="connected").acount()
            rows = await Session.objects.acount()
            return bool(connected == args.gateways and rows >= total)

        await Gateway.objects.aupdate(enabled=True)
        out["sync_seconds"] = await wait_for(synced, 600, "the initial sync")
        out["load_sync"] = loadavg()
        print(f"initial sync: {out['sync_seconds']:.1f} s")
        await asyncio.sleep(3)
        # The capabilities' catch-up after the sync (usage books each session's history
        # at first sight) is one-time work: measured apart, so the steady phase measures
        # the events (before, its first seconds held the catch-up).
        out["catch_up"] = await settle(procs["worker-1"].pid, args.settle)
        print("catch-up after the sync:", out["catch_up"])

        one = {"worker-1": procs["worker-1"]}
        out["steady_1"] = await steady(sims, args.steady, one)
        out["rss_per_gateway_kib"] = (
            rss_kib(procs["worker-1"].pid) - base_rss
        ) / args.gateways
        out["db_connections_1"] = db_connections(env)
        out["load_steady_1"] = loadavg()
        print("steady, one worker:", out["steady_1"], out["db_connections_1"])
        out["lag_1"] = await worker_lag(sims)
        print(f"worker lag after the steady phase: {out['lag_1']:.1f} s")

        cookie = await database_sync_to_async(session_cookie)()
        try:
            out["page_ms"] = await fleet_page(port, cookie, args.pages)
            print(f"fleet page p50/p99: {out['page_ms']}")
        except Exception as exc:  # noqa: BLE001 - report it, go on to the next phase
            out["page_error"] = repr(exc)
            print("fleet page failed:", exc)
        try:
            out["fanout_ms"] = await fanout(args, port, cookie, sims)
            print(
                f"fan-out to {args.sockets} sockets p50/p99/missing: {out['fanout_ms']}"
            )
        except Exception as exc:  # noqa: BLE001 - report it, go on to the next phase
            out["fanout_error"] = repr(exc)
            print("fan-out failed:", exc)
        out["load_fanout"] = loadavg()

        # A second worker: the leases split.
        procs["worker-2"] = manage(["gatewayworker"], worker_env, logs / "worker-2.log")
        pids = {procs["worker-1"].pid, procs["worker-2"].pid}
        half = -(-args.gateways // 2)

        def split() -> bool:
            rows = list(
                Gateway.objects.filter(state="connected").values_list(
                    "lease_owner", flat=True
                )
            )
            counts: dict[int, int] = {}
            for owner in rows:
                pid = int(owner.split(":")[1]) if owner else 0
                counts[pid] = counts.get(pid, 0) + 1
            return (
                len(rows) == args.gateways
                and set(counts) == pids
                and max(counts.values()) <= half + 1
            )

        try:
            out["split_seconds"] = await wait_for(
                database_sync_to_async(split),
                args.split_timeout,
                "the leases split between two workers",
            )
            print(f"two workers split the leases in {out['split_seconds']:.1f} s")
        except RuntimeError as exc:  # report how far it got, measure the two anyway
            out["split_error"] = str(exc)
            out["connected_2"] = await Gateway.objects.filter(
                state="connected"
            ).acount()
            print("split:", exc)
        await asyncio.sleep(3)
        two = {n: procs[n] for n in ("worker-1", "worker-2")}
        out["steady_2"] = await steady(sims, args.steady, two)

        def held() -> dict[str, int]:
            result = {}
            for n, p in two.items():
                result[n] = Gateway.objects.filter(
                    lease_owner__contains=f":{p.pid}:"
                ).count()
            return result

        out["held_2"] = await database_sync_to_async(held)()
        out["db_connections_2"] = db_connections(env)
        out["load_end"] = loadavg()
    finally:
        for proc in procs.values():
            stop(proc)
        await sims.stop()
    report(args, out, logs)


async def settle(pid: int, timeout: float, quiet_pct: float = 15.0) -> str:
    """Wait until the worker's CPU over 3 s is under `quiet_pct` % of a core."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(3)
        if (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) * 100 < quiet_pct:
            return f"quiet after {time.monotonic() - started:.0f} s"
    return f"not quiet after {timeout:.0f} s (steady phase includes the rest)"


async def worker_lag(sims: Sims, timeout: float = 300) -> float:
    """Seconds from one change leaving for the simulator, right after the steady phase,
    to its row in the database: how far behind the worker's event handling runs (the
    events before it are handled first)."""
    from fleet.models import Session

    label = f"lag-{secrets.token_hex(4)}"
    started = time.monotonic()
    await sims.command(op="emit", label=label)

    async def stored() -> bool:
        return await Session.objects.filter(
            key=sims.fanout_key, gateway__name="gw-00", label=label
        ).aexists()

    await wait_for(stored, timeout, "the change after the steady phase")
    return time.monotonic() - started


async def fleet_page(port: int, cookie: str, pages: int) -> tuple[float, float]:
    import httpx

    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", cookies={"sessionid": cookie}, timeout=30
    ) as http:
        times = []
        for i in range(pages + 3):
            t0 = time.perf_counter()
            response = await http.get("/")
            assert response.status_code == 200, response.headers.get("location")
            assert 'class="gw-table"' in response.text
            if i >= 3:  # warm-up
                times.append((time.perf_counter() - t0) * 1000)
    return pct(times, 50), pct(times, 99)


async def fanout(
    args: argparse.Namespace, port: int, cookie: str, sims: Sims
) -> tuple[float, float, int]:
    """--updates changes to one session (it moves to the top of its list), to --sockets
    fleet sockets in a client process: from the change leaving for the simulator to the
    row arriving in each socket."""
    from fleet.models import Session

    row = (
        await Session.objects.filter(key=sims.fanout_key, gateway__name="gw-00")
        .values("pk", "gateway_id")
        .afirst()
    )
    assert row is not None
    client = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "bench" / "bench_fanout.py"),
            "--clients",
            "--count",
            str(args.sockets),
            "--url",
            # The list filtered by the gateway (as bench_fanout): the sockets' state.
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
    try:
        assert client.stdin is not None and client.stdout is not None
        ready = await asyncio.to_thread(client.stdout.readline)
        if not ready.startswith("READY"):
            raise RuntimeError(f"the client process failed ({ready!r})")
        emitted: dict[str, float] = {}
        for i in range(args.updates):
            label = f"fanout-{args.sockets}-{i}-{secrets.token_hex(3)}"
            emitted[label] = time.monotonic()
            await sims.command(op="emit", label=label)
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
        client.stdin.write("DONE " + " ".join(emitted) + "\n")
        client.stdin.flush()
        text = await asyncio.to_thread(client.stdout.read)
        client.wait(30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    data = json.loads(
        [ln for ln in text.splitlines() if ln.startswith("RESULT ")][-1][7:]
    )
    latencies, missing = [], 0
    for seen in data["arrivals"]:
        for label, t0 in emitted.items():
            if label in seen:
                latencies.append((seen[label] - t0) * 1000)
            else:
                missing += 1
    if not latencies:
        raise RuntimeError(f"no update arrived in {len(data['arrivals'])} sockets")
    return pct(latencies, 50), pct(latencies, 99), missing


def report(args: argparse.Namespace, out: dict[str, Any], logs: Path) -> None:
    s1 = out["steady_1"]["worker-1"]
    print(
        f"\n{args.gateways} gateways x {args.sessions} sessions, PostgreSQL + Redis, "
        f"logs in {logs}:\n"
    )
    print("| figure | value | target | load avg |")
    print("|---|---|---|---|")
    print(
        f"| initial sync of all {args.gateways} (one worker) | {out['sync_seconds']:.1f} s "
        f"| < 30 s | {out['load_sync']} |"
    )
    print(
        f"| worker CPU, 1 `sessions.changed`/s/gateway | {s1['cpu_pct']:.1f} % of a core "
        f"| < 25 % | {out['load_steady_1']} |"
    )
    print(
        f"| worker RSS: empty / with {args.gateways} | {out['rss_empty_mib']:.0f} MiB / "
        f"{s1['rss_mib']:.0f} MiB ({out['rss_per_gateway_kib']:.0f} KiB per gateway) | | |"
    )
    print(f"| worker threads with {args.gateways} gateways | {s1['threads']:.0f} | | |")
    print(f"| the catch-up after the sync (usage's history) | {out['catch_up']} | | |")
    print(f"| database connections (by application) | {out['db_connections_1']} | | |")
    print(
        f"| worker lag: a change right after the steady phase stored after "
        f"| {out['lag_1']:.1f} s | | |"
    )
    if "page_ms" in out:
        p50, p99 = out["page_ms"]
        print(f"| fleet page p50 / p99 | {p50:.1f} / {p99:.1f} ms | p50 < 50 ms | |")
    else:
        print(f"| fleet page | failed: {out.get('page_error')} | p50 < 50 ms | |")
    if "fanout_ms" in out:
        f50, f99, missing = out["fanout_ms"]
        print(
            f"| update to {args.sockets} fleet sockets p50 / p99 (not arrived) "
            f"| {f50:.1f} / {f99:.1f} ms ({missing}) | p99 < 150 ms | {out['load_fanout']} |"
        )
    else:
        print(
            f"| update to {args.sockets} fleet sockets | failed: {out.get('fanout_error')} "
            f"| p99 < 150 ms | {out['load_fanout']} |"
        )
    print(
        "| two workers: leases split in | "
        + (
            f"{out['split_seconds']:.1f} s"
            if "split_seconds" in out
            else f"not split: {out.get('split_error')}; {out.get('connected_2')} connected"
        )
        + f" ({out['held_2']}) | | |"
    )
    for name, fig in out["steady_2"].items():
        print(
            f"| {name} of two, steady | {fig['cpu_pct']:.1f} % CPU, {fig['rss_mib']:.0f} "
            f"MiB, {fig['threads']:.0f} threads | | {out['load_end']} |"
        )
    print(f"| database connections, two workers | {out['db_connections_2']} | | |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gateways", type=int, default=50)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--steady", type=float, default=30)
    parser.add_argument("--pages", type=int, default=30)
    parser.add_argument("--sockets", type=int, default=200)
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--split-timeout", type=float, default=300)
    parser.add_argument(
        "--settle",
        type=float,
        default=180,
        help="seconds at most to wait for the worker's catch-up before the steady phase",
    )
    parser.add_argument("--sims-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sims_child:
        asyncio.run(sims_child(args.gateways, args.sessions))
        return
    logs = Path(tempfile.mkdtemp(prefix="cc-bench-many-"))
    with production_env(
        "postgres", args.pg_url, args.redis_url, "bench_many", TOKEN_ENV
    ) as env:
        env["OPENCLAW_GATEWAY_URL"] = ""
        env["GATEWAY_LEASE_SECONDS"] = "6"
        django_setup(env)
        try:
            asyncio.run(measure(args, env, logs))
        finally:
            from django.db import connections

            connections.close_all()


if __name__ == "__main__":
    main()
