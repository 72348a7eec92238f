from __future__ import annotations

from django.contrib import admin

from approvals.models import Approval


@admin.register(Approval)
class ApprovalAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = (
        "command",
        "gateway",
        "agent_id",
        "state",
        "decision",
        "decided_by_name",
        "requested_at",
    )
    list_filter = ("state", "decision", "gateway")
    search_fields = ("command", "agent_id", "decided_by_name", "resolved_by")
    readonly_fields = [f.name for f in Approval._meta.fields]

    def has_add_permission(self, request: object) -> bool:
        return False

    def has_change_permission(self, request: object, obj: object = None) -> bool:
        return False
