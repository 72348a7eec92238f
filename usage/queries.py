"""What the usage page shows, read from the daily rollup (and the ledger for the top
sessions): one `Report` built from the URL's filters, used by the page, its CSV and the
tests alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from django.db.models import Count, QuerySet, Sum
from django.http import QueryDict
from django.utils import timezone

from fleet.models import Gateway
from usage.models import UsageDay, UsageEntry

PERIODS = {
    "today": "Today",
    "7d": "7 days",
    "30d": "30 days",
    "month": "This month",
    "custom": "Custom",
}
STACKS = {"agent": "agent", "model": "model", "gateway": "gateway"}
STACK_FIELD = {"agent": "agent_key", "model": "model", "gateway": "gateway__name"}
MAX_SERIES = 6  # the rest is "other"
MAX_DAYS = 366
TOP_SESSIONS = 20
# The chart's drawing box (SVG user units); the template scales it to the width.
CHART_W, CHART_H, CHART_PAD = 720, 220, 30


class BadFilter(ValueError):
    pass


@dataclass
class Filters:
    period: str = "30d"
    start: date = field(default_factory=timezone.localdate)
    end: date = field(default_factory=timezone.localdate)
    gateway: int | None = None
    agent: str = ""
    model: str = ""
    stack: str = "agent"

    def query(self, **override: Any) -> str:
        q = QueryDict(mutable=True)
        values = {
            "period": self.period,
            "stack": self.stack,
            "gateway": self.gateway or "",
            "agent": self.agent,
            "model": self.model,
        }
        if self.period == "custom":
            values["start"], values["end"] = (
                self.start.isoformat(),
                self.end.isoformat(),
            )
        values.update(override)
        for k, v in values.items():
            if v not in ("", None):
                q[k] = str(v)
        return q.urlencode()


def _date(value: str, name: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise BadFilter(f"The {name} date must look like 2026-12-31.") from None


def parse(params: QueryDict) -> Filters:
    today = timezone.localdate()
    f = Filters()
    period = params.get("period", "30d")
    if period not in PERIODS:
        raise BadFilter("Unknown period: choose today, 7d, 30d, month or custom.")
    f.period = period
    if period == "today":
        f.start = today
    elif period == "7d":
        f.start = today - timedelta(days=6)
    elif period == "30d":
        f.start = today - timedelta(days=29)
    elif period == "month":
        f.start = today.replace(day=1)
    else:
        f.start = _date(params.get("start", ""), "start")
        f.end = _date(params.get("end", "") or today.isoformat(), "end")
        if f.end < f.start:
            raise BadFilter("The end date is before the start date.")
        if (f.end - f.start).days >= MAX_DAYS:
            raise BadFilter(f"A custom range is at most {MAX_DAYS} days.")
    gateway = params.get("gateway", "")
    if gateway:
        if not gateway.isdigit():
            raise BadFilter("Unknown gateway.")
        f.gateway = int(gateway)
    f.agent = params.get("agent", "")[:200]
    f.model = params.get("model", "")[:200]
    stack = params.get("stack", "agent")
    if stack not in STACKS:
        raise BadFilter("Stack the chart by agent, model or gateway.")
    f.stack = stack
    return f


@dataclass
class Row:
    label: str
    runs: int
    input_tokens: int
    output_tokens: int
    cost: Decimal
    url: str = ""


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    series: int
    label: str
    cost: Decimal


@dataclass
class Report:
    filters: Filters
    total: Row
    days: list[date]
    series: list[str]
    # per day: the cost of each series (same order as `series`)
    day_costs: list[list[Decimal]]
    bars: list[Bar]
    max_cost: Decimal
    by: dict[str, list[Row]]
    top_sessions: list[Row]

    @property
    def day_rows(self) -> list[tuple[date, list[Decimal]]]:
        return list(zip(self.days, self.day_costs, strict=True))


def _days(f: Filters) -> QuerySet[UsageDay]:
    qs = UsageDay.objects.filter(day__gte=f.start, day__lte=f.end)
    if f.gateway is not None:
        qs = qs.filter(gateway_id=f.gateway)
    if f.agent:
        qs = qs.filter(agent_key=f.agent)
    if f.model:
        qs = qs.filter(model=f.model)
    return qs


SUMS = {
    "n_runs": Sum("runs"),
    "n_in": Sum("input_tokens"),
    "n_out": Sum("output_tokens"),
    "n_cost": Sum("cost_usd"),
}


def _row(label: str, values: dict[str, Any], url: str = "") -> Row:
    return Row(
        label=label,
        runs=values.get("n_runs") or 0,
        input_tokens=values.get("n_in") or 0,
        output_tokens=values.get("n_out") or 0,
        cost=(values.get("n_cost") or Decimal(0)).quantize(Decimal("0.0001")),
        url=url,
    )


def _grouped(qs: QuerySet[UsageDay], field_name: str, empty: str) -> list[Row]:
    rows = qs.values(field_name).annotate(**SUMS).order_by("-n_cost", field_name)
    return [_row(str(r[field_name] or empty), r) for r in rows]


def build(f: Filters) -> Report:
    from django.urls import reverse

    qs = _days(f)
    total = _row("Total", qs.aggregate(**SUMS))
    by = {
        "agent": _grouped(qs, "agent_key", "(no agent)"),
        "model": _grouped(qs, "model", "(unknown model)"),
        "gateway": _grouped(qs, "gateway__name", "?"),
        "channel": _grouped(qs, "channel", "(no channel)"),
        "person": _grouped(qs, "person__username", "(not from our chat)"),
    }
    stack_field = STACK_FIELD[f.stack]
    ranked = [r.label for r in by[f.stack]]
    empty = {"agent": "(no agent)", "model": "(unknown model)", "gateway": "?"}[f.stack]
    series = ranked[:MAX_SERIES]
    if len(ranked) > MAX_SERIES:
        series.append("other")
    days = [f.start + timedelta(days=i) for i in range((f.end - f.start).days + 1)]
    index = {d: i for i, d in enumerate(days)}
    costs = [[Decimal(0)] * len(series) for _ in days]
    for r in qs.values("day", stack_field).annotate(n_cost=Sum("cost_usd")):
        name = str(r[stack_field] or empty)
        s = series.index(name) if name in series[:MAX_SERIES] else len(series) - 1
        if r["day"] in index and s >= 0:
            costs[index[r["day"]]][s] += r["n_cost"] or 0
    max_cost = max((sum(c, Decimal(0)) for c in costs), default=Decimal(0))
    bars: list[Bar] = []
    if max_cost > 0:
        plot_h = CHART_H - CHART_PAD
        slot = CHART_W / len(days)
        width = max(slot * 0.8, 1.0)
        for i, day_costs in enumerate(costs):
            y = float(plot_h)
            for s, cost in enumerate(day_costs):
                if cost <= 0:
                    continue
                h = float(cost / max_cost) * (plot_h - 10)
                y -= h
                bars.append(
                    Bar(
                        x=round(i * slot + (slot - width) / 2, 2),
                        y=round(y, 2),
                        width=round(width, 2),
                        height=round(h, 2),
                        series=s,
                        label=f"{days[i].isoformat()} {series[s]}: {cost:.4f} USD",
                        cost=cost,
                    )
                )
    # A range on the column itself (the index), not a date cast of it.
    tz = timezone.get_current_timezone()
    since = datetime.combine(f.start, time.min, tzinfo=tz)
    until = datetime.combine(f.end + timedelta(days=1), time.min, tzinfo=tz)
    entries = UsageEntry.objects.filter(occurred_at__gte=since, occurred_at__lt=until)
    if f.gateway is not None:
        entries = entries.filter(gateway_id=f.gateway)
    if f.agent:
        entries = entries.filter(agent_key=f.agent)
    if f.model:
        entries = entries.filter(model=f.model)
    top = (
        entries.values("gateway_id", "session_key", "session_id")
        .annotate(
            n_runs=Count("pk"),
            n_in=Sum("input_tokens"),
            n_out=Sum("output_tokens"),
            n_cost=Sum("cost_usd"),
        )
        .order_by("-n_cost", "session_key")[:TOP_SESSIONS]
    )
    names = dict(Gateway.objects.values_list("pk", "name"))
    top_sessions = [
        _row(
            f"{names.get(r['gateway_id'], '?')} · {r['session_key']}",
            dict(r),
            reverse("session-detail", args=[r["session_id"]])
            if r["session_id"]
            else "",
        )
        for r in top
    ]
    return Report(f, total, days, series, costs, bars, max_cost, by, top_sessions)


def gateways() -> list[Gateway]:
    return list(Gateway.objects.order_by("name"))


def choices(f: Filters) -> dict[str, list[str]]:
    """The agents and models seen in the period (for the filter lists)."""
    qs = UsageDay.objects.filter(day__gte=f.start, day__lte=f.end)
    return {
        "agents": sorted(
            {a for a in qs.values_list("agent_key", flat=True).distinct() if a}
        ),
        "models": sorted(
            {m for m in qs.values_list("model", flat=True).distinct() if m}
        ),
    }


def session_usage(gateway_id: int, key: str) -> dict[str, Any]:
    """A session's runs (newest first) and its cumulative cost over time as a small
    polyline (oldest first), from the ledger: it outlives resets."""
    runs = list(
        UsageEntry.objects.filter(gateway_id=gateway_id, session_key=key)
        .select_related("person")
        .order_by("occurred_at", "pk")[:2000]
    )
    total = Decimal(0)
    points: list[tuple[float, Decimal]] = []
    for r in runs:
        total += r.cost_usd
        points.append((r.occurred_at.timestamp(), total))
    line = ""
    if points:
        t0, t1 = points[0][0], points[-1][0]
        span = (t1 - t0) or 1.0
        top = total or Decimal(1)
        coords = [
            f"{(t - t0) / span * 300:.1f},{60 - float(c / top) * 55:.1f}"
            for t, c in points
        ]
        if len(coords) == 1:
            coords = ["0,60", coords[0].replace("0.0,", "300.0,", 1)]
        line = " ".join(coords)
    return {"runs": list(reversed(runs))[:200], "total": total, "line": line}
