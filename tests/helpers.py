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


class WebhookReceiver:
    """A small HTTP server (its own thread) on a fixed free port that records each POST
    and checks its HMAC signature (alerts' X-ControlCenter-Signature) with `secret`. It can
    be started late, stopped and started again on the same port (a receiver that is down)."""

    def __init__(self, secret: str = "", status: int = 200) -> None:
        self.port = free_port()
        self.secret = secret
        self.status = status
        self.received: list[dict[str, Any]] = []
        self._server: Any = None
        self._thread: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/T0KEN-in-the-path?also=query"

    def verified(self, headers: dict[str, str], body: bytes) -> bool:
        import hashlib
        import hmac

        timestamp = headers.get("x-controlcenter-timestamp", "")
        expected = hmac.new(
            self.secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256
        ).hexdigest()
        return hmac.compare_digest(
            headers.get("x-controlcenter-signature", ""), f"sha256={expected}"
        )

    def start(self) -> None:
        import http.server
        import json
        import threading

        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.received.append(
                    {
                        "path": self.path,
                        "headers": headers,
                        "json": json.loads(body),
                        "verified": receiver.verified(headers, body),
                    }
                )
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self._server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", self.port), Handler
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class SmtpSink:
    """A local SMTP server (aiosmtpd, its own thread) on a free port, keeping each message."""

    def __init__(self) -> None:
        self.port = free_port()
        self.messages: list[Any] = []
        self._controller: Any = None

    def start(self) -> None:
        from email import message_from_bytes

        from aiosmtpd.controller import Controller

        sink = self

        class Handler:
            async def handle_DATA(  # noqa: N802 - aiosmtpd's name
                self, server: Any, session: Any, envelope: Any
            ) -> str:
                message = message_from_bytes(envelope.content)
                sink.messages.append((list(envelope.rcpt_tos), message))
                return "250 OK"

        self._controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
