"""Benchmark of the worker's initial sync, and of a second sync with nothing changed.

    .venv/bin/python bench/bench_sync.py [--agents 100] [--sessions 10000]
        [--db sqlite,postgres] [--pg-url postgres://postgres@127.0.0.1:5432/postgres]
        [--repeat 1]

The gateway simulator runs as its own process (`manage.py fakegateway`), so it does not
share the bench's CPU time. For each database (one child process each, since Django's
settings are per process) the bench makes a fresh database, connects a `GatewayRunner`
(the worker's own class) to the simulator and times `GatewayRunner.sync()`: subscribe,
agents.list, every sessions.list page, reconcile into the database, presence and health.
Then it runs the same sync again with nothing changed.

Rows written are counted, not assumed. Write statements: an execute wrapper on every
database connection the worker opens (whatever thread) counts each INSERT, UPDATE and
DELETE. Rows: on PostgreSQL the cursor's row count of each, and as a second witness
n_tup_ins + n_tup_upd + n_tup_del of the fleet tables from pg_stat_user_tables, before and
after; on SQLite (which reports no row count for INSERT ... RETURNING nor executemany)
triggers on the fleet tables count every row, installed after the timed initial sync so they
do not slow it: the initial sync's rows are then shown as "not counted" (the table sizes
are in the row).

Prints a markdown table (one row per database and sync) with the load average beside it.
SQLite runs in a temporary data folder; PostgreSQL in a database made for the run
(`bench_sync_<pid>`), dropped afterwards."""

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
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (  # noqa: E402
    DEFAULT_PG_URL,
    REPO,
    free_port,
    loadavg,
    pg_admin,
    wait_port,
)

TOKEN_ENV = "BENCH_GATEWAY_TOKEN"
FLEET_TABLES = (
    "fleet_session",
    "fleet_agent",
    "fleet_gateway",
    "fleet_presenceentry",
    "fleet_deviceidentity",
)


def start_simulator(
    agents: int, sessions: int, token: str, log_path: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "fakegateway",
            "--port",
            str(port),
            "--agents",
            str(agents),
            "--sessions",
            str(sessions),
        ],
        cwd=REPO,
        env={**os.environ, "OPENCLAW_GATEWAY_TOKEN": token, "LOG_LEVEL": "WARNING"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_port(port, proc)
    return proc, f"ws://127.0.0.1:{port}"


# -- the child: one database --------------------------------------------------------------


class WriteCounter:
    """Counts rows written through every Django connection (any thread): an execute wrapper
    installed on each connection as it is created."""

    def __init__(self) -> None:
        self.statements: Counter[str] = Counter()
        self.rows: Counter[str] = Counter()
        self.active = False

    def install(self) -> None:
        from django.db.backends.signals import connection_created

        connection_created.connect(self._on_connection, weak=False)

    def _on_connection(self, sender: Any, connection: Any, **kwargs: Any) -> None:
        # One wrapper object per thread is reused for each new database connection.
        if self._wrap not in connection.execute_wrappers:
            connection.execute_wrappers.append(self._wrap)

    def _wrap(
        self, execute: Any, sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        verb = sql.lstrip().split(None, 1)[0].upper()
        if not self.active or verb not in ("INSERT", "UPDATE", "DELETE"):
            return execute(sql, params, many, context)
        result = execute(sql, params, many, context)
        table = sql.split('"')[1] if '"' in sql else "?"
        self.statements[f"{verb} {table}"] += len(params) if many else 1
        if context["connection"].vendor != "sqlite":
            # psycopg: the rows of the statement (of all of them, for executemany).
            self.rows[table] += max(context["cursor"].rowcount, 0)
        return result

    def reset(self) -> None:
        self.statements.clear()
        self.rows.clear()


def sqlite_install_triggers() -> None:
    """SQLite reports no row count for INSERT ... RETURNING nor for executemany through
    Django: count rows with triggers instead (one counter row per table), which cost a
    little per row written; the bench installs them after the timed initial sync."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE IF NOT EXISTS bench_writes (name TEXT PRIMARY KEY, n INTEGER)"
        )
        for table in FLEET_TABLES:
            cursor.execute("INSERT OR IGNORE INTO bench_writes VALUES (%s, 0)", [table])
            for op in ("INSERT", "UPDATE", "DELETE"):
                cursor.execute(
                    f"CREATE TRIGGER IF NOT EXISTS bench_{table}_{op.lower()} AFTER {op} "
                    f"ON {table} BEGIN UPDATE bench_writes SET n = n + 1 "
                    f"WHERE name = '{table}'; END"
                )
    connection.close()


def sqlite_writes() -> dict[str, int]:
    from django.db import connection

    with connection.cursor() as cursor:
        try:
            cursor.execute("SELECT name, n FROM bench_writes")
        except Exception:  # noqa: BLE001 - no triggers yet
            return {}
        found = {str(name): int(n) for name, n in cursor.fetchall()}
    connection.close()
    return found


def pg_tuple_writes() -> dict[str, int]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT relname, n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables "
            "WHERE relname = ANY(%s)",
            [list(FLEET_TABLES)],
        )
        return {str(name): int(n) for name, n in cursor.fetchall()}


async def pg_writes_settled() -> dict[str, int]:
    """Backends report their counts when they go idle, at most once a second; the worker's
    connections are closed after each call (conn_max_age=0), which reports at once. Read
    until two readings a second apart agree."""
    from channels.db import database_sync_to_async

    last: dict[str, int] = await database_sync_to_async(pg_tuple_writes)()
    for _ in range(10):
        await asyncio.sleep(1.1)
        now: dict[str, int] = await database_sync_to_async(pg_tuple_writes)()
        if now == last:
            return now
        last = now
    return last


async def run_syncs(
    sim_url: str, token: str, repeat: int, backend: str
) -> list[dict[str, Any]]:
    from channels.db import database_sync_to_async

    from fleet import services
    from fleet.gateway.client import ConnectOptions, GatewayConnection
    from fleet.models import Agent, Gateway, Session
    from fleet.worker import GatewayRunner

    counter: WriteCounter = BENCH_COUNTER
    gateway = await Gateway.objects.acreate(
        name="bench", url=sim_url, token_env=TOKEN_ENV
    )
    runner = GatewayRunner(gateway)
    device, _ = await database_sync_to_async(services.device_key_for)(gateway.pk)
    conn = GatewayConnection(
        ConnectOptions(url=sim_url, token=token, device=device), runner.events.on_event
    )
    hello = await conn.connect()
    runner.conn, runner.protocol = conn, hello.protocol
    runner.connected.set()
    reader = asyncio.create_task(conn.run())

    # Time spent in the reconcile functions (the database part of the sync), measured by
    # wrapping them; the rest is the gateway calls and the pushes.
    spent = {"db": 0.0}
    originals = {
        name: getattr(services, name)
        for name in (
            "reconcile_agents",
            "reconcile_sessions",
            "replace_presence",
            "record_health",
        )
    }

    def timed(fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent["db"] += time.perf_counter() - t0

        return wrapper

    for name, fn in originals.items():
        setattr(services, name, timed(fn))

    results = []
    try:
        for i in range(1 + repeat):
            label = "initial sync" if i == 0 else "second sync, nothing changed"
            counter.reset()
            spent["db"] = 0.0
            if backend == "sqlite" and i == 1:
                await database_sync_to_async(sqlite_install_triggers)()
            if backend == "postgresql":
                before = await pg_writes_settled()
            elif i > 0:
                before = await database_sync_to_async(sqlite_writes)()
            load = loadavg()
            counter.active = True
            t0 = time.perf_counter()
            await runner.sync(conn, subscribe=i == 0)
            elapsed = time.perf_counter() - t0
            counter.active = False
            if backend == "postgresql":
                after = await pg_writes_settled()
            elif i > 0:
                after = await database_sync_to_async(sqlite_writes)()
                counter.rows.clear()
                counter.rows.update(
                    {
                        k: after[k] - before.get(k, 0)
                        for k in after
                        if after[k] - before.get(k, 0)
                    }
                )
            sessions = await Session.objects.filter(gateway=gateway).acount()
            agents = await Agent.objects.filter(gateway=gateway).acount()
            results.append(
                {
                    "rows_counted": backend != "sqlite" or i > 0,
                    "backend": backend,
                    "what": label,
                    "seconds": elapsed,
                    "db_seconds": spent["db"],
                    "sessions": sessions,
                    "agents": agents,
                    "rows": dict(counter.rows),
                    "statements": dict(counter.statements),
                    "pg_tuples": {
                        k: after.get(k, 0) - before.get(k, 0)
                        for k in FLEET_TABLES
                        if after.get(k, 0) - before.get(k, 0)
                    }
                    if backend == "postgresql"
                    else None,
                    "load": load,
                }
            )
    finally:
        for name, fn in originals.items():
            setattr(services, name, fn)
        await conn.close()
        await reader
    return results


BENCH_COUNTER = WriteCounter()


def child(args: argparse.Namespace) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlcenter.settings")
    os.environ["REDIS_URL"] = ""
    os.environ[TOKEN_ENV] = args.token
    import django

    django.setup()
    from django.core.management import call_command

    BENCH_COUNTER.install()
    call_command("migrate", interactive=False, verbosity=0)
    from django.db import connection

    backend = connection.vendor
    connection.close()
    results = asyncio.run(run_syncs(args.sim_url, args.token, args.repeat, backend))
    print("RESULT " + json.dumps(results))


# -- the parent ---------------------------------------------------------------------------


def run_child(
    db: str, args: argparse.Namespace, sim_url: str, token: str
) -> list[dict[str, Any]]:
    env = {**os.environ, "LOG_LEVEL": "WARNING", "DJANGO_DEBUG": "False"}
    data_dir = Path(tempfile.mkdtemp(prefix="cc-bench-sync-"))
    env["CONTROLCENTER_DATA_DIR"] = str(data_dir)
    dbname = ""
    if db == "postgres":
        parts = urlsplit(args.pg_url)
        dbname = f"bench_sync_{os.getpid()}"
        pg_admin(args.pg_url, f'DROP DATABASE IF EXISTS "{dbname}"')
        pg_admin(args.pg_url, f'CREATE DATABASE "{dbname}"')
        env["DATABASE_URL"] = urlunsplit(parts._replace(path=f"/{dbname}"))
    else:
        env.pop("DATABASE_URL", None)
    try:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                "--sim-url",
                sim_url,
                "--token",
                token,
                "--repeat",
                str(args.repeat),
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        if dbname:
            pg_admin(args.pg_url, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return list(json.loads(line[len("RESULT ") :]))
    raise RuntimeError(f"the {db} run failed:\n{out.stdout}\n{out.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument(
        "--db", default="sqlite,postgres", help="comma-separated: sqlite, postgres"
    )
    parser.add_argument(
        "--pg-url",
        default=DEFAULT_PG_URL,
        help="a PostgreSQL URL to create the bench database from (env BENCH_PG_URL)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="syncs after the first (nothing changed)"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="list the write statements"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sim-url", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    token = secrets.token_urlsafe(16)
    work = Path(tempfile.mkdtemp(prefix="cc-bench-sync-"))
    rows: list[dict[str, Any]] = []
    for db in [d.strip() for d in args.db.split(",") if d.strip()]:
        # A fresh simulator per database: the same seeded 10,000 rows each time.
        sim, sim_url = start_simulator(
            args.agents, args.sessions, token, work / f"sim-{db}.log"
        )
        try:
            rows.extend(run_child(db, args, sim_url, token))
        finally:
            sim.terminate()
            sim.wait(15)

    print(
        f"\nSync of {args.agents} agents and {args.sessions} sessions from the simulator "
        "(separate process):\n"
    )
    print(
        "| database | sync | time | of it in reconcile | rows written | write statements | load avg |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        written = sum(r["rows"].values()) if r["rows_counted"] else "not counted"
        detail = ", ".join(f"{k} {v}" for k, v in sorted(r["rows"].items()) if v) or "-"
        witness = (
            f"; pg_stat: {sum(r['pg_tuples'].values())}"
            if r["pg_tuples"] is not None
            else ""
        )
        print(
            f"| {r['backend']} | {r['what']} ({r['sessions']} sessions, {r['agents']} agents) "
            f"| {r['seconds']:.2f} s | {r['db_seconds']:.2f} s "
            f"| {written} ({detail}{witness}) | {sum(r['statements'].values())} | {r['load']} |"
        )
        if args.verbose:
            print(f"|   | {r['statements']} |")


if __name__ == "__main__":
    main()
