"""Small helpers for tests (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import ThreadSensitiveContext


async def wait_for(
    predicate: Callable[[], Awaitable[bool]],
    timeout: float = 10.0,
    interval: float = 0.05,
) -> None:
    """Poll an async predicate until it holds; fail with a clear message if it never does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if await predicate():
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def admin_request(
    client: Any, method: str, url: str, data: dict[str, Any] | None = None
) -> Any:
    """A request through Django's AsyncClient, following redirects. The real ASGI handler
    runs each request's sync view in its own thread context; the test client does not, so
    it is done here (else the view and the worker share one thread)."""
    async with ThreadSensitiveContext():
        if method == "post":
            return await client.post(url, data or {}, follow=True)
        return await client.get(url, data or {}, follow=True)


def ci() -> bool:
    return os.environ.get("CI") == "true"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server of this test's own, on a free port, that can be stopped and started
    again on the same port (like a Redis restart; no persistence, so groups are lost)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


def daphne_env(data_dir: Any) -> dict[str, str]:
    """The environment of a Control Center subprocess with a data folder of its own (its
    SQLite file and secret key), whichever database the test run itself uses."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")
    }
    env.update(
        {
            "CONTROLCENTER_DATA_DIR": str(data_dir),
            "DJANGO_DEBUG": "False",
            "LOG_LEVEL": "WARNING",
        }
    )
    return env
