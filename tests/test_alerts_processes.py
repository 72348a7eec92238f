"""The alert outbox across a real `manage.py gatewayworker` that is SIGKILLed: on
PostgreSQL (a database of this module's own), against a gateway address nobody listens on
(so the worker raises an "offline" alert) and a local webhook receiver that is down at
first. The alert waits and is retried; the worker dies between two attempts (SIGKILL: no
cleanup); a new worker delivers it once the receiver is back: exactly one POST, signed.

Needs PostgreSQL (TEST_POSTGRES_URL, default postgres://postgres@127.0.0.1:5432/postgres);
skips without it, except under CI=true."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from tests.helpers import WebhookReceiver, ci, free_port

REPO = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres"
)
SECRET_ENV = "CC_PROC_ALERTS_WEBHOOK_SECRET"
TOKEN_ENV = "CC_PROC_ALERTS_GATEWAY_TOKEN"

pytestmark = pytest.mark.timeout(120)

SETUP = """
from alerts.models import AlertRule
from fleet.models import Gateway
Gateway.objects.create(name="dead", url={url!r}, token_env={token_env!r})
AlertRule.objects.create(
    name="offline", kind="gateway_offline", for_seconds=1, cooldown_seconds=0,
    webhook_url={hook!r}, webhook_secret_env={secret_env!r},
)
"""


@pytest.fixture
def database() -> Iterator[str]:
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        message = f"PostgreSQL is not reachable ({exc.__class__.__name__}); tests/test_alerts_processes.py needs it"
        if ci():
            pytest.fail(message)
        pytest.skip(message)
    name = f"cc_alerts_{os.getpid()}_{secrets.token_hex(3)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield urlunsplit(urlsplit(PG_URL)._replace(path=f"/{name}"))
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def until(predicate: Callable[[], Any], timeout: float, what: str, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}\n{log.read_text()[-3000:]}")


def test_it_delivers_once_through_a_receiver_outage_and_a_killed_worker(
    database: str, tmp_path: Path
) -> None:
    receiver = WebhookReceiver(secret=secrets.token_urlsafe(24))
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "DATABASE_URL": database,
        "REDIS_URL": "",
        "CONTROLCENTER_DATA_DIR": str(tmp_path),
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_DEBUG": "False",
        "OPENCLAW_GATEWAY_URL": "",
        "GATEWAY_LEASE_SECONDS": "2",
        "ALERTS_EVALUATE_INTERVAL": "0.3",
        "ALERTS_DELIVER_INTERVAL": "0.2",
        "ALERTS_RETRY_FIRST": "1.5",
        "ALERTS_RETRY_CAP": "1.5",
        "LOG_LEVEL": "INFO",
        TOKEN_ENV: secrets.token_urlsafe(16),
        SECRET_ENV: receiver.secret,
    }

    def manage(*args: str) -> None:
        subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )

    manage("migrate", "--noinput", "-v0")
    manage(
        "shell",
        "-c",
        SETUP.format(
            url=f"ws://127.0.0.1:{free_port()}",  # nobody listens there
            token_env=TOKEN_ENV,
            hook=receiver.url,
            secret_env=SECRET_ENV,
        ),
    )

    def query(sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(database, autocommit=True) as conn:
            return conn.execute(sql).fetchall()

    def delivery() -> tuple[str, int, float] | None:
        rows = query(
            "SELECT status, attempts, EXTRACT(EPOCH FROM next_attempt_at - now()) "
            "FROM alerts_delivery"
        )
        return (rows[0][0], rows[0][1], float(rows[0][2])) if rows else None

    log = tmp_path / "worker.log"
    procs: list[subprocess.Popen[bytes]] = []

    def start_worker() -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "manage.py", "gatewayworker"],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        return proc

    try:
        first = start_worker()
        # Raised, tried, failed (the receiver is down), and tried again: it waits.
        until(lambda: (d := delivery()) and d[1] >= 2, 40, "two attempts", log)
        # Between two attempts: waiting, and the next one not imminent.
        until(
            lambda: (d := delivery()) and d[0] == "pending" and d[2] > 0.5,
            10,
            "between attempts",
            log,
        )
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        attempts_before = delivery()[1]  # type: ignore[index]
        assert receiver.received == []

        receiver.start()
        start_worker()
        until(lambda: (d := delivery()) and d[0] == "sent", 40, "delivered", log)
        time.sleep(2)  # more passes of the sender and evaluator: nothing more
        assert len(receiver.received) == 1, receiver.received
        (post,) = receiver.received
        assert post["verified"], "the signature did not verify"
        assert post["json"]["kind"] == "raised"
        assert "Gateway dead is not connected" in post["json"]["text"]
        status, attempts, _ = delivery()  # type: ignore[misc]
        assert attempts == attempts_before + 1
        assert query("SELECT count(*) FROM alerts_alert") == [(1,)]
        assert query("SELECT count(*) FROM alerts_notice") == [(1,)]
        # The token in the URL's path is in no log line, no stored error.
        assert "T0KEN" not in log.read_text()
        assert query(
            "SELECT count(*) FROM alerts_delivery WHERE last_error LIKE '%T0KEN%'"
        ) == [(0,)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        receiver.stop()
