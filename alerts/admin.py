"""Rules are managed by admins in the Control Center's admin (each change audited); alerts
and their deliveries can be looked at there too, and are acted on from /alerts/."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from alerts.models import Alert, AlertRule, Delivery
from alerts.sources import source_for
from fleet import audit
from fleet.admin import RoleAdmin, RoleWriteAdmin, site
from fleet.models import AuditEvent

# Audited as they are; the webhook URL is audited masked (Slack's carry a token).
RULE_AUDITED_FIELDS = (
    "name",
    "kind",
    "enabled",
    "for_seconds",
    "threshold",
    "gateway",
    "agent",
    "cooldown_seconds",
    "email_to",
    "webhook_url",
    "webhook_secret_env",
)


def _audit_value(rule: AlertRule, field: str) -> Any:
    if field == "webhook_url":
        return rule.webhook_display
    value = getattr(rule, field)
    if field in ("gateway", "agent"):
        return value.pk if value is not None else None
    return value


@admin.register(AlertRule, site=site)
class AlertRuleAdmin(RoleWriteAdmin):
    list_display = (
        "name",
        "kind",
        "enabled",
        "for_seconds",
        "cooldown_seconds",
        "gateway",
        "agent",
        "destinations",
    )
    list_filter = ("kind", "enabled")
    fieldsets = (
        (None, {"fields": ("name", "kind", "enabled")}),
        (
            "Condition",
            {"fields": ("for_seconds", "threshold", "gateway", "agent")},
        ),
        (
            "Where it goes",
            {
                "fields": (
                    "cooldown_seconds",
                    "email_to",
                    "webhook_url",
                    "webhook_secret_env",
                )
            },
        ),
    )

    @admin.display(description="destinations")
    def destinations(self, rule: AlertRule) -> str:
        parts = [f"{len(rule.recipients)} email"] if rule.recipients else []
        if rule.webhook_url:
            parts.append(f"webhook {rule.webhook_display}")
        return ", ".join(parts) or "in the app only"

    def save_model(
        self, request: HttpRequest, obj: AlertRule, form: Any, change: bool
    ) -> None:
        super().save_model(request, obj, form, change)
        changed = RULE_AUDITED_FIELDS if not change else form.changed_data
        audit.record(
            "alert_rule.change" if change else "alert_rule.add",
            request=request,
            params={
                "rule": obj.pk,
                **{
                    k: _audit_value(obj, k) for k in changed if k in RULE_AUDITED_FIELDS
                },
            },
            result=AuditEvent.Result.OK,
        )
        if source_for(obj.kind) is None:
            messages.warning(
                request,
                f"Nothing raises “{obj.get_kind_display()}” alerts yet: the app that "
                "provides them is not installed. The rule waits for it.",
            )

    def delete_model(self, request: HttpRequest, obj: AlertRule) -> None:
        self._audit_delete(request, [obj])
        super().delete_model(request, obj)

    def delete_queryset(
        self, request: HttpRequest, queryset: QuerySet[AlertRule]
    ) -> None:
        self._audit_delete(request, list(queryset))
        super().delete_queryset(request, queryset)

    @staticmethod
    def _audit_delete(request: HttpRequest, rules: list[AlertRule]) -> None:
        for rule in rules:
            audit.record(
                "alert_rule.delete",
                request=request,
                params={"rule": rule.pk, "name": rule.name, "kind": rule.kind},
                result=AuditEvent.Result.OK,
            )


@admin.register(Alert, site=site)
class AlertAdmin(RoleAdmin):
    list_display = ("title", "status", "rule", "since", "raised_at", "resolved_at")
    list_filter = ("status", "kind")
    search_fields = ("title", "key")


@admin.register(Delivery, site=site)
class DeliveryAdmin(RoleAdmin):
    list_display = (
        "notice",
        "channel",
        "address",
        "status",
        "attempts",
        "next_attempt_at",
        "sent_at",
    )
    list_filter = ("status", "channel")
