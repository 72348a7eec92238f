"""The test harness itself works: the real gateway fixtures (tests/realgw.py) and the browser
fixtures (tests/browser.py)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import TYPE_CHECKING

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
