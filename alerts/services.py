"""What people do with alerts, shared by views (and any later consumer): acknowledge
("I am on it": operators and admins) and resolve ("it is dealt with": admins), each
audited. And the queries the list and the navigation count read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db.models import Prefetch, QuerySet
from django.http import HttpRequest
from django.utils import timezone

from alerts import notify
from alerts.models import Alert, Delivery
from fleet import audit, roles
from fleet.models import AuditEvent

RECENT = 50  # resolved alerts shown under the open ones


def can_acknowledge(user: Any) -> bool:
    return roles.can_chat(user)  # the operator role


def can_resolve(user: Any) -> bool:
    return roles.can_admin(user)


def attention_count(user: Any) -> int | None:
    """The navigation's count: open alerts nobody acknowledged yet; None without a role."""
    if not roles.can_view(user):
        return None
    return Alert.objects.filter(status=Alert.Status.OPEN).count()


def _with_deliveries(alerts: QuerySet[Alert]) -> QuerySet[Alert]:
    deliveries = Delivery.objects.order_by("channel", "address", "pk")
    return alerts.select_related(
        "rule", "gateway", "agent", "acknowledged_by", "resolved_by", "raise_notice"
    ).prefetch_related(
        Prefetch("raise_notice__deliveries", queryset=deliveries),
        Prefetch("recovery_notice__deliveries", queryset=deliveries),
    )


@dataclass
class AlertList:
    unresolved: list[Alert]
    recent: list[Alert]


def alert_list() -> AlertList:
    return AlertList(
        unresolved=list(
            _with_deliveries(Alert.objects.filter(resolved_at=None)).order_by(
                "-raised_at", "-pk"
            )
        ),
        recent=list(
            _with_deliveries(Alert.objects.exclude(resolved_at=None)).order_by(
                "-resolved_at", "-pk"
            )[:RECENT]
        ),
    )


class NotAllowed(Exception):
    pass


def _audit(
    action: str, alert: Alert, request: HttpRequest, ok: bool, detail: str = ""
) -> None:
    audit.record(
        action,
        request=request,
        gateway=alert.gateway,
        params={"alert": alert.pk, "rule": alert.rule_id, "title": alert.title},
        result=AuditEvent.Result.OK if ok else AuditEvent.Result.ERROR,
        detail=detail,
    )


def acknowledge(alert: Alert, request: HttpRequest) -> bool:
    """Open → acknowledged. False (and audited as such) when it already was not open."""
    user = request.user
    if not can_acknowledge(user):
        _audit("alert.acknowledge", alert, request, False, "not allowed")
        raise NotAllowed("Acknowledging alerts needs the operator role.")
    done = (
        Alert.objects.filter(pk=alert.pk, status=Alert.Status.OPEN).update(
            status=Alert.Status.ACKNOWLEDGED,
            acknowledged_at=timezone.now(),
            acknowledged_by=user,
        )
        == 1
    )
    _audit(
        "alert.acknowledge",
        alert,
        request,
        done,
        "" if done else f"the alert was already {alert.get_status_display().lower()}",
    )
    if done:
        notify.alerts_changed()
    return done


def resolve(alert: Alert, request: HttpRequest) -> bool:
    """Open or acknowledged → resolved by a person (no recovery notice is sent for it)."""
    user = request.user
    if not can_resolve(user):
        _audit("alert.resolve", alert, request, False, "not allowed")
        raise NotAllowed("Resolving alerts needs the admin role.")
    done = (
        Alert.objects.filter(pk=alert.pk, resolved_at=None).update(
            status=Alert.Status.RESOLVED,
            resolved_at=timezone.now(),
            resolved_by=user,
        )
        == 1
    )
    _audit(
        "alert.resolve",
        alert,
        request,
        done,
        "" if done else "the alert was already resolved",
    )
    if done:
        notify.alerts_changed()
    return done
