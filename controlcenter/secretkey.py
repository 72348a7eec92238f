from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path


def make_private_dir(path: Path) -> None:
    """The data folder, made 0700 (owner only) when it does not exist yet: it holds the
    SQLite database with the device private keys and device tokens, and the secret key."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def make_private_file(path: Path) -> None:
    """An empty file made 0600 when none exists (SQLite then keeps that mode, and gives it
    to its -wal and -shm files too); an existing file is left as it is."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def load_or_create_secret_key(path: Path) -> str:
    """A per-installation key kept beside the SQLite database, created on first use.

    Processes that start together (`serve` and `fakegateway` on a fresh data folder) may
    both find no key: each writes a complete key to a file of its own and links it into
    place, which only one can do; the others read the winner's key."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    make_private_dir(path.parent)
    key = secrets.token_urlsafe(50)
    fd, draft = tempfile.mkstemp(dir=path.parent, prefix=".secret_key.")  # mode 600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(key)
        os.link(draft, path)
    except FileExistsError:
        return path.read_text().strip()
    finally:
        os.unlink(draft)
    return key
