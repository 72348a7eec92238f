"""Logins that cannot be bypassed, and cannot be used to lock people out, through real daphne
processes started with the image's CMD (Dockerfile) on a PostgreSQL database of this
module's own: one as the image runs by default (no trusted proxy, no email), one behind a
"proxy" (CONTROLCENTER_TRUSTED_PROXIES=127.0.0.1, so the test's X-Forwarded-For stands for
many client addresses) with EMAIL_URL pointing at a real SMTP server (aiosmtpd) in this
process. The daphne processes use tests/server_settings.py: production settings with the
fast password hasher.

Needs PostgreSQL (TEST_POSTGRES_URL, default postgres://postgres@127.0.0.1:5432/postgres, a
role that may create databases); skips without it, except under CI=true."""

from __future__ import annotations

import asyncio
import email
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message as EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
from aiosmtpd.controller import Controller

from controlcenter.proxy import TrustedProxyMiddleware
from tests.helpers import ci, free_port

REPO = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres"
)
PASSWORD = secrets.token_urlsafe(12)
EMAILS = {"vic": "vic@example.test", "wendy": "wendy@example.test"}
SETUP = """
from django.contrib.auth.models import User
for name, address in {emails!r}.items():
    User.objects.create_user(name, email=address, password={password!r})
"""


# -- a small TrustedProxyMiddleware check, no server needed ---------------------------------


async def _seen(app: TrustedProxyMiddleware, scope: dict[str, Any]) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.update(scope)

    app.app = inner
    await app(scope, None, None)
    return seen


def _scope(kind: str, peer: str, **headers: str) -> dict[str, Any]:
    return {
        "type": kind,
        "scheme": "ws" if kind == "websocket" else "http",
        "client": (peer, 50000),
        "headers": [
            (k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()
        ]
        + [(b"host", b"cc.example")],
    }


@pytest.mark.parametrize("kind", ["http", "websocket"])
async def test_it_takes_the_client_from_the_last_hop_a_trusted_proxy_added(
    kind: str,
) -> None:
    app = TrustedProxyMiddleware(None, ["10.0.0.0/8", "127.0.0.1"])
    scope = await _seen(
        app,
        _scope(
            kind,
            "127.0.0.1",
            x_forwarded_for="6.6.6.6, 203.0.113.9, 10.1.2.3",
            x_forwarded_proto="https",
        ),
    )
    # 10.1.2.3 is a trusted proxy too; 203.0.113.9 is who connected to the first proxy,
    # 6.6.6.6 is what that client claimed.
    assert scope["client"][0] == "203.0.113.9"
    assert scope["scheme"] == ("wss" if kind == "websocket" else "https")


@pytest.mark.parametrize("kind", ["http", "websocket"])
async def test_it_drops_forwarded_headers_from_any_other_peer(kind: str) -> None:
    for trusted in ([], ["10.0.0.5"]):
        app = TrustedProxyMiddleware(None, trusted)
        scope = await _seen(
            app,
            _scope(
                kind,
                "192.0.2.7",
                x_forwarded_for="203.0.113.9",
                x_forwarded_proto="https",
            ),
        )
        assert scope["client"][0] == "192.0.2.7"
        assert scope["scheme"] in ("http", "ws")
        names = {k for k, _ in scope["headers"]}
        assert names == {b"host"}, "forged X-Forwarded-* reach Django"


def _settings_seen(env: dict[str, str], code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); {code}"],
        cwd=REPO,
        env={
            "PATH": os.environ.get("PATH", ""),
            "DJANGO_SETTINGS_MODULE": "controlcenter.settings",
            "DJANGO_SECRET_KEY": "settings-check-only",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_it_trusts_the_https_header_only_with_trusted_proxies(tmp_path: Path) -> None:
    code = "from django.conf import settings; print(getattr(settings, 'SECURE_PROXY_SSL_HEADER', None))"
    base = {"CONTROLCENTER_DATA_DIR": str(tmp_path)}
    assert _settings_seen(base, code).stdout.strip() == "None"
    proxied = {**base, "CONTROLCENTER_TRUSTED_PROXIES": "10.0.0.5, 10.1.0.0/16"}
    assert "HTTP_X_FORWARDED_PROTO" in _settings_seen(proxied, code).stdout
    bad = _settings_seen({**base, "CONTROLCENTER_TRUSTED_PROXIES": "proxy.lan"}, code)
    assert (
        bad.returncode != 0 and "CONTROLCENTER_TRUSTED_PROXIES must list" in bad.stderr
    )
    assert "proxy.lan" not in bad.stderr
    secret = secrets.token_urlsafe(8)
    email_bad = _settings_seen({**base, "EMAIL_URL": f"smtp://u:{secret}@h:x"}, code)
    assert (
        email_bad.returncode != 0
        and "EMAIL_URL is not an email URL" in email_bad.stderr
    )
    assert secret not in email_bad.stderr


# -- the servers -----------------------------------------------------------------------------


class Mailbox:
    """aiosmtpd's handler: keeps every message it is given."""

    def __init__(self) -> None:
        self.port = free_port()
        self.messages: list[EmailMessage] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append(email.message_from_bytes(envelope.content))
        return "250 Message accepted for delivery"

    def to(self, address: str) -> list[EmailMessage]:
        with self.lock:
            return [m for m in self.messages if address in str(m["To"])]


@pytest.fixture(scope="module")
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox()
    controller = Controller(box, hostname="127.0.0.1", port=box.port)
    controller.start()
    try:
        yield box
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        message = f"PostgreSQL is not reachable at {urlsplit(PG_URL).netloc} ({exc}); tests/test_login_throttle.py needs it"
        if ci():
            pytest.fail(message)
        pytest.skip(message)
    name = f"cc_login_{os.getpid()}_{secrets.token_hex(3)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield urlunsplit(urlsplit(PG_URL)._replace(path=f"/{name}"))
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Server:
    base: str
    popen: subprocess.Popen[bytes]
    log: Path


def _image_cmd(port: int) -> list[str]:
    """The Dockerfile's CMD, on loopback and a free port, run from this virtualenv."""
    line = next(
        line
        for line in (REPO / "Dockerfile").read_text().splitlines()
        if line.startswith("CMD ")
    )
    cmd = json.loads(line[4:])
    assert cmd[0] == "daphne"
    cmd[cmd.index("--bind") + 1] = "127.0.0.1"
    cmd[cmd.index("--port") + 1] = str(port)
    return [sys.executable, "-m", "daphne", *cmd[1:]]


@pytest.fixture(scope="module")
def servers(
    database: str, mailbox: Mailbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Server]]:
    data_dir = tmp_path_factory.mktemp("login")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(data_dir),
        "LANG": "C.UTF-8",
        "DJANGO_SETTINGS_MODULE": "tests.server_settings",
        "DATABASE_URL": database,
        "CONTROLCENTER_DATA_DIR": str(data_dir),
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_DEBUG": "False",
        "LOG_LEVEL": "WARNING",
    }
    for args in (
        ["migrate", "--noinput", "-v0"],
        ["shell", "-c", SETUP.format(emails=EMAILS, password=PASSWORD)],
    ):
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    variants: dict[str, dict[str, str]] = {
        "plain": {},
        "proxied": {
            "CONTROLCENTER_TRUSTED_PROXIES": "127.0.0.1",
            "EMAIL_URL": f"smtp://127.0.0.1:{mailbox.port}",
        },
    }
    started: dict[str, Server] = {}
    try:
        for name, extra in variants.items():
            port = free_port()
            log = data_dir / f"{name}.log"
            with log.open("wb") as out:
                popen = subprocess.Popen(
                    _image_cmd(port),
                    cwd=REPO,
                    env={**env, **extra},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            started[name] = Server(f"http://127.0.0.1:{port}", popen, log)
        for server in started.values():
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{server.base}/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert server.popen.poll() is None, server.log.read_text()[-3000:]
                assert time.monotonic() < deadline, "daphne did not answer /healthz"
                time.sleep(0.1)
        yield started
    finally:
        for server in started.values():
            server.popen.terminate()
            try:
                server.popen.wait(10)
            except subprocess.TimeoutExpired:
                server.popen.kill()
                server.popen.wait()


@pytest.fixture(autouse=True)
def _fresh_counts(request: pytest.FixtureRequest) -> None:
    if "servers" not in request.fixturenames:
        return
    with psycopg.connect(request.getfixturevalue("database"), autocommit=True) as c:
        for (table,) in c.execute(
            "SELECT tablename FROM pg_tables WHERE tablename IN ('fleet_loginthrottle', 'fleet_auditevent')"
        ).fetchall():
            c.execute(f"DELETE FROM {table}")


def _query(database: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(database, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


class Browser:
    """One browser at one address (X-Forwarded-For, believed only by the proxied server)."""

    def __init__(self, server: Server, address: str | None = None) -> None:
        self.http = httpx.AsyncClient(base_url=server.base, follow_redirects=False)
        self.headers = {"X-Forwarded-For": address} if address else {}
        self.token = ""

    async def form(self, url: str) -> httpx.Response:
        page = await self.http.get(url, headers=self.headers)
        found = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert found, page.text[:300]
        self.token = found.group(1)
        return page

    async def post(self, url: str, data: dict[str, str]) -> httpx.Response:
        if not self.token:
            await self.form(url)
        return await self.http.post(
            url,
            data={**data, "csrfmiddlewaretoken": self.token},
            headers=self.headers,
        )

    async def login(self, username: str, password: str) -> httpx.Response:
        return await self.post(
            "/accounts/login/", {"username": username, "password": password}
        )

    async def close(self) -> None:
        await self.http.aclose()


def _counted(response: httpx.Response) -> str:
    if response.status_code == 429:
        assert int(response.headers["Retry-After"]) > 0
        assert "Too many failed attempts" in response.text
        return "refused"
    if response.status_code == 302:
        return "in"
    assert response.status_code == 200, response.status_code
    return "wrong"


# -- the throttle ----------------------------------------------------------------------------


async def test_it_counts_12_concurrent_wrong_guesses_as_12(
    servers: dict[str, Server], database: str
) -> None:
    browser = Browser(servers["plain"])
    await browser.form("/accounts/login/")
    answers = await asyncio.gather(
        *(browser.login("wendy", f"guess-{i}") for i in range(12))
    )
    outcomes = sorted(_counted(r) for r in answers)
    # Only the 5 free attempts had their password checked; the other 7 were refused.
    assert outcomes == ["refused"] * 7 + ["wrong"] * 5
    assert _query(
        database,
        "SELECT failures FROM fleet_loginthrottle WHERE account = 'wendy'",
    ) == [(12,)]
    assert _query(
        database,
        "SELECT count(*) FROM fleet_auditevent WHERE action = 'login.failed' AND username = 'wendy'",
    ) == [(12,)]
    assert _counted(await browser.login("wendy", PASSWORD)) == "refused"
    await browser.close()


async def test_it_counts_padded_fullwidth_and_capitalised_names_as_one_account(
    servers: dict[str, Server],
) -> None:
    guesser = Browser(servers["proxied"], "203.0.113.70")
    for name in ("vic ", "ｖｉｃ", "VIC", " Vic", "vic"):
        assert _counted(await guesser.login(name, "wrong")) == "wrong", name
    assert _counted(await guesser.login("vic", PASSWORD)) == "refused"
    elsewhere = Browser(servers["proxied"], "203.0.113.71")
    assert _counted(await elsewhere.login("vic", PASSWORD)) == "in"
    await guesser.close()
    await elsewhere.close()


async def test_it_does_not_let_guesses_from_many_addresses_lock_out_the_real_user(
    servers: dict[str, Server], database: str
) -> None:
    async def guess_from(address: str) -> list[str]:
        browser = Browser(servers["proxied"], address)
        outcomes = [_counted(await browser.login("vic", "wrong")) for _ in range(7)]
        await browser.close()
        return outcomes

    attackers = [f"198.51.100.{i}" for i in range(1, 9)]
    results = await asyncio.gather(*(guess_from(a) for a in attackers))
    for outcomes in results:
        assert outcomes == ["wrong"] * 5 + ["refused"] * 2
    # Each attacker's own address is held back; vic from an address of their own is not.
    vic = Browser(servers["proxied"], "192.0.2.10")
    assert _counted(await vic.login("vic", PASSWORD)) == "in"
    await vic.close()
    addresses = {
        str(ip)
        for (ip,) in _query(
            database,
            "SELECT ip FROM fleet_auditevent WHERE action = 'login.failed'",
        )
    }
    assert addresses == set(attackers)


async def test_it_limits_the_accounts_one_address_may_try(
    servers: dict[str, Server],
) -> None:
    sprayer = Browser(servers["proxied"], "203.0.113.50")
    for i in range(10):
        assert _counted(await sprayer.login(f"user{i}", "wrong")) == "wrong"
    assert _counted(await sprayer.login("user10", "wrong")) == "refused"
    assert _counted(await sprayer.login("wendy", PASSWORD)) == "refused"
    wendy = Browser(servers["proxied"], "203.0.113.51")
    assert _counted(await wendy.login("wendy", PASSWORD)) == "in"
    await sprayer.close()
    await wendy.close()


# -- the client address ----------------------------------------------------------------------


async def test_it_ignores_a_forged_forwarded_for_without_trusted_proxies(
    servers: dict[str, Server], database: str
) -> None:
    forger = Browser(servers["plain"], "203.0.113.99")
    assert _counted(await forger.login("vic", "wrong")) == "wrong"
    assert _query(
        database, "SELECT host(ip) FROM fleet_auditevent WHERE action = 'login.failed'"
    ) == [("127.0.0.1",)]
    # Through the trusted proxy, the address is the hop the proxy added, not the
    # client's own claim to its left.
    proxied = Browser(servers["proxied"], "6.6.6.6, 203.0.113.9")
    assert _counted(await proxied.login("wendy", "wrong")) == "wrong"
    assert _query(
        database,
        "SELECT host(ip) FROM fleet_auditevent WHERE action = 'login.failed' AND username = 'wendy'",
    ) == [("203.0.113.9",)]
    await forger.close()
    await proxied.close()


# -- password reset --------------------------------------------------------------------------


async def test_it_has_no_password_reset_without_email(
    servers: dict[str, Server],
) -> None:
    async with httpx.AsyncClient(base_url=servers["plain"].base) as http:
        for url in ("/accounts/password_reset/", "/accounts/reset/done/"):
            assert (await http.get(url)).status_code == 404, url


async def test_it_resets_a_password_by_email_throttled_and_audited(
    servers: dict[str, Server], database: str, mailbox: Mailbox
) -> None:
    address = "203.0.113.80"
    browser = Browser(servers["proxied"], address)
    r = await browser.post("/accounts/password_reset/", {"email": EMAILS["vic"]})
    assert r.status_code == 302, r.text[:500]
    deadline = time.monotonic() + 10
    while not mailbox.to(EMAILS["vic"]):
        assert time.monotonic() < deadline, "no reset mail arrived"
        await asyncio.sleep(0.05)
    payload = mailbox.to(EMAILS["vic"])[-1].get_payload(decode=True)
    assert isinstance(payload, bytes)
    link = re.search(r"/accounts/reset/[^/\s]+/[^/\s]+/", payload.decode())
    assert link, payload[:500]
    r = await browser.http.get(link.group(0), headers=browser.headers)
    assert r.status_code == 302
    set_password = r.headers["location"]
    await browser.form(set_password)
    new_password = secrets.token_urlsafe(12)
    r = await browser.post(
        set_password, {"new_password1": new_password, "new_password2": new_password}
    )
    assert r.status_code == 302 and r.headers["location"] == "/accounts/reset/done/"
    fresh = Browser(servers["proxied"], "192.0.2.20")
    assert _counted(await fresh.login("vic", new_password)) == "in"
    rows = _query(
        database,
        "SELECT action, username, host(ip), params FROM fleet_auditevent WHERE action LIKE 'password_reset.%%' ORDER BY created_at",
    )
    assert [r[:3] for r in rows] == [
        ("password_reset.requested", "", address),
        ("password_reset.done", "vic", address),
    ]
    assert rows[0][3] == {"email": EMAILS["vic"]}
    assert new_password not in str(rows)
    # Throttled like a login: 5 requests for one email from one address, then a wait.
    spammer = Browser(servers["proxied"], "203.0.113.81")
    statuses = [
        (
            await spammer.post("/accounts/password_reset/", {"email": EMAILS["wendy"]})
        ).status_code
        for _ in range(6)
    ]
    assert statuses == [302] * 5 + [429]
    for b in (browser, fresh, spammer):
        await b.close()
