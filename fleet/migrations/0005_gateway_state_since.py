from __future__ import annotations

import django.utils.timezone
from django.db import migrations, models


def connected_rows_are_connected(apps, schema_editor):
    # The new column was filled with "now" for every row; a gateway connected right now
    # has not been disconnected since then.
    Gateway = apps.get_model("fleet", "Gateway")
    Gateway.objects.filter(state="connected").update(not_connected_since=None)


class Migration(migrations.Migration):
    dependencies = [("fleet", "0004_gateway_tls")]

    operations = [
        migrations.AddField(
            model_name="gateway",
            name="not_connected_since",
            field=models.DateTimeField(
                blank=True, default=django.utils.timezone.now, null=True
            ),
        ),
        migrations.RunPython(connected_rows_are_connected, migrations.RunPython.noop),
    ]
