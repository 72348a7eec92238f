"""The alerts app's source for cron rules: a finished run that ended `error`, or `ok`
with an error completion status (one alert per run, scoped by gateway and agent)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING

from django.db.models import Q

from alerts.sources import EVENT_BATCH, Condition, event_window_start
from cron.models import BAD_COMPLETIONS, CronJob, CronRun

if TYPE_CHECKING:
    from alerts.models import AlertRule


class CronFailed:
    lasting = False

    def conditions(self, rule: AlertRule, now: datetime) -> Iterable[Condition]:
        start = event_window_start(rule, now)
        seen = set(rule.alerts.filter(since__gte=start).values_list("key", flat=True))
        bad = Q(status=CronRun.Status.ERROR)
        for value in BAD_COMPLETIONS:
            bad |= Q(completion_status__iexact=value)
        runs = CronRun.objects.filter(bad, recorded_at__gte=start)
        if rule.gateway_id is not None:
            runs = runs.filter(gateway_id=rule.gateway_id)
        if rule.agent_id is not None and rule.agent is not None:
            jobs = CronJob.objects.filter(
                gateway_id=rule.agent.gateway_id, agent_key=rule.agent.agent_id
            ).values_list("job_id", flat=True)
            runs = runs.filter(gateway_id=rule.agent.gateway_id, job_id__in=jobs)
        found = 0
        for run in runs.select_related("gateway").order_by("recorded_at", "pk"):
            key = f"cron:{run.pk}"
            if key in seen:
                continue
            found += 1
            if found > EVENT_BATCH:
                return
            what = run.error or run.completion_status or "the run failed"
            yield Condition(
                key=key,
                title=f"Cron job {run.job_name or run.job_id} failed on {run.gateway.name}",
                detail=f"Status {run.status}: {what}"[:2000],
                since=run.recorded_at,
                gateway_id=run.gateway_id,
                agent_id=rule.agent_id,
            )
