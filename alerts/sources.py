"""Condition sources: what each rule kind watches, read from the database only (so alerts
does not depend on the worker's internals).

A source answers "which conditions of this kind hold now, for this rule?". It is either
*lasting* (a gateway down: the evaluator raises an alert when it appears and sends a
recovery when it is gone) or an *event* source (a failed run: one alert per event, never
cleared by itself; the source reports events since the rule was made).

Apps whose tables alerts does not know (cron runs, budgets, approvals) plug in from their
own `AppConfig.ready`:

    from alerts.sources import Condition, register
    register(AlertRule.Kind.CRON_FAILED, CronFailures())

A rule whose kind has no source yet stays quiet (its admin page says so)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from fleet.models import Gateway

if TYPE_CHECKING:
    from alerts.models import AlertRule

# Event sources look back at most this far (and never before the rule was made).
EVENT_LOOKBACK = timedelta(days=1)
# At most this many new events per rule and evaluation (the rest come on the next ones).
EVENT_BATCH = 200
RESCAN_MARGIN = timedelta(hours=1)


@dataclass(frozen=True)
class Condition:
    key: str  # stable per condition: "gateway:3:offline", "run:<message id>"
    title: str
    detail: str
    since: datetime
    gateway_id: int | None = None
    agent_id: int | None = None


class ConditionSource(Protocol):
    lasting: bool

    def conditions(self, rule: AlertRule, now: datetime) -> Iterable[Condition]: ...


_sources: dict[str, ConditionSource] = {}


def register(kind: str, source: ConditionSource) -> None:
    _sources[kind] = source


def source_for(kind: str) -> ConditionSource | None:
    return _sources.get(kind)


def event_window_start(rule: AlertRule, now: datetime) -> datetime:
    return max(rule.created_at, now - EVENT_LOOKBACK)


def _gateways(rule: AlertRule) -> list[Gateway]:
    gateways = Gateway.objects.filter(enabled=True)
    if rule.gateway_id is not None:
        gateways = gateways.filter(pk=rule.gateway_id)
    return list(gateways.order_by("pk"))


class GatewayOffline:
    """A gateway not `connected` for longer than the rule's `for_seconds`: through every
    state in between (Gateway.not_connected_since), or held by no live worker (its lease ran
    out: a worker that died leaves `connected` in the row)."""

    lasting = True

    def conditions(self, rule: AlertRule, now: datetime) -> Iterable[Condition]:
        cutoff = now - timedelta(seconds=rule.for_seconds)
        for gateway in _gateways(rule):
            since = gateway.not_connected_since
            expired = gateway.lease_expires_at
            held = expired is None or expired >= now
            if not held and expired is not None and (since is None or expired < since):
                since = expired
            if since is None or since > cutoff:
                continue
            reason = (
                gateway.last_error or gateway.get_state_display()
                if held
                else "no gateway worker holds it (its lease ran out)"
            )
            yield Condition(
                key=f"gateway:{gateway.pk}:offline",
                title=f"Gateway {gateway.name} is not connected",
                detail=f"State: {gateway.get_state_display()}. {reason}"[:2000],
                since=since,
                gateway_id=gateway.pk,
            )


class GatewayAttention:
    """A gateway in a state only a person can fix: auth_failed, pairing_required,
    tls_failed (each its own condition: one clearing and another starting is a recovery
    and a new alert)."""

    lasting = True
    STATES = (
        Gateway.State.AUTH_FAILED,
        Gateway.State.PAIRING_REQUIRED,
        Gateway.State.TLS_FAILED,
    )

    def conditions(self, rule: AlertRule, now: datetime) -> Iterable[Condition]:
        cutoff = now - timedelta(seconds=rule.for_seconds)
        for gateway in _gateways(rule):
            if gateway.state not in self.STATES or gateway.state_changed_at > cutoff:
                continue
            detail = gateway.last_error
            if (
                gateway.state == Gateway.State.PAIRING_REQUIRED
                and gateway.approve_command
            ):
                detail = f"{detail}\nOn the gateway host: {gateway.approve_command}"
            yield Condition(
                key=f"gateway:{gateway.pk}:{gateway.state}",
                title=f"Gateway {gateway.name}: {gateway.get_state_display()}",
                detail=detail.strip()[:2000],
                since=gateway.state_changed_at,
                gateway_id=gateway.pk,
            )


class RunFailed:
    """An agent run whose reply ended in `error` (chat.Message), scoped by gateway and
    agent. Runs cut off by a dropped connection are left out: the gateway rules cover
    those, and one outage would otherwise raise one alert per run in flight."""

    lasting = False

    def conditions(self, rule: AlertRule, now: datetime) -> Iterable[Condition]:
        from chat.models import Message
        from chat.store import INTERRUPTED

        start = event_window_start(rule, now)
        latest = rule.alerts.order_by("-since").values_list("since", flat=True).first()
        if latest is not None:
            # Read on from the newest alerted run, less a margin for a run that is stored
            # as failed after later runs were (they are keyed, so none alerts twice).
            start = max(start, latest - RESCAN_MARGIN)
        seen = set(rule.alerts.filter(since__gte=start).values_list("key", flat=True))
        runs = Message.objects.filter(
            role=Message.Role.ASSISTANT,
            state=Message.State.ERROR,
            created_at__gte=start,
        ).exclude(error=INTERRUPTED)
        if rule.gateway_id is not None:
            runs = runs.filter(session__gateway_id=rule.gateway_id)
        if rule.agent_id is not None:
            runs = runs.filter(session__agent_id=rule.agent_id)
        found = 0
        for message in (
            runs.select_related("session__gateway", "session__agent")
            .order_by("created_at", "pk")
            .iterator(chunk_size=500)
        ):
            if f"run:{message.pk}" in seen:
                continue
            found += 1
            if found > EVENT_BATCH:
                return  # the rest on the next evaluation
            session = message.session
            agent = session.agent.title if session.agent else session.agent_key or "?"
            yield Condition(
                key=f"run:{message.pk}",
                title=f"Run failed: agent {agent} on {session.gateway.name}",
                detail=f"Session {session.title}: {message.error or 'the run failed'}"[
                    :2000
                ],
                since=message.created_at,
                gateway_id=session.gateway_id,
                agent_id=session.agent_id,
            )


def register_builtin() -> None:
    from alerts.models import AlertRule

    register(AlertRule.Kind.GATEWAY_OFFLINE, GatewayOffline())
    register(AlertRule.Kind.GATEWAY_ATTENTION, GatewayAttention())
    register(AlertRule.Kind.RUN_FAILED, RunFailed())
