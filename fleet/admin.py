"""Until the fleet pages and admin actions exist, the synced fleet is readable here."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from fleet.models import Agent, AuditEvent, Gateway, PresenceEntry, Session


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Gateway)
class GatewayAdmin(ReadOnlyAdmin):
    list_display = ["name", "url", "state", "protocol", "server_version", "last_error"]
    exclude = ["lease_owner", "worker_channel"]


@admin.register(Agent)
class AgentAdmin(ReadOnlyAdmin):
    list_display = ["agent_id", "name", "gateway", "model", "is_default", "gone_at"]
    list_filter = ["gateway"]
    list_select_related = ["gateway"]


@admin.register(Session)
class SessionAdmin(ReadOnlyAdmin):
    list_display = [
        "key",
        "label",
        "gateway",
        "agent",
        "status",
        "model",
        "total_tokens",
        "updated_at",
        "gone_at",
    ]
    list_filter = ["gateway", "status", "kind", "channel"]
    list_select_related = ["gateway", "agent"]
    search_fields = ["key", "label", "display_name"]
    show_full_result_count = False


@admin.register(PresenceEntry)
class PresenceAdmin(ReadOnlyAdmin):
    list_display = ["host", "gateway", "mode", "platform", "version", "seen_at"]
    list_select_related = ["gateway"]


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    list_display = [
        "created_at",
        "username",
        "action",
        "gateway",
        "session_key",
        "result",
    ]
    list_filter = ["action", "result"]
    list_select_related = ["gateway"]
