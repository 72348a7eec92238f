"""/cron/ in Debian's Chromium against `manage.py serve --demo` (daphne, the worker and the
simulator, whose demo runs a succeeding and a failing cron job): the jobs show, the failing
job's run arrives live (no reload), the cron count in the navigation moves, and "Run now"
goes through the worker and is audited."""

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


def _state(url: str) -> str | None:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
            states = json.load(r).get("states") or {}
    except OSError:
        return None
    return str(next(iter(states))) if states else None


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[dict[str, Any]]:
    port = free_port()
    password = secrets.token_urlsafe(12)
    env = {
        **{k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
        "CONTROLCENTER_DATA_DIR": str(tmp_path),
        "CONTROLCENTER_ADMIN_PASSWORD": password,
        "ALERTS_EVALUATE_INTERVAL": "0.5",
        "REDIS_URL": "",
        "DJANGO_DEBUG": "True",
    }
    with (tmp_path / "serve.log").open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "serve", "--demo", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _state(url) == "connected", 90, "the demo gateway")
        yield {
            "url": url,
            "password": password,
            "db": tmp_path / "controlcenter.sqlite3",
        }
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_demo_shows_cron_runs_live_and_run_now_is_audited(
    demo: dict[str, Any], page: Any, page_events: Any
) -> None:
    url = demo["url"]
    page.goto(f"{url}/cron/")
    page.fill("#id_username", "admin")
    page.fill("#id_password", demo["password"])
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/cron/")
    page.wait_for_selector(".cron-job:has-text('Hourly digest')")
    assert page.locator(".cron-job").count() == 3
    page.wait_for_timeout(500)  # the page's socket is open
    page.evaluate("window.__marker = 1")
    page.wait_for_selector(
        ".cron-job[data-status='error']:has-text('Nightly backup') .cron-run-row.bad",
        timeout=60_000,
    )
    assert page.evaluate("window.__marker") == 1  # pushed, not reloaded
    assert "backup target unreachable" in page.inner_text(
        ".cron-job:has-text('Nightly backup')"
    )
    page.wait_for_selector("#nav-badge-cron:not([data-count='0'])", timeout=10_000)

    page.click(".cron-job:has-text('Weekly announcement') button.cron-run")
    page.wait_for_selector(".cron-outcome.ok:has-text('Started')")
    page.wait_for_selector(
        ".cron-job:has-text('Weekly announcement') .cron-run-row", timeout=30_000
    )
    with sqlite3.connect(demo["db"], timeout=20) as db:
        rows = db.execute(
            "SELECT username, result FROM fleet_auditevent WHERE action = 'cron.run'"
        ).fetchall()
    assert rows == [("admin", "ok")]
    page_events.assert_no_dialogs()
    assert not page_events.page_errors, page_events.page_errors
