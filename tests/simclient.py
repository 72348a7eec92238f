"""A raw protocol client of the gateway simulator, for tests that speak the wire protocol
themselves (tests/test_simulator.py, tests/test_usage.py): `open_client` does the handshake
(challenge, a signed `connect`) and returns a `Client` that keeps every frame and matches
responses by id."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from fleet.gateway import DeviceKey, request_frame
from fleet.gateway.testing import FakeGateway

TOKEN = "sim-test-token"
SCOPES = ["operator.read", "operator.write", "operator.admin"]
Frame = dict[str, Any]


def now_ms() -> int:
    return int(time.time() * 1000)


class Client:
    """A tiny test client: every frame is kept; responses are matched by id."""

    def __init__(self, ws: ClientConnection, hello: Frame) -> None:
        self.ws = ws
        self.hello = hello
        self.frames: list[Frame] = []
        self._arrived = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self.close_code: int | None = None
        self.close_reason = ""

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                try:
                    self.frames.append(json.loads(raw))
                except ValueError:
                    self.frames.append({"type": "raw", "text": raw})
                self._arrived.set()
        except ConnectionClosed:
            pass
        if self.ws.close_code is not None:
            self.close_code = self.ws.close_code
            self.close_reason = self.ws.close_reason or ""
        self._arrived.set()

    @property
    def events(self) -> list[Frame]:
        return [f for f in self.frames if f.get("type") == "event"]

    async def wait(self, pred: Callable[[Frame], bool], timeout: float = 5.0) -> Frame:
        deadline = time.monotonic() + timeout
        while True:
            for frame in self.frames:
                if pred(frame):
                    return frame
            if self._reader.done():
                raise AssertionError(f"closed ({self.close_code}) while waiting")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("timed out waiting for a frame")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

    async def responses(
        self, rid: str, n: int = 1, timeout: float = 5.0
    ) -> list[Frame]:
        def enough(_: Frame) -> bool:
            return len(self._responses(rid)) >= n

        await self.wait(enough, timeout)
        return self._responses(rid)

    def _responses(self, rid: str) -> list[Frame]:
        return [f for f in self.frames if f.get("type") == "res" and f.get("id") == rid]

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Frame:
        rid = uuid.uuid4().hex
        await self.ws.send(request_frame(rid, method, params or {}))
        return (await self.responses(rid))[0]

    async def ok(self, method: str, params: dict[str, Any] | None = None) -> Any:
        res = await self.call(method, params)
        assert res["ok"], res
        return res["payload"]

    async def event(
        self,
        name: str,
        pred: Callable[[Any], bool] = lambda p: True,
        timeout: float = 5.0,
    ) -> Frame:
        return await self.wait(
            lambda f: (
                f.get("type") == "event"
                and f.get("event") == name
                and pred(f.get("payload"))
            ),
            timeout,
        )

    async def closed(self, timeout: float = 5.0) -> tuple[int | None, str]:
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        return self.close_code, self.close_reason

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(Exception):
            await self._reader


def connect_params(
    challenge: Frame,
    *,
    token: str | None = TOKEN,
    key: DeviceKey | None = None,
    client_id: str = "gateway-client",
    mode: str = "backend",
    protocols: tuple[int, int] = (3, 4),
    scopes: list[str] | None = None,
    device_token: str | None = None,
    nonce: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    scopes = list(SCOPES if scopes is None else scopes)
    params: dict[str, Any] = {
        "minProtocol": protocols[0],
        "maxProtocol": protocols[1],
        "client": {
            "id": client_id,
            "version": "0.1.0",
            "platform": "linux",
            "mode": mode,
        },
        "role": "operator",
        "scopes": scopes,
        "caps": ["tool-events"],
        "auth": {},
        **extra,
    }
    if token is not None:
        params["auth"]["token"] = token
    if device_token is not None:
        params["auth"]["deviceToken"] = device_token
    if key is not None:
        params["device"] = key.sign_connect(
            client_id=client_id,
            client_mode=mode,
            role="operator",
            scopes=scopes,
            signed_at=now_ms(),
            token=token or device_token or "",
            nonce=nonce or challenge["payload"]["nonce"],
            platform="linux",
        )
    return params


async def handshake(
    sim: FakeGateway, **kwargs: Any
) -> tuple[ClientConnection, Frame, Frame]:
    """Open a socket, read the challenge, send connect; returns (ws, challenge, response)."""
    ws = await connect(sim.url)
    challenge = json.loads(await ws.recv())
    await ws.send(request_frame("c1", "connect", connect_params(challenge, **kwargs)))
    return ws, challenge, json.loads(await ws.recv())


async def open_client(sim: FakeGateway, **kwargs: Any) -> Client:
    kwargs.setdefault("key", DeviceKey.generate())
    ws, _, res = await handshake(sim, **kwargs)
    assert res["ok"], res
    return Client(ws, res["payload"])
