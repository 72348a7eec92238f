"""Per-gateway session counts and filter values on the gateway row (fleet/services/summary.py),
filled here from the sessions already stored; the worker keeps them from then on."""

from __future__ import annotations

from typing import Any

from django.db import migrations, models

FACETS = ("status", "kind", "channel")


def fill(apps: Any, schema_editor: Any) -> None:
    Gateway = apps.get_model("fleet", "Gateway")
    Session = apps.get_model("fleet", "Session")
    for gateway in Gateway.objects.all():
        sessions = Session.objects.filter(gateway_id=gateway.pk)
        live = sessions.filter(gone_at=None)
        values: dict[str, set[str]] = {name: set() for name in FACETS}
        for row in sessions.order_by().values_list(*FACETS).distinct():
            for name, value in zip(FACETS, row, strict=True):
                if value:
                    values[name].add(value)
        Gateway.objects.filter(pk=gateway.pk).update(
            live_sessions=live.count(),
            running_sessions=live.filter(has_active_run=True).count(),
            session_facets={name: sorted(v)[:100] for name, v in values.items()},
        )


class Migration(migrations.Migration):
    dependencies = [("fleet", "0008_session_live_order")]

    operations = [
        migrations.AddField(
            model_name="gateway",
            name="live_sessions",
            field=models.PositiveIntegerField(default=0, editable=False),
        ),
        migrations.AddField(
            model_name="gateway",
            name="running_sessions",
            field=models.PositiveIntegerField(default=0, editable=False),
        ),
        migrations.AddField(
            model_name="gateway",
            name="session_facets",
            field=models.JSONField(blank=True, default=dict, editable=False),
        ),
        migrations.RunPython(fill, migrations.RunPython.noop, elidable=True),
    ]
