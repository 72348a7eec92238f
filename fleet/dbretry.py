"""Database calls from long-lived async code (the worker, the chat relay) that ride out a
database outage instead of failing: `retry_db` awaits a call until it gets past the
database's errors, `db` is `database_sync_to_async` with that retry.

The database going away for a while (a failover, a restart, a full connection table) must
not end the worker nor lose a chat reply: each call is retried with backoff for up to
DB_RETRY_SECONDS. `outages` counts the outages this process came through; the worker's
runners compare it to know when to resync."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from channels.db import database_sync_to_async
from django.db import InterfaceError, OperationalError

log = logging.getLogger(__name__)
T = TypeVar("T")

DB_ERRORS = (OperationalError, InterfaceError)
DB_RETRY_SECONDS = 60.0
DB_RETRY_FIRST, DB_RETRY_CAP = 0.2, 2.0


class _Outages:
    count = 0  # outages this process came through


outages = _Outages()


async def retry_db(call: Callable[[], Awaitable[T]], what: str) -> T:
    """Await `call()` until it gets past the database's errors, or DB_RETRY_SECONDS pass.
    database_sync_to_async closes the broken connection (close_old_connections) after a
    failure, so each attempt starts on a fresh one."""
    started = time.monotonic()
    delay = DB_RETRY_FIRST
    failures = 0
    while True:
        try:
            result = await call()
        except DB_ERRORS as exc:
            failures += 1
            if failures == 1:
                log.warning("database unavailable during %s (%s); retrying", what, exc)
            if time.monotonic() - started + delay > DB_RETRY_SECONDS:
                log.error(
                    "database still unavailable after %.0f s: %s",
                    DB_RETRY_SECONDS,
                    what,
                )
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, DB_RETRY_CAP)
            continue
        if failures:
            outages.count += 1
            log.warning(
                "database back after %.1f s (%d failed attempts at %s)",
                time.monotonic() - started,
                failures,
                what,
            )
        return result


def db(
    fn: Callable[..., T], executor: ThreadPoolExecutor | None = None
) -> Callable[..., Awaitable[T]]:
    """`database_sync_to_async`, retried through a database outage (see retry_db). On the
    one thread all sync code of the loop shares, or on `executor`'s threads (each has its
    own connection) for calls that must not queue behind the others (the lease step)."""
    wrapped = (
        database_sync_to_async(fn)
        if executor is None
        else database_sync_to_async(fn, thread_sensitive=False, executor=executor)
    )
    what = getattr(fn, "__name__", "a database call")

    async def call(*args: Any, **kwargs: Any) -> T:
        return await retry_db(lambda: wrapped(*args, **kwargs), what)

    return call
