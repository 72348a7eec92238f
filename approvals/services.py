"""The sync core of exec approvals, shared by the views, the consumer and the worker's
capability (capability.py wraps it once for async code)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from django.db.models import QuerySet
from django.utils import timezone

from approvals.models import Approval
from fleet import audit, calls, roles
from fleet.groups import push, session_group
from fleet.models import Gateway, Session

NAV_GROUP = "nav"  # fleet/nav.py
BADGE = "approvals"
DECISIONS = ("allow-once", "allow-always", "deny")
DECISION_LABELS = {
    "allow-once": "allowed once",
    "allow-always": "allowed always",
    "deny": "denied",
}
AUDIT_ACTION = "approval.decide"
REVIEWER_CHANNEL = "control-center"


class NotAllowed(PermissionError):
    """The user may not make this decision (the words say why)."""


# -- who may decide ------------------------------------------------------------------------


def can_decide(user: Any) -> bool:
    """The approvals.decide permission (operators and admins have it by default)."""
    return roles.can_view(user) and bool(user.has_perm("approvals.decide"))


def can_allow_always(user: Any) -> bool:
    """A standing grant outlives the request: admins only."""
    return can_decide(user) and roles.can_admin(user)


def check_decision(user: Any, decision: str) -> None:
    if decision not in DECISIONS:
        raise NotAllowed(f"{decision!r} is not a decision.")
    if not can_decide(user):
        raise NotAllowed("You may see approvals but not decide them.")
    if decision == "allow-always" and not can_allow_always(user):
        raise NotAllowed("Allow always makes a standing grant: only admins may.")


def authorize_resolve(user: Any, params: dict[str, Any]) -> None:
    """The capability's per-call check of exec.approval.resolve (web and worker)."""
    check_decision(user, str(params.get("decision", "")))


# -- what the gateway tells ----------------------------------------------------------------


def _when(ms: Any) -> dt.datetime | None:
    if isinstance(ms, int | float) and ms > 0:
        return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return None


def _text(value: Any, limit: int) -> str:
    return str(value)[:limit] if value is not None else ""


def _strings(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def changed(approval: Approval | None = None) -> None:
    """Tell every page's navigation, the inbox, and the chat page of the approval's
    session to re-read."""
    push(NAV_GROUP, "nav.badge", badge=BADGE)
    if approval is not None and approval.session_key:
        session_pk = (
            Session.objects.filter(
                gateway_id=approval.gateway_id, key=approval.session_key
            )
            .values_list("pk", flat=True)
            .first()
        )
        if session_pk is not None:
            push(
                session_group(session_pk),
                "approval.changed",
                approval=approval.pk,
                note=uuid.uuid4().hex,
            )


def changed_many(approvals: list[Approval]) -> None:
    """Several closed at once (a resync, the expiry sweep): the navigation once, and the
    chat page of each one's session, as a single decision does."""
    push(NAV_GROUP, "nav.badge", badge=BADGE)
    keys = {(a.gateway_id, a.session_key) for a in approvals if a.session_key}
    pages: dict[tuple[int, str], int] = {}
    for gateway_id in {g for g, _ in keys}:
        wanted = [k for g, k in keys if g == gateway_id]
        for key, pk in Session.objects.filter(
            gateway_id=gateway_id, key__in=wanted
        ).values_list("key", "pk"):
            pages[(gateway_id, key)] = pk
    for approval in approvals:
        session_pk = pages.get((approval.gateway_id, approval.session_key))
        if session_pk is not None:
            push(
                session_group(session_pk),
                "approval.changed",
                approval=approval.pk,
                note=uuid.uuid4().hex,
            )


def record_requested(gateway_id: int, payload: Any) -> Approval | None:
    """Store an `exec.approval.requested` payload (or an `exec.approval.list` entry)."""
    if not isinstance(payload, dict) or not payload.get("id"):
        return None
    raw_request = payload.get("request")
    request: dict[str, Any] = raw_request if isinstance(raw_request, dict) else {}
    analysis = request.get("commandAnalysis")
    analysis = analysis if isinstance(analysis, dict) else {}
    fields = {
        "kind": _text(payload.get("approvalKind") or "exec", 20),
        "command": _text(request.get("command"), 20_000),
        "command_argv": _strings(request.get("commandArgv")),
        "risk_kinds": _strings(analysis.get("riskKinds")),
        "warning_lines": _strings(analysis.get("warningLines")),
        "host": _text(request.get("host"), 200),
        "cwd": _text(request.get("cwd"), 2000),
        "resolved_path": _text(request.get("resolvedPath"), 2000),
        "agent_id": _text(request.get("agentId"), 200),
        "session_key": _text(request.get("sessionKey"), 500),
        "run_id": _text(request.get("runId"), 200),
        "tool_call_id": _text(request.get("toolCallId"), 200),
        "source_channel": _text(request.get("turnSourceChannel"), 100),
        "allowed_decisions": _strings(request.get("allowedDecisions"))
        or list(DECISIONS),
        "requested_at": _when(payload.get("createdAtMs")) or timezone.now(),
        "expires_at": _when(payload.get("expiresAtMs")),
    }
    approval, created = Approval.objects.get_or_create(
        gateway_id=gateway_id, approval_id=_text(payload["id"], 200), defaults=fields
    )
    if created:
        changed(approval)
    return approval


def record_resolved(gateway_id: int, payload: Any) -> Approval | None:
    """Store an `exec.approval.resolved` payload: the decision, whoever made it."""
    if not isinstance(payload, dict) or not payload.get("id"):
        return None
    approval = Approval.objects.filter(
        gateway_id=gateway_id, approval_id=str(payload["id"])
    ).first()
    if approval is None:
        approval = record_requested(
            gateway_id, {"id": payload["id"], "request": payload.get("request")}
        )
        if approval is None:
            return None
    decision = str(payload.get("decision") or "")
    state = (
        Approval.State.ALLOWED
        if decision.startswith("allow")
        else Approval.State.DENIED
    )
    Approval.objects.filter(pk=approval.pk, state=Approval.State.PENDING).update(
        state=state,
        decision=decision,
        resolved_by=_text(payload.get("resolvedBy"), 200),
        decided_at=_when(payload.get("ts")) or timezone.now(),
    )
    approval.refresh_from_db()
    changed(approval)
    return approval


def sync_pending(gateway_id: int, payload: Any) -> int:
    """After a (re)connect: store what `exec.approval.list` says is pending, and close what
    we thought pending that the gateway no longer has (decided or expired meanwhile)."""
    items = payload.get("approvals") if isinstance(payload, dict) else payload
    items = items if isinstance(items, list) else []
    seen = set()
    for item in items:
        approval = record_requested(gateway_id, item)
        if approval is not None:
            seen.add(approval.pk)
    closing = list(
        Approval.objects.filter(gateway_id=gateway_id, state=Approval.State.PENDING)
        .exclude(pk__in=seen)
        .only("pk", "gateway_id", "session_key")
    )
    gone = Approval.objects.filter(
        pk__in=[a.pk for a in closing], state=Approval.State.PENDING
    ).update(
        state=Approval.State.EXPIRED,
        note="no longer pending at the gateway (decided or expired while we were away)",
        decided_at=timezone.now(),
    )
    if gone:
        changed_many(closing)
    return len(seen)


def expire_due() -> int:
    """Pending requests past their time are expired (the gateway does the same)."""
    closing = list(
        Approval.objects.filter(
            state=Approval.State.PENDING, expires_at__lt=timezone.now()
        ).only("pk", "gateway_id", "session_key")
    )
    count = Approval.objects.filter(
        pk__in=[a.pk for a in closing], state=Approval.State.PENDING
    ).update(state=Approval.State.EXPIRED, note="expired", decided_at=timezone.now())
    if count:
        changed_many(closing)
    return count


# -- deciding ------------------------------------------------------------------------------


def late_text(approval: Approval) -> str:
    """Why a decision came too late, in words."""
    if approval.state == Approval.State.EXPIRED:
        return "Too late: this request has expired."
    if approval.pending and approval.decided_by_name:
        return f"Already being decided by {approval.decided_by_name}."
    label = DECISION_LABELS.get(approval.decision, approval.decision or "decided")
    who = approval.decider or "someone else"
    return f"Already decided by {who} ({label})."


def decide(approval: Approval, user: Any, decision: str, request: Any = None) -> str:
    """Decide a pending request: claim it (one person wins), audit, and have the worker
    send exec.approval.resolve; the worker records the outcome. Returns "" when the decision
    went through, else why not (late, or the gateway refused) in words for people.
    Raises NotAllowed for a user who may not make this decision."""
    check_decision(user, decision)
    name = user.get_username()
    claimed = Approval.objects.filter(
        pk=approval.pk, state=Approval.State.PENDING, decided_by_name=""
    ).update(decided_by=user, decided_by_name=name)
    approval.refresh_from_db()
    if not claimed:
        return late_text(approval)
    if approval.expires_at is not None and approval.expires_at < timezone.now():
        _release(approval, expired=True)
        return late_text(approval)
    event = audit.record(
        AUDIT_ACTION,
        user=user,
        request=request,
        gateway=approval.gateway,
        params={
            "approval": approval.approval_id,
            "command": approval.command[:500],
            "decision": decision,
            "agent": approval.agent_id,
        },
    )
    # No `reviewer`: on 2026.9.6 it is a channel sender ({channel, accountId, senderId}) and
    # a decision with one is looked up among that channel's approvals ("unknown or expired
    # approval id"). The person is kept here (decided_by), the connection's name there.
    params = {"id": approval.approval_id, "decision": decision}
    try:
        calls.call(
            approval.gateway_id,
            "exec.approval.resolve",
            params,
            user=user,
            record={
                "with": "approvals",
                "audit_id": str(event.pk),
                "pk": approval.pk,
                "decision": decision,
            },
        )
    except (calls.GatewayUnavailable, calls.GatewayCallFailed, PermissionError) as exc:
        audit.finish_unless_recorded(event, False, str(exc))
        approval.refresh_from_db()
        if not approval.pending:
            return late_text(approval)
        _release(approval)
        return f"Not sent: {exc}"
    approval.refresh_from_db()
    return ""


def _release(approval: Approval, expired: bool = False) -> None:
    fields: dict[str, Any] = {"decided_by": None, "decided_by_name": ""}
    if expired:
        fields.update(
            state=Approval.State.EXPIRED, note="expired", decided_at=timezone.now()
        )
    Approval.objects.filter(pk=approval.pk, state=Approval.State.PENDING).update(
        **fields
    )
    approval.refresh_from_db()
    changed(approval)


def record_outcome(fields: dict[str, Any], reply: dict[str, Any]) -> None:
    """The worker's recorder of exec.approval.resolve: the audit result, and the decision
    (the resolved event may come before or after this answer)."""
    audit.finish_from_reply(str(fields.get("audit_id", "")), reply)
    pk = int(fields.get("pk") or 0)
    decision = str(fields.get("decision", ""))
    if reply.get("ok"):
        state = (
            Approval.State.ALLOWED
            if decision.startswith("allow")
            else Approval.State.DENIED
        )
        Approval.objects.filter(pk=pk, state=Approval.State.PENDING).update(
            state=state, decision=decision, decided_at=timezone.now()
        )
    else:
        error = reply.get("error") or {}
        # Unknown id: expired or decided elsewhere before ours arrived.
        if "unknown" in str(error.get("message", "")):
            Approval.objects.filter(pk=pk, state=Approval.State.PENDING).update(
                state=Approval.State.EXPIRED,
                note="the gateway no longer had it (decided elsewhere or expired)",
                decided_at=timezone.now(),
            )
        else:
            Approval.objects.filter(pk=pk, state=Approval.State.PENDING).update(
                decided_by=None, decided_by_name=""
            )
    changed(Approval.objects.filter(pk=pk).first())


# -- reading -------------------------------------------------------------------------------


def pending() -> QuerySet[Approval]:
    return Approval.objects.filter(state=Approval.State.PENDING).select_related(
        "gateway"
    )


def pending_count(user: Any) -> int | None:
    """The navigation badge: None hides the link from people without a role."""
    if not roles.can_view(user):
        return None
    return Approval.objects.filter(state=Approval.State.PENDING).count()


FILTERS = ("gateway", "agent", "person", "decision", "q")


def history(filters: dict[str, str]) -> QuerySet[Approval]:
    rows = Approval.objects.exclude(state=Approval.State.PENDING).select_related(
        "gateway"
    )
    if filters.get("gateway", "").isdigit():
        rows = rows.filter(gateway_id=int(filters["gateway"]))
    if filters.get("agent"):
        rows = rows.filter(agent_id=filters["agent"])
    if filters.get("person"):
        rows = rows.filter(decided_by_name=filters["person"]) | rows.filter(
            resolved_by=filters["person"]
        )
    if filters.get("decision"):
        if filters["decision"] == "expired":
            rows = rows.filter(state=Approval.State.EXPIRED)
        else:
            rows = rows.filter(decision=filters["decision"])
    if filters.get("q"):
        rows = rows.filter(command__icontains=filters["q"])
    return rows.order_by("-requested_at")


def gateways() -> QuerySet[Gateway]:
    return Gateway.objects.order_by("name")
