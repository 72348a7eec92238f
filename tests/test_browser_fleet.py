"""The fleet page in Debian's Chromium against real processes: the gateway simulator
(`manage.py fakegateway`) and the Control Center (`manage.py serve`: daphne + worker) on
free ports with their own data folder. Log in, see the fleet, watch rows change live,
see the banner when the gateway goes away and comes back, and check that gateway text with
markup stays text, in the page and in a pushed fragment."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from django.utils.timesince import timesince

from tests.browser import Stack, log_in, screenshot
from tests.helpers import wait_until

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
XSS = "<img src=x onerror=alert(1)>"
# Keeps the page's sockets at hand, to deliver a frame to the page as the server would.
SOCKETS_KEPT = """(() => { const Native = window.WebSocket; window.__sockets = [];
  window.WebSocket = class extends Native {
    constructor(url, protocols) { super(url, protocols); window.__sockets.push(this); } };
})()"""
# Delivers a session-rows frame rendered for `query` on the fleet socket; answers how
# many "No sessions match" rows the list shows after it.
DELIVER_ROWS = """([rows, query]) => {
  const socket = window.__sockets.filter(s => s.url.includes('/ws/fleet/')).pop();
  const frame = rows.replace('<tbody id="session-rows"',
                             `<tbody id="session-rows" data-for="${query}"`);
  socket.dispatchEvent(new MessageEvent('message', { data: frame }));
  return document.querySelectorAll('#session-rows td.empty').length;
}"""


def test_the_fleet_lives_in_the_browser(
    stack: Stack,
    browser: Any,  # noqa: F811
    page_events: Any,  # noqa: F811
) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page_events.attach(context)
    context.add_init_script(SOCKETS_KEPT)
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
    unfiltered = re.sub(
        r' data-for="[^"]*"', "", page.inner_html("#session-list table")
    )
    page.fill("input[name=q]", "zz-no-such-session")
    page.wait_for_selector("#session-rows td.empty")
    assert page.evaluate("window.__marker") == 1
    # Rows the server rendered for the filters before the search, in flight when the
    # page swapped its list, do not cover the new list; rows for the filters it shows do.
    body = unfiltered[unfiltered.index("<tbody") :]
    assert page.evaluate(DELIVER_ROWS, [body, ""]) == 1
    assert page.evaluate(DELIVER_ROWS, [body, "q=zz-no-such-session"]) == 0
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
