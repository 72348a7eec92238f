"""Settings of the daphne processes tests start (tests/test_login_throttle.py): production's,
with the fast password hasher the in-process tests use (conftest.py), so a test can make
hundreds of login attempts in seconds. Nothing else differs."""

from __future__ import annotations

from controlcenter.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
