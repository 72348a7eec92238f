"""The Django admin is where admins act on the fleet: session actions that go to the gateway
through the worker, gateway settings, the audit log and people.

One module per thing the admin holds: `site` (the site, its login, the role-permission
mixin and the helper for custom admin pages), `sessions`, `gateways`, `audit`, `synced`
(agents and presence, read-only) and `people`. Importing the package registers them all;
capability apps register their own model admins on `site` from their `admin.py`."""

from __future__ import annotations

from fleet.admin import audit, gateways, people, sessions, synced
from fleet.admin.site import (
    RoleAdmin,
    RolePermissions,
    RoleWriteAdmin,
    admin_page,
    site,
)

__all__ = [
    "RoleAdmin",
    "RolePermissions",
    "RoleWriteAdmin",
    "admin_page",
    "audit",
    "gateways",
    "people",
    "sessions",
    "site",
    "synced",
]
