"""The evaluator: one sync step, `evaluate_once(now)`, that the worker runs every
ALERTS_EVALUATE_INTERVAL seconds (registered in alerts/apps.py through fleet/capabilities.py). For each enabled rule it asks the rule
kind's condition source what holds now, raises an alert for each new condition, clears the
alerts whose condition is gone, and writes the notices and their outbox rows in the same
transaction (so a crash loses nothing and sends nothing twice: delivery.py sends them).

No storms:
- one alert per condition until it clears (a partial unique constraint, also between two
  workers), and a recovery notice when it does;
- a cooldown per rule: at most one raise notice per `cooldown_seconds`; alerts that fire
  meanwhile wait and go out together when it ends;
- a digest: several alerts (or recoveries) of a rule due at once make one notice.
Recoveries are not held back by the cooldown: there is at most one per notified alert."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from alerts import notify
from alerts.models import Alert, AlertRule, Notice
from alerts.sources import Condition, ConditionSource, source_for

log = logging.getLogger(__name__)

# How long one worker's claim on a rule's evaluation lasts (a worker that dies mid-way
# leaves it; the next evaluation after this takes over).
RULE_CLAIM = timedelta(seconds=30)


def evaluate_once(now: datetime | None = None) -> int:
    """Evaluate every enabled rule; returns how many alerts were raised or cleared."""
    now = now or timezone.now()
    changes = 0
    for rule in AlertRule.objects.filter(enabled=True).order_by("pk"):
        source = source_for(rule.kind)
        if source is None:
            continue  # a kind whose app is not installed yet (cron, budget, approvals)
        if not _claim(rule, now):
            continue
        try:
            changes += _evaluate_rule(rule, source, now)
        except Exception:
            # One rule's failure (a source's bug) must not stop the others.
            log.exception("alerts: evaluating rule %s failed", rule.pk)
        finally:
            AlertRule.objects.filter(pk=rule.pk).update(evaluating_until=None)
    if changes:
        notify.alerts_changed()
    return changes


def _claim(rule: AlertRule, now: datetime) -> bool:
    free = Q(evaluating_until=None) | Q(evaluating_until__lt=now)
    return (
        AlertRule.objects.filter(free, pk=rule.pk).update(
            evaluating_until=now + RULE_CLAIM
        )
        == 1
    )


def _evaluate_rule(rule: AlertRule, source: ConditionSource, now: datetime) -> int:
    conditions = {c.key: c for c in source.conditions(rule, now)}
    changes = 0
    if source.lasting:
        open_alerts = {
            a.key: a for a in rule.alerts.filter(resolved_at=None, lasting=True)
        }
        for key, alert in open_alerts.items():
            if key not in conditions:
                Alert.objects.filter(pk=alert.pk, resolved_at=None).update(
                    status=Alert.Status.RESOLVED, resolved_at=now
                )
                changes += 1
        new = [c for k, c in conditions.items() if k not in open_alerts]
        new = [c for c in new if not _resolved_by_a_person(rule, c)]
    else:
        seen = set(
            rule.alerts.filter(key__in=list(conditions)).values_list("key", flat=True)
        )
        new = [c for k, c in conditions.items() if k not in seen]
    for condition in new:
        changes += _raise(rule, condition, source.lasting, now)
    _send_notices(rule, now)
    return changes


def _resolved_by_a_person(rule: AlertRule, condition: Condition) -> bool:
    """A person resolved this condition's alert while it still held: do not raise it again
    until it clears (its `since` then moves past the resolution)."""
    return rule.alerts.filter(
        key=condition.key,
        resolved_by__isnull=False,
        resolved_at__gte=condition.since,
    ).exists()


def _raise(rule: AlertRule, condition: Condition, lasting: bool, now: datetime) -> int:
    try:
        with transaction.atomic():
            Alert.objects.create(
                rule=rule,
                key=condition.key,
                kind=rule.kind,
                title=condition.title[:300],
                detail=condition.detail,
                gateway_id=condition.gateway_id,
                agent_id=condition.agent_id,
                lasting=lasting,
                since=condition.since,
                raised_at=now,
            )
    except IntegrityError:
        return 0  # another worker raised it first
    log.info("alert raised: rule %s, %s", rule.pk, condition.key)
    return 1


def _send_notices(rule: AlertRule, now: datetime) -> None:
    """Write the notices that are due, each with its deliveries, atomically with marking
    the alerts it covers (the outbox pattern)."""
    with transaction.atomic():
        recovered = list(
            rule.alerts.filter(
                lasting=True,
                resolved_at__isnull=False,
                resolved_by=None,
                raise_notice__isnull=False,
                recovery_notice=None,
            ).order_by("resolved_at", "pk")
        )
        if recovered:
            notice = notify.make_notice(rule, recovered, recovery=True, now=now)
            Alert.objects.filter(pk__in=[a.pk for a in recovered]).update(
                recovery_notice=notice
            )
        cooling = rule.last_notice_at is not None and now < rule.last_notice_at + (
            timedelta(seconds=rule.cooldown_seconds)
        )
        if cooling:
            return
        pending = list(
            rule.alerts.filter(raise_notice=None, resolved_by=None).order_by(
                "raised_at", "pk"
            )
        )
        if not pending:
            return
        notice = notify.make_notice(rule, pending, recovery=False, now=now)
        _mark_raised(pending, notice)
        rule.last_notice_at = now
        AlertRule.objects.filter(pk=rule.pk).update(last_notice_at=now)


def _mark_raised(alerts: Sequence[Alert], notice: Notice) -> None:
    ids = [a.pk for a in alerts]
    Alert.objects.filter(pk__in=ids).update(raise_notice=notice)
    # Cleared before anyone was told: the notice says so, no separate recovery follows.
    Alert.objects.filter(pk__in=ids, resolved_at__isnull=False).update(
        recovery_notice=notice
    )
