from __future__ import annotations

from django.apps import AppConfig


class AlertsConfig(AppConfig):
    name = "alerts"
    verbose_name = "Alerts"

    def ready(self) -> None:
        from django.conf import settings

        from alerts import delivery, evaluate, services, sources
        from fleet import hooks
        from fleet.nav import NavBadge

        sources.register_builtin()
        # Run inside the worker (gatewayworker and serve): evaluate, then send the outbox.
        hooks.periodic_steps.append(
            (settings.ALERTS_EVALUATE_INTERVAL, evaluate.evaluate_once)
        )
        hooks.periodic_steps.append(
            (settings.ALERTS_DELIVER_INTERVAL, delivery.deliver_due)
        )
        hooks.nav_badges.append(
            NavBadge("alerts", "Alerts", "alerts", services.attention_count)
        )
