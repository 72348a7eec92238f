"""The Django admin is where admins act on the fleet: session actions that go to the gateway
through the worker, gateway settings, and the audit log.

Access is by role, not by `is_staff`: `ControlCenterAdminSite` lets in exactly the users
`fleet.roles.can_admin` accepts (the admin role, or a superuser), and the model admins here
answer their permission questions from the role too, so an admin needs no Django model
permissions and a viewer or operator with `is_staff` still gets nothing."""

from __future__ import annotations

import csv
import itertools
import json
import re
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

from asgiref.sync import sync_to_async
from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.decorators import login_not_required
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.models import Group, User
from django.core.exceptions import ValidationError
from django.core.handlers.asgi import ASGIRequest
from django.db import transaction
from django.db.models import QuerySet
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    HttpResponseRedirect,
    StreamingHttpResponse,
)
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.decorators import method_decorator
from django.utils.html import format_html
from django.utils.safestring import mark_safe
from django.views.decorators.cache import never_cache

from fleet import admin_actions, audit, envrules, leases, roles
from fleet.auth import ThrottledLoginFormMixin, refused
from fleet.gateway import (
    PEM_MARKER,
    TlsConfigError,
    format_fingerprint,
    normalize_pin,
)
from fleet.models import (
    Agent,
    AuditEvent,
    DeviceIdentity,
    Gateway,
    PresenceEntry,
    Session,
    WorkerHeartbeat,
)

# Bulk actions list every session on their confirmation page and call the gateway once per
# session; past this many, the admin is asked to narrow the selection.
MAX_BULK = 200


# -- the site ------------------------------------------------------------------------------


class AdminLoginForm(ThrottledLoginFormMixin, AuthenticationForm):
    """The admin's login form lets in admins by role (staff status is not asked for); a
    throttled attempt says so (fleet/auth.py)."""

    required_css_class = "required"
    error_messages = {
        **AuthenticationForm.error_messages,
        "not_admin": "This account does not have the admin role.",
    }

    def confirm_login_allowed(self, user: Any) -> None:
        super().confirm_login_allowed(user)
        if not roles.can_admin(user):
            raise ValidationError(self.error_messages["not_admin"], code="not_admin")


class ControlCenterAdminSite(admin.AdminSite):
    site_header = "Control Center admin"
    site_title = "Control Center admin"
    index_title = "Gateways, sessions and the audit log"
    site_url = "/"
    login_form = AdminLoginForm
    # The session table is wide (title, gateway, agent, status, model, tokens, activity,
    # state): it gets the whole width.
    enable_nav_sidebar = False

    def has_permission(self, request: HttpRequest) -> bool:
        # Staff status alone is not enough, and the admin role alone is.
        return roles.can_admin(request.user)

    @method_decorator(never_cache)
    @login_not_required
    def login(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        """The throttle sits in the authentication backend (fleet/auth.py), shared with
        the accounts login; a refused attempt is answered 429 with Retry-After."""
        response = super().login(request, extra_context)
        verdict = refused(request)
        if verdict is not None:
            response.status_code = 429
            response["Retry-After"] = str(verdict.retry_after)
        return response


site = ControlCenterAdminSite(name="admin")


class RoleAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Every permission question answered by the role: admins may look; what they may
    change is narrowed per model below."""

    def has_module_permission(self, request: HttpRequest) -> bool:
        return roles.can_admin(request.user)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return roles.can_admin(request.user)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class RoleWriteAdmin(RoleAdmin):
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return roles.can_admin(request.user)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return roles.can_admin(request.user)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return roles.can_admin(request.user)


def _report(request: HttpRequest, outcomes: Sequence[admin_actions.Outcome]) -> None:
    """One message per outcome; a long selection gets a summary plus its failures."""
    failures = [o for o in outcomes if not o.ok]
    if len(outcomes) > 10:
        done = len(outcomes) - len(failures)
        messages.info(request, f"{done} of {len(outcomes)} sessions done.")
        shown: Iterable[admin_actions.Outcome] = failures[:10]
        if len(failures) > 10:
            messages.error(request, f"… and {len(failures) - 10} more failures.")
    else:
        shown = outcomes
    for outcome in shown:
        if outcome.ok:
            messages.success(request, outcome.message)
        else:
            messages.error(request, outcome.message)


# -- sessions ------------------------------------------------------------------------------


class GoneFilter(admin.SimpleListFilter):
    title = "on the gateway"
    parameter_name = "gone"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [
            ("live", "Live"),
            ("gone", "Gone"),
            ("deleted", "Deleted from here"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value == "live":
            return queryset.filter(gone_at=None)
        if value == "gone":
            return queryset.exclude(gone_at=None)
        if value == "deleted":
            return queryset.exclude(deleted_at=None)
        return queryset


class AgentFilter(admin.RelatedFieldListFilter):
    """Agents are named per gateway ("main" on each), so show which gateway each is on."""

    def field_choices(
        self, field: Any, request: HttpRequest, model_admin: Any
    ) -> list[tuple[str, Any]]:
        return [
            (str(a.pk), f"{a.agent_id} · {a.gateway.name}")
            for a in Agent.objects.select_related("gateway").order_by(
                "gateway__name", "agent_id"
            )
        ]


class SessionForm(forms.ModelForm):  # type: ignore[type-arg]
    class Meta:
        model = Session
        fields = ["label"]
        widgets = {"label": forms.TextInput(attrs={"size": 60})}
        help_texts = {
            "label": "Saving sends sessions.patch to the gateway; "
            "the label here changes when the gateway confirms."
        }


@admin.register(Session, site=site)
class SessionAdmin(RoleAdmin):
    form = SessionForm
    list_display = [
        "title_column",
        "gateway",
        "agent",
        "status",
        "model",
        "total_tokens",
        "last_activity",
        "state_column",
    ]
    list_display_links = ["title_column"]
    list_filter = [
        "gateway",
        ("agent", AgentFilter),
        "status",
        "kind",
        "channel",
        GoneFilter,
    ]
    list_select_related = ["gateway", "agent"]
    search_fields = ["key", "label", "display_name"]
    search_help_text = "Search the key, the label or the display name."
    show_full_result_count = False
    list_per_page = 100
    ordering = ["-updated_at", "-id"]
    actions = [
        "rename_sessions",
        "change_model",
        "reset_sessions",
        "delete_sessions",
        "abort_runs",
    ]
    fieldsets = [
        (None, {"fields": ["label"]}),
        (
            "From the gateway",
            {
                "fields": [
                    "key",
                    "gateway",
                    "agent",
                    "display_name",
                    "kind",
                    "channel",
                    "model_column",
                    "status",
                    "has_active_run",
                    "tokens_column",
                    "updated_at",
                    "gone_at",
                    "deleted_at",
                    "session_id",
                    "synced_at",
                ]
            },
        ),
        ("Raw row", {"fields": ["raw_column"], "classes": ["collapse"]}),
    ]
    readonly_fields = [
        "key",
        "gateway",
        "agent",
        "display_name",
        "kind",
        "channel",
        "model_column",
        "status",
        "has_active_run",
        "tokens_column",
        "updated_at",
        "gone_at",
        "deleted_at",
        "session_id",
        "synced_at",
        "raw_column",
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Session]:
        return super().get_queryset(request).select_related("gateway", "agent")

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return roles.can_admin(request.user)

    def has_session_admin_permission(self, request: HttpRequest) -> bool:
        return roles.can_admin(request.user)

    # -- columns ---------------------------------------------------------------------------

    @admin.display(description="Session", ordering="label")
    def title_column(self, obj: Session) -> str:
        if obj.title == obj.key:
            return obj.key
        return format_html('{}<br><span class="quiet">{}</span>', obj.title, obj.key)

    @admin.display(description="Last activity", ordering="updated_at")
    def last_activity(self, obj: Session) -> Any:
        return obj.updated_at

    @admin.display(description="On the gateway")
    def state_column(self, obj: Session) -> str:
        if obj.deleted_at:
            return format_html(
                '<span class="cc-tag cc-deleted" title="{}">deleted</span>',
                f"deleted {obj.deleted_at:%Y-%m-%d %H:%M}",
            )
        if obj.gone_at:
            return format_html(
                '<span class="cc-tag cc-gone" title="{}">gone</span>',
                f"gone since {obj.gone_at:%Y-%m-%d %H:%M}",
            )
        if obj.has_active_run:
            return mark_safe('<span class="cc-tag cc-running">running</span>')
        return mark_safe('<span class="cc-tag cc-live">live</span>')

    @admin.display(description="Model")
    def model_column(self, obj: Session) -> str:
        if obj.model_provider and obj.model:
            return f"{obj.model_provider}/{obj.model}"
        return obj.model or "-"

    @admin.display(description="Tokens")
    def tokens_column(self, obj: Session) -> str:
        parts = [
            f"{name} {value:,}"
            for name, value in (
                ("in", obj.input_tokens),
                ("out", obj.output_tokens),
                ("total", obj.total_tokens),
                ("context", obj.context_tokens),
            )
            if value is not None
        ]
        return " · ".join(parts) or "-"

    @admin.display(description="Raw row from the gateway")
    def raw_column(self, obj: Session) -> str:
        return format_html(
            '<pre class="cc-raw">{}</pre>', json.dumps(obj.raw, indent=2)[:20000]
        )

    # -- the change form: the label goes to the gateway ------------------------------------

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        # Buttons above the form that open the confirmation page of an action for this row.
        extra = {
            "session_actions": [
                ("change_model", "Change model"),
                ("reset_sessions", "Reset"),
                ("abort_runs", "Abort run"),
                ("delete_sessions", "Delete on gateway"),
            ],
            **(extra_context or {}),
        }
        return super().change_view(request, object_id, form_url, extra)

    def save_model(
        self, request: HttpRequest, obj: Session, form: Any, change: bool
    ) -> None:
        """Never saves the row: the label is sent as `sessions.patch`, and the worker writes
        it when the gateway's `sessions.changed` confirms."""
        if "label" not in form.changed_data:
            messages.info(request, "Nothing changed, nothing sent.")
            return
        current = Session.objects.select_related("gateway").get(pk=obj.pk)
        label = form.cleaned_data["label"]

        def send() -> None:
            outcome = admin_actions.rename_session(
                current, label, user=request.user, request=request
            )
            _report(request, [outcome])

        # The admin runs this inside its transaction; the call waits on the worker (and its
        # async plumbing recycles this thread's connection), so send once that has ended.
        transaction.on_commit(send)

    def save_related(
        self, request: HttpRequest, form: Any, formsets: Any, change: bool
    ) -> None:
        pass

    def log_change(self, request: HttpRequest, obj: Any, message: Any) -> Any:
        # The audit event is the record; the row itself did not change here.
        return None

    def response_change(self, request: HttpRequest, obj: Session) -> HttpResponse:
        # Skip Django's "was changed successfully": the gateway has not confirmed yet.
        if "_continue" in request.POST:
            return HttpResponseRedirect(
                reverse("admin:fleet_session_change", args=[obj.pk])
            )
        return HttpResponseRedirect(reverse("admin:fleet_session_changelist"))

    # -- actions ---------------------------------------------------------------------------

    def _too_many(self, request: HttpRequest, sessions: list[Session]) -> bool:
        if len(sessions) > MAX_BULK:
            messages.warning(
                request,
                f"Select at most {MAX_BULK} sessions for one action "
                "(each one is a call to its gateway). Nothing was sent.",
            )
            return True
        return False

    def _confirmation(
        self,
        request: HttpRequest,
        *,
        action: str,
        title: str,
        intro: str,
        button: str,
        rows: list[dict[str, Any]],
        groups: list[dict[str, Any]] | None = None,
        danger: bool = False,
    ) -> TemplateResponse:
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "subtitle": None,
            "opts": self.model._meta,
            "app_label": self.model._meta.app_label,
            "action": action,
            "intro": intro,
            "button": button,
            "rows": rows,
            "groups": groups,
            "danger": danger,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "media": self.media,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(
            request, "admin/fleet/session/action_confirmation.html", context
        )

    @staticmethod
    def _warnings(session: Session) -> list[str]:
        notes = []
        if session.gateway.state != Gateway.State.CONNECTED:
            notes.append(
                f"{session.gateway.name} is {session.gateway.get_state_display().lower()}: "
                "this will most likely fail."
            )
        if session.gone_at:
            notes.append("The gateway no longer lists this session.")
        return notes

    def _simple_action(
        self,
        request: HttpRequest,
        queryset: QuerySet[Session],
        *,
        action: str,
        title: str,
        intro: str,
        button: str,
        run: Any,
        note: Any,
        danger: bool = False,
    ) -> TemplateResponse | None:
        sessions = list(queryset)
        if self._too_many(request, sessions):
            return None
        if request.POST.get("post") == "yes":
            outcomes = [
                run(session, user=request.user, request=request) for session in sessions
            ]
            _report(request, outcomes)
            return None
        rows = [
            {"session": s, "notes": [*note(s), *self._warnings(s)]} for s in sessions
        ]
        return self._confirmation(
            request,
            action=action,
            title=title,
            intro=intro,
            button=button,
            rows=rows,
            danger=danger,
        )

    @admin.action(
        description="Reset selected sessions on the gateway",
        permissions=["session_admin"],
    )
    def reset_sessions(
        self, request: HttpRequest, queryset: QuerySet[Session]
    ) -> TemplateResponse | None:
        return self._simple_action(
            request,
            queryset,
            action="reset_sessions",
            title="Reset these sessions?",
            intro="Each gateway gets sessions.reset for each session below: it starts a "
            "fresh transcript. The Control Center keeps the messages it already has.",
            button="Yes, reset them",
            run=admin_actions.reset_session,
            note=lambda s: [],
            danger=True,
        )

    @admin.action(
        description="Delete selected sessions on the gateway",
        permissions=["session_admin"],
    )
    def delete_sessions(
        self, request: HttpRequest, queryset: QuerySet[Session]
    ) -> TemplateResponse | None:
        def note(s: Session) -> list[str]:
            if s.deleted_at:
                return ["Already deleted from here once."]
            main = s.gateway.main_session_key or f"agent:{s.agent_key or 'main'}:main"
            if s.key == main:
                return [
                    "This is the gateway's main session: the gateway refuses to delete it."
                ]
            return []

        return self._simple_action(
            request,
            queryset,
            action="delete_sessions",
            title="Delete these sessions on their gateways?",
            intro="Each gateway gets sessions.delete for each session below and archives "
            "its transcript. The Control Center keeps its own copy and transcript, marked deleted.",
            button="Yes, delete them on the gateway",
            run=admin_actions.delete_session,
            note=note,
            danger=True,
        )

    @admin.action(
        description="Abort the running run of selected sessions",
        permissions=["session_admin"],
    )
    def abort_runs(
        self, request: HttpRequest, queryset: QuerySet[Session]
    ) -> TemplateResponse | None:
        return self._simple_action(
            request,
            queryset,
            action="abort_runs",
            title="Abort the runs of these sessions?",
            intro="Each gateway gets chat.abort for each session below, which stops every "
            "run in that session.",
            button="Yes, abort",
            run=admin_actions.abort_run,
            note=lambda s: (
                []
                if s.has_active_run
                else ["Nothing seems to be running (the gateway is asked anyway)."]
            ),
        )

    @admin.action(description="Rename selected sessions", permissions=["session_admin"])
    def rename_sessions(
        self, request: HttpRequest, queryset: QuerySet[Session]
    ) -> TemplateResponse | None:
        sessions = list(queryset)
        if self._too_many(request, sessions):
            return None
        if request.POST.get("post") == "yes":
            outcomes = []
            for session in sessions:
                label = request.POST.get(f"label_{session.pk}")
                if label is None or label.strip() == session.label:
                    continue
                outcomes.append(
                    admin_actions.rename_session(
                        session, label[:500], user=request.user, request=request
                    )
                )
            if not outcomes:
                messages.info(request, "No label changed, nothing sent.")
            _report(request, outcomes)
            return None
        rows = [
            {
                "session": s,
                "input": {"name": f"label_{s.pk}", "value": s.label},
                "notes": self._warnings(s),
            }
            for s in sessions
        ]
        return self._confirmation(
            request,
            action="rename_sessions",
            title="Rename these sessions",
            intro="Type the new labels. Each changed label is sent to its gateway as "
            "sessions.patch; a row updates when its gateway confirms. An empty label clears it.",
            button="Send the new labels",
            rows=rows,
        )

    @admin.action(
        description="Change the model of selected sessions",
        permissions=["session_admin"],
    )
    def change_model(
        self, request: HttpRequest, queryset: QuerySet[Session]
    ) -> TemplateResponse | None:
        sessions = list(queryset)
        if self._too_many(request, sessions):
            return None
        by_gateway: dict[int, list[Session]] = {}
        for s in sessions:
            by_gateway.setdefault(s.gateway_id, []).append(s)
        if request.POST.get("post") == "yes":
            outcomes = []
            refused = False
            for gateway_id, members in by_gateway.items():
                model = (request.POST.get(f"model_{gateway_id}") or "").strip()
                if not model:
                    continue
                # Only a model the gateway itself offers may be sent.
                offered = admin_actions.list_models(
                    members[0].gateway, user=request.user
                )
                if model not in {c.value for c in offered.choices}:
                    messages.error(
                        request,
                        f"{members[0].gateway.name} does not offer the model {model}"
                        + (f" ({offered.error})" if offered.error else "")
                        + "; nothing sent for its sessions.",
                    )
                    refused = True
                    continue
                outcomes += [
                    admin_actions.change_model(
                        s, model, user=request.user, request=request
                    )
                    for s in members
                ]
            if not outcomes and not refused:
                messages.info(request, "No model chosen, nothing sent.")
            _report(request, outcomes)
            return None
        groups = []
        for gateway_id, members in by_gateway.items():
            gateway = members[0].gateway
            offered = admin_actions.list_models(gateway, user=request.user)
            groups.append(
                {
                    "gateway": gateway,
                    "field": f"model_{gateway_id}",
                    "choices": offered.choices,
                    "error": offered.error,
                    "rows": [
                        {"session": s, "notes": self._warnings(s)} for s in members
                    ],
                }
            )
        return self._confirmation(
            request,
            action="change_model",
            title="Change the model of these sessions",
            intro="Choose a model from each gateway's own list (models.list). Each session "
            "below gets sessions.patch with that model; rows update when the gateway confirms.",
            button="Send the model change",
            rows=[],
            groups=groups,
        )


# -- gateways ------------------------------------------------------------------------------


class GatewayForm(forms.ModelForm):  # type: ignore[type-arg]
    class Meta:
        model = Gateway
        fields = [
            "name",
            "url",
            "rest_url",
            "token_env",
            "enabled",
            "tls_ca_file",
            "tls_ca_env",
            "tls_pin",
        ]
        labels = {"token_env": "Token environment variable"}
        help_texts = {
            "token_env": "Name of the worker's environment variable that holds this "
            "gateway's token: a name ending in _GATEWAY_TOKEN, or one the deployment "
            "lists in CONTROLCENTER_ALLOWED_ENV.",
            "tls_ca_env": "Or: the name of a worker environment variable holding that CA "
            "as PEM text (or a path to it): a name ending in _CA_BUNDLE, or one listed in "
            "CONTROLCENTER_ALLOWED_ENV.",
        }

    def clean_url(self) -> str:
        url = str(self.cleaned_data["url"]).strip()
        if not url.startswith(("ws://", "wss://", "http://", "https://")):
            raise ValidationError("Use a ws://, wss://, http:// or https:// address.")
        refusal = envrules.url_refusal(url)
        if refusal:
            raise ValidationError(refusal)
        return url

    def clean_rest_url(self) -> str:
        url = str(self.cleaned_data.get("rest_url") or "").strip()
        if url and not url.startswith(("http://", "https://")):
            raise ValidationError(
                "Use an http:// or https:// address, or leave it blank."
            )
        refusal = envrules.url_refusal(url, "The REST fallback address") if url else ""
        if refusal:
            raise ValidationError(refusal)
        return url

    def clean_token_env(self) -> str:
        name = validate_token_env(str(self.cleaned_data["token_env"]))
        refusal = envrules.env_name_refusal(name, envrules.TOKEN)
        if refusal:
            raise ValidationError(refusal)
        return name

    def clean_tls_ca_file(self) -> str:
        path = str(self.cleaned_data.get("tls_ca_file") or "").strip()
        if PEM_MARKER in path or "\n" in path:
            raise ValidationError(
                "Type the path of the PEM file here; to give the certificate itself, put "
                "it in an environment variable of the worker and name that below."
            )
        if path and not path.startswith("/"):
            raise ValidationError(
                "Use an absolute path on the worker, e.g. /etc/ssl/gateway-ca.pem."
            )
        return path

    def clean_tls_ca_env(self) -> str:
        name = str(self.cleaned_data.get("tls_ca_env") or "").strip()
        if PEM_MARKER in name:
            raise ValidationError(
                "Put the certificate in the worker's environment and type only the "
                "variable's name here, e.g. GATEWAY_CA_BUNDLE."
            )
        if name and not re.fullmatch(r"[A-Z_][A-Z0-9_]*", name):
            raise ValidationError(
                "An environment variable name: upper-case letters, digits and underscores."
            )
        refusal = envrules.env_name_refusal(name, envrules.CA_BUNDLE) if name else ""
        if refusal:
            raise ValidationError(refusal)
        return name

    def clean_tls_pin(self) -> str:
        raw = str(self.cleaned_data.get("tls_pin") or "").strip()
        try:
            pin = normalize_pin(raw)
        except TlsConfigError as exc:
            raise ValidationError(str(exc)) from None
        return format_fingerprint(pin) if pin else ""

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("tls_ca_file") and data.get("tls_ca_env"):
            self.add_error(
                "tls_ca_env", "Name the CA bundle by a path or by a variable, not both."
            )
        url = str(data.get("url") or "")
        rest_url = str(data.get("rest_url") or "")
        tls_set = (
            data.get("tls_ca_file") or data.get("tls_ca_env") or data.get("tls_pin")
        )
        if (
            tls_set
            and url
            and not url.startswith(("wss://", "https://"))
            and not rest_url.startswith("https://")
        ):
            self.add_error(
                "url",
                "TLS settings apply to wss:// and https:// addresses only: use wss:// "
                "(or clear the TLS fields).",
            )
        return data


def validate_token_env(value: str) -> str:
    """The NAME of an environment variable, never a token: upper-case words joined by
    underscores. Long runs of digits or long unbroken strings look like a pasted secret."""
    name = value.strip()
    secret_hint = (
        "That looks like a token itself. Put the token in the worker's environment "
        "and type only the variable's name here, e.g. OPENCLAW_GATEWAY_TOKEN."
    )
    if not name:
        raise ValidationError("Name the environment variable that holds the token.")
    if (
        not all(c.isascii() and (c.isalnum() or c == "_") for c in name)
        or name[0].isdigit()
    ):
        if any(c in name for c in "-.+/=") or len(name) >= 20:
            raise ValidationError(secret_hint)
        raise ValidationError(
            "An environment variable name has only letters, digits and underscores, "
            "and does not start with a digit."
        )
    if name != name.upper():
        if (
            sum(c.isupper() for c in name)
            and sum(c.islower() for c in name)
            and len(name) >= 16
        ):
            raise ValidationError(secret_hint)
        raise ValidationError(
            "Use the upper-case name of the variable, e.g. OPENCLAW_GATEWAY_TOKEN."
        )
    longest_word = max(len(part) for part in name.split("_"))
    digits = sum(c.isdigit() for c in name)
    if longest_word >= 24 or digits >= 6:
        raise ValidationError(secret_hint)
    return name


DEVICE_FIELDS = (
    "device_id",
    "fingerprint",
    "public_key",
    "token_held",
    "scopes",
    "created_at",
)


class DeviceInline(admin.StackedInline):  # type: ignore[type-arg]
    model = DeviceIdentity
    fields = DEVICE_FIELDS
    readonly_fields = DEVICE_FIELDS
    can_delete = False
    extra = 0
    max_num = 0
    verbose_name = "Device identity"
    verbose_name_plural = "Device identity"

    @admin.display(description="Public-key fingerprint (SHA-256)")
    def fingerprint(self, obj: Any) -> str:
        return str(obj.fingerprint) or "-"

    @admin.display(description="Device token")
    def token_held(self, obj: Any) -> str:
        # Never the token itself: only whether the gateway issued one.
        return (
            "issued by the gateway and kept (used when the shared token is refused)"
            if obj.device_token
            else "none yet (issued when the gateway approves this device)"
        )

    @admin.display(description="Scopes granted")
    def scopes(self, obj: Any) -> str:
        return ", ".join(obj.device_token_scopes or []) or "-"

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return roles.can_admin(request.user)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


# Everything an admin can set on a gateway is audited (none of it is a secret).
GATEWAY_AUDITED_FIELDS = GatewayForm.Meta.fields


@admin.register(Gateway, site=site)
class GatewayAdmin(RoleWriteAdmin):
    form = GatewayForm
    change_form_template = "admin/fleet/gateway/change_form.html"
    list_display = [
        "name",
        "url",
        "enabled",
        "state",
        "server_version",
        "protocol",
        "short_error",
        "worker",
    ]
    list_filter = ["enabled", "state"]
    search_fields = ["name", "url"]
    actions = ["enable_gateways", "disable_gateways"]
    inlines = [DeviceInline]
    readonly_fields = [
        "token_status",
        "state",
        "last_error",
        "state_changed_at",
        "server_version",
        "protocol",
        "connected_since",
        "last_event_at",
        "pairing",
        "main_session_key",
        "worker",
    ]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "name",
                    "url",
                    "rest_url",
                    "token_env",
                    "token_status",
                    "enabled",
                ]
            },
        ),
        (
            "TLS (wss:// and https:// only)",
            {
                "fields": ["tls_ca_file", "tls_ca_env", "tls_pin"],
                "description": "Blank: the system trust store, no pin. For a self-signed "
                "or private CA, name its PEM bundle; to pin, paste the SHA-256 of the "
                "gateway's certificate or of its public key (a mismatch is refused and "
                "shown here, never retried in a loop).",
            },
        ),
        (
            "Connection (kept up to date by the worker)",
            {
                "fields": [
                    "state",
                    "last_error",
                    "state_changed_at",
                    "server_version",
                    "protocol",
                    "connected_since",
                    "last_event_at",
                    "pairing",
                    "main_session_key",
                    "worker",
                ]
            },
        ),
    ]

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:  # adding: only what an admin types
            return [
                (None, {"fields": ["name", "url", "rest_url", "token_env", "enabled"]}),
                (
                    "TLS (wss:// and https:// only)",
                    {"fields": ["tls_ca_file", "tls_ca_env", "tls_pin"]},
                ),
            ]
        return super().get_fieldsets(request, obj)

    def get_inlines(self, request: HttpRequest, obj: Any) -> list[Any]:
        return [DeviceInline] if obj is not None else []

    @admin.display(description="Last error")
    def short_error(self, obj: Gateway) -> str:
        return obj.last_error[:80] + ("…" if len(obj.last_error) > 80 else "")

    @admin.display(description="Token")
    def token_status(self, obj: Gateway) -> str:
        refusal = envrules.env_name_refusal(obj.token_env, envrules.TOKEN)
        if refusal:
            return f"The worker does not read it: {refusal}"
        if envrules.read_env(obj.token_env, envrules.TOKEN):
            return f"{obj.token_env} is set in the web process's environment (the worker reads its own)."
        return f"{obj.token_env} is not set in the web process's environment; the worker must have it."

    @admin.display(description="Pairing")
    def pairing(self, obj: Gateway) -> str:
        if not obj.pairing_request_id:
            return "-"
        return format_html(
            "Request {} ({}: {}). Approve on the gateway host: <code>{}</code>",
            obj.pairing_request_id,
            obj.pairing_reason or "not-paired",
            obj.pairing_reason_text,
            obj.approve_command,
        )

    @admin.display(description="Worker")
    def worker(self, obj: Gateway) -> str:
        if obj.worker_alive():
            return f"held by {obj.lease_owner} until {obj.lease_expires_at:%H:%M:%S}"
        return "no worker holds this gateway"

    # -- audit every change ----------------------------------------------------------------

    def save_model(
        self, request: HttpRequest, obj: Gateway, form: Any, change: bool
    ) -> None:
        super().save_model(request, obj, form, change)
        changed = GATEWAY_AUDITED_FIELDS if not change else form.changed_data
        audit.record(
            "gateway.change" if change else "gateway.add",
            request=request,
            gateway=obj,
            params={
                k: envrules.safe_url(getattr(obj, k))
                if k in ("url", "rest_url") and getattr(obj, k)
                else getattr(obj, k)
                for k in changed
                if k in GATEWAY_AUDITED_FIELDS
            },
            result=AuditEvent.Result.OK,
        )

    def delete_model(self, request: HttpRequest, obj: Gateway) -> None:
        self._audit_delete(request, [obj])
        super().delete_model(request, obj)

    def delete_queryset(
        self, request: HttpRequest, queryset: QuerySet[Gateway]
    ) -> None:
        self._audit_delete(request, list(queryset))
        super().delete_queryset(request, queryset)

    @staticmethod
    def _audit_delete(request: HttpRequest, gateways: list[Gateway]) -> None:
        for gateway in gateways:
            audit.record(
                "gateway.delete",
                request=request,
                params={
                    "name": gateway.name,
                    "url": envrules.safe_url(gateway.url),
                    "id": gateway.pk,
                },
                result=AuditEvent.Result.OK,
                detail=f"{gateway.sessions.count()} sessions deleted with it",
            )

    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> Any:
        """Summarise instead of listing every session and message that goes with it."""
        from chat.models import Message

        objs = list(objs)
        sessions = Session.objects.filter(gateway__in=objs)
        counts = {
            "gateways": len(objs),
            "sessions": sessions.count(),
            "messages": Message.objects.filter(session__gateway__in=objs).count(),
            "agents": Agent.objects.filter(gateway__in=objs).count(),
        }
        summary = [
            f"Gateway: {g.name} ({envrules.safe_url(g.url)}), with all its agents, sessions "
            "and transcripts"
            for g in objs
        ]
        return summary, counts, set(), []

    def _set_enabled(
        self, request: HttpRequest, queryset: QuerySet[Gateway], enabled: bool
    ) -> None:
        for gateway in queryset:
            if gateway.enabled == enabled:
                continue
            gateway.enabled = enabled
            gateway.save(update_fields=["enabled", "updated_at"])
            audit.record(
                "gateway.change",
                request=request,
                gateway=gateway,
                params={"enabled": enabled},
                result=AuditEvent.Result.OK,
            )
            messages.success(
                request,
                f"{gateway.name} {'enabled: the worker connects' if enabled else 'disabled: the worker lets go'} within a few seconds.",
            )

    @admin.action(description="Enable selected gateways", permissions=["change"])
    def enable_gateways(
        self, request: HttpRequest, queryset: QuerySet[Gateway]
    ) -> None:
        self._set_enabled(request, queryset, True)

    @admin.action(description="Disable selected gateways", permissions=["change"])
    def disable_gateways(
        self, request: HttpRequest, queryset: QuerySet[Gateway]
    ) -> None:
        self._set_enabled(request, queryset, False)

    # -- test the connection ---------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "<path:object_id>/test-connection/",
                self.admin_site.admin_view(self.test_connection_view),
                name="fleet_gateway_test_connection",
            ),
            path(
                "<path:object_id>/rotate-identity/",
                self.admin_site.admin_view(self.rotate_identity_view),
                name="fleet_gateway_rotate_identity",
            ),
            *super().get_urls(),
        ]

    def rotate_identity_view(
        self, request: HttpRequest, object_id: str
    ) -> HttpResponse:
        """GET: what rotating means, and a button; POST: rotate (audited) and go back."""
        gateway = _gateway_or_404(Gateway.objects.select_related("device"), object_id)
        if not self.has_change_permission(request, gateway):
            return HttpResponse(status=403)
        if request.method == "POST":
            outcome = admin_actions.rotate_device_identity(
                gateway, user=request.user, request=request
            )
            (messages.success if outcome.ok else messages.error)(
                request, outcome.message
            )
            return HttpResponseRedirect(
                reverse("admin:fleet_gateway_change", args=[gateway.pk])
            )
        context = {
            **self.admin_site.each_context(request),
            "title": f"Rotate the device identity towards {gateway.name}?",
            "subtitle": None,
            "opts": self.model._meta,
            "app_label": self.model._meta.app_label,
            "original": gateway,
            "device": getattr(gateway, "device", None),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(
            request, "admin/fleet/gateway/rotate_identity.html", context
        )

    def test_connection_view(
        self, request: HttpRequest, object_id: str
    ) -> HttpResponse:
        if not self.has_view_permission(request):
            return HttpResponse(status=403)
        gateway = _gateway_or_404(Gateway.objects.all(), object_id)
        result = admin_actions.test_connection(gateway, user=request.user)
        context = {
            **self.admin_site.each_context(request),
            "title": f"Test the connection to {gateway.name}",
            "subtitle": None,
            "opts": self.model._meta,
            "app_label": self.model._meta.app_label,
            "original": gateway,
            "result": result,
            "answer": json.dumps(result.payload, indent=2)[:50000]
            if result.payload is not None
            else "",
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(
            request, "admin/fleet/gateway/test_connection.html", context
        )


def _gateway_or_404(queryset: QuerySet[Gateway], object_id: str) -> Gateway:
    """The gateway of a `<path:object_id>` URL: anything but digits is no gateway (404); the
    ORM would raise ValueError on it, a 500."""
    if not re.fullmatch(r"[0-9]+", object_id):
        raise Http404("no such gateway")
    return get_object_or_404(queryset, pk=int(object_id))


# -- the audit log ---------------------------------------------------------------------------


CSV_COLUMNS = [
    ("created_at", "when"),
    ("username", "who"),
    ("action", "action"),
    ("gateway__name", "gateway"),
    ("session_key", "session"),
    ("params", "params"),
    ("result", "result"),
    ("detail", "detail"),
    ("ip", "ip"),
]


class _Echo:
    """A file-like object whose write returns what it was given (for csv.writer)."""

    def write(self, value: str) -> str:
        return value


def csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        text = json.dumps(value, sort_keys=True)
    elif hasattr(value, "isoformat"):
        text = value.isoformat()
    else:
        text = str(value)
    # Spreadsheets run cells that start like a formula; gateway text is untrusted.
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        text = "'" + text
    return text


def audit_csv_response(
    request: HttpRequest, queryset: QuerySet[AuditEvent], filename: str
) -> StreamingHttpResponse:
    """Stream the events as CSV, a chunk of rows at a time, without holding the table.
    Under ASGI (daphne) the stream must be async, or Django collects it whole first.

    Not `values_list().aiterator()`: its iterable runs the query when it is made, in the
    event loop, and Django refuses that (SynchronousOnlyOperation; the download hung under
    daphne). The sync iterator is made and advanced in the request's sync thread instead,
    one chunk per hop (ASGIHandler keeps one thread per request, so one connection)."""
    writer = csv.writer(_Echo())
    fields = [name for name, _ in CSV_COLUMNS]
    header = writer.writerow([title for _, title in CSV_COLUMNS])
    values = queryset.values_list(*fields)
    chunk_size = 2000

    async def arows() -> AsyncIterator[str]:
        yield header
        source: Iterator[tuple[Any, ...]] | None = None

        def next_chunk() -> list[str]:
            nonlocal source
            if source is None:
                source = values.iterator(chunk_size=chunk_size)
            return [
                writer.writerow([csv_cell(v) for v in row])
                for row in itertools.islice(source, chunk_size)
            ]

        while chunk := await sync_to_async(next_chunk)():
            yield "".join(chunk)

    def rows() -> Iterator[str]:
        yield header
        for row in values.iterator(chunk_size=2000):
            yield writer.writerow([csv_cell(v) for v in row])

    stream = arows() if isinstance(request, ASGIRequest) else rows()
    response = StreamingHttpResponse(stream, content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


AUDIT_FIELDS = (
    "created_at",
    "username",
    "user",
    "action",
    "gateway",
    "session",
    "session_key",
    "params_pretty",
    "result",
    "detail",
    "ip",
)


@admin.register(AuditEvent, site=site)
class AuditEventAdmin(RoleAdmin):
    change_list_template = "admin/fleet/auditevent/change_list.html"
    list_display = [
        "created_at",
        "username",
        "action",
        "gateway",
        "session_key",
        "result",
        "short_detail",
        "ip",
    ]
    list_filter = [
        ("user", admin.RelatedOnlyFieldListFilter),
        "action",
        "result",
        "gateway",
    ]
    list_select_related = ["gateway"]
    search_fields = ["username", "session_key", "detail", "action"]
    date_hierarchy = "created_at"
    show_full_result_count = False
    list_per_page = 100
    actions = ["export_csv"]
    fields = AUDIT_FIELDS
    readonly_fields = AUDIT_FIELDS

    @admin.display(description="Detail")
    def short_detail(self, obj: AuditEvent) -> str:
        return obj.detail[:80] + ("…" if len(obj.detail) > 80 else "")

    @admin.display(description="Parameters (secrets removed)")
    def params_pretty(self, obj: AuditEvent) -> str:
        return format_html(
            '<pre class="cc-raw">{}</pre>', json.dumps(obj.params, indent=2)
        )

    @admin.action(description="Export selected events as CSV")
    def export_csv(
        self, request: HttpRequest, queryset: QuerySet[AuditEvent]
    ) -> StreamingHttpResponse:
        return audit_csv_response(
            request, queryset.order_by("-created_at"), self._filename()
        )

    @staticmethod
    def _filename() -> str:
        return f"audit-{timezone.now():%Y%m%d-%H%M%S}.csv"

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "export.csv",
                self.admin_site.admin_view(self.export_view),
                name="fleet_auditevent_export",
            ),
            *super().get_urls(),
        ]

    def export_view(self, request: HttpRequest) -> HttpResponseBase:
        """Every event the changelist shows for the same filters and search, as CSV."""
        if not self.has_view_permission(request):
            return HttpResponse(status=403)
        changelist = self.get_changelist_instance(request)
        return audit_csv_response(
            request, changelist.get_queryset(request), self._filename()
        )


# -- read-only views of the synced fleet -------------------------------------------------------


@admin.register(Agent, site=site)
class AgentAdmin(RoleAdmin):
    list_display = ["agent_id", "name", "gateway", "model", "is_default", "gone_at"]
    list_filter = ["gateway"]
    list_select_related = ["gateway"]
    search_fields = ["agent_id", "name"]


@admin.register(PresenceEntry, site=site)
class PresenceAdmin(RoleAdmin):
    list_display = ["host", "gateway", "mode", "platform", "version", "seen_at"]
    list_filter = ["gateway", "mode"]
    list_select_related = ["gateway"]


@admin.register(WorkerHeartbeat, site=site)
class WorkerAdmin(RoleAdmin):
    """The running gateway workers and which gateways each holds (fleet/leases.py)."""

    list_display = ["owner", "is_alive", "held_gateways", "started_at", "seen_at"]

    @admin.display(description="Alive", boolean=True)
    def is_alive(self, obj: WorkerHeartbeat) -> bool:
        return obj.alive()

    @admin.display(description="Holds")
    def held_gateways(self, obj: WorkerHeartbeat) -> str:
        names = leases.held_by(obj.owner)  # one query a row: workers are few
        return f"{len(names)}: {', '.join(names)}" if names else "none"


# -- people: admins manage accounts and their roles --------------------------------------------


@admin.register(User, site=site)
class PersonAdmin(UserAdmin):  # type: ignore[type-arg]
    list_display = ["username", "email", "role", "is_active", "last_login"]
    list_filter = ["groups", "is_active", "is_superuser"]

    @admin.display(description="Role")
    def role(self, obj: User) -> str:
        return roles.role_of(obj) or "-"

    def get_queryset(self, request: HttpRequest) -> QuerySet[User]:
        return super().get_queryset(request).prefetch_related("groups")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        fields = list(super().get_readonly_fields(request, obj))
        if not request.user.is_superuser:  # only a superuser makes superusers
            fields += ["is_superuser", "user_permissions"]
        return fields

    def formfield_for_manytomany(
        self, db_field: Any, request: HttpRequest, **kwargs: Any
    ) -> Any:
        # An admin hands out the three roles; other groups may carry permissions, which
        # only a superuser grants (as it alone edits permissions).
        if db_field.name == "groups" and not request.user.is_superuser:
            kwargs["queryset"] = Group.objects.filter(name__in=roles.ROLES)
        return super().formfield_for_manytomany(db_field, request, **kwargs)

    def has_module_permission(self, request: HttpRequest) -> bool:
        return roles.can_admin(request.user)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return roles.can_admin(request.user)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return roles.can_admin(request.user)

    # A superuser's account is out of an admin's reach: changed, given a new password
    # (`user_change_password` asks `has_change_permission` for the account) or deleted
    # (the change form's delete view, and the bulk action through `get_deleted_objects`,
    # ask `has_delete_permission` for each account) only by another superuser.

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return roles.can_admin(request.user) and _may_manage(request.user, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return roles.can_admin(request.user) and _may_manage(request.user, obj)


def _may_manage(actor: Any, account: Any) -> bool:
    return account is None or actor.is_superuser or not account.is_superuser


@admin.register(Group, site=site)
class RoleGroupAdmin(GroupAdmin):
    def has_module_permission(self, request: HttpRequest) -> bool:
        return roles.can_admin(request.user)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return roles.can_admin(request.user)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser
