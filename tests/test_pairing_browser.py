"""Pairing seen in Debian's Chromium, against real processes: the simulator in pairing
mode (`manage.py fakegateway --pairing`, which approves a request id typed on its stdin,
like `openclaw devices approve` on a gateway host) and the Control Center (`manage.py
serve`). The fleet page shows the request, its reason and the command; once approved the
card turns connected without a reload."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import REPO, Stack, log_in, screenshot
from tests.helpers import wait_until

pytestmark = pytest.mark.browser


class PairingStack(Stack):
    def start_gateway(self) -> None:
        out = open(self.tmp / "gateway.log", "ab")  # noqa: SIM115 - lives with the process
        self.gateway = subprocess.Popen(
            [
                sys.executable,
                "manage.py",
                "fakegateway",
                "--port",
                str(self.gw_port),
                "--pairing",
            ],
            cwd=REPO,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def approve(self, request_id: str) -> None:
        assert self.gateway is not None and self.gateway.stdin is not None
        self.gateway.stdin.write(f"{request_id}\n".encode())
        self.gateway.stdin.flush()


@pytest.fixture
def pairing_stack(tmp_path: Path) -> Iterator[PairingStack]:
    s = PairingStack(tmp_path)
    try:
        s.start_gateway()
        s.start_web()
        wait_until(
            lambda: s.gateway_state() == "pairing_required",
            40,
            "the gateway to ask for pairing",
        )
        yield s
    finally:
        s.stop()


def test_the_page_shows_pairing_and_turns_connected_once_approved(
    pairing_stack: PairingStack,
    browser: Any,
    page_events: Any,
) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page_events.attach(context)
    page = context.new_page()
    log_in(page, pairing_stack)
    page.wait_for_selector(".gw-card.state-pairing_required")
    page.wait_for_selector("#live-status:text('live')")

    banner = page.inner_text(".gw-card .banner")
    assert "Pairing required." in banner
    assert "not paired with the gateway yet" in banner
    request_id = page.inner_text(".gw-card code.pairing-request").strip()
    assert page.inner_text(".gw-card code.approve").strip() == (
        f"openclaw devices approve {request_id}"
    )
    identity = page.inner_text(".gw-card .gw-identity")
    assert "Device" in identity and "key fingerprint" in identity
    screenshot(page, "fleet-pairing.png")

    page.evaluate("window.__marker = 1")  # gone if the page reloads
    pairing_stack.approve(request_id)
    page.wait_for_selector(".gw-card.state-connected", timeout=40_000)
    assert page.evaluate("window.__marker") == 1
    assert page.locator(".gw-card .banner").count() == 0
    assert "paired" in page.inner_text(".gw-card .gw-identity")
    page_events.assert_no_dialogs()
    assert not page_events.page_errors
    context.close()
