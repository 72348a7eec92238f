from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from fleet import roles as checks


def roles(request: HttpRequest) -> dict[str, Any]:
    user = getattr(request, "user", None)
    return {
        "user_role": checks.role_of(user),
        "can_chat": checks.can_chat(user),
        "can_admin": checks.can_admin(user),
    }
