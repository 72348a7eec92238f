"""The per-installation secret key, made on first use by whichever process starts first."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from controlcenter.secretkey import load_or_create_secret_key

REPO = Path(__file__).resolve().parent.parent


def test_it_is_made_once_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "data" / "secret_key"
    key = load_or_create_secret_key(path)
    assert len(key) > 50
    assert load_or_create_secret_key(path) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["secret_key"]  # no drafts left


def test_processes_starting_together_agree_on_one_key(tmp_path: Path) -> None:
    # `serve` and `fakegateway` start together on a fresh data folder in the browser
    # tests; one of them used to die with FileExistsError.
    path = tmp_path / "secret_key"
    code = (
        "import sys, time; from pathlib import Path; "
        "from controlcenter.secretkey import load_or_create_secret_key as f; "
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); "
        "print(f(Path(sys.argv[1])))"
    )
    start = time.time() + 2.0  # all at once, once every process has started
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(path), str(start)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        for _ in range(12)
    ]
    keys = set()
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err.decode()
        keys.add(out.decode().strip())
    assert keys == {path.read_text().strip()}


def test_it_makes_the_data_folder_and_the_database_private(tmp_path: Path) -> None:
    """A fresh data folder (0700) and its SQLite database (0600, and so its -wal and -shm,
    looked at while the connection is open): they hold the device private keys and device
    tokens. The umask is the common 022."""
    data = tmp_path / "fresh" / "data"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "DJANGO_SECRET_KEY", "DJANGO_SECRET_KEY_FILE")
    }
    env.update(
        {
            "CONTROLCENTER_DATA_DIR": str(data),
            "DJANGO_SETTINGS_MODULE": "controlcenter.settings",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    code = (
        "import json, os, stat, django; django.setup(); "
        "from django.conf import settings; from django.db import connection; "
        "connection.cursor().execute('CREATE TABLE t (x)'); "
        "folder = settings.DATA_DIR; "
        "print(json.dumps({name: stat.S_IMODE(os.stat(folder / name).st_mode) "
        "for name in ['.', *os.listdir(folder)]}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.umask(0o022),
    )
    assert result.returncode == 0, result.stderr
    modes = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"controlcenter.sqlite3", "controlcenter.sqlite3-wal", "secret_key"} <= set(
        modes
    )
    assert modes.pop(".") == 0o700
    assert modes == dict.fromkeys(modes, 0o600), {k: oct(v) for k, v in modes.items()}
