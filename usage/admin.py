"""Budgets are managed by admins (each change audited); the ledger is read-only here."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from fleet import audit
from fleet.admin import RoleAdmin, RoleWriteAdmin, site
from fleet.models import AuditEvent
from usage.budgets import ensure_budget_rule
from usage.models import Budget, UsageEntry

AUDITED = (
    "name",
    "gateway",
    "agent_key",
    "period",
    "amount_usd",
    "thresholds",
    "enabled",
)


def _value(budget: Budget, field: str) -> Any:
    if field == "gateway":
        return budget.gateway_id
    value = getattr(budget, field)
    return str(value) if field == "amount_usd" else value


@admin.register(Budget, site=site)
class BudgetAdmin(RoleWriteAdmin):
    list_display = (
        "name",
        "period",
        "amount_usd",
        "thresholds",
        "gateway",
        "agent_key",
        "enabled",
    )
    list_filter = ("period", "enabled")

    def save_model(
        self, request: HttpRequest, obj: Budget, form: Any, change: bool
    ) -> None:
        super().save_model(request, obj, form, change)
        ensure_budget_rule()
        changed = AUDITED if not change else form.changed_data
        audit.record(
            "budget.change" if change else "budget.add",
            request=request,
            params={
                "budget": obj.pk,
                **{k: _value(obj, k) for k in changed if k in AUDITED},
            },
            result=AuditEvent.Result.OK,
        )

    def delete_model(self, request: HttpRequest, obj: Budget) -> None:
        self._audit_delete(request, [obj])
        super().delete_model(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Budget]) -> None:
        self._audit_delete(request, list(queryset))
        super().delete_queryset(request, queryset)

    @staticmethod
    def _audit_delete(request: HttpRequest, budgets: list[Budget]) -> None:
        for budget in budgets:
            audit.record(
                "budget.delete",
                request=request,
                params={"budget": budget.pk, "name": budget.name},
                result=AuditEvent.Result.OK,
            )


@admin.register(UsageEntry, site=site)
class UsageEntryAdmin(RoleAdmin):
    list_display = (
        "occurred_at",
        "gateway",
        "agent_key",
        "model",
        "session_key",
        "cost_usd",
    )
    list_filter = ("gateway",)
    search_fields = ("session_key", "run_id")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # the ledger only grows
