"""Read-side queries of the fleet pages, shared by the views and the live consumer.

Everything here is sync ORM work returning plain, fully loaded objects (no lazy foreign keys
left to trip an async caller), so a consumer can wrap one function once with
`database_sync_to_async` and render the result."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple
from urllib.parse import urlencode

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db.models import Count, F, Q, QuerySet, Sum
from django.db.models.fields.json import KeyTransform
from django.http import QueryDict
from django.shortcuts import get_object_or_404

from fleet import roles
from fleet.forms import SessionFilterForm
from fleet.models import Agent, Gateway, PresenceEntry, Session
from fleet.services import summary

PAGE_SIZE = 50
# Filter names kept in links and in the live socket's URL (page is handled apart).
FILTER_NAMES = ("q", "gateway", "agent", "status", "kind", "channel", "gone")


def parse_filters(params: QueryDict | dict[str, Any]) -> dict[str, Any]:
    """Validated filters (and `page`) from a query string; bad values are ignored."""
    if isinstance(params, dict):
        qd = QueryDict(mutable=True)
        for k, v in params.items():
            qd[k] = str(v)
        params = qd
    return SessionFilterForm(params).filters()


def filters_query(filters: dict[str, Any], **extra: Any) -> str:
    """The query string for these filters (without page unless given in extra)."""
    values = {k: filters[k] for k in FILTER_NAMES if filters.get(k)}
    if values.get("gone"):
        values["gone"] = "1"
    values.update(
        {k: v for k, v in extra.items() if v and not (k == "page" and int(v) <= 1)}
    )
    return urlencode(values)


def session_for_user(user: Any, pk: int, *, chat: bool = False) -> Session:
    """The one lookup of a session page (the fleet's and the chat's): 404 for a session
    that does not exist, 403 for a user without the role (viewer; operator to chat)."""
    if chat and not roles.can_chat(user):
        raise PermissionDenied("operator role needed")
    if not chat and not roles.can_view(user):
        raise PermissionDenied("Your account has no role yet: ask an admin for one.")
    return get_object_or_404(Session.objects.select_related("gateway", "agent"), pk=pk)


def sessions_queryset(filters: dict[str, Any]) -> QuerySet[Session]:
    qs = Session.objects.all()
    if not filters.get("gone"):
        # Served by the partial index session_live_recent (gone_at IS NULL).
        qs = qs.filter(gone_at=None)
    if filters.get("gateway"):
        qs = qs.filter(gateway_id=filters["gateway"])
    if filters.get("agent"):
        qs = qs.filter(agent_id=filters["agent"])
    for name in ("status", "kind", "channel"):
        if filters.get(name):
            qs = qs.filter(**{name: filters[name]})
    if filters.get("q"):
        q = filters["q"]
        qs = qs.filter(
            Q(key__icontains=q) | Q(label__icontains=q) | Q(display_name__icontains=q)
        )
    return qs


def _ordered(qs: QuerySet[Session]) -> QuerySet[Session]:
    # Last activity first; rows the gateway never dated go last; id breaks ties so pages
    # are stable.
    return qs.order_by(F("updated_at").desc(nulls_last=True), "-id")


@dataclass
class SessionPage:
    filters: dict[str, Any]
    rows: list[Session]
    number: int
    total: int
    page_size: int = PAGE_SIZE

    @property
    def num_pages(self) -> int:
        return max(1, -(-self.total // self.page_size))

    @property
    def has_next(self) -> bool:
        return self.number < self.num_pages

    @property
    def has_previous(self) -> bool:
        return self.number > 1

    @property
    def query(self) -> str:
        """Filters and page as a query string, for the live socket and links."""
        return filters_query(
            self.filters, page=self.number if self.number > 1 else None
        )

    @property
    def next_query(self) -> str:
        return filters_query(self.filters, page=self.number + 1)

    @property
    def previous_query(self) -> str:
        return filters_query(
            self.filters, page=self.number - 1 if self.number > 2 else None
        )

    @property
    def ids(self) -> list[int]:
        return [s.pk for s in self.rows]


def session_page(filters: dict[str, Any], page_size: int = PAGE_SIZE) -> SessionPage:
    """One page of the session list (offset paging over an indexed order: the count and
    a LIMIT/OFFSET stay a few milliseconds at 10,000 rows)."""
    qs = sessions_queryset(filters)
    total = _count(qs, filters)
    num_pages = max(1, -(-total // page_size))
    number = min(int(filters.get("page") or 1), num_pages)
    start = (number - 1) * page_size
    rows = list(_listed(_ordered(qs))[start : start + page_size])
    return SessionPage(
        filters=filters, rows=rows, number=number, total=total, page_size=page_size
    )


def _count(qs: QuerySet[Session], filters: dict[str, Any]) -> int:
    """The list's total. Unfiltered (or by gateway alone) it is the sum of the live counts
    the gateway rows keep exact (fleet/services/summary.py): a COUNT over 50,000 sessions
    is a scan of 10-15 ms on PostgreSQL, the sum reads 50 rows."""
    if any(filters.get(name) for name in FILTER_NAMES if name != "gateway"):
        return qs.count()
    gateways = Gateway.objects.all()
    if filters.get("gateway"):
        gateways = gateways.filter(pk=filters["gateway"])
    return int(gateways.aggregate(n=Sum("live_sessions"))["n"] or 0)


def visible_ids(filters: dict[str, Any], page_size: int = PAGE_SIZE) -> list[int]:
    """The ids on the page these filters show, in order: cheaper than the page itself, so
    the consumer can tell "rows changed in place" from "the page changed"."""
    qs = sessions_queryset(filters)
    number = int(filters.get("page") or 1)
    start = (number - 1) * page_size
    ids = list(_ordered(qs).values_list("id", flat=True)[start : start + page_size])
    if not ids and number > 1:
        return visible_ids({**filters, "page": None}, page_size)
    return ids


def sessions_by_ids(ids: list[int]) -> list[Session]:
    return list(_listed(Session.objects.filter(pk__in=ids)))


def _listed(qs: QuerySet[Session]) -> QuerySet[Session]:
    """What a row of the list reads, in the one query: not the raw rows (large JSON), but
    the one value of them a row shows (`Session.estimated_cost`), which would otherwise
    load each row's raw JSON in a query of its own (50 more per page)."""
    return (
        qs.select_related("gateway", "agent")
        .defer("raw", "gateway__health", "agent__raw", "agent__identity")
        .annotate(raw_cost=KeyTransform("estimatedCostUsd", "raw"))
    )


class Option(NamedTuple):
    """One `<option>` of a filter select, its selection decided here rather than by a
    comparison per option in the template (150 agents at 50 gateways)."""

    value: int
    label: str
    selected: bool


@dataclass
class FilterChoices:
    gateways: list[Option] = field(default_factory=list)
    agents: list[Option] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    channels: list[str] = field(default_factory=list)


def filter_choices(
    gateways: list[Gateway] | None = None, filters: dict[str, Any] | None = None
) -> FilterChoices:
    """The filter's choices, the ones `filters` hold selected. Status, kind and channel
    come from the values each gateway row keeps (fleet/services/summary.py), not from
    DISTINCTs over every session; pass the gateways already loaded (the table's) to save
    that query too."""
    if gateways is None:
        gateways = list(Gateway.objects.defer("health").order_by("name"))
    else:
        gateways = sorted(gateways, key=lambda g: g.name)
    filters = filters or {}
    names = {g.pk: g.name for g in gateways}
    agents = sorted(
        Agent.objects.filter(gone_at=None)
        .only("pk", "agent_id", "name", "gateway_id")
        .order_by(),
        key=lambda a: (names.get(a.gateway_id, ""), a.agent_id),
    )
    many = len(gateways) > 1
    facets = summary.union_facets(gateways)
    return FilterChoices(
        gateways=[
            Option(g.pk, g.name, filters.get("gateway") == g.pk) for g in gateways
        ],
        agents=[
            Option(
                a.pk,
                f"{a.title} ({names.get(a.gateway_id, '')})" if many else a.title,
                filters.get("agent") == a.pk,
            )
            for a in agents
        ],
        statuses=facets["status"],
        kinds=facets["kind"],
        channels=facets["channel"],
    )


@dataclass
class GatewayCard:
    gateway: Gateway
    agents: list[Agent]
    clients: list[PresenceEntry]
    nodes: list[PresenceEntry]
    session_count: int
    running_count: int


def gateway_cards(gateway_id: int | None = None) -> list[GatewayCard]:
    """Each gateway (or one) with its agents (and their session counts) and presence."""
    qs = Gateway.objects.select_related("device").order_by("name")
    if gateway_id is not None:
        qs = qs.filter(pk=gateway_id)
    gateways = list(qs)
    ids = [g.pk for g in gateways]
    per_agent: dict[int | None, dict[str, int]] = {
        row["agent_id"]: {"n": row["n"], "running": row["running"]}
        for row in Session.objects.filter(gateway_id__in=ids, gone_at=None)
        .values("agent_id")
        .annotate(n=Count("id"), running=Count("id", filter=Q(has_active_run=True)))
        .order_by()
    }
    agents: dict[int, list[Agent]] = {pk: [] for pk in ids}
    for agent in (
        Agent.objects.filter(gateway_id__in=ids, gone_at=None)
        .defer("raw", "identity")
        .order_by("agent_id")
    ):
        counts_for = per_agent.get(agent.pk, {})
        agent.live_sessions = counts_for.get("n", 0)  # type: ignore[attr-defined]
        agent.running_sessions = counts_for.get("running", 0)  # type: ignore[attr-defined]
        agents[agent.gateway_id].append(agent)
    presence: dict[int, list[PresenceEntry]] = {pk: [] for pk in ids}
    for entry in PresenceEntry.objects.filter(gateway_id__in=ids).order_by(
        "host", "instance_key"
    ):
        presence[entry.gateway_id].append(entry)
    return [
        GatewayCard(
            gateway=g,
            agents=agents[g.pk],
            clients=[p for p in presence[g.pk] if not p.is_node],
            nodes=[p for p in presence[g.pk] if p.is_node],
            session_count=g.live_sessions,
            running_count=g.running_sessions,
        )
        for g in gateways
    ]


# -- many gateways: a compact table, problems first ----------------------------------------------

# How bad each state is for the table's order (lower first); connected is the good state.
PROBLEM_RANK: dict[str, int] = {
    Gateway.State.AUTH_FAILED: 0,
    Gateway.State.TLS_FAILED: 0,
    Gateway.State.PAIRING_REQUIRED: 1,
    Gateway.State.OFFLINE: 1,
    Gateway.State.REST_FALLBACK: 2,
    Gateway.State.CONNECTING: 3,
    Gateway.State.CONNECTED: 5,
}


# The state's label without Django's get_FOO_display (which flattens the choices per call).
STATE_LABELS: dict[str, str] = {
    str(value): str(label) for value, label in Gateway.State.choices
}


def cards_up_to() -> int:
    """Up to this many gateways the fleet page shows full cards, above it the table."""
    return int(settings.FLEET_CARDS_UP_TO)


@dataclass
class GatewayRow:
    gateway: Gateway
    session_count: int
    running_count: int

    @cached_property
    def alive(self) -> bool:
        return self.gateway.worker_alive()

    @property
    def state_label(self) -> str:
        return STATE_LABELS.get(self.gateway.state, self.gateway.state)

    @cached_property
    def rank(self) -> tuple[int, str]:
        g = self.gateway
        if not g.enabled:
            return (9, g.name)
        bad = PROBLEM_RANK.get(g.state, 1)
        if bad == PROBLEM_RANK[Gateway.State.CONNECTED] and (
            g.last_error or not self.alive
        ):
            bad = 4  # connected, but something to read
        return (bad, g.name)

    @property
    def problem(self) -> bool:
        return self.rank[0] < 5


def gateway_rows(gateways: list[Gateway] | None = None) -> list[GatewayRow]:
    """Every gateway in one query (no agents, no presence: those are on its own page; the
    counts are kept on the row), sorted with problems first, then by name."""
    if gateways is None:
        gateways = list(Gateway.objects.defer("health").order_by("name"))
    rows = [
        GatewayRow(
            gateway=g, session_count=g.live_sessions, running_count=g.running_sessions
        )
        for g in gateways
    ]
    rows.sort(key=lambda r: r.rank)
    return rows


@dataclass
class FleetGateways:
    """What the fleet page's gateway region shows: cards for a few, a table for many."""

    cards: list[GatewayCard] | None = None
    rows: list[GatewayRow] | None = None

    @property
    def order(self) -> tuple[int, ...]:
        if self.rows is not None:
            return tuple(r.gateway.pk for r in self.rows)
        return tuple(c.gateway.pk for c in self.cards or [])

    @property
    def gateways(self) -> list[Gateway]:
        if self.rows is not None:
            return [r.gateway for r in self.rows]
        return [c.gateway for c in self.cards or []]

    def context(self) -> dict[str, Any]:
        return {"cards": self.cards or [], "gateway_rows": self.rows}


def fleet_gateways() -> FleetGateways:
    gateways = list(Gateway.objects.defer("health").order_by("name"))
    if len(gateways) > cards_up_to():
        return FleetGateways(rows=gateway_rows(gateways))
    return FleetGateways(cards=gateway_cards())
