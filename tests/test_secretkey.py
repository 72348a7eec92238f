"""The per-installation secret key, made on first use by whichever process starts first."""

from __future__ import annotations

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
