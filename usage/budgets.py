"""Budgets: their state now (spend in the current period, from the daily rollup), and the
alerts source that raises one alert per budget, threshold and period."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from django.db.models import Sum
from django.utils import timezone

from alerts.sources import Condition
from usage.models import Budget, UsageDay

if TYPE_CHECKING:
    from alerts.models import AlertRule


@dataclass(frozen=True)
class BudgetState:
    budget: Budget
    period_start: date
    spent: Decimal
    share: float  # spent / amount, 0..
    crossed: list[int]  # thresholds reached, percent

    @property
    def percent(self) -> int:
        return round(self.share * 100)

    @property
    def level(self) -> str:
        """ok, warn (a threshold below 100 % reached) or over (100 % or more)."""
        if self.share >= 1:
            return "over"
        return "warn" if self.crossed else "ok"

    @property
    def meter_value(self) -> str:
        return f"{min(self.share, 1.0):.3f}"


def period_start(budget: Budget, today: date) -> date:
    return today.replace(day=1) if budget.period == Budget.Period.MONTH else today


def state_of(budget: Budget, now: datetime | None = None) -> BudgetState:
    today = timezone.localdate(now or timezone.now())
    start = period_start(budget, today)
    days = UsageDay.objects.filter(day__gte=start, day__lte=today)
    if budget.gateway_id is not None:
        days = days.filter(gateway_id=budget.gateway_id)
    if budget.agent_key:
        days = days.filter(agent_key=budget.agent_key)
    spent = days.aggregate(total=Sum("cost_usd"))["total"] or Decimal(0)
    amount = budget.amount_usd or Decimal(0)
    share = float(spent / amount) if amount > 0 else 0.0
    crossed = [t for t in budget.threshold_list() if share * 100 >= t]
    return BudgetState(budget, start, spent, share, crossed)


def states(now: datetime | None = None) -> list[BudgetState]:
    return [
        state_of(b, now)
        for b in Budget.objects.filter(enabled=True).select_related("gateway")
    ]


def attention_count(user: object) -> int | None:
    """The nav badge: budgets past a threshold this period (None: the user may not look)."""
    from fleet.roles import can_view

    if not can_view(user):
        return None
    return sum(1 for s in states() if s.crossed)


def ensure_budget_rule() -> None:
    """Budgets raise their alerts through one rule of kind `budget` (alerts app); an admin
    who makes the first budget gets it (in the app only, until destinations are added)."""
    from alerts.models import AlertRule

    if not AlertRule.objects.filter(kind=AlertRule.Kind.BUDGET).exists():
        AlertRule.objects.create(
            name="Budget thresholds",
            kind=AlertRule.Kind.BUDGET,
            for_seconds=0,
            cooldown_seconds=0,
        )


class BudgetCrossed:
    """A budget's threshold reached in the current period: an event per (budget, period,
    threshold), so it is raised once and never again that period. A rule scoped to a
    gateway watches that gateway's budgets; its `threshold` (percent), when set, is the
    least threshold it alerts on."""

    lasting = False

    def conditions(self, rule: AlertRule, now: datetime) -> Iterable[Condition]:
        for state in states(now):
            budget = state.budget
            if rule.gateway_id is not None and budget.gateway_id != rule.gateway_id:
                continue
            for pct in state.crossed:
                if rule.threshold is not None and pct < rule.threshold:
                    continue
                yield Condition(
                    key=f"budget:{budget.pk}:{state.period_start.isoformat()}:{pct}",
                    title=f"Budget {budget.name}: {pct} % reached",
                    detail=(
                        f"{state.spent:.2f} of {budget.amount_usd:.2f} USD spent "
                        f"({budget.get_period_display().lower()}, since "
                        f"{state.period_start.isoformat()})."
                    ),
                    since=now,
                    gateway_id=budget.gateway_id,
                )
