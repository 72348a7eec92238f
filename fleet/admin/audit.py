"""The audit log in the admin: read-only, filtered, and exported as streamed CSV."""

from __future__ import annotations

import json

from django.contrib import admin
from django.db.models import QuerySet
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    StreamingHttpResponse,
)
from django.urls import URLPattern, path
from django.utils import timezone
from django.utils.html import format_html

from fleet import csvexport
from fleet.admin.site import RoleAdmin, site
from fleet.models import (
    AuditEvent,
)

# -- the audit log ---------------------------------------------------------------------------


CSV_COLUMNS = [
    ("created_at", "when"),
    ("username", "who"),
    ("action", "action"),
    ("gateway__name", "gateway"),
    ("session_key", "session"),
    ("params", "params"),
    ("result", "result"),
    ("detail", "detail"),
    ("ip", "ip"),
]


def audit_csv_response(
    request: HttpRequest, queryset: QuerySet[AuditEvent], filename: str
) -> StreamingHttpResponse:
    """Stream the events as CSV, a chunk of rows at a time (fleet/csvexport.py)."""
    return csvexport.queryset_response(request, queryset, CSV_COLUMNS, filename)


AUDIT_FIELDS = (
    "created_at",
    "username",
    "user",
    "action",
    "gateway",
    "session",
    "session_key",
    "params_pretty",
    "result",
    "detail",
    "ip",
)


@admin.register(AuditEvent, site=site)
class AuditEventAdmin(RoleAdmin):
    change_list_template = "admin/fleet/auditevent/change_list.html"
    list_display = [
        "created_at",
        "username",
        "action",
        "gateway",
        "session_key",
        "result",
        "short_detail",
        "ip",
    ]
    list_filter = [
        ("user", admin.RelatedOnlyFieldListFilter),
        "action",
        "result",
        "gateway",
    ]
    list_select_related = ["gateway"]
    search_fields = ["username", "session_key", "detail", "action"]
    date_hierarchy = "created_at"
    show_full_result_count = False
    list_per_page = 100
    actions = ["export_csv"]
    fields = AUDIT_FIELDS
    readonly_fields = AUDIT_FIELDS

    @admin.display(description="Detail")
    def short_detail(self, obj: AuditEvent) -> str:
        return obj.detail[:80] + ("…" if len(obj.detail) > 80 else "")

    @admin.display(description="Parameters (secrets removed)")
    def params_pretty(self, obj: AuditEvent) -> str:
        return format_html(
            '<pre class="cc-raw">{}</pre>', json.dumps(obj.params, indent=2)
        )

    @admin.action(description="Export selected events as CSV")
    def export_csv(
        self, request: HttpRequest, queryset: QuerySet[AuditEvent]
    ) -> StreamingHttpResponse:
        return audit_csv_response(
            request, queryset.order_by("-created_at"), self._filename()
        )

    @staticmethod
    def _filename() -> str:
        return f"audit-{timezone.now():%Y%m%d-%H%M%S}.csv"

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "export.csv",
                self.admin_site.admin_view(self.export_view),
                name="fleet_auditevent_export",
            ),
            *super().get_urls(),
        ]

    def export_view(self, request: HttpRequest) -> HttpResponseBase:
        """Every event the changelist shows for the same filters and search, as CSV."""
        if not self.has_view_permission(request):
            return HttpResponse(status=403)
        changelist = self.get_changelist_instance(request)
        return audit_csv_response(
            request, changelist.get_queryset(request), self._filename()
        )
