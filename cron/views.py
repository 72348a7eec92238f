from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from cron import actions, services
from cron.models import CronJob
from fleet.roles import can_admin, can_view
from fleet.views import AuthenticatedHttpRequest

TEMPLATE = "cron/cron.html"


def _require_viewer(request: AuthenticatedHttpRequest) -> None:
    if not can_view(request.user):
        raise PermissionDenied("Your account has no role yet: ask an admin for one.")


def _gateway_filter(raw: str | None) -> int | None:
    return int(raw) if raw and raw.isdigit() else None


def context_for(user: object, gateway_id: int | None) -> dict[str, object]:
    return {
        "jobs": services.job_list(gateway_id),
        "gateways": services.gateways(),
        "selected": gateway_id,
        "can_admin": can_admin(user),
    }


@require_GET
def cron_list(request: AuthenticatedHttpRequest) -> HttpResponse:
    """Every gateway's cron jobs with their recent runs; ?gateway=<pk> for one gateway.
    An htmx request gets the list partial alone."""
    _require_viewer(request)
    template = TEMPLATE
    if request.htmx and not request.htmx.boosted:
        template += "#cron-list"
    gateway_id = _gateway_filter(request.GET.get("gateway"))
    return render(request, template, context_for(request.user, gateway_id))


@require_POST
def cron_action(
    request: AuthenticatedHttpRequest, pk: int, action: str
) -> HttpResponse:
    _require_viewer(request)
    if action not in actions.ACTIONS:
        raise PermissionDenied("Unknown cron action.")
    job = get_object_or_404(CronJob.objects.select_related("gateway"), pk=pk)
    if not can_admin(request.user):
        actions.act(action, job, user=request.user, request=request)  # audited refusal
        raise PermissionDenied("Cron actions need the admin role.")
    outcome = actions.act(action, job, user=request.user, request=request)
    gateway_id = _gateway_filter(request.POST.get("gateway"))
    if request.htmx:
        context = context_for(request.user, gateway_id) | {
            "outcome": outcome,
            "list_oob": True,
        }
        return render(request, f"{TEMPLATE}#cron-action-response", context)
    (messages.success if outcome.ok else messages.error)(request, outcome.message)
    url = reverse("cron")
    if gateway_id is not None:
        url += f"?gateway={gateway_id}"
    return redirect(url)
