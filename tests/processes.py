"""The production layout as separate processes, shared by tests/test_processes.py and
tests/test_many_gateways.py: a PostgreSQL database and a Redis channel layer of the module's
own (fixtures, imported by the modules that use them), daphne and `manage.py gatewayworker`
subprocesses (`Stack`, `Proc`), `run_manage` for one-off commands, `until` for polling, and a
logged-in browser as real WebSocket clients (`Browser`, `Socket`).

Needs PostgreSQL (TEST_POSTGRES_URL, default postgres://postgres@127.0.0.1:5432/postgres, a
role that may create databases) and Redis (TEST_REDIS_URL, default redis://127.0.0.1:6379);
the fixtures skip without them, except under CI=true."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import redis
import websockets

from fleet.gateway.testing import FakeGateway
from tests.helpers import ci

REPO = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres"
)
REDIS_BASE = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
# A Redis database of our own (the suite's in-process tests use 0), and a key prefix per run.
REDIS_DB = 11
TOKEN_ENV = "CC_PROCESSES_GATEWAY_TOKEN"
# Spawned from the test's loop: the simulator must keep answering meanwhile.
STARTUP_TIMEOUT = 30.0


# -- services --------------------------------------------------------------------------------


def _unavailable(what: str) -> NoReturn:
    message = f"{what}; the process tests need it (apt-get install postgresql redis-server, or set TEST_POSTGRES_URL / TEST_REDIS_URL)"
    if ci():
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A PostgreSQL database of the test module's own, dropped afterwards."""
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        _unavailable(
            f"PostgreSQL is not reachable at {urlsplit(PG_URL).netloc} ({exc})"
        )
    name = f"cc_processes_{os.getpid()}_{secrets.token_hex(3)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            parts = urlsplit(PG_URL)
            yield urlunsplit(parts._replace(path=f"/{name}"))
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Layer:
    url: str
    prefix: str


@pytest.fixture(scope="module")
def channel_layer() -> Iterator[Layer]:
    """Our Redis database and a key prefix of this run's own, its keys deleted afterwards."""
    url = f"{REDIS_BASE}/{REDIS_DB}"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        _unavailable(f"Redis is not reachable at {REDIS_BASE} ({exc})")
    layer = Layer(url, f"cc-processes-{secrets.token_hex(4)}")
    try:
        yield layer
    finally:
        keys = list(client.scan_iter(f"{layer.prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


# -- processes -------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    # How many syncs the simulator had seen when this process started.
    syncs_before: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def kill(self) -> None:
        """SIGKILL: no handler runs, the lease stays in the database until it expires."""
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    async def terminate(self, timeout: float = 10.0) -> float:
        """SIGTERM; returns how long the process took to exit."""
        started = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        while self.popen.poll() is None:
            if time.monotonic() - started > timeout:
                self.popen.kill()
                self.popen.wait()
                raise AssertionError(
                    f"{self.name} ignored SIGTERM for {timeout} s:\n{self.tail()}"
                )
            await asyncio.sleep(0.02)
        return time.monotonic() - started


@dataclass
class ProcessStack:
    """daphne and `manage.py gatewayworker` as subprocesses on a database of their own,
    each with its log; the test reads the database."""

    env: dict[str, str]
    db_url: str
    base: str
    logs: Path
    gateway_id: int
    username: str
    password: str
    procs: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str]) -> Proc:
        log = self.logs / f"{name}-{len(self.procs)}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def worker(self) -> Proc:
        return self.spawn("worker", [sys.executable, "manage.py", "gatewayworker"])

    def web(self) -> Proc:
        """daphne on the stack's port (again, after a restart)."""
        port = str(urlsplit(self.base).port)
        return self.spawn(
            "web",
            [
                sys.executable,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                port,
                "controlcenter.asgi:application",
            ],
        )

    async def healthy(self) -> bool:
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(f"{self.base}/healthz")).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()


@dataclass
class Stack(ProcessStack):
    sim: FakeGateway = field(kw_only=True)

    def gateway(self) -> dict[str, Any]:
        (row,) = self.query(
            "SELECT state, lease_owner, last_error FROM fleet_gateway WHERE id = %s",
            self.gateway_id,
        )
        return {"state": row[0], "lease_owner": row[1], "last_error": row[2]}

    def holder_pid(self) -> int | None:
        owner = self.gateway()["lease_owner"]
        return int(owner.split(":")[1]) if owner else None

    def calls_of(self, method: str) -> int:
        return sum(1 for name, _ in self.sim.calls if name == method)

    def list_calls(self) -> int:
        return self.calls_of("sessions.list")

    def subscribe_calls(self) -> int:
        return self.calls_of("sessions.subscribe")

    def syncs(self) -> int:
        """Whole syncs asked of the gateway: `health` is a sync's last request."""
        return self.calls_of("health")


async def run_manage(stack_env: dict[str, str], *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "manage.py",
        *args,
        cwd=REPO,
        env=stack_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"manage.py {' '.join(args)} failed:\n{text[-3000:]}"
    return text


async def until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float,
    what: str,
    procs: list[Proc] | None = None,
) -> float:
    """Poll until `predicate` holds; returns the time it took. Fails naming `what`, with the
    logs of `procs` (and at once when one of them died)."""
    started = time.monotonic()
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - started
        for proc in procs or []:
            assert proc.popen.poll() is None, f"{proc.name} died:\n{proc.tail()}"
        if time.monotonic() - started > timeout:
            logs = "\n".join(f"--- {p.name}:\n{p.tail()}" for p in procs or [])
            raise AssertionError(f"not within {timeout} s: {what}\n{logs}")
        await asyncio.sleep(0.05)


# -- browsers --------------------------------------------------------------------------------


class Browser:
    """A logged-in browser: an HTTP client with the session cookie, and page sockets."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.http = httpx.AsyncClient(base_url=stack.base, follow_redirects=False)

    async def login(self) -> None:
        page = await self.http.get("/accounts/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert token, page.text[:500]
        response = await self.http.post(
            "/accounts/login/",
            data={
                "username": self.stack.username,
                "password": self.stack.password,
                "csrfmiddlewaretoken": token.group(1),
            },
        )
        assert response.status_code == 302, response.text[:500]
        assert "sessionid" in self.http.cookies

    @contextlib.asynccontextmanager
    async def socket(self, path: str) -> AsyncIterator[Socket]:
        cookie = "; ".join(f"{k}={v}" for k, v in self.http.cookies.items())
        url = self.stack.base.replace("http://", "ws://") + path
        async with websockets.connect(
            url, additional_headers={"Cookie": cookie, "Origin": self.stack.base}
        ) as ws:
            sock = Socket(ws)
            reader = asyncio.create_task(sock.read())
            try:
                yield sock
            finally:
                reader.cancel()

    async def close(self) -> None:
        await self.http.aclose()


class Socket:
    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.frames: list[str] = []
        self.arrived = asyncio.Event()

    async def read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for frame in self.ws:
                self.frames.append(str(frame))
                self.arrived.set()

    async def frame_with(
        self, needle: str, timeout: float = 10.0, start: int = 0
    ) -> int:
        """The index of the first frame from `start` on that contains `needle`."""
        deadline = time.monotonic() + timeout
        while True:
            self.arrived.clear()
            for i in range(start, len(self.frames)):
                if needle in self.frames[i]:
                    return i
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no frame with {needle!r} within {timeout} s "
                    f"({len(self.frames)} frames)"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), remaining)

    def count(self, needle: str) -> int:
        return sum(needle in f for f in self.frames)
