"""Alerts in Debian's Chromium against real processes: the gateway simulator
(`manage.py fakegateway`) and the Control Center (`manage.py serve`: daphne + the worker,
which runs the alert steps) on free ports with their own data folder. The gateway goes
away: the alert count in the navigation moves without a reload; acknowledging the alert on
/alerts/ brings it back down, live, and is in the audit log."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parent.parent

RULE = """
from alerts.models import AlertRule
AlertRule.objects.create(name="offline", kind="gateway_offline", for_seconds=2,
                         cooldown_seconds=0)
"""


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.gw_port = free_port()
        self.web_port = free_port()
        self.password = secrets.token_urlsafe(12)
        inherited = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        self.env = {
            **inherited,
            "CONTROLCENTER_DATA_DIR": str(tmp),
            "CONTROLCENTER_ADMIN_PASSWORD": self.password,
            "OPENCLAW_GATEWAY_URL": f"ws://127.0.0.1:{self.gw_port}",
            "OPENCLAW_GATEWAY_TOKEN": secrets.token_urlsafe(16),
            "GATEWAY_WS_READY_TIMEOUT": "60",
            "ALERTS_EVALUATE_INTERVAL": "0.5",
            "REDIS_URL": "",
            "DJANGO_DEBUG": "True",  # static files from the finders
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.gateway: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def spawn(self, *args: str, log: str) -> subprocess.Popen[bytes]:
        with (self.tmp / log).open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "manage.py", *args],
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def gateway_state(self) -> str | None:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as r:
                body = json.load(r)
        except OSError:
            return None
        # The stack has one gateway; an anonymous /healthz counts gateways per state.
        states = body.get("states") or {}
        return str(next(iter(states))) if states else None

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.tmp / "controlcenter.sqlite3", timeout=20)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    try:
        s.gateway = s.spawn("fakegateway", "--port", str(s.gw_port), log="gateway.log")
        s.spawn("serve", "--port", str(s.web_port), log="web.log")
        wait_until(lambda: s.gateway_state() == "connected", 60, "the gateway")
        subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", RULE],
            cwd=REPO,
            env=s.env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield s
    finally:
        s.stop()


def test_it_moves_the_alert_count_live_and_audits_the_acknowledgement(
    stack: Stack, page: Any, page_events: Any
) -> None:
    page.goto(f"{stack.url}/")
    page.fill("#id_username", "admin")
    page.fill("#id_password", stack.password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{stack.url}/")
    badge = "#nav-badge-alerts"
    page.wait_for_selector(f'{badge}[data-count="0"]')
    page.wait_for_timeout(1000)  # the nav socket is open
    page.evaluate("window.__marker = 1")

    assert stack.gateway is not None
    stack.gateway.terminate()
    stack.gateway.wait(10)
    page.wait_for_selector(f'{badge}[data-count="1"]', timeout=30_000)
    assert page.evaluate("window.__marker") == 1  # no reload: pushed
    assert page.inner_text(f"{badge} .nav-count") == "1"

    page.click(badge)
    page.wait_for_url(f"{stack.url}/alerts/")
    item = page.locator(".open-alerts .alert-item").first
    assert "is not connected" in item.inner_text()
    page.wait_for_timeout(500)  # the page's sockets are open
    page.click(".open-alerts .alert-item button.ack")
    page.wait_for_selector('.open-alerts .alert-item[data-status="acknowledged"]')
    page.wait_for_selector(f'{badge}[data-count="0"]', timeout=10_000)
    assert page.locator(f"{badge} .nav-count").count() == 0
    assert "acknowledged by admin" in page.inner_text(".open-alerts .alert-item")

    with stack.db() as db:
        rows = db.execute(
            "SELECT username, result, params FROM fleet_auditevent "
            "WHERE action = 'alert.acknowledge'"
        ).fetchall()
    assert len(rows) == 1
    username, result, params = rows[0]
    assert (username, result) == ("admin", "ok")
    assert "is not connected" in json.loads(params)["title"]
    page_events.assert_no_dialogs()
    assert not page_events.page_errors, page_events.page_errors
