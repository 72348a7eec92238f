"""Many simulated gateways in one process (issue 16), as real processes: `manage.py
fakegateway --count 3` answers on three ports, and `manage.py serve --demo --demo-gateways 5`
runs five simulators whose worker connects them all, and its fleet page shows the table."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)


def _free_ports(n: int) -> int:
    """A base port with n free ports after it (best effort: probe them)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n >= 65535:
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no run of free ports")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except OSError:
        return 0, ""


def _env(tmp: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp),
        "LANG": "C.UTF-8",
        "CONTROLCENTER_DATA_DIR": str(tmp),
        "DATABASE_URL": "",
        "REDIS_URL": "",
        "OPENCLAW_GATEWAY_URL": "",
        "OPENCLAW_GATEWAY_TOKEN": secrets.token_urlsafe(16),
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "CONTROLCENTER_ADMIN_PASSWORD": "pw-" + secrets.token_urlsafe(8),
    }


def _until(pred: Any, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def test_fakegateway_runs_three_gateways_in_one_process(tmp_path: Path) -> None:
    base = _free_ports(3)
    log = tmp_path / "gw.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "manage.py",
                "fakegateway",
                "--port",
                str(base),
                "--count",
                "3",
            ],
            cwd=REPO,
            env=_env(tmp_path),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        urls = [f"http://127.0.0.1:{p}/readyz" for p in range(base, base + 3)]
        _until(lambda: all(_get(u)[0] == 200 for u in urls), 60, proc, log)
    finally:
        proc.terminate()
        proc.wait(15)
    assert proc.returncode == 0
    assert log.read_text().count("Simulated OpenClaw gateway") == 3  # flushed at exit


def test_serve_demo_runs_five_gateways_and_the_fleet_table(tmp_path: Path) -> None:
    port = _free_ports(1)
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "manage.py",
                "serve",
                "--demo",
                "--demo-gateways",
                "5",
                "--demo-sessions",
                "5",
                "--port",
                str(port),
            ],
            cwd=REPO,
            env=_env(tmp_path),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def all_connected() -> bool:
            status, body = _get(f"http://127.0.0.1:{port}/healthz")
            return status == 200 and json.loads(body)["states"] == {"connected": 5}

        _until(all_connected, 90, proc, log)
        import sqlite3

        with sqlite3.connect(tmp_path / "controlcenter.sqlite3", timeout=20) as db:
            names = [r[0] for r in db.execute("SELECT name FROM fleet_gateway")]
        assert sorted(names) == ["demo", "demo-2", "demo-3", "demo-4", "demo-5"]
    finally:
        proc.terminate()
        proc.wait(20)
