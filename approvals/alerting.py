"""The alerts app's source for approval rules: a request still waiting for a decision after
the rule's `for_seconds` (one lasting condition per request, recovered when someone decides
or it expires), scoped by gateway and agent."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from django.db.models import Q

from alerts.sources import EVENT_BATCH, Condition
from approvals.models import Approval

if TYPE_CHECKING:
    from alerts.models import AlertRule


class ApprovalWaiting:
    lasting = True

    def conditions(self, rule: AlertRule, now: datetime) -> Iterable[Condition]:
        waiting = Approval.objects.filter(
            Q(expires_at__isnull=True) | Q(expires_at__gt=now),
            state=Approval.State.PENDING,
            requested_at__lte=now - timedelta(seconds=rule.for_seconds),
        )
        if rule.gateway_id is not None:
            waiting = waiting.filter(gateway_id=rule.gateway_id)
        if rule.agent_id is not None and rule.agent is not None:
            waiting = waiting.filter(
                gateway_id=rule.agent.gateway_id, agent_id=rule.agent.agent_id
            )
        for approval in waiting.select_related("gateway").order_by("requested_at")[
            :EVENT_BATCH
        ]:
            where = f" in {approval.cwd}" if approval.cwd else ""
            yield Condition(
                key=f"approval:{approval.pk}",
                title=f"An exec approval waits on {approval.gateway.name}",
                detail=(
                    f"Agent {approval.agent_id or 'unknown'} asks to run "
                    f"{approval.command[:500]}{where}; nobody has decided yet."
                )[:2000],
                since=approval.requested_at,
                gateway_id=approval.gateway_id,
                agent_id=rule.agent_id,
            )
