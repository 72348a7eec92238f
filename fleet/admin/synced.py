"""Read-only admin views of what the worker syncs from the gateways: agents and presence."""

from __future__ import annotations

from django.contrib import admin

from fleet.admin.site import RoleAdmin, site
from fleet.models import (
    Agent,
    PresenceEntry,
)


@admin.register(Agent, site=site)
class AgentAdmin(RoleAdmin):
    list_display = ["agent_id", "name", "gateway", "model", "is_default", "gone_at"]
    list_filter = ["gateway"]
    list_select_related = ["gateway"]
    search_fields = ["agent_id", "name"]


@admin.register(PresenceEntry, site=site)
class PresenceAdmin(RoleAdmin):
    list_display = ["host", "gateway", "mode", "platform", "version", "seen_at"]
    list_filter = ["gateway", "mode"]
    list_select_related = ["gateway"]
