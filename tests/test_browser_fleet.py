"""The fleet page in Debian's Chromium against real processes: the gateway simulator
(`manage.py fakegateway`) and the Control Center (`manage.py serve`: daphne + worker) on
free ports with their own data folder. Log in, see the fleet, watch rows change live,
see the banner when the gateway goes away and comes back, and check that gateway text with
markup stays text, in the page and in a pushed fragment."""

from __future__ import annotations

import json
import os
import secrets
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from django.utils.timesince import timesince

from tests.browser import ARTIFACTS

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
XSS = "<img src=x onerror=alert(1)>"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.gw_port = free_port()
        self.web_port = free_port()
        self.password = secrets.token_urlsafe(12)
        self.token = secrets.token_urlsafe(16)
        # The stack runs on its embedded defaults (its own SQLite file, in-memory layer),
        # whichever database the test run itself uses.
        inherited = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        self.env = {
            **inherited,
            "CONTROLCENTER_DATA_DIR": str(tmp),
            "CONTROLCENTER_ADMIN_PASSWORD": self.password,
            "OPENCLAW_GATEWAY_URL": f"ws://127.0.0.1:{self.gw_port}",
            "OPENCLAW_GATEWAY_TOKEN": self.token,
            "GATEWAY_WS_READY_TIMEOUT": "2",
            "GATEWAY_REST_POLL_INTERVAL": "1",
            "REDIS_URL": "",
            # Static files straight from the finders (no collectstatic in a test).
            "DJANGO_DEBUG": "True",
        }
        self.gateway: subprocess.Popen[bytes] | None = None
        self.web: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def _spawn(self, *args: str, log: str) -> subprocess.Popen[bytes]:
        out = open(self.tmp / log, "ab")  # noqa: SIM115 - lives as long as the process
        return subprocess.Popen(
            [sys.executable, "manage.py", *args],
            cwd=REPO,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def start_gateway(self) -> None:
        self.gateway = self._spawn(
            "fakegateway",
            "--port",
            str(self.gw_port),
            "--sessions",
            "12",
            "--event-rate",
            "4",
            log="gateway.log",
        )

    def stop_gateway(self) -> None:
        if self.gateway is not None:
            self.gateway.terminate()
            self.gateway.wait(10)
            self.gateway = None

    def start_web(self) -> None:
        self.web = self._spawn("serve", "--port", str(self.web_port), log="web.log")

    def health(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as r:
                return dict(json.load(r))
        except OSError:
            return None

    def gateway_state(self) -> str | None:
        # The stack has one gateway; an anonymous /healthz counts gateways per state.
        body = self.health()
        if not body or not body.get("states"):
            return None
        return str(next(iter(body["states"])))

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.tmp / "controlcenter.sqlite3", timeout=20)

    def stop(self) -> None:
        for proc in (self.web, self.gateway):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    try:
        s.start_gateway()
        s.start_web()
        wait_until(
            lambda: s.gateway_state() == "connected", 40, "the gateway to connect"
        )
        yield s
    finally:
        s.stop()


def log_in(page: Any, stack: Stack) -> None:
    page.goto(f"{stack.url}/")
    assert "/accounts/login/" in page.url
    page.fill("#id_username", "admin")
    page.fill("#id_password", stack.password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{stack.url}/")


def screenshot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_the_fleet_lives_in_the_browser(
    stack: Stack,
    browser: Any,  # noqa: F811
    page_events: Any,  # noqa: F811
) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page_events.attach(context)
    page = context.new_page()
    log_in(page, stack)

    # The fleet: a connected gateway, its agents, sessions; the socket is live.
    page.wait_for_selector(".gw-card.state-connected")
    page.wait_for_selector("#live-status:text('live')")
    assert page.locator("#session-rows tr[id^=session-]").count() >= 5
    page.evaluate(
        """() => { window.__frames = []; document.addEventListener('htmx:wsAfterMessage',
           e => window.__frames.push(e.detail.message)); }"""
    )

    # A row changes live (the simulator emits sessions.changed in the background).
    before = page.inner_text("#session-rows")
    wait_until(
        lambda: page.inner_text("#session-rows") != before, 20, "a row to change live"
    )
    assert page.evaluate("window.__frames.length") >= 1
    screenshot(page, "fleet-light.png")

    # Search as you type: the list narrows without a page load.
    page.evaluate("window.__marker = 1")
    page.fill("input[name=q]", "zz-no-such-session")
    page.wait_for_selector("#session-rows td.empty")
    assert page.evaluate("window.__marker") == 1
    page.fill("input[name=q]", "")
    page.wait_for_selector("#session-rows tr[id^=session-]")

    # Gateway text with markup: escaped in a pushed fragment and in the page.
    with stack.db() as db:
        db.execute("UPDATE fleet_session SET label = ?, display_name = ?", (XSS, XSS))
    page.evaluate("window.__frames = []")
    wait_until(
        lambda: page.evaluate(
            "window.__frames.some(f => f.includes('&lt;img src=x onerror=alert(1)&gt;'))"
        ),
        30,
        "a pushed fragment with the escaped label",
    )
    wait_until(lambda: XSS in page.inner_text("#session-rows"), 10, "the label as text")
    assert page.locator("img").count() == 0
    page.reload()
    page.wait_for_selector("#live-status:text('live')")
    assert XSS in page.inner_text("#session-rows")
    assert page.locator("img").count() == 0
    page.wait_for_timeout(500)
    page_events.assert_clean()  # no dialog, no console error, no failed request

    # The gateway goes away: a banner; it comes back: the banner goes, without a reload.
    stack.stop_gateway()
    page.wait_for_selector(".gw-card:not(.state-connected) .banner", timeout=30_000)
    banner = page.inner_text(".gw-card .banner")
    assert banner
    screenshot(page, "fleet-gateway-away.png")
    stack.start_gateway()
    page.wait_for_selector(".gw-card.state-connected", timeout=40_000)
    assert page.locator(".gw-card .banner").count() == 0
    context.close()

    # Dark mode and a phone screen, for the eye.
    dark = browser.new_context(
        color_scheme="dark", viewport={"width": 390, "height": 844}
    )
    page = dark.new_page()
    page.clock.install()
    log_in(page, stack)
    page.wait_for_selector("#live-status:text('live')")
    screenshot(page, "fleet-dark-phone.png")
    page.set_viewport_size({"width": 1280, "height": 900})
    screenshot(page, "fleet-dark.png")

    # Relative times move on between pushes: three hours later, every row says so.
    page.clock.fast_forward("03:00:00")
    shown = page.evaluate(
        """() => [Date.now(), [...document.querySelectorAll('#session-rows time.ago')]
           .map(t => [t.getAttribute('datetime'), t.textContent])]"""
    )
    now = datetime.fromtimestamp(shown[0] / 1000, tz=UTC)
    assert shown[1]
    for at, text in shown[1]:
        expected = timesince(datetime.fromisoformat(at), now)
        if "month" not in expected and "year" not in expected:
            assert text == f"{expected} ago"
        assert "0\u00a0minutes" not in text
    dark.close()


def test_the_page_says_reconnecting_and_catches_up(
    stack: Stack,
    browser: Any,  # noqa: F811
) -> None:
    context = browser.new_context()
    page = context.new_page()
    log_in(page, stack)
    page.wait_for_selector("#live-status:text('live')")
    assert stack.web is not None
    stack.web.terminate()
    stack.web.wait(10)
    page.wait_for_selector("#live-status:text('reconnecting…')", timeout=10_000)
    # Agents, unlike sessions, are never changed by the simulator's background events, so
    # the resync after the restart keeps this edit and the page can only learn it from the
    # state the consumer sends on reconnect.
    with stack.db() as db:
        db.execute("UPDATE fleet_agent SET name = 'changed while away'")
    stack.start_web()
    page.wait_for_selector("#live-status:text('live')", timeout=60_000)
    wait_until(
        lambda: "changed while away" in page.inner_text("main"),
        10,
        "the state sent on reconnect",
    )
    context.close()
