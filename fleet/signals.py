"""Signal wiring for the fleet app, done once from FleetConfig.ready()."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.contrib.auth.signals import (
    user_logged_in,
    user_logged_out,
    user_login_failed,
)
from django.db.models.signals import (
    m2m_changed,
    post_delete,
    post_save,
    pre_delete,
    pre_save,
)

from fleet import audit
from fleet.live import notify_user

# -- open sockets: told when their user's rights may have changed (fleet/live.py) --------------


def _on_logged_out(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    if user is not None:
        session = getattr(request, "session", None)
        notify_user(user.pk, getattr(session, "session_key", None))


def _on_user_saved(sender: Any, instance: Any, **kwargs: Any) -> None:
    update_fields = kwargs.get("update_fields")
    if update_fields and set(update_fields) <= {"last_login"}:
        return  # every login saves this; rights did not change
    notify_user(instance.pk)


def _on_user_deleted(sender: Any, instance: Any, **kwargs: Any) -> None:
    notify_user(instance.pk)


def _on_user_relation_changed(
    sender: Any, instance: Any, action: str, reverse: bool, **kwargs: Any
) -> None:
    """`user.groups` / `user.user_permissions` from the user's side, `group.user_set`
    from the group's (its users are `pk_set`, or, for a clear, read before it)."""
    if not reverse:
        if action.startswith("post_"):
            notify_user(instance.pk)
        return
    if action == "pre_clear":
        instance._live_cleared = list(instance.user_set.values_list("pk", flat=True))
        return
    if action == "post_clear":
        pks = getattr(instance, "_live_cleared", [])
    elif action.startswith("post_"):
        pks = kwargs.get("pk_set") or []
    else:
        return
    for pk in pks:
        notify_user(pk)


def _on_group_changed(sender: Any, instance: Any, **kwargs: Any) -> None:
    """A role group renamed, deleted, or its permissions changed: its members' rights.
    (A deleted group's memberships go without an m2m signal; this runs before.)"""
    if isinstance(instance, Group) and instance.pk is not None:
        for pk in instance.user_set.values_list("pk", flat=True):
            notify_user(pk)


def connect() -> None:
    user_logged_in.connect(audit.on_user_logged_in, dispatch_uid="fleet.audit.login")
    user_logged_out.connect(audit.on_user_logged_out, dispatch_uid="fleet.audit.logout")
    user_login_failed.connect(
        audit.on_user_login_failed, dispatch_uid="fleet.audit.login_failed"
    )

    user = get_user_model()
    pre_save.connect(
        audit.on_user_pre_save, sender=user, dispatch_uid="fleet.audit.pre"
    )
    post_save.connect(audit.on_user_saved, sender=user, dispatch_uid="fleet.audit.save")
    post_delete.connect(
        audit.on_user_deleted, sender=user, dispatch_uid="fleet.audit.delete"
    )
    m2m_changed.connect(
        audit.on_user_groups_changed,
        sender=user.groups.through,
        dispatch_uid="fleet.audit.groups",
    )
    m2m_changed.connect(
        audit.on_user_permissions_changed,
        sender=user.user_permissions.through,
        dispatch_uid="fleet.audit.permissions",
    )

    user_logged_out.connect(_on_logged_out, dispatch_uid="fleet.live.logout")
    post_save.connect(_on_user_saved, sender=user, dispatch_uid="fleet.live.save")
    post_delete.connect(_on_user_deleted, sender=user, dispatch_uid="fleet.live.delete")
    for relation in (user.groups.through, user.user_permissions.through):
        m2m_changed.connect(
            _on_user_relation_changed,
            sender=relation,
            dispatch_uid=f"fleet.live.{relation._meta.label_lower}",
        )
    post_save.connect(_on_group_changed, sender=Group, dispatch_uid="fleet.live.group")
    pre_delete.connect(
        _on_group_changed, sender=Group, dispatch_uid="fleet.live.group_delete"
    )
    m2m_changed.connect(
        _on_group_changed,
        sender=Group.permissions.through,
        dispatch_uid="fleet.live.group_permissions",
    )
