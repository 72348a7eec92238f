"""The Content-Security-Policy (controlcenter/csp.py) in Debian's Chromium against real
processes (`manage.py serve` and the simulator): every kind of page, ours and the admin's,
loads and works with no violation (no inline script, no <style>, no style attribute, in the
page or in a fragment htmx or the WebSocket swaps in)."""

from __future__ import annotations

from typing import Any

import pytest

from controlcenter.csp import POLICY
from tests.browser import Stack, log_in, main_session_pk, send
from tests.helpers import wait_until

pytestmark = pytest.mark.browser

# Runs before any script of each document: every violation, also from swapped-in HTML.
RECORD_VIOLATIONS = """
window.__csp = [];
document.addEventListener('securitypolicyviolation', e => window.__csp.push(
  `${e.violatedDirective} ${e.blockedURI || 'inline'} at ${e.sourceFile}:${e.lineNumber}`));
"""


class Visits:
    def __init__(self, page: Any, stack: Stack) -> None:
        self.page = page
        self.stack = stack
        self.violations: list[str] = []
        self.console: list[str] = []
        page.on("console", self._on_console)

    def _on_console(self, message: Any) -> None:
        if message.type == "error":
            self.console.append(message.text)

    def collect(self, what: str) -> None:
        found = self.page.evaluate("window.__csp || []")
        self.violations += [f"{what}: {v}" for v in found]

    def visit(self, path: str, ready: str = "body", settle_ms: int = 300) -> None:
        response = self.page.goto(f"{self.stack.url}{path}")
        assert response is not None and response.status == 200, (path, response)
        assert response.headers.get("content-security-policy") == POLICY, path
        self.page.wait_for_selector(ready)
        self.page.wait_for_timeout(settle_ms)
        self.collect(path)

    def assert_clean(self) -> None:
        assert not self.violations, "CSP violations:\n" + "\n".join(self.violations)
        csp_console = [m for m in self.console if "Content Security Policy" in m]
        assert not csp_console, csp_console


def _ids(stack: Stack) -> dict[str, int]:
    with stack.db() as db:
        gateway = db.execute("select id from fleet_gateway").fetchone()[0]
        session = db.execute("select id from fleet_session order by id").fetchone()[0]
        user = db.execute("select id from auth_user").fetchone()[0]
    return {"gateway": gateway, "session": session, "user": user}


def test_it_shows_every_page_without_a_csp_violation(
    stack: Stack,
    browser: Any,
) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.add_init_script(RECORD_VIOLATIONS)
    page = context.new_page()
    visits = Visits(page, stack)

    visits.visit("/accounts/login/", "#id_username")
    log_in(page, stack)
    visits.collect("login, submitted")

    # The fleet: live rows swapped in by the socket (with their context bars).
    visits.visit("/", "#live-status:text('live')", settle_ms=100)
    page.wait_for_selector("#session-rows .ctx")
    before = page.inner_text("#session-rows")
    wait_until(
        lambda: page.inner_text("#session-rows") != before, 20, "a row to change live"
    )
    page.fill("input[name=q]", "zz-no-such-session")  # an htmx swap
    page.wait_for_url("**q=zz-no-such-session**")  # pushed once the swap is done
    page.wait_for_timeout(300)
    visits.collect("fleet, live and searched")

    ids = _ids(stack)
    visits.visit(f"/sessions/{ids['session']}/", "#live-status:text('live')")

    # A chat: the streamed reply and the stored one are swapped in.
    pk = main_session_pk(stack)
    visits.visit(f"/chat/{pk}/", "#composer textarea")
    send(page, "hello under the policy")
    page.wait_for_selector(
        ".msg.assistant.state-final:has-text('so you can watch tokens arrive')",
        timeout=20_000,
    )
    visits.collect("chat, after a reply")
    visits.visit("/chat/search/?q=hello", ".agent-list")
    page.click(".agent-list button")  # "Start a chat": a form POST
    page.wait_for_selector("#composer textarea")
    visits.collect("a new chat")

    # The admin, its lists, change forms (with their widgets) and our pages in it.
    for path in (
        "/admin/",
        "/admin/fleet/gateway/",
        f"/admin/fleet/gateway/{ids['gateway']}/change/",
        f"/admin/fleet/gateway/{ids['gateway']}/test-connection/",
        f"/admin/fleet/gateway/{ids['gateway']}/rotate-identity/",
        "/admin/fleet/gateway/add/",
        "/admin/fleet/session/",
        f"/admin/fleet/session/{ids['session']}/change/",
        "/admin/fleet/auditevent/",
        "/admin/auth/user/",
        f"/admin/auth/user/{ids['user']}/change/",
        "/admin/auth/user/add/",
        "/admin/auth/group/add/",
    ):
        visits.visit(path, "#content")
    # The changelist's actions bar and the audit filters work under the policy.
    visits.visit("/admin/fleet/session/", "#changelist")
    page.check("#action-toggle")
    visits.collect("session changelist, all selected")

    visits.assert_clean()
    context.close()


def test_it_reports_a_violation_when_a_page_has_an_inline_style(
    stack: Stack,
    browser: Any,
) -> None:
    """The check above can fail: an inline style attribute set on the page is refused."""
    context = browser.new_context()
    context.add_init_script(RECORD_VIOLATIONS)
    page = context.new_page()
    visits = Visits(page, stack)
    visits.visit("/accounts/login/", "#id_username")
    page.evaluate(
        "document.body.insertAdjacentHTML('beforeend', '<p style=\"color: red\">x</p>')"
    )
    page.wait_for_timeout(200)
    visits.collect("injected")
    assert any("style-src" in v for v in visits.violations), visits.violations
    context.close()
