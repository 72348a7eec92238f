"""The session and gateway actions anyone with the role may call (rename, change model,
reset, delete, abort; test the connection, rotate the device identity), as plain sync
service functions: the admin's actions and pages call them, so do the tests.

Every action goes through `fleet.calls.call` (which checks the role; the worker checks it
again), is recorded as an `AuditEvent` before anything is sent, and finishes that event with
the outcome. None of them raises for an expected failure: the gateway's error, an unavailable
gateway or a missing role come back as an `Outcome` with `ok=False` and a message for people.

The database is not changed from here except where the gateway's answer is the confirmation
the issue asks for (delete marks the row deleted, and gone when the gateway says it deleted
it). A rename or a model change shows up when the gateway's `sessions.changed` event arrives
through the worker, like any other change."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.db import transaction
from django.db.models import F, Value
from django.db.models.functions import Coalesce
from django.http import HttpRequest
from django.utils import timezone

from fleet import audit, calls, roles, services
from fleet.groups import fleet_group, push, session_group
from fleet.models import AuditEvent, Gateway, Session
from fleet.services import summary


@dataclass
class Outcome:
    """How one action on one session (or gateway) ended."""

    ok: bool
    message: str
    payload: Any = None
    session: Session | None = None


@dataclass
class ModelChoice:
    value: str
    label: str


@dataclass
class ModelList:
    choices: list[ModelChoice] = field(default_factory=list)
    error: str = ""


# What each action is called in the audit log, and in words for the confirmation page.
ACTION_LABELS = {
    "session.rename": "Rename",
    "session.model": "Change the model of",
    "session.reset": "Reset",
    "session.delete": "Delete on the gateway",
    "session.abort": "Abort the running run of",
}


def _where(session: Session) -> str:
    return f"{session.key} on {session.gateway.name}"


def _run(
    action: str,
    session: Session,
    method: str,
    params: dict[str, Any],
    *,
    user: Any,
    request: HttpRequest | None,
    done: str,
) -> Outcome:
    """Record, call; turn every expected failure into an Outcome. The worker finishes the
    record with the gateway's answer (also when this request gave up waiting); only a call
    that never reached it, or got no answer in time, is finished here."""
    event = audit.record(
        action,
        user=user,
        request=request,
        session=session,
        params={"method": method, **params},
    )
    try:
        payload = calls.call(
            session.gateway_id,
            method,
            params,
            user=user,
            record={"with": "audit", "audit_id": str(event.pk)},
        )
    except calls.GatewayCallFailed as exc:
        audit.finish_unless_recorded(event, False, f"{exc.code}: {exc.message}")
        return Outcome(
            False, f"Could not {done} {_where(session)}: {exc.message}", session=session
        )
    except calls.GatewayUnavailable as exc:
        audit.finish_unless_recorded(event, False, f"unavailable: {exc}")
        return Outcome(
            False, f"Could not {done} {_where(session)}: {exc}", session=session
        )
    except PermissionError as exc:
        audit.finish_unless_recorded(event, False, f"refused: {exc}")
        return Outcome(False, f"Not allowed: {exc}.", session=session)
    audit.finish_unless_recorded(event, True, audit.reply_summary(payload))
    return Outcome(True, "", payload=payload, session=session)


def rename_session(
    session: Session, label: str, *, user: Any, request: HttpRequest | None = None
) -> Outcome:
    """`sessions.patch {key, label}`; an empty label clears it (null). Our row changes when
    the gateway's `sessions.changed` comes back through the worker."""
    label = label.strip()
    outcome = _run(
        "session.rename",
        session,
        "sessions.patch",
        {"key": session.key, "label": label or None},
        user=user,
        request=request,
        done="rename",
    )
    if outcome.ok:
        what = f"“{label}”" if label else "no label"
        outcome.message = (
            f"Rename of {_where(session)} to {what} sent; "
            "the row updates when the gateway confirms."
        )
    return outcome


def change_model(
    session: Session, model: str, *, user: Any, request: HttpRequest | None = None
) -> Outcome:
    """`sessions.patch {key, model}`, the model chosen from the gateway's `models.list`."""
    outcome = _run(
        "session.model",
        session,
        "sessions.patch",
        {"key": session.key, "model": model},
        user=user,
        request=request,
        done="change the model of",
    )
    if outcome.ok:
        resolved = (
            outcome.payload.get("resolved")
            if isinstance(outcome.payload, dict)
            else None
        )
        shown = model
        if isinstance(resolved, dict) and resolved.get("model"):
            provider = resolved.get("modelProvider")
            shown = (
                f"{provider}/{resolved['model']}"
                if provider
                else str(resolved["model"])
            )
        outcome.message = (
            f"Model of {_where(session)} set to {shown}; "
            "the row updates when the gateway confirms."
        )
    return outcome


def reset_session(
    session: Session, *, user: Any, request: HttpRequest | None = None
) -> Outcome:
    """`sessions.reset {key}`: the gateway starts a fresh transcript; ours keeps the old one."""
    outcome = _run(
        "session.reset",
        session,
        "sessions.reset",
        {"key": session.key},
        user=user,
        request=request,
        done="reset",
    )
    if outcome.ok:
        outcome.message = f"Reset {_where(session)}."
    return outcome


def delete_session(
    session: Session, *, user: Any, request: HttpRequest | None = None
) -> Outcome:
    """`sessions.delete {key}`. The Control Center keeps its row and transcript, marked
    deleted now, and gone when the gateway answers that it deleted it."""
    outcome = _run(
        "session.delete",
        session,
        "sessions.delete",
        {"key": session.key},
        user=user,
        request=request,
        done="delete",
    )
    if not outcome.ok:
        return outcome
    now = timezone.now()
    deleted = (
        isinstance(outcome.payload, dict) and outcome.payload.get("deleted") is True
    )
    changes: dict[str, Any] = {"deleted_at": now}
    if deleted:
        # The event path (`sessions.changed` reason delete) may have marked it gone already:
        # keep the time it saw.
        changes.update(gone_at=Coalesce(F("gone_at"), Value(now)), has_active_run=False)
    with transaction.atomic():
        Session.objects.filter(pk=session.pk).update(**changes)
        summary.refresh_counts(session.gateway_id)
    session.refresh_from_db(fields=["deleted_at", "gone_at", "has_active_run"])
    push(
        fleet_group(),
        "fleet.sessions",
        gateway_id=session.gateway_id,
        session_ids=[session.pk],
    )
    push(session_group(session.pk), "session.changed", session_id=session.pk)
    outcome.message = (
        f"Deleted {_where(session)}; the Control Center keeps its copy and transcript."
        if deleted
        else f"The gateway had nothing to delete for {_where(session)}; marked deleted here."
    )
    return outcome


def abort_run(
    session: Session, *, user: Any, request: HttpRequest | None = None
) -> Outcome:
    """`chat.abort {sessionKey}`: every run in the session is aborted."""
    outcome = _run(
        "session.abort",
        session,
        "chat.abort",
        {"sessionKey": session.key},
        user=user,
        request=request,
        done="abort the run of",
    )
    if outcome.ok:
        payload = outcome.payload if isinstance(outcome.payload, dict) else {}
        if payload.get("aborted"):
            outcome.message = f"Aborted the running run of {_where(session)}."
        else:
            outcome.message = f"Nothing was running in {_where(session)}."
    return outcome


def list_models(gateway: Gateway, *, user: Any) -> ModelList:
    """The gateway's `models.list` answer as choices, or the reason there are none."""
    try:
        payload = calls.call(gateway.pk, "models.list", {}, user=user)
    except calls.GatewayCallFailed as exc:
        return ModelList(error=f"{gateway.name} refused models.list: {exc.message}")
    except (calls.GatewayUnavailable, PermissionError) as exc:
        return ModelList(error=str(exc))
    return ModelList(choices=model_choices(payload))


def model_choices(payload: Any) -> list[ModelChoice]:
    """`{models: [{id, name?, provider?}]}` (or a bare list, or strings) → choices whose
    value is what `sessions.patch model` accepts: `provider/id`."""
    entries = payload.get("models") if isinstance(payload, dict) else payload
    if not isinstance(entries, list):
        return []
    choices: list[ModelChoice] = []
    seen: set[str] = set()
    for entry in entries:
        if isinstance(entry, str):
            value, label = entry, entry
        elif isinstance(entry, dict) and isinstance(entry.get("id"), str):
            model_id = entry["id"]
            provider = entry.get("provider")
            value = (
                f"{provider}/{model_id}"
                if isinstance(provider, str) and provider and "/" not in model_id
                else model_id
            )
            name = entry.get("name")
            label = (
                f"{value} ({name})"
                if isinstance(name, str) and name and name != model_id
                else value
            )
        else:
            continue
        if value and value not in seen:
            seen.add(value)
            choices.append(ModelChoice(value=value[:200], label=label[:300]))
    return choices


def rotate_device_identity(
    gateway: Gateway, *, user: Any, request: HttpRequest | None = None
) -> Outcome:
    """A new device key for this gateway (audited). The worker reconnects with it; a gateway
    that is not on loopback then asks for pairing again, shown on the fleet page."""
    if not roles.can_admin(user):
        audit.record(
            "gateway.rotate_identity",
            user=user,
            request=request,
            gateway=gateway,
            result=AuditEvent.Result.ERROR,
            detail="refused: the admin role is needed",
        )
        return Outcome(
            False, "Not allowed: rotating a device identity needs the admin role."
        )
    event = audit.record(
        "gateway.rotate_identity", user=user, request=request, gateway=gateway
    )
    old_id, new_id = services.rotate_device_identity(gateway.pk)
    event.params = {"old_device_id": old_id, "new_device_id": new_id}
    event.save(update_fields=["params"])
    event.finish(True, f"new device {new_id[:16]}…")
    push(fleet_group(), "fleet.gateway", gateway_id=gateway.pk)
    return Outcome(
        True,
        f"New device identity for {gateway.name}: {new_id[:16]}…. The worker reconnects "
        "with it; if the gateway is not on the same host, approve the new pairing request "
        "shown on the fleet page.",
    )


@dataclass
class HealthCheck:
    ok: bool
    message: str
    payload: Any = None


def test_connection(gateway: Gateway, *, user: Any) -> HealthCheck:
    """Ask the worker for the gateway's `health`; say why not when it cannot."""
    try:
        payload = calls.call(gateway.pk, "health", {}, user=user)
    except calls.GatewayCallFailed as exc:
        return HealthCheck(
            False,
            f"The gateway answered health with an error: {exc.code}: {exc.message}",
        )
    except (calls.GatewayUnavailable, PermissionError) as exc:
        gateway.refresh_from_db()
        state = gateway.get_state_display()
        last = f" Last error: {gateway.last_error}" if gateway.last_error else ""
        return HealthCheck(False, f"{exc} State: {state}.{last}")
    if not isinstance(payload, dict):
        return HealthCheck(True, "The gateway answered health.", payload)
    parts = ["ok" if payload.get("ok") else "not ok"]
    if isinstance(payload.get("durationMs"), int | float):
        parts.append(f"in {payload['durationMs']} ms")
    agents = payload.get("agents")
    if isinstance(agents, list):
        parts.append(f"{len(agents)} agent{'s' if len(agents) != 1 else ''}")
    sessions = payload.get("sessions")
    if isinstance(sessions, dict) and isinstance(sessions.get("count"), int):
        parts.append(f"{sessions['count']} sessions")
    return HealthCheck(
        bool(payload.get("ok", True)),
        f"{gateway.name} answered health: {', '.join(parts)}.",
        payload,
    )
