from __future__ import annotations

from django.apps import AppConfig


class AlertsConfig(AppConfig):
    name = "alerts"
    verbose_name = "Alerts"

    def ready(self) -> None:
        from django.conf import settings

        from alerts import delivery, evaluate, services, sources
        from fleet import capabilities, nav

        sources.register_builtin()
        # Run inside the worker (gatewayworker and serve): evaluate, then send the outbox.
        capabilities.register(
            capabilities.Capability(
                name="alerts",
                periodic=(
                    capabilities.Periodic(
                        settings.ALERTS_EVALUATE_INTERVAL,
                        evaluate.evaluate_once,
                        "alerts-evaluate",
                    ),
                    capabilities.Periodic(
                        settings.ALERTS_DELIVER_INTERVAL,
                        delivery.deliver_due,
                        "alerts-deliver",
                    ),
                ),
            )
        )
        nav.register(
            nav.NavBadge("alerts", "Alerts", "alerts", services.attention_count)
        )
