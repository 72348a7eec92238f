"""Gateways in the admin: settings (the form is `fleet.forms.GatewayForm`), each change
audited, the device identity, and two custom pages (test the connection, rotate the
identity)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseRedirect,
)
from django.shortcuts import get_object_or_404
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html

from fleet import actions, audit, envrules
from fleet.admin.site import (
    RolePermissions,
    RoleWriteAdmin,
    admin_page,
    site,
)
from fleet.forms import GatewayForm
from fleet.models import (
    Agent,
    AuditEvent,
    DeviceIdentity,
    Gateway,
    Session,
)

# What else goes with a gateway, counted on the delete confirmation: an app whose rows are
# deleted with it registers a counter from its admin.py (chat: its messages), so this
# module names no app above fleet. Label -> the number of those gateways' rows.
DeletedCounter = Callable[[list[Gateway]], int]
_deleted_with_gateway: dict[str, DeletedCounter] = {}


def register_deleted_with_gateway(label: str, count: DeletedCounter) -> None:
    """Add (or replace, by label) a count for the gateway delete confirmation's summary."""
    _deleted_with_gateway[label] = count


DEVICE_FIELDS = (
    "device_id",
    "fingerprint",
    "public_key",
    "token_held",
    "scopes",
    "created_at",
)


class DeviceInline(RolePermissions, admin.StackedInline):  # type: ignore[type-arg]
    """Read-only: the worker makes the identity; rotating it is a page of its own."""

    model = DeviceIdentity
    fields = DEVICE_FIELDS
    readonly_fields = DEVICE_FIELDS
    can_delete = False
    extra = 0
    max_num = 0
    verbose_name = "Device identity"
    verbose_name_plural = "Device identity"

    @admin.display(description="Public-key fingerprint (SHA-256)")
    def fingerprint(self, obj: Any) -> str:
        return str(obj.fingerprint) or "-"

    @admin.display(description="Device token")
    def token_held(self, obj: Any) -> str:
        # Never the token itself: only whether the gateway issued one.
        return (
            "issued by the gateway and kept (used when the shared token is refused)"
            if obj.device_token
            else "none yet (issued when the gateway approves this device)"
        )

    @admin.display(description="Scopes granted")
    def scopes(self, obj: Any) -> str:
        return ", ".join(obj.device_token_scopes or []) or "-"


# Everything an admin can set on a gateway is audited (none of it is a secret).
GATEWAY_AUDITED_FIELDS = GatewayForm.Meta.fields


@admin.register(Gateway, site=site)
class GatewayAdmin(RoleWriteAdmin):
    form = GatewayForm
    change_form_template = "admin/fleet/gateway/change_form.html"
    list_display = [
        "name",
        "url",
        "enabled",
        "state",
        "server_version",
        "protocol",
        "short_error",
        "worker",
    ]
    list_filter = ["enabled", "state"]
    search_fields = ["name", "url"]
    actions = ["enable_gateways", "disable_gateways"]
    inlines = [DeviceInline]
    readonly_fields = [
        "token_status",
        "state",
        "last_error",
        "state_changed_at",
        "server_version",
        "protocol",
        "connected_since",
        "last_event_at",
        "pairing",
        "main_session_key",
        "worker",
    ]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "name",
                    "url",
                    "rest_url",
                    "token_env",
                    "token_status",
                    "enabled",
                ]
            },
        ),
        (
            "TLS (wss:// and https:// only)",
            {
                "fields": ["tls_ca_file", "tls_ca_env", "tls_pin"],
                "description": "Blank: the system trust store, no pin. For a self-signed "
                "or private CA, name its PEM bundle; to pin, paste the SHA-256 of the "
                "gateway's certificate or of its public key (a mismatch is refused and "
                "shown here, never retried in a loop).",
            },
        ),
        (
            "Connection (kept up to date by the worker)",
            {
                "fields": [
                    "state",
                    "last_error",
                    "state_changed_at",
                    "server_version",
                    "protocol",
                    "connected_since",
                    "last_event_at",
                    "pairing",
                    "main_session_key",
                    "worker",
                ]
            },
        ),
    ]

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:  # adding: only what an admin types
            return [
                (None, {"fields": ["name", "url", "rest_url", "token_env", "enabled"]}),
                (
                    "TLS (wss:// and https:// only)",
                    {"fields": ["tls_ca_file", "tls_ca_env", "tls_pin"]},
                ),
            ]
        return super().get_fieldsets(request, obj)

    def get_inlines(self, request: HttpRequest, obj: Any) -> list[Any]:
        return [DeviceInline] if obj is not None else []

    @admin.display(description="Last error")
    def short_error(self, obj: Gateway) -> str:
        return obj.last_error[:80] + ("…" if len(obj.last_error) > 80 else "")

    @admin.display(description="Token")
    def token_status(self, obj: Gateway) -> str:
        refusal = envrules.env_name_refusal(obj.token_env, envrules.TOKEN)
        if refusal:
            return f"The worker does not read it: {refusal}"
        if envrules.read_env(obj.token_env, envrules.TOKEN):
            return f"{obj.token_env} is set in the web process's environment (the worker reads its own)."
        return f"{obj.token_env} is not set in the web process's environment; the worker must have it."

    @admin.display(description="Pairing")
    def pairing(self, obj: Gateway) -> str:
        if not obj.pairing_request_id:
            return "-"
        return format_html(
            "Request {} ({}: {}). Approve on the gateway host: <code>{}</code>",
            obj.pairing_request_id,
            obj.pairing_reason or "not-paired",
            obj.pairing_reason_text,
            obj.approve_command,
        )

    @admin.display(description="Worker")
    def worker(self, obj: Gateway) -> str:
        if obj.worker_alive():
            return f"held by {obj.lease_owner} until {obj.lease_expires_at:%H:%M:%S}"
        return "no worker holds this gateway"

    # -- audit every change ----------------------------------------------------------------

    def save_model(
        self, request: HttpRequest, obj: Gateway, form: Any, change: bool
    ) -> None:
        super().save_model(request, obj, form, change)
        changed = GATEWAY_AUDITED_FIELDS if not change else form.changed_data
        audit.record(
            "gateway.change" if change else "gateway.add",
            request=request,
            gateway=obj,
            params={
                k: envrules.safe_url(getattr(obj, k))
                if k in ("url", "rest_url") and getattr(obj, k)
                else getattr(obj, k)
                for k in changed
                if k in GATEWAY_AUDITED_FIELDS
            },
            result=AuditEvent.Result.OK,
        )

    def delete_model(self, request: HttpRequest, obj: Gateway) -> None:
        self._audit_delete(request, [obj])
        super().delete_model(request, obj)

    def delete_queryset(
        self, request: HttpRequest, queryset: QuerySet[Gateway]
    ) -> None:
        self._audit_delete(request, list(queryset))
        super().delete_queryset(request, queryset)

    @staticmethod
    def _audit_delete(request: HttpRequest, gateways: list[Gateway]) -> None:
        for gateway in gateways:
            audit.record(
                "gateway.delete",
                request=request,
                params={
                    "name": gateway.name,
                    "url": envrules.safe_url(gateway.url),
                    "id": gateway.pk,
                },
                result=AuditEvent.Result.OK,
                detail=f"{gateway.sessions.count()} sessions deleted with it",
            )

    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> Any:
        """Summarise instead of listing every session and message that goes with it."""
        objs = list(objs)
        sessions = Session.objects.filter(gateway__in=objs)
        counts = {
            "gateways": len(objs),
            "sessions": sessions.count(),
            **{label: count(objs) for label, count in _deleted_with_gateway.items()},
            "agents": Agent.objects.filter(gateway__in=objs).count(),
        }
        summary = [
            f"Gateway: {g.name} ({envrules.safe_url(g.url)}), with all its agents, sessions "
            "and transcripts"
            for g in objs
        ]
        return summary, counts, set(), []

    def _set_enabled(
        self, request: HttpRequest, queryset: QuerySet[Gateway], enabled: bool
    ) -> None:
        for gateway in queryset:
            if gateway.enabled == enabled:
                continue
            gateway.enabled = enabled
            gateway.save(update_fields=["enabled", "updated_at"])
            audit.record(
                "gateway.change",
                request=request,
                gateway=gateway,
                params={"enabled": enabled},
                result=AuditEvent.Result.OK,
            )
            messages.success(
                request,
                f"{gateway.name} {'enabled: the worker connects' if enabled else 'disabled: the worker lets go'} within a few seconds.",
            )

    @admin.action(description="Enable selected gateways", permissions=["change"])
    def enable_gateways(
        self, request: HttpRequest, queryset: QuerySet[Gateway]
    ) -> None:
        self._set_enabled(request, queryset, True)

    @admin.action(description="Disable selected gateways", permissions=["change"])
    def disable_gateways(
        self, request: HttpRequest, queryset: QuerySet[Gateway]
    ) -> None:
        self._set_enabled(request, queryset, False)

    # -- test the connection ---------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "<path:object_id>/test-connection/",
                self.admin_site.admin_view(self.test_connection_view),
                name="fleet_gateway_test_connection",
            ),
            path(
                "<path:object_id>/rotate-identity/",
                self.admin_site.admin_view(self.rotate_identity_view),
                name="fleet_gateway_rotate_identity",
            ),
            *super().get_urls(),
        ]

    def rotate_identity_view(
        self, request: HttpRequest, object_id: str
    ) -> HttpResponse:
        """GET: what rotating means, and a button; POST: rotate (audited) and go back."""
        gateway = _gateway_or_404(Gateway.objects.select_related("device"), object_id)
        if not self.has_change_permission(request, gateway):
            return HttpResponse(status=403)
        if request.method == "POST":
            outcome = actions.rotate_device_identity(
                gateway, user=request.user, request=request
            )
            (messages.success if outcome.ok else messages.error)(
                request, outcome.message
            )
            return HttpResponseRedirect(
                reverse("admin:fleet_gateway_change", args=[gateway.pk])
            )
        return admin_page(
            self,
            request,
            "admin/fleet/gateway/rotate_identity.html",
            title=f"Rotate the device identity towards {gateway.name}?",
            original=gateway,
            device=getattr(gateway, "device", None),
        )

    def test_connection_view(
        self, request: HttpRequest, object_id: str
    ) -> HttpResponse:
        if not self.has_view_permission(request):
            return HttpResponse(status=403)
        gateway = _gateway_or_404(Gateway.objects.all(), object_id)
        result = actions.test_connection(gateway, user=request.user)
        return admin_page(
            self,
            request,
            "admin/fleet/gateway/test_connection.html",
            title=f"Test the connection to {gateway.name}",
            original=gateway,
            result=result,
            answer=json.dumps(result.payload, indent=2)[:50000]
            if result.payload is not None
            else "",
        )


def _gateway_or_404(queryset: QuerySet[Gateway], object_id: str) -> Gateway:
    """The gateway of a `<path:object_id>` URL: anything but digits is no gateway (404); the
    ORM would raise ValueError on it, a 500."""
    if not re.fullmatch(r"[0-9]+", object_id):
        raise Http404("no such gateway")
    return get_object_or_404(queryset, pk=int(object_id))
