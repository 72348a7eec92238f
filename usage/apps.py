from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from django.apps import AppConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


class UsageConfig(AppConfig):
    name = "usage"
    verbose_name = "Usage and cost"

    def ready(self) -> None:
        from channels.db import database_sync_to_async

        from alerts.models import AlertRule
        from alerts.sources import register as register_source
        from fleet import capabilities, nav
        from usage import budgets, ledger

        book_keys = database_sync_to_async(ledger.book_keys)
        book_run = database_sync_to_async(ledger.book_run)

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

        def off_the_event_path(fn: Callable[..., T]) -> Callable[..., Awaitable[T]]:
            wrapped: Callable[..., Awaitable[T]] = database_sync_to_async(
                fn, thread_sensitive=False, executor=catch_up
            )
            return wrapped

        unmarked = off_the_event_path(ledger.unmarked_sessions)
        backfill = off_the_event_path(ledger.backfill)
        rebuild = off_the_event_path(ledger.rebuild)

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
