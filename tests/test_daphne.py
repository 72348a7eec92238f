"""Responses that only a real ASGI server shows right: daphne as a subprocess on a free port,
with its own SQLite data folder, logged in over real HTTP. Django's test client runs a
streaming response's sync iterator in the test's thread, so it cannot see what daphne does
with the async one (the audit CSV hung there: SynchronousOnlyOperation in the event loop)."""

from __future__ import annotations

import csv
import io
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import daphne_env, free_port

REPO = Path(__file__).resolve().parent.parent
EVENTS = 4500  # more than two of the export's 2000-row chunks

pytestmark = pytest.mark.timeout(120)


@dataclass
class Daphne:
    base: str
    username: str
    password: str
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=20, trust_env=False)

    def log_in(self, http: httpx.Client) -> None:
        page = http.get("/accounts/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert token, page.text[:500]
        response = http.post(
            "/accounts/login/",
            data={
                "username": self.username,
                "password": self.password,
                "csrfmiddlewaretoken": token.group(1),
            },
        )
        assert response.status_code == 302, response.text[:500]


SEED = """
from django.contrib.auth.models import Group, User
from fleet import roles
from fleet.models import AuditEvent
import os
user = User.objects.create_user(
    os.environ["CC_SEED_USERNAME"], password=os.environ["CC_SEED_PASSWORD"]
)
user.groups.add(Group.objects.get(name=roles.ADMIN))
AuditEvent.objects.bulk_create(
    AuditEvent(username="seed", action=f"seed.{i}", detail="=1+1" if i == 0 else "")
    for i in range(%d)
)
"""


@pytest.fixture(scope="module")
def daphne(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daphne]:
    data = tmp_path_factory.mktemp("daphne")
    env = daphne_env(data)
    username, password = "auditor", secrets.token_urlsafe(12)
    for argv in (
        ["migrate", "-v0"],
        ["shell", "-v0", "-c", SEED % EVENTS],
    ):
        done = subprocess.run(
            [sys.executable, "manage.py", *argv],
            cwd=REPO,
            env={**env, "CC_SEED_USERNAME": username, "CC_SEED_PASSWORD": password},
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    port = free_port()
    log = data / "daphne.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                "controlcenter.asgi:application",
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Daphne(f"http://127.0.0.1:{port}", username, password, proc, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with server.client() as http:
                    if http.get("/healthz").status_code == 200:
                        break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "daphne never answered /healthz"
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _rows(body: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(body)))


def test_it_streams_the_audit_export_under_daphne(daphne: Daphne) -> None:
    with daphne.client() as http:
        daphne.log_in(http)
        with http.stream("GET", "/admin/fleet/auditevent/export.csv") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/csv")
            assert "content-length" not in response.headers  # streamed, not collected
            chunks = list(response.iter_text())
    rows = _rows("".join(chunks))
    assert rows[0] == ["when", "who", "action", "gateway", "session", "params"] + [
        "result",
        "detail",
        "ip",
    ]
    seeds = [row for row in rows[1:] if row[2].startswith("seed.")]
    assert len(seeds) == EVENTS
    assert len({row[2] for row in seeds}) == EVENTS
    assert [row[7] for row in seeds if row[2] == "seed.0"] == ["'=1+1"]
    assert "SynchronousOnlyOperation" not in daphne.log.read_text()


def test_it_streams_the_audit_export_action_under_daphne(daphne: Daphne) -> None:
    with daphne.client() as http:
        daphne.log_in(http)
        page = http.get("/admin/fleet/auditevent/", params={"q": "seed.1"})
        assert page.status_code == 200
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        ids = re.findall(r'name="_selected_action" value="([^"]+)"', page.text)
        assert token and ids
        response = http.post(
            "/admin/fleet/auditevent/",
            data={
                "csrfmiddlewaretoken": token.group(1),
                "action": "export_csv",
                "_selected_action": ids,
                "index": "0",
            },
        )
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"].startswith("text/csv")
    rows = _rows(response.text)
    assert len(rows) == 1 + len(ids)
    assert all(row[2].startswith("seed.1") for row in rows[1:])


def test_it_serves_static_files_whole_under_daphne(daphne: Daphne) -> None:
    """WhiteNoise's file responses are the other streaming responses: whole and intact."""
    expected = (REPO / "static" / "css" / "app.css").read_bytes()
    with daphne.client() as http:
        response = http.get("/static/css/app.css")
    assert response.status_code == 200
    assert response.content == expected
