"""Sessions in the admin: the list, the change form whose label goes to the gateway, and
the bulk actions (rename, change model, reset, delete, abort), each confirmed first and each
a call through `fleet.actions`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db import transaction
from django.db.models import QuerySet
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseRedirect,
)
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html
from django.utils.safestring import mark_safe

from fleet import actions
from fleet.admin.site import RoleAdmin, admin_page, site
from fleet.models import (
    Agent,
    Gateway,
    Session,
)

# Bulk actions list every session on their confirmation page and call the gateway once per
# session; past this many, the admin is asked to narrow the selection.
MAX_BULK = 200


def _report(request: HttpRequest, outcomes: Sequence[actions.Outcome]) -> None:
    """One message per outcome; a long selection gets a summary plus its failures."""
    failures = [o for o in outcomes if not o.ok]
    if len(outcomes) > 10:
        done = len(outcomes) - len(failures)
        messages.info(request, f"{done} of {len(outcomes)} sessions done.")
        shown: Iterable[actions.Outcome] = failures[:10]
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

    # Admins change a session's label (sent to the gateway), never add or delete rows here.
    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.role_allows(request)

    def has_session_admin_permission(self, request: HttpRequest) -> bool:
        return self.role_allows(request)

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
            outcome = actions.rename_session(
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
        return admin_page(
            self,
            request,
            "admin/fleet/session/action_confirmation.html",
            title=title,
            action=action,
            intro=intro,
            button=button,
            rows=rows,
            groups=groups,
            danger=danger,
            action_checkbox_name=helpers.ACTION_CHECKBOX_NAME,
            media=self.media,
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
            run=actions.reset_session,
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
            run=actions.delete_session,
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
            run=actions.abort_run,
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
                    actions.rename_session(
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
                offered = actions.list_models(members[0].gateway, user=request.user)
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
                    actions.change_model(s, model, user=request.user, request=request)
                    for s in members
                ]
            if not outcomes and not refused:
                messages.info(request, "No model chosen, nothing sent.")
            _report(request, outcomes)
            return None
        groups = []
        for gateway_id, members in by_gateway.items():
            gateway = members[0].gateway
            offered = actions.list_models(gateway, user=request.user)
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
