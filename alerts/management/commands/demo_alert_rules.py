"""`manage.py demo_alert_rules`: a starter set of alert rules, created only when there are
none yet (`serve --demo` runs it on start, so a newcomer sees alerts at once)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from alerts.models import AlertRule

# In the app only (no email, no webhook): set recipients in the admin to try delivery.
RULES = (
    ("Gateway offline for a minute", AlertRule.Kind.GATEWAY_OFFLINE, 60),
    ("Gateway needs a person", AlertRule.Kind.GATEWAY_ATTENTION, 0),
    ("Agent run failed", AlertRule.Kind.RUN_FAILED, 0),
    ("Cron run failed", AlertRule.Kind.CRON_FAILED, 0),
)


class Command(BaseCommand):
    help = "Create a starter set of alert rules when none exist."

    def handle(self, *args: Any, **options: Any) -> None:
        if AlertRule.objects.exists():
            return
        for name, kind, for_seconds in RULES:
            AlertRule.objects.create(
                name=name, kind=kind, for_seconds=for_seconds, cooldown_seconds=60
            )
        self.stdout.write(f"Created {len(RULES)} demo alert rules (see /admin/).")
