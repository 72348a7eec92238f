"""Small helpers shared by the tests (fixtures live in conftest.py); test modules import
from here, never from each other."""

from __future__ import annotations

import asyncio
import html
import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.test import AsyncClient

from chat.models import run_dom_id
from chat.routing import websocket_urlpatterns
from fleet.models import Gateway, Session


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


# -- the worker --------------------------------------------------------------------------


async def state_of(gateway: Gateway) -> Gateway:
    return await Gateway.objects.aget(pk=gateway.pk)


async def until_state(gateway: Gateway, state: str, timeout: float = 10.0) -> Gateway:
    async def check() -> bool:
        return (await state_of(gateway)).state == state

    try:
        await wait_for(check, timeout)
    except AssertionError:
        current = await state_of(gateway)
        raise AssertionError(
            f"gateway never reached {state}: it is {current.state} ({current.last_error})"
        ) from None
    return await state_of(gateway)


# -- the chat ----------------------------------------------------------------------------


class Chat:
    """One session page: a logged-in HTTP client and the page's WebSocket."""

    def __init__(self, session: Session, user: Any) -> None:
        self.session = session
        self.user = user
        self.client = AsyncClient()
        self.ws: WebsocketCommunicator | None = None
        self.backfill: list[str] = []

    async def open(self) -> None:
        await sync_to_async(self.client.force_login)(self.user)
        self.ws = WebsocketCommunicator(
            URLRouter(websocket_urlpatterns), f"/ws/chat/{self.session.pk}/"
        )
        self.ws.scope["user"] = self.user
        connected, _ = await self.ws.connect()
        assert connected

    async def send(self, text: str, message_id: uuid.UUID | None = None) -> Any:
        return await self.client.post(
            f"/chat/{self.session.pk}/send/",
            {"text": text, "message_id": str(message_id or uuid.uuid4())},
        )

    async def frames_until(self, needle: str, timeout: float = 10) -> list[str]:
        """Every frame up to and including the first that contains `needle`."""
        assert self.ws is not None
        frames: list[str] = []
        while True:
            frame = await self.ws.receive_from(timeout=timeout)
            frames.append(frame)
            if needle in frame:
                return frames

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.disconnect()


def stored_reply(run_id: Any, state: str = "final") -> str:
    """The start of the stored reply of a run, as the consumer pushes it."""
    return (
        f'<article id="{run_dom_id(str(run_id))}" class="msg assistant state-{state}"'
    )


def streamed_text(frames: list[str], run_id: str) -> str:
    """What a browser shows in the reply bubble after applying the frames in order."""
    dom = run_dom_id(run_id)
    text = ""
    for frame in frames:
        bubble = re.search(rf'id="{dom}-text">(.*?)</div>', frame, re.S)
        if bubble:
            text = html.unescape(bubble.group(1))
            continue
        append = re.fullmatch(
            rf'<span id="{dom}-text" hx-swap-oob="beforeend">(.*)</span>', frame, re.S
        )
        if append:
            text += html.unescape(append.group(1))
        replace = re.fullmatch(
            rf'<span id="{dom}-text" hx-swap-oob="innerHTML">(.*)</span>', frame, re.S
        )
        if replace:
            text = html.unescape(replace.group(1))
    return text


async def connected_gateway(
    sim: Any, make_gateway: Any, running_worker: Any
) -> Gateway:
    gateway = await sync_to_async(make_gateway)(sim.url)
    await running_worker()

    async def ready() -> bool:
        row = await Gateway.objects.aget(pk=gateway.pk)
        synced = await Session.objects.filter(gateway=gateway).acount()
        return row.state == Gateway.State.CONNECTED and synced > 0

    await wait_for(ready, 15)
    return await Gateway.objects.aget(pk=gateway.pk)


# -- a user's client and sockets (approvals, and the real gateway's approvals) ---------------


async def client_for(user: Any) -> AsyncClient:
    """An async test client logged in as `user`."""
    client = AsyncClient()
    await sync_to_async(client.force_login)(user)
    return client


async def body_of(response: Any) -> str:
    """A streamed CSV (async under the ASGI handler, as under daphne)."""
    return b"".join([chunk async for chunk in response.streaming_content]).decode()


async def chat_socket(session: Session, user: Any) -> WebsocketCommunicator:
    """The chat page's socket of `session`, as `user`."""
    ws = WebsocketCommunicator(
        URLRouter(websocket_urlpatterns), f"/ws/chat/{session.pk}/"
    )
    ws.scope["user"] = user
    ok, _ = await ws.connect()
    assert ok
    return ws


async def frame_with(ws: WebsocketCommunicator, *needles: str) -> str:
    """The next frame that holds every one of `needles` (the ones before are dropped)."""
    while True:
        frame = await ws.receive_from(timeout=10)
        if all(n in frame for n in needles):
            return frame


# -- the live sockets -----------------------------------------------------------------------

XSS = "<img src=x onerror=alert(1)>"
# The variable the test gateways name for their token (set per test by the conftest fixture).
TEST_TOKEN_ENV = "CONTROLCENTER_TEST_GATEWAY_TOKEN"

IN_MEMORY = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}


def asgi_application() -> Any:
    from controlcenter.asgi import application

    return application


async def connect(
    path: str, headers: list[tuple[bytes, bytes]]
) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(asgi_application(), path, headers=headers)
    connected, _ = await communicator.connect(timeout=5)
    assert connected
    return communicator


async def receive_all(communicator: WebsocketCommunicator, quiet: float = 0.4) -> str:
    """The frames that arrive until the socket is quiet, joined (at least one)."""
    frames = [await communicator.receive_from(timeout=5)]
    # receive_nothing waits without cancelling the consumer (receive_from would).
    while not await communicator.receive_nothing(timeout=quiet):
        frames.append(await communicator.receive_from(timeout=5))
    return "".join(frames)


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    *,
    every: float = 0.1,
    tolerate: tuple[type[BaseException], ...] = (),
) -> Any:
    """Poll `predicate` (from a sync test) until it returns something true, and return
    that; an exception of a `tolerate` type counts as not yet (a server still starting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except tolerate:
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
