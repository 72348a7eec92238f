"""The socket closed on logout, in Debian's Chromium against a real server (`manage.py
serve --demo`: daphne, the worker and the gateway simulator on a free port, with its own
data folder): two tabs of one login, one logs out, and the other tab's fleet socket closes
within a second and says so instead of reconnecting."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent


class Server:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.password = secrets.token_urlsafe(12)
        inherited = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        env = {
            **inherited,
            "CONTROLCENTER_DATA_DIR": str(tmp),
            "CONTROLCENTER_ADMIN_PASSWORD": self.password,
            "REDIS_URL": "",
            "DJANGO_DEBUG": "True",  # static files from the finders
        }
        self.log = open(tmp / "web.log", "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "manage.py",
                "serve",
                "--demo",
                "--port",
                str(self.port),
                "--demo-sessions",
                "5",
            ],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "the server exited"
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("the server did not come up")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def test_it_closes_the_socket_of_another_tab_on_logout(
    server: Server,
    browser_context: Any,
) -> None:
    fleet = browser_context.new_page()
    fleet.goto(f"{server.url}/")
    fleet.fill("#id_username", "admin")
    fleet.fill("#id_password", server.password)
    fleet.click("button[type=submit]")
    fleet.wait_for_url(f"{server.url}/")
    fleet.wait_for_selector("#live-status:text('live')")
    fleet.evaluate(
        """() => document.addEventListener('htmx:wsClose', e => {
             window.__closed = {code: e.detail.event.code, at: Date.now()}; })"""
    )

    other = browser_context.new_page()  # same login (one cookie jar)
    other.goto(f"{server.url}/")
    other.wait_for_selector("#live-status:text('live')")
    clicked_at = time.time() * 1000
    with other.expect_navigation():
        other.click("form.whoami button[type=submit]")

    fleet.wait_for_function("window.__closed !== undefined", timeout=5_000)
    closed = fleet.evaluate("window.__closed")
    assert closed["code"] == 4003
    # Within a second of the click (the logout request included).
    assert 0 <= closed["at"] - clicked_at < 1000, closed
    fleet.wait_for_selector("#live-status:text('signed out')")
    # It stays closed: no reconnect with the session that is gone.
    fleet.wait_for_timeout(1500)
    assert fleet.evaluate("window.__closed.code") == 4003
    assert "signed out" in fleet.inner_text("#live-status")
    fleet.reload()
    assert "/accounts/login/" in fleet.url
