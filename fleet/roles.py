"""The three roles are Django groups (made by a data migration). Checks live here so views,
consumers and the worker ask the same question the same way."""

from __future__ import annotations

from typing import Any

VIEWER = "viewer"
OPERATOR = "operator"
ADMIN = "admin"
ROLES = (VIEWER, OPERATOR, ADMIN)
_RANK = {VIEWER: 1, OPERATOR: 2, ADMIN: 3}


def role_of(user: Any) -> str | None:
    """The highest role a user has; superusers are admins; None for no role."""
    if (
        user is None
        or not getattr(user, "is_authenticated", False)
        or not user.is_active
    ):
        return None
    if user.is_superuser:
        return ADMIN
    names = getattr(user, "_role_names", None)
    if names is None:
        names = set(user.groups.filter(name__in=ROLES).values_list("name", flat=True))
        user._role_names = names
    best = None
    for name in names:
        if best is None or _RANK[name] > _RANK[best]:
            best = name
    return best


def has_role(user: Any, role: str) -> bool:
    current = role_of(user)
    return current is not None and _RANK[current] >= _RANK[role]


def can_view(user: Any) -> bool:
    return has_role(user, VIEWER)


def can_chat(user: Any) -> bool:
    return has_role(user, OPERATOR)


def can_admin(user: Any) -> bool:
    return has_role(user, ADMIN)
