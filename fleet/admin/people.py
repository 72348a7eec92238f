"""People in the admin: admins manage accounts and their roles; a superuser's account and
other groups' permissions stay a superuser's business."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group, User
from django.db.models import QuerySet
from django.http import (
    HttpRequest,
)

from fleet import roles
from fleet.admin.site import RolePermissions, site

# -- people: admins manage accounts and their roles --------------------------------------------


@admin.register(User, site=site)
class PersonAdmin(RolePermissions, UserAdmin):  # type: ignore[type-arg]
    writable = True

    list_display = ["username", "email", "role", "is_active", "last_login"]
    list_filter = ["groups", "is_active", "is_superuser"]

    @admin.display(description="Role")
    def role(self, obj: User) -> str:
        return roles.role_of(obj) or "-"

    def get_queryset(self, request: HttpRequest) -> QuerySet[User]:
        return super().get_queryset(request).prefetch_related("groups")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        fields = list(super().get_readonly_fields(request, obj))
        if not request.user.is_superuser:  # only a superuser makes superusers
            fields += ["is_superuser", "user_permissions"]
        return fields

    def formfield_for_manytomany(
        self, db_field: Any, request: HttpRequest, **kwargs: Any
    ) -> Any:
        # An admin hands out the three roles; other groups may carry permissions, which
        # only a superuser grants (as it alone edits permissions).
        if db_field.name == "groups" and not request.user.is_superuser:
            kwargs["queryset"] = Group.objects.filter(name__in=roles.ROLES)
        return super().formfield_for_manytomany(db_field, request, **kwargs)

    # A superuser's account is out of an admin's reach: changed, given a new password
    # (`user_change_password` asks `has_change_permission` for the account) or deleted
    # (the change form's delete view, and the bulk action through `get_deleted_objects`,
    # ask `has_delete_permission` for each account) only by another superuser.

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.role_allows(request) and _may_manage(request.user, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.role_allows(request) and _may_manage(request.user, obj)


def _may_manage(actor: Any, account: Any) -> bool:
    return account is None or actor.is_superuser or not account.is_superuser


@admin.register(Group, site=site)
class RoleGroupAdmin(RolePermissions, GroupAdmin):
    """Admins see the roles; only a superuser edits groups (they carry permissions)."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser
