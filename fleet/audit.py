"""Audit events: one function that records a mutating action from any path (views,
admin actions, the chat, logins), with secrets removed from its parameters."""

from __future__ import annotations

import contextvars
import uuid
from typing import Any

from asgiref.sync import iscoroutinefunction
from django.http import HttpRequest
from django.utils.decorators import sync_and_async_middleware

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


def reply_summary(payload: Any) -> str:
    """A short note of the gateway's answer for the audit log (not the whole entry)."""
    if not isinstance(payload, dict):
        return "ok"
    parts = [
        f"{name}={payload[name]}"
        for name in ("deleted", "aborted", "status", "runIds", "key")
        if name in payload
    ]
    return ", ".join(parts) or "ok"


def finish_from_reply(audit_id: str, reply: Any, error: str = "") -> None:
    """Finish an audit event with the worker's reply to its call: ok with a summary of the
    answer, or the error (`error` overrides the reply's own words). Written by the worker,
    once; it overrides what a caller that gave up waiting may have noted meanwhile."""
    try:
        pk = uuid.UUID(audit_id)
    except (ValueError, AttributeError, TypeError):
        return
    ok = isinstance(reply, dict) and bool(reply.get("ok"))
    if not error and not ok:
        raw = reply.get("error") if isinstance(reply, dict) else None
        shape = raw if isinstance(raw, dict) else {}
        code, words = shape.get("code", "ERROR"), shape.get("message", "unknown error")
        # UNAVAILABLE_HERE: the worker could not reach the gateway (fleet/calls.py).
        error = (
            f"unavailable: {words}"
            if code == "UNAVAILABLE_HERE"
            else f"{code}: {words}"
        )
    detail = error or reply_summary(reply.get("payload"))
    AuditEvent.objects.filter(pk=pk).update(
        result=AuditEvent.Result.ERROR if error else AuditEvent.Result.OK,
        detail=detail[:2000],
    )


def finish_unless_recorded(event: AuditEvent, ok: bool, detail: str) -> None:
    """A caller's own note of how its call ended (it never reached the worker, or no answer
    came in time), unless the worker has recorded the outcome already."""
    AuditEvent.objects.filter(pk=event.pk, result=AuditEvent.Result.PENDING).update(
        result=AuditEvent.Result.OK if ok else AuditEvent.Result.ERROR, detail=detail
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


# -- accounts: who changed which account, from any path ----------------------------------------
#
# Receivers for the User model's signals (connected in fleet/signals.py), so a change is
# recorded whether it comes through the admin's forms, Django's password views, a role
# change from either side of the groups relation, or code. The request that made it (for
# who and from where) comes from `request_middleware`; without one (a management command,
# the shell) the event has no user. Parameters name fields and groups, never a value of
# the password field.

USER_CREATED = "user.created"
USER_CHANGED = "user.changed"
USER_DELETED = "user.deleted"
ROLE_GRANTED = "role.granted"
ROLE_REMOVED = "role.removed"
PASSWORD_CHANGED = "password.changed"  # by the account's own user
PASSWORD_RESET = "password.reset"  # by someone else (an admin), or by a reset link

# The account fields whose changes are recorded with their old and new values.
PLAIN_FIELDS = (
    "username",
    "first_name",
    "last_name",
    "email",
    "is_active",
    "is_staff",
)
SUPERUSER = "superuser"

_request: contextvars.ContextVar[HttpRequest | None] = contextvars.ContextVar(
    "fleet_audit_request", default=None
)


def current_request() -> HttpRequest | None:
    return _request.get()


@sync_and_async_middleware
def request_middleware(get_response: Any) -> Any:
    """Makes the request known to the account receivers while it is handled."""
    if iscoroutinefunction(get_response):

        async def amiddleware(request: HttpRequest) -> Any:
            token = _request.set(request)
            try:
                return await get_response(request)
            finally:
                _request.reset(token)

        return amiddleware

    def middleware(request: HttpRequest) -> Any:
        token = _request.set(request)
        try:
            return get_response(request)
        finally:
            _request.reset(token)

    return middleware


def _actor() -> tuple[Any, HttpRequest | None]:
    request = current_request()
    user = getattr(request, "user", None) if request is not None else None
    if user is not None and not getattr(user, "is_authenticated", False):
        user = None
    return user, request


def _record_account(action: str, target: Any, **params: Any) -> None:
    user, request = _actor()
    record(
        action,
        user=user,
        request=request,
        params={"account": target.get_username(), "account_id": target.pk, **params},
        result=AuditEvent.Result.OK,
    )


def on_user_pre_save(sender: Any, instance: Any, **kwargs: Any) -> None:
    """Remembers the stored row, to tell afterwards what the save changed."""
    update_fields = kwargs.get("update_fields")
    if (
        instance.pk is None
        or kwargs.get("raw")  # loaddata: rows as they were, not a change
        or (update_fields and set(update_fields) <= {"last_login"})
    ):
        instance._audit_before = None
        return
    instance._audit_before = (
        sender._default_manager.filter(pk=instance.pk)
        .values("password", "is_superuser", *PLAIN_FIELDS)
        .first()
    )


def on_user_saved(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    if kwargs.get("raw"):
        return
    if created:
        _record_account(
            USER_CREATED,
            instance,
            **{name: getattr(instance, name) for name in PLAIN_FIELDS},
        )
        if instance.is_superuser:
            _record_account(ROLE_GRANTED, instance, roles=[SUPERUSER])
        return
    before = getattr(instance, "_audit_before", None)
    instance._audit_before = None
    if before is None:
        return
    changes = {
        name: {"from": before[name], "to": getattr(instance, name)}
        for name in PLAIN_FIELDS
        if before[name] != getattr(instance, name)
    }
    if changes:
        _record_account(USER_CHANGED, instance, changes=changes)
    if before["is_superuser"] != instance.is_superuser:
        action = ROLE_GRANTED if instance.is_superuser else ROLE_REMOVED
        _record_account(action, instance, roles=[SUPERUSER])
    # A new hash from set_password or set_unusable_password; not the silent re-hash at
    # login (a stronger hasher), which saves the same password under a new hash.
    if before["password"] != instance.password and (
        getattr(instance, "_password", None) is not None
        or not instance.has_usable_password()
    ):
        user, _ = _actor()
        own = user is not None and user.pk == instance.pk
        _record_account(
            PASSWORD_CHANGED if own else PASSWORD_RESET,
            instance,
            usable=instance.has_usable_password(),
        )


def on_user_deleted(sender: Any, instance: Any, **kwargs: Any) -> None:
    _record_account(USER_DELETED, instance)


def on_user_groups_changed(
    sender: Any,
    instance: Any,
    action: str,
    reverse: bool,
    model: Any,
    pk_set: set[Any] | None,
    **kwargs: Any,
) -> None:
    """Role (group) changes from the user's side (`user.groups`) or the group's
    (`group.user_set`); a clear is read before it happens."""
    if action == "pre_clear":
        related = instance.user_set if reverse else instance.groups
        instance._audit_cleared = set(related.values_list("pk", flat=True))
        return
    if action not in ("post_add", "post_remove", "post_clear"):
        return
    if action == "post_clear":
        pk_set = getattr(instance, "_audit_cleared", set())
    if not pk_set:
        return
    audit_action = ROLE_GRANTED if action == "post_add" else ROLE_REMOVED
    if reverse:  # instance is a group, pk_set users
        for user in model._default_manager.filter(pk__in=pk_set).order_by("pk"):
            _record_account(audit_action, user, roles=[instance.name])
    else:
        names = sorted(
            model._default_manager.filter(pk__in=pk_set).values_list("name", flat=True)
        )
        _record_account(audit_action, instance, roles=names)


def on_user_permissions_changed(
    sender: Any,
    instance: Any,
    action: str,
    reverse: bool,
    model: Any,
    pk_set: set[Any] | None,
    **kwargs: Any,
) -> None:
    """Direct permissions of an account (only a superuser can edit them in the admin)."""
    if reverse or action not in ("post_add", "post_remove", "post_clear"):
        return
    if action == "post_clear":
        change: dict[str, Any] = {"cleared": True}
    elif not pk_set:
        return
    else:
        names = sorted(
            model._default_manager.filter(pk__in=pk_set).values_list(
                "codename", flat=True
            )
        )
        change = {"added" if action == "post_add" else "removed": names}
    _record_account(USER_CHANGED, instance, changes={"permissions": change})
