"""Small holes closed: a GET that created a session, 500s on an odd id, the WebSocket Origin
check that looked at the host only, and the deployment settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.test import Client

from fleet.models import Agent, Gateway, Session

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def agent(db: Any) -> Agent:
    gateway = Gateway.objects.create(name="alpha", url="ws://127.0.0.1:1")
    return Agent.objects.create(gateway=gateway, agent_id="main")


def test_it_starts_a_chat_only_by_post_with_csrf(
    personas: dict[str, User], agent: Agent
) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(personas["bob"])
    target = {"gateway": str(agent.gateway_id), "agent": "main"}
    assert client.get("/chat/new/", target).status_code == 405
    assert client.post("/chat/new/", target).status_code == 403  # no CSRF token
    assert not Session.objects.exists()

    page = client.get("/chat/search/")
    token = page.context["csrf_token"]
    assert 'action="/chat/new/"' in page.content.decode()
    response = client.post("/chat/new/", {**target, "csrfmiddlewaretoken": token})
    session = Session.objects.get()
    assert response.status_code == 302
    assert response["Location"] == f"/chat/{session.pk}/"
    assert session.key.startswith("agent:main:cc-")
    # The session page's "New chat" is a form too, for the same agent.
    html = client.get(f"/chat/{session.pk}/").content.decode()
    assert 'action="/chat/new/"' in html and 'name="agent" value="main"' in html
    assert "/chat/new/?" not in html


def test_it_refuses_a_chat_to_a_viewer_and_an_unknown_agent(
    personas: dict[str, User], agent: Agent
) -> None:
    client = Client()
    client.force_login(personas["carol"])
    target = {"gateway": str(agent.gateway_id), "agent": "main"}
    assert client.post("/chat/new/", target).status_code == 403
    client.force_login(personas["bob"])
    assert client.post("/chat/new/", {**target, "agent": "nope"}).status_code == 404
    assert client.post("/chat/new/", {**target, "gateway": "x"}).status_code == 404
    assert not Session.objects.exists()


@pytest.mark.parametrize("page", ["test-connection", "rotate-identity"])
def test_it_answers_404_for_a_gateway_id_that_is_not_a_number(
    personas: dict[str, User], agent: Agent, page: str
) -> None:
    client = Client(raise_request_exception=False)
    client.force_login(personas["alice"])
    for odd in ("abc", "1x", "%C2%B9", "1/2"):
        response = client.get(f"/admin/fleet/gateway/{odd}/{page}/")
        assert response.status_code == 404, (odd, response.status_code)
    assert client.get(f"/admin/fleet/gateway/999999/{page}/").status_code == 404


# -- the WebSocket Origin check ---------------------------------------------------------------


def _session_cookie(user: User) -> bytes:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


async def _origin_accepted(
    cookie: bytes, origin: str, host: str, scheme: str = "ws"
) -> bool:
    """Whether the fleet socket of a logged-in admin opens with this Origin and Host."""
    from controlcenter.asgi import application

    communicator = WebsocketCommunicator(
        application,
        "/ws/fleet/",
        headers=[
            (b"host", host.encode()),
            (b"origin", origin.encode()),
            (b"cookie", cookie),
        ],
    )
    communicator.scope["scheme"] = scheme
    connected, _ = await communicator.connect(timeout=5)
    await communicator.disconnect()
    return bool(connected)


@pytest.fixture
def admin_cookie(transactional_db: Any, personas: dict[str, User]) -> bytes:
    return _session_cookie(personas["alice"])


@pytest.mark.parametrize(
    ("origin", "accepted"),
    [
        ("https://cc.example.com", True),
        ("https://cc.example.com:443", True),
        ("https://a.ops.example.com", True),  # CSRF_TRUSTED_ORIGINS' wildcard
        ("http://cc.example.com", False),  # another scheme
        ("https://cc.example.com:8443", False),  # another port
        ("https://evil.example.com", False),
        ("http://a.ops.example.com", False),
        ("null", False),
        ("", False),
    ],
)
async def test_it_checks_the_websocket_origins_scheme_host_and_port(
    settings: Any, admin_cookie: bytes, origin: str, accepted: bool
) -> None:
    settings.ALLOWED_HOSTS = ["cc.example.com", ".ops.example.com"]
    settings.CSRF_TRUSTED_ORIGINS = ["https://*.ops.example.com"]
    # A TLS socket (wss): its own origin is https://cc.example.com.
    got = await _origin_accepted(admin_cookie, origin, "cc.example.com", "wss")
    assert got is accepted


async def test_it_accepts_a_trusted_origin_over_a_plain_socket_behind_a_proxy(
    settings: Any, admin_cookie: bytes
) -> None:
    """Behind a TLS proxy daphne sees ws: the https page's origin is accepted as trusted."""
    settings.ALLOWED_HOSTS = ["cc.example.com"]
    settings.CSRF_TRUSTED_ORIGINS = ["https://cc.example.com"]
    assert await _origin_accepted(
        admin_cookie, "https://cc.example.com", "cc.example.com"
    )
    assert not await _origin_accepted(
        admin_cookie, "https://cc.example.com:8443", "cc.example.com"
    )


async def test_it_accepts_the_origin_of_the_page_served_over_plain_http(
    settings: Any, admin_cookie: bytes
) -> None:
    """Without a trusted origin (a local `serve`), the page's own origin: the Host header's,
    with the request's scheme (ws = http); a Host that is not allowed has none."""
    settings.ALLOWED_HOSTS = ["127.0.0.1"]
    settings.CSRF_TRUSTED_ORIGINS = []
    host = "127.0.0.1:8000"
    assert await _origin_accepted(admin_cookie, "http://127.0.0.1:8000", host)
    assert not await _origin_accepted(admin_cookie, "http://127.0.0.1:9000", host)
    assert not await _origin_accepted(admin_cookie, "https://127.0.0.1:8000", host)
    assert not await _origin_accepted(admin_cookie, "http://evil:8000", "evil:8000")


# -- deployment settings ---------------------------------------------------------------------


def _setting(env: dict[str, str], expression: str) -> str:
    code = f"from django.conf import settings; print(repr({expression}))"
    done = subprocess.run(
        [sys.executable, "manage.py", "shell", "-v0", "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_it_reads_the_https_settings_from_the_environment(tmp_path: Path) -> None:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "SECURE_", "SESSION_", "CSRF_"))
    }
    base["CONTROLCENTER_DATA_DIR"] = str(tmp_path)
    expression = (
        "(settings.SESSION_COOKIE_SECURE, settings.CSRF_COOKIE_SECURE, "
        "settings.SECURE_HSTS_SECONDS, settings.SECURE_HSTS_INCLUDE_SUBDOMAINS, "
        "settings.SECURE_HSTS_PRELOAD)"
    )
    # A fresh checkout on plain http keeps working.
    assert _setting(base, expression) == "(False, False, 0, False, False)"
    https = {
        **base,
        "SESSION_COOKIE_SECURE": "True",
        "CSRF_COOKIE_SECURE": "True",
        "SECURE_HSTS_SECONDS": "31536000",
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": "True",
        "SECURE_HSTS_PRELOAD": "True",
    }
    assert _setting(https, expression) == "(True, True, 31536000, True, True)"


# -- the Content-Security-Policy header (the browser test checks that pages obey it) -------


def test_it_sends_the_content_security_policy_on_pages_and_errors(
    client: Client, personas: dict[str, User], agent: Agent
) -> None:
    from controlcenter.csp import POLICY

    assert "script-src 'self'" in POLICY and "unsafe-inline" not in POLICY
    assert client.get("/accounts/login/")["Content-Security-Policy"] == POLICY
    client.force_login(personas["alice"])
    for url in ("/", "/chat/search/", "/admin/", "/no-such-page/"):
        assert client.get(url)["Content-Security-Policy"] == POLICY, url


async def test_it_sends_the_policy_from_an_async_stack_too() -> None:
    """Under daphne the middleware runs async (the chat send and abort views are async)."""
    from django.http import HttpResponse
    from django.test import RequestFactory

    from controlcenter.csp import POLICY, ContentSecurityPolicyMiddleware

    async def view(request: Any) -> HttpResponse:
        return HttpResponse("ok")

    middleware = ContentSecurityPolicyMiddleware(view)
    response = await middleware(RequestFactory().get("/"))
    assert response["Content-Security-Policy"] == POLICY
