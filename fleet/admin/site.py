"""The admin site, its login, and what every model admin here shares: the permission
questions answered by the role, and custom admin pages.

Access is by role, not by `is_staff`: `ControlCenterAdminSite` lets in exactly the users
`fleet.roles.can_admin` accepts (the admin role, or a superuser), and the model admins
answer their permission questions from the role too, so an admin needs no Django model
permissions and a viewer or operator with `is_staff` still gets nothing."""

from __future__ import annotations

from typing import Any, cast

from django.contrib import admin
from django.contrib.auth.decorators import login_not_required
from django.contrib.auth.forms import AuthenticationForm
from django.core.exceptions import ValidationError
from django.http import (
    HttpRequest,
    HttpResponse,
)
from django.template.response import TemplateResponse
from django.urls import reverse_lazy
from django.utils.decorators import method_decorator
from django.views.decorators.cache import never_cache

from fleet import roles
from fleet.auth import ThrottledLoginFormMixin, refused

# -- the site ------------------------------------------------------------------------------


class AdminLoginForm(ThrottledLoginFormMixin, AuthenticationForm):
    """The admin's login form lets in admins by role (staff status is not asked for); a
    throttled attempt says so (fleet/auth.py)."""

    required_css_class = "required"
    error_messages = {
        **AuthenticationForm.error_messages,
        "not_admin": "This account does not have the admin role.",
    }

    def confirm_login_allowed(self, user: Any) -> None:
        super().confirm_login_allowed(user)
        if not roles.can_admin(user):
            raise ValidationError(self.error_messages["not_admin"], code="not_admin")


class ControlCenterAdminSite(admin.AdminSite):
    site_header = "Control Center admin"
    site_title = "Control Center admin"
    index_title = "Gateways, sessions and the audit log"
    # "View site": the fleet page, resolved when a page renders (the stubs want a str).
    site_url = cast(str, reverse_lazy("fleet"))
    login_form = AdminLoginForm
    # The session table is wide (title, gateway, agent, status, model, tokens, activity,
    # state): it gets the whole width.
    enable_nav_sidebar = False

    def has_permission(self, request: HttpRequest) -> bool:
        # Staff status alone is not enough, and the admin role alone is.
        return roles.can_admin(request.user)

    @method_decorator(never_cache)
    @login_not_required
    def login(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        """The throttle sits in the authentication backend (fleet/auth.py), shared with
        the accounts login; a refused attempt is answered 429 with Retry-After."""
        response = super().login(request, extra_context)
        verdict = refused(request)
        if verdict is not None:
            response.status_code = 429
            response["Retry-After"] = str(verdict.retry_after)
        return response


site = ControlCenterAdminSite(name="admin")


class RolePermissions:
    """Every permission question of a model admin (or inline) answered by the role, in one
    place: admins may look; they may add, change and delete only where `writable` says so.
    A model admin narrows one question by overriding it and asking `role_allows` (or
    `super()`) first."""

    writable = False

    def role_allows(self, request: HttpRequest) -> bool:
        return roles.can_admin(request.user)

    def has_module_permission(self, request: HttpRequest) -> bool:
        return self.role_allows(request)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.role_allows(request)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.writable and self.role_allows(request)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.writable and self.role_allows(request)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.writable and self.role_allows(request)


class RoleAdmin(RolePermissions, admin.ModelAdmin):  # type: ignore[type-arg]
    """A model admin admins may read; what they may change is narrowed per model."""


class RoleWriteAdmin(RoleAdmin):
    """A model admin admins may add to, change and delete from."""

    writable = True


def admin_page(
    model_admin: admin.ModelAdmin,  # type: ignore[type-arg]
    request: HttpRequest,
    template: str,
    *,
    title: str,
    **context: Any,
) -> TemplateResponse:
    """A custom page of a model admin (a confirmation, a test result), rendered with the
    admin's own chrome: the site's context, the model's breadcrumbs and the current app."""
    request.current_app = model_admin.admin_site.name
    return TemplateResponse(
        request,
        template,
        {
            **model_admin.admin_site.each_context(request),
            "title": title,
            "subtitle": None,
            "opts": model_admin.model._meta,
            "app_label": model_admin.model._meta.app_label,
            **context,
        },
    )
