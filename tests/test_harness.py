"""The test harness itself works: the real gateway fixtures (tests/realgw.py) and the browser
fixtures (tests/browser.py)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from websockets.asyncio.client import connect

if TYPE_CHECKING:  # imported for real by pytest_plugins, with assertion rewriting
    from playwright.sync_api import Page

    from tests.browser import PageEvents
    from tests.realgw import RealGateway

# The fixtures, also when tests/conftest.py does not register them. A no-op when the conftest
# has the same pytest_plugins line; when it imports the fixture names instead, its fixtures are
# the ones used and each gateway still starts once per session.
pytest_plugins = ["tests.realgw", "tests.browser"]


def _get(url: str) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        return response.status, response.read()


async def _first_frame(url: str) -> dict[str, object]:
    async with connect(url, proxy=None, open_timeout=10) as ws:
        frame: dict[str, object] = json.loads(await asyncio.wait_for(ws.recv(), 10))
        return frame


@pytest.mark.realgw
def test_real_gateway_answers_healthz(real_gateway: RealGateway) -> None:
    status, _body = _get(f"{real_gateway.http_url}/healthz")
    assert status == 200
    assert real_gateway.url == f"ws://127.0.0.1:{real_gateway.port}"
    assert real_gateway.protocol == 4
    assert real_gateway.token not in repr(real_gateway)


@pytest.mark.realgw
async def test_real_gateway_sends_connect_challenge(real_gateway: RealGateway) -> None:
    frame = await _first_frame(real_gateway.url)
    assert frame["type"] == "event"
    assert frame["event"] == "connect.challenge"
    payload = frame["payload"]
    assert isinstance(payload, dict)
    assert payload["nonce"]


@pytest.mark.realgw
def test_real_gateway_cli_reaches_the_gateway(real_gateway: RealGateway) -> None:
    result = real_gateway.cli("gateway", "call", "health", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok"] is True


@pytest.mark.realgw
async def test_real_gateway_v3_sends_connect_challenge(
    real_gateway_v3: RealGateway,
) -> None:
    status, _body = _get(f"{real_gateway_v3.http_url}/healthz")
    assert status == 200
    assert real_gateway_v3.protocol == 3
    frame = await _first_frame(real_gateway_v3.url)
    assert frame["event"] == "connect.challenge"


@pytest.mark.browser
def test_browser_reads_the_title_of_a_data_url(page: Page) -> None:
    page.goto("data:text/html,<title>Harness check</title><h1>hello</h1>")
    assert page.title() == "Harness check"
    assert page.text_content("h1") == "hello"


@pytest.mark.browser
def test_page_events_records_dialogs_and_errors(
    page: Page, page_events: PageEvents
) -> None:
    page_events.assert_clean()
    page.set_content(
        "<script>console.error('boom'); alert('xss'); throw new Error('oops');</script>"
    )
    page.wait_for_timeout(100)  # let the page errors arrive
    assert page_events.dialogs == ["alert: xss"]
    assert page_events.console_errors == ["boom"]
    assert any("oops" in error for error in page_events.page_errors)
    with pytest.raises(AssertionError):
        page_events.assert_no_dialogs()


async def test_async_tests_still_run_between_browser_tests() -> None:
    """Playwright's loop is not left registered as the running loop after a browser test."""
    await asyncio.sleep(0)


class _RawClient:
    """Just enough of the protocol to drive one run on the real gateway: requests by id, events
    collected in order (the harness check does not go through the Control Center's client)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self.pending: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def read(self) -> None:
        async for raw in self.ws:
            frame = json.loads(raw)
            if frame.get("type") == "res" and frame.get("id") in self.pending:
                self.pending.pop(frame["id"]).set_result(frame)
            elif frame.get("type") == "event":
                self.events.append(frame)

    async def req(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        rid = uuid.uuid4().hex
        self.pending[rid] = asyncio.get_running_loop().create_future()
        await self.ws.send(
            json.dumps({"type": "req", "id": rid, "method": method, "params": params})
        )
        return await asyncio.wait_for(self.pending[rid], 30)

    async def event(
        self, match: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for frame in self.events:
                if match(frame):
                    return frame
            await asyncio.sleep(0.05)
        raise AssertionError(
            f"no such event in {timeout} s: {[e['event'] for e in self.events]}"
        )


@pytest.mark.realgw
async def test_real_gateway_asks_before_exec_and_prices_the_run(
    real_gateway: RealGateway,
) -> None:
    """The project's harness is the shared one as it is now: `[[fake:exec CMD]]` makes the fake
    model call `exec`, the gateway asks an approval client first (tools.exec.mode "ask"), the run
    goes on after allow-once, and the session's usage is priced (openclaw.json's model cost).
    Seen on 2026.9.6: a connection with operator.approvals but without operator.admin gets no
    exec.approval.requested at all (the run goes on without asking it), so the scopes hold both."""
    async with connect(
        real_gateway.url, proxy=None, open_timeout=10, max_size=None
    ) as ws:
        json.loads(await asyncio.wait_for(ws.recv(), 10))  # connect.challenge
        client = _RawClient(ws)
        reader = asyncio.create_task(client.read())
        try:
            hello = await client.req(
                "connect",
                {
                    "minProtocol": 3,
                    "maxProtocol": 4,
                    "client": {
                        "id": "cli",
                        "version": "0.0.0-test",
                        "platform": "linux",
                        "mode": "cli",
                    },
                    "role": "operator",
                    "scopes": [
                        "operator.read",
                        "operator.write",
                        "operator.admin",
                        "operator.approvals",
                    ],
                    "caps": ["tool-events", "approvals"],
                    "auth": {"token": real_gateway.token},
                },
            )
            assert hello.get("ok"), hello.get("error")
            key = f"agent:main:harness-{uuid.uuid4().hex[:6]}"
            run = str(uuid.uuid4())
            sent = await client.req(
                "chat.send",
                {
                    "sessionKey": key,
                    "message": "please [[fake:exec uname -s]] now",
                    "idempotencyKey": run,
                },
            )
            assert sent.get("ok"), sent.get("error")
            asked = await client.event(
                lambda e: e["event"] == "exec.approval.requested", 60
            )
            request = asked["payload"]["request"]
            assert request["command"] == "uname -s"
            assert "allow-once" in request["allowedDecisions"]
            resolved = await client.req(
                "exec.approval.resolve",
                {"id": asked["payload"]["id"], "decision": "allow-once"},
            )
            assert resolved.get("ok"), resolved.get("error")

            def finished(e: dict[str, Any]) -> bool:
                p = e.get("payload") or {}
                return (
                    e["event"] == "chat"
                    and p.get("runId") == run
                    and p.get("state") in ("final", "error", "aborted")
                )

            done = (await client.event(finished, 90))["payload"]
            assert done["state"] == "final"
            text = "".join(
                c.get("text", "")
                for c in done["message"]["content"]
                if isinstance(c, dict)
            )
            assert text.startswith("Ran it: Linux"), text
            listed = await client.req("sessions.list", {})
            row = next(s for s in listed["payload"]["sessions"] if s["key"] == key)
            assert row["estimatedCostUsd"] > 0, row
        finally:
            reader.cancel()
