"""Signal wiring for the fleet app, done once from FleetConfig.ready()."""

from __future__ import annotations

from django.contrib.auth.signals import (
    user_logged_in,
    user_logged_out,
    user_login_failed,
)

from fleet import audit


def connect() -> None:
    user_logged_in.connect(audit.on_user_logged_in, dispatch_uid="fleet.audit.login")
    user_logged_out.connect(audit.on_user_logged_out, dispatch_uid="fleet.audit.logout")
    user_login_failed.connect(
        audit.on_user_login_failed, dispatch_uid="fleet.audit.login_failed"
    )
