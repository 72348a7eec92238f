"""First-run setup shared by `serve`: the admin account."""

from __future__ import annotations

import os
import secrets

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group

from fleet import roles

ADMIN_USERNAME = "admin"


def ensure_admin_account() -> str | None:
    """On a database without users, create `admin` (admin role, superuser). Returns the
    generated password when one was made, so the caller can show it once."""
    User = get_user_model()
    if User.objects.exists():
        return None
    password = os.environ.get("CONTROLCENTER_ADMIN_PASSWORD") or ""
    generated = not password
    if generated:
        password = secrets.token_urlsafe(12)
    user = User.objects.create_superuser(ADMIN_USERNAME, email="", password=password)
    group, _ = Group.objects.get_or_create(name=roles.ADMIN)
    user.groups.add(group)
    return password if generated else None
