"""The chat in Debian's Chromium against real processes (the simulator and `manage.py serve`):
log in, open a chat, send, watch the reply grow token by token, stop a run, reload and see the
transcript; replies with script, an onerror image and a javascript: link execute nothing,
neither while streaming nor once stored."""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser import ARTIFACTS, Stack, log_in, main_session_pk, send, wait_js

pytestmark = pytest.mark.browser

XSS_REPLY = (
    "[[fake:echo]] Look: <script>alert(1)</script> and "
    "<img src=x onerror=alert(1)> and [click me](javascript:alert(1)) "
    "and [safe](https://example.com) [[/fake]]"
)


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=False)


def test_a_person_chats_watches_the_reply_grow_stops_a_run_and_reloads(
    stack: Stack,
    browser: Any,
    page_events: Any,
) -> None:
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page_events.attach(context)
    page = context.new_page()
    log_in(page, stack)
    pk = main_session_pk(stack)
    page.goto(f"{stack.url}/chat/{pk}/")
    # The socket back-fills the gateway's history on first view.
    wait_js(page, "document.querySelectorAll('#messages .msg').length >= 2")

    # Send, and watch the reply grow.
    send(page, "hello from the browser")
    page.wait_for_selector(".msg.user:has-text('hello from the browser')")
    lengths = []
    for _ in range(300):
        n = page.evaluate(
            "(() => { const t = document.querySelector('.msg.assistant.streaming .text');"
            " return t ? t.textContent.length : -1 })()"
        )
        lengths.append(n)
        if n == -1 and max(lengths) > 0:
            break
        page.wait_for_timeout(10)
    page.wait_for_selector(
        ".msg.assistant.state-final:has-text('so you can watch tokens arrive')"
    )
    partial = [n for n in lengths if 0 < n < 90]
    assert len(set(partial)) >= 2, f"the reply did not grow visibly: {lengths}"
    assert page.locator("#composer textarea").input_value() == ""
    shot(page, "chat-reply.png")

    # Stop a slow run.
    send(page, "[[fake:slow]] take your time")
    wait_js(
        page,
        "(() => { const t = document.querySelector('.msg.assistant.streaming .text');"
        " return t && t.textContent.length > 0 })()",
        15000,
    )
    page.wait_for_selector("#runbar .stop")
    shot(page, "chat-running.png")
    page.click("#runbar .stop")
    page.wait_for_selector(".msg.assistant.state-aborted", timeout=15000)
    assert page.locator("#runbar .stop").count() == 0

    # Hostile reply: escaped while streaming, sanitized once stored.
    send(page, XSS_REPLY)
    page.wait_for_selector(
        ".msg.assistant.state-final:has-text('Look:')", timeout=15000
    )
    stored = page.locator(".msg.assistant.state-final:has-text('Look:')").last
    assert "<script>alert(1)</script>" in stored.inner_text()
    assert stored.locator("img, script").count() == 0
    assert stored.locator("a[href^='javascript']").count() == 0
    assert stored.locator("a[href='https://example.com']").count() == 1
    shot(page, "chat-xss.png")

    # Reload: the transcript is the same.
    count = page.locator("#messages .msg").count()
    page.reload()
    wait_js(page, f"document.querySelectorAll('#messages .msg').length >= {count}")
    assert page.locator(".msg.assistant.state-aborted").count() == 1
    assert page.locator("#messages img, #messages script").count() == 0
    shot(page, "chat-reloaded.png")
    page_events.assert_no_dialogs()
    context.close()
