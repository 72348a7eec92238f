"""The admin's cron actions (run now, enable/disable, remove): each audited, sent through
the worker (fleet/calls.py), whose recorder writes the outcome (the audit result and the
mirror's change) once the gateway answered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.http import HttpRequest

from cron import services
from cron.models import CronJob
from fleet import audit, calls, roles

ACTIONS = {
    # action -> (gateway method, audit action, words for a failure)
    "run": ("cron.run", "cron.run", "run"),
    "enable": ("cron.update", "cron.enable", "enable"),
    "disable": ("cron.update", "cron.disable", "disable"),
    "remove": ("cron.remove", "cron.remove", "remove"),
}


@dataclass
class Outcome:
    ok: bool
    message: str


def params_for(action: str, job: CronJob) -> dict[str, Any]:
    if action == "run":
        return {"id": job.job_id, "mode": "force"}
    if action in ("enable", "disable"):
        return {"id": job.job_id, "patch": {"enabled": action == "enable"}}
    return {"id": job.job_id}


def record_outcome(fields: dict[str, Any], reply: dict[str, Any]) -> None:
    """The worker's recorder: finish the audit event, and mirror what the answer says."""
    calls.record_audit(fields, reply)
    if not reply.get("ok"):
        return
    gateway_id, job_id = fields.get("gateway_id"), fields.get("job_id")
    if not isinstance(gateway_id, int) or not isinstance(job_id, str):
        return
    action = fields.get("action")
    jobs = CronJob.objects.filter(gateway_id=gateway_id, job_id=job_id)
    if action == "remove":
        services.apply_event(gateway_id, {"jobId": job_id, "action": "removed"})
    elif action in ("enable", "disable"):
        jobs.update(enabled=action == "enable")
    services.changed()


def act(
    action: str, job: CronJob, *, user: Any, request: HttpRequest | None
) -> Outcome:
    method, audit_action, words = ACTIONS[action]
    params = params_for(action, job)
    event = audit.record(
        audit_action,
        user=user,
        request=request,
        gateway=job.gateway,
        params={"method": method, "job": job.name or job.job_id, **params},
    )
    if not roles.can_admin(user):
        audit.finish_unless_recorded(event, False, "refused: needs the admin role")
        return Outcome(False, "Cron actions need the admin role.")
    try:
        calls.call(
            job.gateway_id,
            method,
            params,
            user=user,
            record={
                "with": "cron",
                "audit_id": str(event.pk),
                "gateway_id": job.gateway_id,
                "job_id": job.job_id,
                "action": action,
            },
        )
    except calls.GatewayCallFailed as exc:
        audit.finish_unless_recorded(event, False, f"{exc.code}: {exc.message}")
        return Outcome(False, f"Could not {words} {job}: {exc.message}")
    except calls.GatewayUnavailable as exc:
        audit.finish_unless_recorded(event, False, f"unavailable: {exc}")
        return Outcome(False, f"Could not {words} {job}: {exc}")
    except PermissionError as exc:
        audit.finish_unless_recorded(event, False, f"refused: {exc}")
        return Outcome(False, f"Not allowed: {exc}.")
    audit.finish_unless_recorded(event, True, "ok")
    done = {"run": "Started", "enable": "Enabled", "disable": "Disabled"}
    return Outcome(True, f"{done.get(action, 'Removed')} {job}.")
