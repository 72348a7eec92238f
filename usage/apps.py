from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from django.apps import AppConfig

log = logging.getLogger(__name__)


class UsageConfig(AppConfig):
    name = "usage"
    verbose_name = "Usage and cost"

    def ready(self) -> None:
        from alerts.models import AlertRule
        from alerts.sources import register as register_source
        from fleet import capabilities, nav
        from fleet.dbretry import db
        from usage import budgets, catchup, ledger

        book_keys = db(ledger.book_keys)
        book_run = db(ledger.book_run)

        seen = ledger.SeenCounters()

        async def on_sessions_changed(
            link: capabilities.GatewayLink, payloads: list[Any]
        ) -> None:
            # The fleet stored the rows first (the worker's own handler runs before ours).
            moved = seen.moved(link.gateway_id, payloads)
            if moved:
                await book_keys(link.gateway_id, list(moved))
                seen.remember(link.gateway_id, moved)

        async def on_lost(link: capabilities.GatewayLink) -> None:
            seen.forget(link.gateway_id)

        async def on_chat(link: capabilities.GatewayLink, payload: Any) -> None:
            if not isinstance(payload, dict) or payload.get("state") != "final":
                return
            key, run_id = payload.get("sessionKey"), payload.get("runId")
            if isinstance(key, str) and isinstance(run_id, str):
                await book_run(link.gateway_id, key, run_id)

        # The catch-up after a (re)connect books a month of history at first sight: on a
        # thread of its own, not the loop's ORM thread, so the events of every gateway do
        # not wait behind it (at fifty gateways the worker lagged seconds behind). The
        # marks keep the two threads' bookings from counting anything twice.
        catch_up = ThreadPoolExecutor(1, thread_name_prefix="usage-catch-up")
        unmarked = db(catchup.unmarked_sessions, catch_up)
        backfill = db(catchup.backfill, catch_up)
        missed = db(catchup.missed_sessions, catch_up)
        recover = db(catchup.recover, catch_up)
        rebuild = db(ledger.rebuild, catch_up)

        async def on_ready(link: capabilities.GatewayLink) -> None:
            # Sessions never seen: their history from the gateway, at the times it
            # happened (older gateways lack the method: counters only).
            for key in await unmarked(link.gateway_id):
                try:
                    series = await link.call("sessions.usage.timeseries", {"key": key})
                except Exception as exc:  # unknown method, a refusal, a timeout
                    log.info(
                        "usage: no timeseries for a session (%s)", type(exc).__name__
                    )
                    break
                await backfill(link.gateway_id, key, series)
            # Sessions seen before whose runs may have ended while nobody watched: the
            # runs after the newest one booked, from the gateway's points.
            for key in await missed(link.gateway_id):
                try:
                    series = await link.call("sessions.usage.timeseries", {"key": key})
                except Exception as exc:  # unknown method, a refusal, a timeout
                    log.info(
                        "usage: no timeseries for a session (%s)", type(exc).__name__
                    )
                    break
                await recover(link.gateway_id, key, series)
            await rebuild(link.gateway_id, seen)

        capabilities.register(
            capabilities.Capability(
                name="usage",
                batched={"sessions.changed": on_sessions_changed},
                events={"chat": on_chat},
                on_ready=on_ready,
                on_lost=on_lost,
            )
        )
        register_source(AlertRule.Kind.BUDGET, budgets.BudgetCrossed())
        nav.register(nav.NavBadge("usage", "Usage", "usage", budgets.attention_count))
