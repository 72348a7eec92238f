"""Notices (what a message says) and their outbox rows; the live note to the pages."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from alerts.models import Alert, AlertRule, Delivery, Notice
from fleet.groups import push

NAV_GROUP = "nav"  # fleet/nav.py: the navigation badges of every page
BADGE = "alerts"
SUBJECT_PREFIX = "[Control Center]"


def alerts_changed() -> None:
    """Tell every page's navigation and the alerts page to re-read (after the commit)."""
    push(NAV_GROUP, "nav.badge", badge=BADGE)


def _line(alert: Alert) -> str:
    state = " (recovered)" if alert.resolved_at and alert.resolved_by_id is None else ""
    return f"- {alert.title}{state}, since {alert.since:%Y-%m-%d %H:%M:%S} UTC"


def _texts(
    rule: AlertRule, alerts: Sequence[Alert], recovery: bool
) -> tuple[str, str, str]:
    """(kind, subject, text) of a notice."""
    if len(alerts) == 1:
        alert = alerts[0]
        if recovery:
            return (
                Notice.Kind.RECOVERED,
                f"{SUBJECT_PREFIX} RECOVERED: {alert.title}",
                f"Recovered: {alert.title}\n(rule: {rule.name}; began "
                f"{alert.since:%Y-%m-%d %H:%M:%S} UTC)",
            )
        return (
            Notice.Kind.RAISED,
            f"{SUBJECT_PREFIX} ALERT: {alert.title}",
            f"{alert.title}\n{alert.detail}\n(rule: {rule.name}; since "
            f"{alert.since:%Y-%m-%d %H:%M:%S} UTC)".replace("\n\n", "\n"),
        )
    what = "recovered" if recovery else "alerts"
    lines = "\n".join(_line(a) for a in alerts[:50])
    more = f"\n… and {len(alerts) - 50} more" if len(alerts) > 50 else ""
    return (
        Notice.Kind.DIGEST,
        f"{SUBJECT_PREFIX} {len(alerts)} {what}: {rule.name}",
        f"{len(alerts)} {what} for rule {rule.name}:\n{lines}{more}",
    )


def _alert_payload(alert: Alert) -> dict[str, Any]:
    return {
        "id": alert.pk,
        "key": alert.key,
        "kind": alert.kind,
        "title": alert.title,
        "detail": alert.detail,
        "status": alert.status,
        "since": alert.since.isoformat(),
        "raised_at": alert.raised_at.isoformat(),
        "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None,
        "gateway_id": alert.gateway_id,
        "agent_id": alert.agent_id,
    }


def make_notice(
    rule: AlertRule, alerts: Sequence[Alert], recovery: bool, now: datetime
) -> Notice:
    """A notice of these alerts, with one outbox row per destination of the rule. Call it
    inside the transaction that marks the alerts."""
    kind, subject, text = _texts(rule, alerts, recovery)
    notice = Notice.objects.create(
        rule=rule,
        kind=kind,
        subject=subject[:300],
        text=text,
        payload={
            "kind": "recovered" if recovery else "raised",
            "rule": {"id": rule.pk, "name": rule.name, "kind": rule.kind},
            "alerts": [_alert_payload(a) for a in alerts[:200]],
            "count": len(alerts),
        },
        created_at=now,
    )
    rows = [
        Delivery(
            notice=notice,
            channel=Delivery.Channel.EMAIL,
            address=address,
            next_attempt_at=now,
            created_at=now,
        )
        for address in dict.fromkeys(rule.recipients)
    ]
    if rule.webhook_url:
        rows.append(
            Delivery(
                notice=notice,
                channel=Delivery.Channel.WEBHOOK,
                next_attempt_at=now,
                created_at=now,
            )
        )
    Delivery.objects.bulk_create(rows)
    return notice
