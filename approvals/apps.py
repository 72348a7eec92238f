from __future__ import annotations

from django.apps import AppConfig


class ApprovalsConfig(AppConfig):
    name = "approvals"
    verbose_name = "Exec approvals"

    def ready(self) -> None:
        from alerts.models import AlertRule
        from alerts.sources import register as register_source
        from approvals import alerting, capability, services
        from fleet import calls, capabilities, nav

        capabilities.register(capability.CAPABILITY)
        calls.register_recorder("approvals", services.record_outcome)
        register_source(AlertRule.Kind.APPROVAL_WAITING, alerting.ApprovalWaiting())
        nav.register(
            nav.NavBadge("approvals", "Approvals", "approvals", services.pending_count)
        )
