"""Exec approvals in Debian's Chromium against the real OpenClaw 2026.9.6 (exec mode ask, the
harness's `[[fake:exec CMD]]` directive) and the Control Center's own processes
(`manage.py serve`: daphne + the worker) on free ports with their own data folder. An operator
(bob) sends from the chat page; the card appears with the command and a ticking countdown; a
viewer (carol), in a browser context of her own on the same chat page, sees it live with no
button; bob allows once, `Ran it: ...` streams into his page, carol's card turns into the
decision without a reload, and the inbox's history names bob. No console error (a CSP
violation is one) on either page."""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import DEFAULT_TIMEOUT_MS, PageEvents, Stack, send
from tests.helpers import wait_until

pytestmark = [pytest.mark.realgw, pytest.mark.browser, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parent.parent
LONG_MS = 120_000  # a real gateway and a fake model on a loaded machine

# Run in `manage.py shell` of the stack (again until the worker has stored the gateway's
# agent "main"; nothing is written before that); the password comes from the environment.
SETUP = """
import os
from django.contrib.auth.models import Group, Permission, User
from fleet.models import Agent, Gateway, Session
gateway = Gateway.objects.get(url=os.environ["OPENCLAW_GATEWAY_URL"])
assert Agent.objects.filter(gateway=gateway, agent_id="main").exists(), "no agent main yet"
decide = Permission.objects.get(content_type__app_label="approvals", codename="decide")
for name in ("operator", "admin"):
    Group.objects.get_or_create(name=name)[0].permissions.add(decide)
for name, role in (("bob", "operator"), ("carol", "viewer")):
    user = User.objects.create_user(name, password=os.environ["CC_PERSONA_PASSWORD"])
    user.groups.add(Group.objects.get_or_create(name=role)[0])
session = Session.objects.create(gateway=gateway, key=os.environ["CC_SESSION_KEY"],
                                 agent_key="main")
print("session", session.pk)
"""


class RealStack(Stack):
    """`manage.py serve` pointed at the real gateway (no simulator)."""

    def __init__(self, tmp: Path, gateway: Any) -> None:
        super().__init__(tmp)
        self.env.update(
            OPENCLAW_GATEWAY_URL=gateway.url,
            OPENCLAW_GATEWAY_TOKEN=gateway.token,
            GATEWAY_WS_READY_TIMEOUT="60",
            CC_PERSONA_PASSWORD=secrets.token_urlsafe(12),
        )

    def shell(self, code: str, **env: str) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", code],
            cwd=REPO,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            return ""
        return result.stdout


@pytest.fixture
def real_stack(tmp_path: Path, real_gateway: Any) -> Iterator[RealStack]:
    s = RealStack(tmp_path, real_gateway)
    try:
        s.start_web()
        wait_until(
            lambda: s.gateway_state() == "connected", 120, "the real gateway to connect"
        )
        yield s
    finally:
        s.stop()


def new_session(stack: RealStack) -> int:
    key = f"agent:main:cc-browser-approve-{uuid.uuid4().hex[:8]}"
    out = wait_until(
        lambda: stack.shell(SETUP, CC_SESSION_KEY=key) or None,
        90,
        "users and a session",
    )
    match = re.search(r"^session (\d+)$", out, re.M)
    assert match, out
    return int(match.group(1))


def open_chat(
    browser: Any, stack: RealStack, who: str, pk: int
) -> tuple[Any, Any, PageEvents]:
    """Log in as `who` in a context of its own and open the chat; returns once the chat
    socket has sent its first frame (the page is then subscribed to the session)."""
    events = PageEvents()
    context = browser.new_context(
        viewport={"width": 1280, "height": 900}, locale="en-US", timezone_id="UTC"
    )
    context.set_default_timeout(DEFAULT_TIMEOUT_MS * 3)
    context.set_default_navigation_timeout(60_000)
    events.attach(context)
    page = context.new_page()
    page.goto(f"{stack.url}/accounts/login/")
    page.fill("#id_username", who)
    page.fill("#id_password", stack.env["CC_PERSONA_PASSWORD"])
    page.click("button[type=submit]")
    page.wait_for_url(f"{stack.url}/")
    frames: list[str] = []

    def on_socket(ws: Any) -> None:
        if f"/ws/chat/{pk}/" in ws.url:
            ws.on("framereceived", lambda payload: frames.append(str(payload)))

    page.on("websocket", on_socket)
    page.goto(f"{stack.url}/chat/{pk}/")
    page.wait_for_selector("#chat-approvals", state="attached")
    waited = 0
    while not frames:
        assert waited < LONG_MS, f"{who}'s chat socket sent nothing"
        page.wait_for_timeout(50)
        waited += 50
    return context, page, events


def js_wait(page: Any, expression: str, what: str, timeout_ms: int = LONG_MS) -> None:
    """Poll a JS expression (the page's CSP refuses Playwright's eval-based poller)."""
    waited = 0
    while not page.evaluate(expression):
        assert waited < timeout_ms, f"timed out waiting for {what}"
        page.wait_for_timeout(100)
        waited += 100


COUNTDOWN = (
    "(() => { const t = document.querySelector('#chat-approvals time.countdown');"
    " return t ? t.textContent : '' })()"
)


def test_an_operator_allows_once_and_a_viewer_watches_it_live(
    real_stack: RealStack, browser: Any
) -> None:
    stack = real_stack
    pk = new_session(stack)
    contexts = []
    try:
        bob_context, bob, bob_events = open_chat(browser, stack, "bob", pk)
        contexts.append(bob_context)
        carol_context, carol, carol_events = open_chat(browser, stack, "carol", pk)
        contexts.append(carol_context)
        assert carol.locator("#chat-approvals .approval-card").count() == 0
        carol.evaluate("window.__noReload = 1")

        send(bob, "please [[fake:exec uname -a]] now")
        bob.wait_for_selector(".msg.user:has-text('please')")

        # The card, with the command, a countdown and the buttons, on bob's page.
        card = "#chat-approvals .approval-card[data-state='pending']"
        bob.wait_for_selector(f"{card}:has-text('uname -a')", timeout=LONG_MS)
        assert bob.inner_text(f"{card} .approval-command") == "uname -a"
        js_wait(bob, f"/^\\d+:\\d\\d$/.test({COUNTDOWN})", "bob's countdown")
        first = bob.evaluate(COUNTDOWN)
        js_wait(bob, f"{COUNTDOWN} !== {first!r}", "bob's countdown to tick", 15_000)
        allow = bob.locator(f"{card} form.approval-actions button[value='allow-once']")
        assert allow.count() == 1

        # Live on carol's page (no reload), with the countdown and without any button.
        carol.wait_for_selector(f"{card}:has-text('uname -a')", timeout=LONG_MS)
        js_wait(carol, f"/^\\d+:\\d\\d$/.test({COUNTDOWN})", "carol's countdown")
        assert carol.locator("#chat-approvals .approval-actions").count() == 0
        assert carol.locator("#chat-approvals button").count() == 0
        assert carol.evaluate("window.__noReload") == 1

        # Allow once: the run goes on and its reply streams into bob's page.
        allow.click()
        bob.wait_for_selector(
            ".msg.assistant:has-text('Ran it:')", timeout=LONG_MS, state="attached"
        )
        bob.wait_for_selector(
            ".msg.assistant.state-final:has-text('Ran it:')", timeout=LONG_MS
        )
        reply = bob.locator(".msg.assistant.state-final:has-text('Ran it:')").last
        assert "Ran it: Linux" in reply.inner_text()

        # Carol's card turns into the decision, pushed.
        decided = (
            "#chat-approvals .approval-card[data-state='allowed'] .approval-outcome"
        )
        carol.wait_for_selector(f"{decided}:has-text('by bob')", timeout=LONG_MS)
        assert re.match(r"Allowed by bob\b", carol.inner_text(decided))
        assert carol.evaluate("window.__noReload") == 1
        assert carol.locator("#chat-approvals button").count() == 0

        # The inbox's history names bob.
        carol.goto(f"{stack.url}/approvals/")
        row = carol.locator(
            ".approval-history tr.history-row[data-state='allowed']:has-text('uname -a')"
        )
        row.first.wait_for()
        cells = row.first.locator("td").all_inner_texts()
        assert "allow-once" in cells and "bob" in cells, cells

        for who, events in (("bob", bob_events), ("carol", carol_events)):
            assert not events.console_errors, (
                who,
                events.console_errors,
            )  # CSP included
            events.assert_clean()
    finally:
        for context in contexts:
            context.close()
