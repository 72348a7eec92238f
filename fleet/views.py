from __future__ import annotations

from collections import Counter
from typing import Any

from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_not_required
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied
from django.db import connection
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils.decorators import method_decorator
from django.views.decorators.http import require_GET
from django_htmx.middleware import HtmxDetails

from fleet import leases, queries, throttle
from fleet.audit import client_ip, record
from fleet.auth import ThrottledLoginFormMixin, refused, too_many_message
from fleet.models import AuditEvent, Gateway
from fleet.roles import can_view


class AuthenticatedHttpRequest(HttpRequest):
    user: User
    htmx: HtmxDetails


def _require_viewer(request: AuthenticatedHttpRequest) -> None:
    # LoginRequiredMiddleware already sent anonymous visitors to the login page; a
    # logged-in account without a role sees nothing.
    if not can_view(request.user):
        raise PermissionDenied("Your account has no role yet: ask an admin for one.")


@require_GET
def fleet(request: AuthenticatedHttpRequest) -> HttpResponse:
    """The fleet: gateways, agents, presence and the session list. An htmx request from
    the filter form, the search box or the pager gets the list partial alone."""
    _require_viewer(request)
    filters = queries.parse_filters(request.GET)
    page = queries.session_page(filters)
    context: dict[str, Any] = {
        "page": page,
        "filters": filters,
    }
    template_name = "fleet/fleet.html"
    if request.htmx and not request.htmx.boosted:
        template_name += "#session-list"
    else:
        gateways = queries.fleet_gateways()
        context.update(gateways.context())
        context["choices"] = queries.filter_choices(gateways.gateways, filters)
    return render(request, template_name, context)


@require_GET
def gateway_detail(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    """One gateway's full card (agents, presence, banners), however many there are; its
    sessions are the fleet list filtered by it."""
    _require_viewer(request)
    cards = queries.gateway_cards(gateway_id=pk)
    if not cards:
        raise Http404("No such gateway.")
    return render(request, "fleet/gateway.html", {"card": cards[0]})


@require_GET
def session_detail(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    """One session's fields and recent transcript (chat's `{% session_transcript %}`)."""
    session = queries.session_for_user(request.user, pk)
    return render(request, "fleet/session.html", {"session": session})


class ThrottledAuthenticationForm(ThrottledLoginFormMixin, AuthenticationForm):
    pass


@method_decorator(login_not_required, name="dispatch")
class LoginView(auth_views.LoginView):
    """Django's login; the throttle sits in the authentication backend (fleet/auth.py),
    this view answers a refused attempt with 429 and audits each attempt once."""

    authentication_form = ThrottledAuthenticationForm

    def form_invalid(self, form: Any) -> HttpResponse:
        verdict = refused(self.request)
        record(
            throttle.FAILED,
            params={"username": str(self.request.POST.get("username", ""))[:150]},
            result=AuditEvent.Result.ERROR,
            detail=throttle.REFUSED_DETAIL if verdict else "",
            ip=client_ip(self.request),
        )
        if verdict is None:
            return super().form_invalid(form)
        context = self.get_context_data(form=form, throttled=verdict)
        response = self.render_to_response(context, status=429)
        response["Retry-After"] = str(verdict.retry_after)
        return response

    def form_valid(self, form: Any) -> HttpResponse:
        response = super().form_valid(form)
        record(
            throttle.SUCCEEDED,
            user=form.get_user(),
            request=self.request,
            result=AuditEvent.Result.OK,
        )
        return response


# -- password reset: routed only when an email backend is configured (controlcenter/urls.py)

PASSWORD_RESET_REQUESTED = "password_reset.requested"
PASSWORD_RESET_DONE = "password_reset.done"


@method_decorator(login_not_required, name="dispatch")
class PasswordResetView(auth_views.PasswordResetView):
    """Asks for a reset link. Each request counts in the login throttle as a failure of
    ("password-reset:" + the email) from the address, and is audited with the address."""

    def form_valid(self, form: Any) -> HttpResponse:
        email = str(form.cleaned_data["email"])
        ip = client_ip(self.request)
        verdict = throttle.attempt(f"password-reset:{email}", ip)
        record(
            PASSWORD_RESET_REQUESTED,
            params={"email": email},
            result=AuditEvent.Result.OK if verdict.allowed else AuditEvent.Result.ERROR,
            detail="" if verdict.allowed else throttle.REFUSED_DETAIL,
            ip=ip,
        )
        if verdict.allowed:
            return super().form_valid(form)
        form.add_error(None, too_many_message(verdict))
        response = self.render_to_response(self.get_context_data(form=form), status=429)
        response["Retry-After"] = str(verdict.retry_after)
        return response


@method_decorator(login_not_required, name="dispatch")
class PasswordResetConfirmView(auth_views.PasswordResetConfirmView):
    def form_valid(self, form: Any) -> HttpResponse:
        response = super().form_valid(form)
        record(
            PASSWORD_RESET_DONE,
            user=form.user,
            request=self.request,
            result=AuditEvent.Result.OK,
        )
        return response


@login_not_required
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """The process is up, the database answers, and how many gateways are in each state and
    held by a live worker. Anyone may ask (probes have no session), so that is all an
    anonymous caller learns; names, versions and errors only for a logged-in user who may
    see the fleet (an account without a role is refused the fleet page, so here too)."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        gateways = list(Gateway.objects.order_by("name"))
    except Exception as exc:  # noqa: BLE001 - report, don't crash the health check
        return JsonResponse(
            {"ok": False, "database": f"error: {exc.__class__.__name__}"}, status=503
        )
    states = Counter(g.state for g in gateways)
    body: dict[str, Any] = {
        "ok": True,
        "database": "ok",
        "states": dict(sorted(states.items())),
        "held_by_worker": sum(1 for g in gateways if g.worker_alive()),
    }
    if can_view(request.user):
        body["gateways"] = [
            {
                "name": g.name,
                "state": g.state,
                "protocol": g.protocol,
                "version": g.server_version,
                "since": g.state_changed_at.isoformat(),
                "worker": g.worker_alive(),
                "error": g.last_error,
            }
            for g in gateways
        ]
        body["workers"] = [  # who holds which gateway (fleet/leases.py)
            {
                "worker": w.owner,
                "alive": w.alive,
                "seen": w.seen_at.isoformat(),
                "gateways": w.gateways,
            }
            for w in leases.worker_shares()
        ]
    return JsonResponse(body)
