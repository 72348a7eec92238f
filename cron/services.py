"""The cron mirror's sync core (used by the worker's handlers in cron/handlers.py, by
the views and by the tests): jobs and runs written from `cron.list`/`cron.runs` answers
and `cron` events, idempotently, and what the page reads."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from cron.models import CronJob, CronRun
from fleet.groups import push
from fleet.models import Gateway

GROUP = "cron"  # the /cron/ pages' live notes
NAV_BADGE = "cron"
HISTORY = 20  # runs shown per job


def changed() -> None:
    """Tell the cron pages and the navigation's cron count to re-read."""
    push(GROUP, "cron.changed")
    push("nav", "nav.badge", badge=NAV_BADGE)


def _dt(ms: Any) -> datetime | None:
    if isinstance(ms, bool) or not isinstance(ms, int | float) or ms <= 0:
        return None
    try:
        return datetime.fromtimestamp(ms / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _text(value: Any, limit: int) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        value = value.get("message") or value.get("text") or ""
    return str(value)[:limit]


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def schedule_text(schedule: Any) -> str:
    """A person's reading of a job's schedule: `cron 0 * * * * (UTC)`, `every 60 s`, `at …`."""
    if isinstance(schedule, str):
        return schedule[:300]
    if not isinstance(schedule, dict):
        return ""
    kind = schedule.get("kind")
    if kind == "cron":
        tz = f" ({schedule['tz']})" if schedule.get("tz") else ""
        return f"cron {schedule.get('expr', '?')}{tz}"[:300]
    if kind == "every":
        every = schedule.get("everyMs")
        if isinstance(every, int | float) and every > 0:
            return f"every {every / 1000:g} s"
    if kind == "at":
        at = schedule.get("at") or schedule.get("atMs")
        when = _dt(at) if isinstance(at, int | float) else None
        return f"at {when:%Y-%m-%d %H:%M} UTC" if when else f"at {at}"[:300]
    return str(kind or "")[:300]


def upsert_job(gateway_id: int, job: dict[str, Any]) -> CronJob | None:
    job_id = job.get("id") or job.get("jobId")
    if not isinstance(job_id, str) or not job_id:
        return None
    state: dict[str, Any] = _dict(job.get("state"))
    payload: dict[str, Any] = _dict(job.get("payload"))
    fields: dict[str, Any] = {
        "name": _text(job.get("name"), 300),
        "enabled": bool(job.get("enabled", True)),
        "schedule": schedule_text(job.get("schedule")),
        "payload_kind": _text(payload.get("kind"), 40),
        "agent_key": _text(job.get("agentId"), 200),
        "next_run_at": _dt(state.get("nextRunAtMs")),
        "running": bool(state.get("runningAtMs")),
        "removed_at": None,
        "updated_at": timezone.now(),
    }
    if state.get("lastStatus") or state.get("lastRunStatus"):
        fields["last_status"] = _text(
            state.get("lastStatus") or state.get("lastRunStatus"), 20
        )
        fields["last_error"] = _text(state.get("lastError"), 2000)
        fields["last_run_at"] = _dt(state.get("lastRunAtMs"))
    row, _ = CronJob.objects.update_or_create(
        gateway_id=gateway_id, job_id=job_id, defaults=fields
    )
    return row


def sync_jobs(gateway_id: int, jobs: Iterable[dict[str, Any]]) -> None:
    """The whole list as the gateway has it now: jobs it no longer lists are removed."""
    seen = []
    for job in jobs:
        if isinstance(job, dict) and (row := upsert_job(gateway_id, job)) is not None:
            seen.append(row.pk)
    CronJob.objects.filter(gateway_id=gateway_id, removed_at=None).exclude(
        pk__in=seen
    ).update(removed_at=timezone.now(), running=False)


def _usage(entry: dict[str, Any]) -> dict[str, int | None]:
    usage: dict[str, Any] = _dict(entry.get("usage"))

    def num(*names: str) -> int | None:
        for name in names:
            value = usage.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return int(value)
        return None

    return {
        "input_tokens": num("input", "inputTokens", "input_tokens"),
        "output_tokens": num("output", "outputTokens", "output_tokens"),
        "total_tokens": num("total", "totalTokens", "total_tokens"),
    }


def record_run(gateway_id: int, entry: dict[str, Any]) -> bool:
    """Store one finished run; True when it was new. The same run may come as an event and
    again in `cron.runs`: matched by runId first, then by (job, ts)."""
    job_id = entry.get("jobId")
    status = entry.get("status")
    if not isinstance(job_id, str) or status not in CronRun.Status.values:
        return False
    run_id = _text(entry.get("runId"), 200)
    ts = entry.get("ts")
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        run_at, took = entry.get("runAtMs"), entry.get("durationMs")
        if isinstance(run_at, int | float) and isinstance(took, int | float):
            ts = run_at + took
        else:
            ts = int(timezone.now().timestamp() * 1000)
    fields: dict[str, Any] = {
        "job_name": _text(entry.get("jobName"), 300),
        "status": status,
        "completion_status": _text(entry.get("completionStatus"), 40),
        "delivery_status": _text(entry.get("deliveryStatus"), 40),
        "error": _text(entry.get("error"), 4000),
        "summary": _text(entry.get("summary"), 4000),
        "run_at": _dt(entry.get("runAtMs")),
        "duration_ms": entry.get("durationMs")
        if isinstance(entry.get("durationMs"), int)
        else None,
        "model": _text(entry.get("model"), 200),
        **_usage(entry),
    }
    runs = CronRun.objects.filter(gateway_id=gateway_id, job_id=job_id)
    if run_id and runs.filter(run_id=run_id).exists():
        return False
    if runs.filter(ts=int(ts)).exists():
        return False
    try:
        with transaction.atomic():
            CronRun.objects.create(
                gateway_id=gateway_id,
                job_id=job_id,
                run_id=run_id,
                ts=int(ts),
                **fields,
            )
    except IntegrityError:
        return False  # stored meanwhile (the event and the reconcile raced)
    _note_last_run(gateway_id, job_id, fields, int(ts))
    return True


def _note_last_run(
    gateway_id: int, job_id: str, fields: dict[str, Any], ts: int
) -> None:
    job = CronJob.objects.filter(gateway_id=gateway_id, job_id=job_id).first()
    if job is None:
        CronJob.objects.create(
            gateway_id=gateway_id,
            job_id=job_id,
            name=fields["job_name"],
            last_status=fields["status"],
            last_error=fields["error"][:2000],
            last_run_at=_dt(ts),
        )
        return
    when = _dt(ts)
    if job.last_run_at is None or (when is not None and when >= job.last_run_at):
        CronJob.objects.filter(pk=job.pk).update(
            last_status=fields["status"],
            last_error=fields["error"][:2000],
            last_run_at=when,
            running=False,
        )


def record_runs(gateway_id: int, entries: Iterable[Any]) -> int:
    return sum(1 for e in entries if isinstance(e, dict) and record_run(gateway_id, e))


def apply_event(gateway_id: int, payload: Any) -> bool:
    """One `cron` event; True when something the page shows changed."""
    if not isinstance(payload, dict) or not isinstance(payload.get("jobId"), str):
        return False
    job_id = payload["jobId"]
    action = payload.get("action")
    jobs = CronJob.objects.filter(gateway_id=gateway_id, job_id=job_id)
    if action in ("added", "updated"):
        job = payload.get("job")
        if isinstance(job, dict):
            upsert_job(gateway_id, {"id": job_id, **job})
        elif not jobs.exists():
            CronJob.objects.create(gateway_id=gateway_id, job_id=job_id)
        if payload.get("nextRunAtMs"):
            jobs.update(next_run_at=_dt(payload["nextRunAtMs"]))
        return True
    if action == "removed":
        return bool(jobs.update(removed_at=timezone.now(), running=False))
    if action == "started":
        if not jobs.exists():
            CronJob.objects.create(gateway_id=gateway_id, job_id=job_id)
        return bool(jobs.update(running=True))
    if action == "finished":
        record_run(gateway_id, payload)
        update: dict[str, Any] = {"running": False}
        if payload.get("nextRunAtMs"):
            update["next_run_at"] = _dt(payload["nextRunAtMs"])
        jobs.update(**update)
        return True
    return False


# --- what the page reads ---------------------------------------------------------------


@dataclass
class JobView:
    job: CronJob
    runs: list[CronRun]


def job_list(gateway_id: int | None = None) -> list[JobView]:
    jobs = CronJob.objects.select_related("gateway").filter(removed_at=None)
    if gateway_id is not None:
        jobs = jobs.filter(gateway_id=gateway_id)
    out = []
    for job in jobs.order_by("gateway__name", "name", "job_id"):
        runs = list(
            CronRun.objects.filter(gateway_id=job.gateway_id, job_id=job.job_id)[
                :HISTORY
            ]
        )
        out.append(JobView(job, runs))
    return out


def gateways() -> list[Gateway]:
    return list(Gateway.objects.order_by("name"))


def failing_count(user: Any) -> int | None:
    from fleet import roles

    if not roles.can_view(user):
        return None
    return CronJob.objects.filter(
        removed_at=None, last_status=CronRun.Status.ERROR
    ).count()
