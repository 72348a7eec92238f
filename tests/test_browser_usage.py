"""The usage page in Debian's Chromium against `manage.py serve --demo` (daphne, the worker
and the simulator in one real process, its own data folder): the first start has a month of
history; the SVG chart has one bar per non-zero day and series of its numbers table; the
filters change it (and the URL); it reads in dark mode and on a 390 px screen; the CSV
(streamed by daphne) holds exactly the tables' rows."""

from __future__ import annotations

import csv
import datetime
import io
import json
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

from tests.helpers import free_port, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parent.parent


class Demo:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.password = secrets.token_urlsafe(12)
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        env.update(
            CONTROLCENTER_DATA_DIR=str(tmp),
            CONTROLCENTER_ADMIN_PASSWORD=self.password,
            REDIS_URL="",
            DJANGO_DEBUG="True",
        )
        self.log = (tmp / "serve.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "serve", "--demo", "--port", str(self.port)],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connected(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as r:
            return "connected" in (json.load(r).get("states") or {})

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    d = Demo(tmp_path)
    try:
        wait_until(d.connected, 90, "the demo gateway", tolerate=(OSError,))
        yield d
    finally:
        d.stop()


def _login(page: Any, demo: Demo) -> None:
    page.goto(f"{demo.url}/accounts/login/")
    page.fill("#id_username", "admin")
    page.fill("#id_password", demo.password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{demo.url}/")


def _expected_bars(page: Any) -> int:
    """Non-zero cells of the chart's numbers table."""
    cells = page.locator('table[data-table="days"] tbody td').all_text_contents()
    return sum(1 for c in cells if float(c) > 0)


def _table(page: Any, name: str) -> list[list[str]]:
    rows = page.locator(f'table[data-table="{name}"] tbody tr')
    out = []
    for i in range(rows.count()):
        cells = rows.nth(i).locator("th, td").all_inner_texts()
        if len(cells) == 5:
            out.append([c.strip() for c in cells])
    return out


def test_the_usage_page_draws_filters_reads_and_exports(
    demo: Demo, browser: Any, page_events: Any
) -> None:
    context = browser.new_context()
    page = context.new_page()
    _login(page, demo)
    page.goto(f"{demo.url}/usage/?period=30d&stack=agent")
    # The history from the simulator is booked on connect: wait for a month of it.
    wait_until(
        lambda: (
            page.reload()
            or int(page.get_attribute("#cost-chart", "data-bars") or 0) > 10
        ),
        60,
        "a month of history",
    )
    bars = page.locator("#cost-chart rect.bar")
    assert bars.count() == _expected_bars(page) > 10
    days_with_cost = {
        b.split(" ")[0]
        for b in page.locator("#cost-chart rect.bar title").all_text_contents()
    }
    assert len(days_with_cost) > 5  # spread over the month
    all_count = bars.count()

    # A filter: one agent. The chart redraws (htmx) and the URL says so.
    agents = page.locator('select[name="agent"] option').all_inner_texts()
    agent = next(a for a in agents if a != "All")
    page.select_option('select[name="agent"]', agent)
    page.wait_for_url(f"**agent={agent}**")
    page.wait_for_function(
        "n => document.querySelectorAll('#cost-chart rect.bar').length < n",
        arg=all_count,
    )
    assert page.locator("#cost-chart rect.bar").count() == _expected_bars(page)
    legend = page.locator(".legend li").all_inner_texts()
    assert [item.strip() for item in legend] == [agent]

    # The CSV of what is shown (through daphne, streamed) holds exactly the tables' rows.
    # The demo keeps booking runs today, and the worker books the month of history one
    # session at a time, so the comparison reads a range that ended yesterday once its
    # CSV holds still: a table and a CSV fetched a moment apart then see the same rows.
    today = datetime.datetime.now(datetime.UTC).date()  # the server keeps UTC days
    start, end = today - datetime.timedelta(days=29), today - datetime.timedelta(days=1)
    past = f"/usage/?period=custom&start={start}&end={end}&agent={agent}"
    page.goto(f"{demo.url}{past}")
    href = page.get_attribute("a.csv", "href")
    assert href is not None
    last: list[str] = [""]

    def holds_still() -> bool:
        text = page.request.get(f"{demo.url}{href}").text()
        same, last[0] = text == last[0], text
        time.sleep(0 if same else 1.0)
        return same

    wait_until(holds_still, 60, "the booked history holds still")
    page.goto(f"{demo.url}{past}")
    response = page.request.get(f"{demo.url}{href}")
    assert response.ok and response.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(response.text())))
    for name in ("agent", "model", "gateway", "channel", "person"):
        shown = _table(page, name)
        exported = [r[1:] for r in rows if r and r[0] == name]
        assert exported == shown, name
    page_events.assert_no_dialogs()
    context.close()

    # Dark mode: the page and the bars take the dark colours.
    dark = browser.new_context(color_scheme="dark")
    page = dark.new_page()
    _login(page, demo)
    page.goto(f"{demo.url}/usage/")
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    bar_fill = page.evaluate(
        "getComputedStyle(document.querySelector('#cost-chart rect.bar')).fill"
    )
    assert background == "rgb(15, 17, 21)"
    assert bar_fill == "rgb(110, 160, 255)"
    dark.close()

    # A phone: 390 px wide, nothing wider than the screen, the chart fits.
    phone = browser.new_context(viewport={"width": 390, "height": 844})
    page = phone.new_page()
    _login(page, demo)
    page.goto(f"{demo.url}/usage/")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    box = page.locator("#cost-chart").bounding_box()
    assert box is not None and box["width"] <= 390 and box["height"] > 100
    phone.close()
