"""Transcripts in the admin: read-only, for admins (the role), fast on a large table."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from chat.models import Message
from fleet.admin import RoleAdmin, site
from fleet.admin.gateways import register_deleted_with_gateway
from fleet.models import Gateway


@admin.register(Message, site=site)
class MessageAdmin(RoleAdmin):
    list_display = ["created_at", "session", "role", "state", "sender", "run_id"]
    list_filter = ["role", "state"]
    list_select_related = ["session", "sender"]
    raw_id_fields = ["session", "sender"]
    search_fields = ["run_id", "session__key"]
    show_full_result_count = False
    list_per_page = 100
    ordering = ["-created_at"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Message]:
        return super().get_queryset(request).select_related("session", "sender")


def _messages_of(gateways: list[Gateway]) -> int:
    return Message.objects.filter(session__gateway__in=gateways).count()


# A gateway's delete confirmation counts the transcripts that go with it.
register_deleted_with_gateway("messages", _messages_of)
