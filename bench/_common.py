"""Helpers shared by the production-shape benchmarks (bench_sync, bench_throughput,
bench_fanout, bench_memory): ports, child processes, a throwaway database, load average."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PG_URL = os.environ.get(
    "BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/postgres"
)
DEFAULT_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, to print beside every figure."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
    return ordered[index]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} ended before it listened")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {timeout:.0f} s")


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def pg_admin(url: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)


@contextmanager
def database_env(db: str, pg_url: str, prefix: str) -> Iterator[dict[str, str]]:
    """Environment variables for a fresh database: a SQLite file in a temporary data folder,
    or a PostgreSQL database made for the run (dropped afterwards)."""
    data_dir = Path(tempfile.mkdtemp(prefix=f"cc-{prefix}-"))
    env = {"CONTROLCENTER_DATA_DIR": str(data_dir)}
    if db == "sqlite":
        env["DATABASE_URL"] = ""
        yield env
        return
    if db != "postgres":
        raise SystemExit(f"unknown database {db!r}: use sqlite or postgres")
    name = f"{prefix}_{os.getpid()}"
    pg_admin(pg_url, f'DROP DATABASE IF EXISTS "{name}"')
    pg_admin(pg_url, f'CREATE DATABASE "{name}"')
    env["DATABASE_URL"] = urlunsplit(urlsplit(pg_url)._replace(path=f"/{name}"))
    try:
        yield env
    finally:
        pg_admin(pg_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def redis_prefix(url: str, prefix: str) -> Iterator[str]:
    """A channel-layer prefix for one run; its keys are deleted from Redis afterwards."""
    try:
        yield prefix
    finally:
        import redis

        client = redis.Redis.from_url(url)
        try:
            keys = list(client.scan_iter(match=f"{prefix}*", count=500))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


@contextmanager
def production_env(
    db: str, pg_url: str, redis_url: str, name: str, token_env: str
) -> Iterator[dict[str, str]]:
    """The environment of a production-shaped run (a fresh database, Redis with a prefix of
    the run's own, a gateway token, DEBUG off), also set on this process."""
    with (
        database_env(db, pg_url, name) as env,
        redis_prefix(redis_url, f"{name.replace('_', '-')}-{os.getpid()}-") as prefix,
    ):
        env.update(
            {
                token_env: secrets.token_urlsafe(16),
                "REDIS_URL": redis_url,
                "CHANNEL_LAYER_PREFIX": prefix,
                "LOG_LEVEL": "WARNING",
                "DJANGO_DEBUG": "False",
            }
        )
        yield env


def django_setup(env: dict[str, str]) -> None:
    """Django in this process on that environment, its database migrated."""
    os.environ.update(env)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlcenter.settings")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"  # setup code is plain sync
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connections

    call_command("migrate", interactive=False, verbosity=0)
    connections.close_all()


def manage(
    args: list[str], env: dict[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    """Start `manage.py <args>` with the given environment, output to a log file."""
    log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        [sys.executable, "manage.py", *args],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
