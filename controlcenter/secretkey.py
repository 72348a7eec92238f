from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path


def load_or_create_secret_key(path: Path) -> str:
    """A per-installation key kept beside the SQLite database, created on first use.

    Processes that start together (`serve` and `fakegateway` on a fresh data folder) may
    both find no key: each writes a complete key to a file of its own and links it into
    place, which only one can do; the others read the winner's key."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
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
