"""The fleet list's exact order as an index, on PostgreSQL only.

`queries._ordered` sorts live sessions by `updated_at DESC NULLS LAST, id DESC`;
`session_live_recent` (`updated_at DESC` = NULLS FIRST, `id` ASC) does not match it, so
PostgreSQL sorted every live session for each page: 78 ms at 50,000 sessions, 0.1 ms with
this index (bench/bench_many.py). SQLite refuses NULLS LAST in an index and sorts small
tables fast enough, so it gets none."""

from __future__ import annotations

from typing import Any

from django.db import migrations

INDEX = "session_live_order"


def create(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            f"CREATE INDEX IF NOT EXISTS {INDEX} ON fleet_session "
            "(updated_at DESC NULLS LAST, id DESC) WHERE gone_at IS NULL"
        )


def drop(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP INDEX IF EXISTS {INDEX}")


class Migration(migrations.Migration):
    dependencies = [("fleet", "0007_worker_heartbeat")]

    operations = [migrations.RunPython(create, drop, elidable=False)]
