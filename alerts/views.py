from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST

from alerts import services
from alerts.models import Alert
from fleet.roles import can_view
from fleet.views import AuthenticatedHttpRequest

TEMPLATE = "alerts/alerts.html"


def _require_viewer(request: AuthenticatedHttpRequest) -> None:
    if not can_view(request.user):
        raise PermissionDenied("Your account has no role yet: ask an admin for one.")


def context_for(user: object) -> dict[str, object]:
    return {
        "alerts": services.alert_list(),
        "can_acknowledge": services.can_acknowledge(user),
        "can_resolve": services.can_resolve(user),
    }


@require_GET
def alert_list(request: AuthenticatedHttpRequest) -> HttpResponse:
    """Open and acknowledged alerts, then the recently resolved, with delivery states.
    An htmx request (the live refresh) gets the list partial alone."""
    _require_viewer(request)
    template = TEMPLATE
    if request.htmx and not request.htmx.boosted:
        template += "#alert-list"
    return render(request, template, context_for(request.user))


def _act(request: AuthenticatedHttpRequest, pk: int, action: str) -> HttpResponse:
    _require_viewer(request)
    alert = get_object_or_404(Alert, pk=pk)
    try:
        if action == "acknowledge":
            done = services.acknowledge(alert, request)
        else:
            done = services.resolve(alert, request)
    except services.NotAllowed as exc:
        raise PermissionDenied(str(exc)) from None
    if request.htmx:
        return render(request, f"{TEMPLATE}#alert-list", context_for(request.user))
    if not done:
        messages.info(request, "Nothing to do: someone else got there first.")
    return redirect("alerts")


@require_POST
def acknowledge(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    return _act(request, pk, "acknowledge")


@require_POST
def resolve(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    return _act(request, pk, "resolve")
