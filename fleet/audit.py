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


def on_user_logged_in(
    sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any
) -> None:
    record("auth.login", user=user, request=request, result=AuditEvent.Result.OK)


def on_user_logged_out(
    sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any
) -> None:
    if user is None:  # logging out while not logged in
        return
    record("auth.logout", user=user, request=request, result=AuditEvent.Result.OK)


def on_user_login_failed(
    sender: Any,
    credentials: dict[str, Any],
    request: HttpRequest | None = None,
    **kwargs: Any,
) -> None:
    """Records the attempted username and the address; never the password (Django has
    already masked it in `credentials`, and only the username is read anyway)."""
    username = str(credentials.get("username") or "")[:150]
    record(
        "auth.login_failed",
        user=None,
        request=None,
        params={"username": username},
        result=AuditEvent.Result.ERROR,
        detail="wrong username or password, or the account is inactive",
        ip=client_ip(request),
    )
