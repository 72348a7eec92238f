"""Debian's Chromium, driven by Playwright's sync API, as pytest fixtures (a helper module, not a
conftest). Register them in ``tests/conftest.py``::

    from tests.browser import browser, browser_context, chromium, page, page_events  # noqa: F401

- ``chromium`` (session): launches ``/usr/bin/chromium`` (``$CHROMIUM_PATH``) headless, once per
  session. Missing: the tests are skipped, or fail under ``CI=true``.
- ``browser`` (per test): that Browser, made usable for the test (see "event loops" below).
- ``browser_context`` / ``page`` (per test): a fresh context and page, closed after the test; a
  screenshot goes to ``test-artifacts/screenshots/`` when the test fails.
- ``page_events`` (per test): the :class:`PageEvents` of that context: JS dialogs (``alert``,
  ``confirm``, ``prompt``; all dismissed), console errors, uncaught page errors and failed
  requests, so XSS tests can ``page_events.assert_no_dialogs()``.

Browser tests must be sync tests (``def``, not ``async def``); the Django server they talk to
runs in another thread (pytest-django's ``live_server`` or similar).

Event loops: Playwright's sync API runs an asyncio loop in the main thread (in a greenlet) and,
between its calls, leaves that loop registered as the thread's *running* loop. While that is so,
pytest-asyncio cannot run async tests ("Cannot run the event loop while another loop is
running") and Django's ``async_unsafe`` guard refuses ORM calls. So the loop is registered only
while a browser test runs: the ``browser`` fixture registers it before the test and removes it
afterwards (:class:`_PlaywrightSession`). Do not call Playwright outside the ``browser`` /
``browser_context`` / ``page`` fixtures: a call while the loop is not registered kills the
Playwright connection for the rest of the session.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import socket
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Dialog,
    Page,
    Playwright,
    Request,
    WebError,
    sync_playwright,
)

from tests.helpers import wait_until

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
SCREENSHOTS = ARTIFACTS / "screenshots"
CHROMIUM_PATH = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
DEFAULT_TIMEOUT_MS = 10_000  # actions and expectations; a local page needs far less
NAVIGATION_TIMEOUT_MS = 15_000


@dataclass
class PageEvents:
    """What the pages of one browser context did that a test may need to assert on."""

    dialogs: list[str] = field(default_factory=list)  # "alert: <message>"
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)  # uncaught exceptions
    failed_requests: list[str] = field(default_factory=list)  # "<url>: <error>"

    def assert_no_dialogs(self) -> None:
        """For XSS tests: no injected ``alert()``/``confirm()``/``prompt()`` ran."""
        assert not self.dialogs, f"JS dialogs opened: {self.dialogs}"

    def assert_clean(self) -> None:
        """No dialog, no console error and no uncaught exception."""
        self.assert_no_dialogs()
        assert not self.page_errors, f"uncaught page errors: {self.page_errors}"
        assert not self.console_errors, f"console errors: {self.console_errors}"

    def attach(self, context: BrowserContext) -> None:
        context.on("dialog", self._on_dialog)
        context.on("console", self._on_console)
        context.on("weberror", self._on_web_error)
        context.on("requestfailed", self._on_request_failed)

    def _on_dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()  # a dialog left open blocks the page

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    def _on_web_error(self, error: WebError) -> None:
        self.page_errors.append(str(error.error))

    def _on_request_failed(self, request: Request) -> None:
        self.failed_requests.append(f"{request.url}: {request.failure}")


class _PlaywrightSession:
    """The session's Playwright and Chromium, and the registration of Playwright's event loop
    as the main thread's running loop (see the module docstring)."""

    def __init__(self, playwright: Playwright, browser: Browser) -> None:
        self.playwright = playwright
        self.browser = browser
        # Playwright's loop, which its last sync call registered as the running loop.
        loop = asyncio._get_running_loop()
        if loop is None:
            raise RuntimeError(
                "Playwright's sync API no longer registers its loop: see browser.py"
            )
        self._loop = loop

    def activate(self) -> None:
        """Register Playwright's loop: needed before any Playwright call."""
        asyncio._set_running_loop(self._loop)

    def deactivate(self) -> None:
        """Unregister it, for async tests and Django's async-safety guard."""
        if asyncio._get_running_loop() is self._loop:
            asyncio._set_running_loop(None)

    def close(self) -> None:
        self.activate()
        try:
            self.browser.close()
        finally:
            self.playwright.stop()  # leaves no loop registered


def under_ci() -> bool:
    return os.environ.get("CI") == "true"


def launch_chromium() -> _PlaywrightSession:
    if not os.access(CHROMIUM_PATH, os.X_OK):
        if under_ci():
            pytest.fail(
                f"Chromium not installed at {CHROMIUM_PATH} (CI=true: browser tests must run): "
                "apt-get install chromium, or run scripts/ensure-services.sh",
                pytrace=False,
            )
        pytest.skip("Chromium not installed: apt-get install chromium")
    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM_PATH, headless=True, args=list(CHROMIUM_ARGS)
        )
    except BaseException:
        playwright.stop()
        raise
    return _PlaywrightSession(playwright, browser)


@pytest.fixture(scope="session")
def chromium() -> Iterator[_PlaywrightSession]:
    """Chromium, launched once per session; use ``browser`` or ``page`` in tests."""
    session = launch_chromium()
    session.deactivate()
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def browser(
    chromium: _PlaywrightSession, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Browser]:
    """The session's Chromium, usable for the duration of one (sync) test."""
    # Strictly necessary, and only for browser tests: while Playwright's loop is registered as
    # the running loop (all through a browser test), Django's async_unsafe guard would raise
    # SynchronousOnlyOperation for every ORM call of the test and its fixtures, although no
    # Django code runs in that loop: the test body is plain synchronous code in the main thread
    # and the server under test runs in its own thread. monkeypatch restores the variable after
    # the test, so every other test keeps the guard.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    chromium.activate()
    try:
        yield chromium.browser
    finally:
        chromium.deactivate()


@pytest.fixture
def page_events() -> PageEvents:
    """Dialogs, console errors, page errors and failed requests of the test's browser context."""
    return PageEvents()


@pytest.fixture
def browser_context(
    browser: Browser, page_events: PageEvents, request: pytest.FixtureRequest
) -> Iterator[BrowserContext]:
    """A fresh browser context (cookies, storage) for one test, closed after it."""
    context = browser.new_context(
        viewport={"width": 1280, "height": 800}, locale="en-US", timezone_id="UTC"
    )
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    context.set_default_navigation_timeout(NAVIGATION_TIMEOUT_MS)
    page_events.attach(context)
    failed_before = request.session.testsfailed
    try:
        yield context
    finally:
        try:
            # The call phase is reported before teardown: a failed test has raised the count.
            if request.session.testsfailed > failed_before:
                for number, open_page in enumerate(context.pages):
                    suffix = f"-{number}" if number else ""
                    save_screenshot(open_page, f"{request.node.nodeid}{suffix}")
        finally:
            context.close()


@pytest.fixture
def page(browser_context: BrowserContext) -> Page:
    """A new page in the test's own browser context."""
    return browser_context.new_page()


def save_screenshot(page: Page, name: str) -> Path | None:
    """Save a full-page screenshot to test-artifacts/screenshots/<name>.png (gitignored)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") + ".png")
    try:
        page.screenshot(path=str(path), full_page=True)
    except Exception:  # a crashed or closed page: the test's own error matters more
        return None
    return path


# -- the stack the browser tests drive: the simulator and `manage.py serve` ----------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def main_session_pk(stack: Stack) -> int:
    def find() -> int | None:
        with stack.db() as conn:
            row = conn.execute(
                "select id from fleet_session where key = 'agent:main:main'"
            ).fetchone()
        return int(row[0]) if row else None

    return int(wait_until(find, 20, "the main session row"))


def wait_js(page: Any, expression: str, timeout_ms: int = 10_000) -> None:
    """Poll a JS expression until it is truthy. Not page.wait_for_function: Playwright's
    in-page poller evaluates the string with eval, which the page's CSP refuses."""
    waited = 0
    while not page.evaluate(expression):
        assert waited < timeout_ms, f"timed out waiting for {expression}"
        page.wait_for_timeout(20)
        waited += 20


def send(page: Any, text: str) -> None:
    page.fill("#composer textarea", text)
    page.press("#composer textarea", "Enter")
