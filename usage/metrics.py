"""/metrics for Prometheus: every value is read from the database at scrape time (one
collector per request), so any number of web processes answer the same; the browser
sockets and the push latency come from fleet.socketstats (Redis, summed over the web
processes). Labels are bounded: gateway names, agent ids, model names, states, socket
kinds; never session keys."""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterator

from django.db.models import Count, Sum
from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from fleet import socketstats
from fleet.models import Gateway, Session
from usage.models import UsageDay

TOKEN_ENV = "CONTROLCENTER_METRICS_TOKEN"


def _token() -> str:
    return os.environ.get("CONTROLCENTER_METRICS_TOKEN", "").strip()


def configured() -> bool:
    return bool(_token())


def authorized(header: str) -> bool:
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    return hmac.compare_digest(given.strip().encode(), _token().encode())


class DatabaseCollector:
    def collect(self) -> Iterator[Metric]:
        now = timezone.now()
        gateways = list(Gateway.objects.order_by("pk"))
        names = {g.pk: g.name for g in gateways}
        up = GaugeMetricFamily(
            "controlcenter_gateway_up",
            "1 when the worker's connection is ready.",
            labels=["gateway"],
        )
        state = GaugeMetricFamily(
            "controlcenter_gateway_state",
            "The gateway's connection state (1 for the current one).",
            labels=["gateway", "state"],
        )
        lag = GaugeMetricFamily(
            "controlcenter_worker_event_lag_seconds",
            "Seconds since the worker last got an event from the gateway.",
            labels=["gateway"],
        )
        for g in gateways:
            up.add_metric([g.name], 1.0 if g.state == Gateway.State.CONNECTED else 0.0)
            for choice in Gateway.State.values:
                state.add_metric([g.name, choice], 1.0 if g.state == choice else 0.0)
            if g.last_event_at is not None:
                lag.add_metric(
                    [g.name], max((now - g.last_event_at).total_seconds(), 0.0)
                )
        yield up
        yield state
        yield lag
        sessions = GaugeMetricFamily(
            "controlcenter_sessions",
            "Sessions on the gateway, by status.",
            labels=["gateway", "status"],
        )
        running = GaugeMetricFamily(
            "controlcenter_running_runs",
            "Sessions with a run in progress.",
            labels=["gateway"],
        )
        live = Session.objects.filter(gone_at=None, deleted_at=None)
        for st in (
            live.values("gateway_id", "status").annotate(n=Count("pk")).order_by()
        ):
            sessions.add_metric(
                [names.get(st["gateway_id"], "?"), st["status"] or "unknown"], st["n"]
            )
        counts = dict(
            live.filter(has_active_run=True)
            .values("gateway_id")
            .annotate(n=Count("pk"))
            .values_list("gateway_id", "n")
        )
        for g in gateways:
            running.add_metric([g.name], counts.get(g.pk, 0))
        yield sessions
        yield running
        tokens = CounterMetricFamily(
            "controlcenter_tokens",
            "Tokens in the ledger (it only grows).",
            labels=["gateway", "agent", "model", "direction"],
        )
        cost = CounterMetricFamily(
            "controlcenter_cost_usd",
            "Estimated cost in the ledger, USD (it only grows).",
            labels=["gateway", "agent", "model"],
        )
        rows = (
            UsageDay.objects.values("gateway_id", "agent_key", "model")
            .annotate(i=Sum("input_tokens"), o=Sum("output_tokens"), c=Sum("cost_usd"))
            .order_by()
        )
        for r in rows:
            labels = [names.get(r["gateway_id"], "?"), r["agent_key"], r["model"]]
            tokens.add_metric([*labels, "input"], r["i"] or 0)
            tokens.add_metric([*labels, "output"], r["o"] or 0)
            cost.add_metric(labels, float(r["c"] or 0))
        yield tokens
        yield cost


class SocketsCollector:
    def collect(self) -> Iterator[Metric]:
        sockets, latency = socketstats.read()
        gauge = GaugeMetricFamily(
            "controlcenter_browser_sockets",
            "Browser WebSockets open on the web processes, by kind of page.",
            labels=["kind"],
        )
        for kind in sorted(sockets):
            gauge.add_metric([kind], sockets[kind])
        yield gauge
        histogram = HistogramMetricFamily(
            "controlcenter_push_latency_seconds",
            "From a note leaving the worker to the frame a web consumer sent for it.",
            labels=["kind"],
        )
        for kind in sorted(latency):
            counts = latency[kind]
            buckets: list[tuple[str, float]] = []
            running = 0
            for i, bound in enumerate((*socketstats.BUCKETS, float("inf"))):
                running += int(counts.get(str(i), 0))
                buckets.append(
                    ("+Inf" if bound == float("inf") else str(bound), running)
                )
            histogram.add_metric([kind], buckets, float(counts.get("sum", 0.0)))
        yield histogram


def render() -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector())
    registry.register(SocketsCollector())
    return generate_latest(registry), CONTENT_TYPE_LATEST
