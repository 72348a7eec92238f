"""Audit events: one function that records a mutating action from any path (views,
admin actions, the chat, logins), with secrets removed from its parameters."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from fleet.models import AuditEvent, Gateway, Session, redact


def client_ip(request: HttpRequest | None) -> str | None:
    if request is None:
        return None
    return request.META.get("REMOTE_ADDR") or None


def record(
    action: str,
    *,
    user: Any = None,
    request: HttpRequest | None = None,
    gateway: Gateway | None = None,
    session: Session | None = None,
    params: dict[str, Any] | None = None,
    result: str = AuditEvent.Result.PENDING,
    detail: str = "",
    ip: str | None = None,
) -> AuditEvent:
    if user is None and request is not None:
        user = getattr(request, "user", None)
    authenticated = user is not None and getattr(user, "is_authenticated", False)
    if gateway is None and session is not None:
        gateway = session.gateway
    return AuditEvent.objects.create(
        action=action,
        user=user if authenticated else None,
        username=user.get_username()
        if authenticated
        else str((params or {}).get("username", ""))[:150],
        gateway=gateway,
        session=session,
        session_key=session.key if session is not None else "",
        params=redact(params or {}),
        result=result,
        detail=detail,
        ip=ip or client_ip(request),
    )


# -- logins: receivers for django.contrib.auth's signals, connected in fleet/signals.py --------
#
# They record logins, logouts and failed logins from every path (the admin's login, the
# accounts login, a test's force_login), with the action names fleet/throttle.py counts, so a
# failure at the admin's login counts towards the same throttle. The accounts LoginView in
# fleet/views.py records its own "login.ok"/"login.failed" rows; to not count those twice,
# these receivers leave that one view to itself.

LOGIN_OK = "login.ok"
LOGIN_FAILED = "login.failed"  # fleet.throttle counts these
LOGOUT = "logout"


def _recorded_by_view(request: HttpRequest | None) -> bool:
    match = getattr(request, "resolver_match", None)
    return match is not None and match.view_name == "login"


def on_user_logged_in(
    sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any
) -> None:
    if _recorded_by_view(request):
        return
    record(LOGIN_OK, user=user, request=request, result=AuditEvent.Result.OK)


def on_user_logged_out(
    sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any
) -> None:
    if user is None:  # logging out while not logged in
        return
    record(LOGOUT, user=user, request=request, result=AuditEvent.Result.OK)


def on_user_login_failed(
    sender: Any,
    credentials: dict[str, Any],
    request: HttpRequest | None = None,
    **kwargs: Any,
) -> None:
    """Records the attempted username and the address; never the password (Django has
    already masked it in `credentials`, and only the username is read anyway)."""
    if _recorded_by_view(request):
        return
    from fleet.auth import refused  # fleet.auth imports this module

    username = str(credentials.get("username") or "")[:150]
    record(
        LOGIN_FAILED,
        user=None,
        request=None,
        params={"username": username},
        result=AuditEvent.Result.ERROR,
        detail="refused without checking the password: too many failed attempts"
        if refused(request)
        else "wrong username or password, or the account is inactive",
        ip=client_ip(request),
    )
