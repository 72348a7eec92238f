from __future__ import annotations

from django.apps import AppConfig


class CronConfig(AppConfig):
    name = "cron"
    verbose_name = "Cron"

    def ready(self) -> None:
        from alerts.models import AlertRule
        from alerts.sources import register as register_source
        from cron import actions, alerting, handlers, services
        from fleet import calls, capabilities, nav, roles

        capabilities.register(
            capabilities.Capability(
                name="cron",
                events={"cron": handlers.on_cron},
                calls={
                    "cron.run": roles.ADMIN,
                    "cron.update": roles.ADMIN,
                    "cron.remove": roles.ADMIN,
                    "cron.add": roles.ADMIN,
                },
                on_ready=handlers.reconcile,
            )
        )
        calls.register_recorder("cron", actions.record_outcome)
        register_source(AlertRule.Kind.CRON_FAILED, alerting.CronFailed())
        nav.register(nav.NavBadge("cron", "Cron", "cron", services.failing_count))
