from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST

from approvals import services
from approvals.models import Approval
from fleet import audit, calls, csvexport
from fleet.models import Gateway
from fleet.roles import can_admin, can_view
from fleet.views import AuthenticatedHttpRequest

TEMPLATE = "approvals/inbox.html"
HISTORY_LIMIT = 200


def _require_viewer(request: AuthenticatedHttpRequest) -> None:
    if not can_view(request.user):
        raise PermissionDenied("Your account has no role yet: ask an admin for one.")


def _filters(request: AuthenticatedHttpRequest) -> dict[str, str]:
    return {k: request.GET.get(k, "").strip()[:200] for k in services.FILTERS}


def context_for(user: Any, filters: dict[str, str] | None = None) -> dict[str, Any]:
    filters = filters or {}
    return {
        "pending": list(services.pending()),
        "history": list(services.history(filters)[:HISTORY_LIMIT]),
        "filters": filters,
        "gateways": list(services.gateways()),
        "can_decide": services.can_decide(user),
        "can_allow_always": services.can_allow_always(user),
        "can_admin": can_admin(user),
        "decisions": services.DECISION_LABELS,
    }


@require_GET
def inbox(request: AuthenticatedHttpRequest) -> HttpResponse:
    """Everything pending across the gateways, newest first, then the history."""
    _require_viewer(request)
    template = TEMPLATE
    if request.htmx and not request.htmx.boosted:
        template += "#approval-inbox"
    return render(request, template, context_for(request.user, _filters(request)))


@require_POST
def decide(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    _require_viewer(request)
    approval = get_object_or_404(Approval, pk=pk)
    decision = request.POST.get("decision", "")
    try:
        problem = services.decide(approval, request.user, decision, request)
    except services.NotAllowed as exc:
        raise PermissionDenied(str(exc)) from None
    label = services.DECISION_LABELS.get(decision, decision)
    if request.htmx:  # the card's form; the live push redraws the card itself
        result = problem or f"Sent: {label}."
        return render(request, f"{TEMPLATE}#decide-result", {"result": result})
    if problem:
        messages.warning(request, problem)
    else:
        messages.success(request, f"{approval.command[:80]}: {label}.")
    if _safe_next(request):
        return redirect(request.POST["next"])
    return redirect("approvals")


def _safe_next(request: AuthenticatedHttpRequest) -> bool:
    target = request.POST.get("next", "")
    return target.startswith("/") and not target.startswith("//")


CSV_COLUMNS = (
    ("gateway__name", "gateway"),
    ("approval_id", "id"),
    ("command", "command"),
    ("host", "host"),
    ("cwd", "cwd"),
    ("agent_id", "agent"),
    ("session_key", "session"),
    ("requested_at", "requested"),
    ("expires_at", "expires"),
    ("state", "state"),
    ("decision", "decision"),
    ("decided_by_name", "decided by"),
    ("decided_at", "decided at"),
    ("resolved_by", "gateway resolvedBy"),
    ("warning_lines", "warnings"),
)


@require_GET
def export_csv(request: AuthenticatedHttpRequest) -> StreamingHttpResponse:
    """The history with the page's filters, streamed (async under daphne, as fleet's
    audit export does, so it is never collected whole)."""
    _require_viewer(request)
    return csvexport.queryset_response(
        request, services.history(_filters(request)), CSV_COLUMNS, "approvals.csv"
    )


def _require_admin(request: AuthenticatedHttpRequest) -> None:
    if not can_admin(request.user):
        raise PermissionDenied("Standing grants are for admins.")


@require_GET
def grants(request: AuthenticatedHttpRequest, gateway_id: int) -> HttpResponse:
    """The gateway's standing grants (exec.approval.grants.list), with revoke."""
    _require_admin(request)
    gateway = get_object_or_404(Gateway, pk=gateway_id)
    error = ""
    rows: list[Any] = []
    try:
        payload = calls.call(
            gateway.pk, "exec.approval.grants.list", {}, user=request.user
        )
        raw = payload.get("grants") if isinstance(payload, dict) else payload
        rows = [g for g in raw if isinstance(g, dict)] if isinstance(raw, list) else []
    except (calls.GatewayUnavailable, calls.GatewayCallFailed) as exc:
        error = str(exc)
    return render(
        request,
        "approvals/grants.html",
        {"gateway": gateway, "grants": rows, "error": error},
    )


@require_POST
def revoke_grant(request: AuthenticatedHttpRequest, gateway_id: int) -> HttpResponse:
    _require_admin(request)
    gateway = get_object_or_404(Gateway, pk=gateway_id)
    grant_id = request.POST.get("grant", "").strip()[:200]
    if not grant_id:
        messages.warning(request, "No grant was named.")
        return redirect("approval-grants", gateway_id=gateway.pk)
    event = audit.record(
        "approval.grant.revoke",
        request=request,
        gateway=gateway,
        params={"grant": grant_id},
    )
    try:
        calls.call(
            gateway.pk,
            "exec.approval.grants.revoke",
            {"id": grant_id},
            user=request.user,
            record={"with": "audit", "audit_id": str(event.pk)},
        )
        messages.success(request, "The grant is revoked.")
    except (calls.GatewayUnavailable, calls.GatewayCallFailed) as exc:
        audit.finish_unless_recorded(event, False, str(exc))
        messages.warning(request, f"Not revoked: {exc}")
    return redirect("approval-grants", gateway_id=gateway.pk)
