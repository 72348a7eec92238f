from __future__ import annotations

from django.apps import AppConfig


class ApprovalsConfig(AppConfig):
    name = "approvals"
    verbose_name = "Exec approvals"

    def ready(self) -> None:
        from approvals import capability, services
        from fleet import calls, capabilities, nav

        capabilities.register(capability.CAPABILITY)
        calls.register_recorder("approvals", services.record_outcome)
        nav.register(
            nav.NavBadge("approvals", "Approvals", "approvals", services.pending_count)
        )
