"""Read-only admin views of what the worker syncs from the gateways (agents, presence) and of
the workers themselves (which gateways each holds)."""

from __future__ import annotations

from django.contrib import admin

from fleet import leases
from fleet.admin.site import RoleAdmin, site
from fleet.models import (
    Agent,
    PresenceEntry,
    WorkerHeartbeat,
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


@admin.register(WorkerHeartbeat, site=site)
class WorkerAdmin(RoleAdmin):
    """The running gateway workers and which gateways each holds (fleet/leases.py)."""

    list_display = ["owner", "is_alive", "held_gateways", "started_at", "seen_at"]

    @admin.display(description="Alive", boolean=True)
    def is_alive(self, obj: WorkerHeartbeat) -> bool:
        return obj.alive()

    @admin.display(description="Holds")
    def held_gateways(self, obj: WorkerHeartbeat) -> str:
        names = leases.held_by(obj.owner)  # one query a row: workers are few
        return f"{len(names)}: {', '.join(names)}" if names else "none"
