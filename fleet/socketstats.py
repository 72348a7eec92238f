"""What the browser sockets of every web process add up to, for /metrics: how many are
open (by kind) and how long a note took from leaving the worker (`apush` stamps it) to the
frame a consumer sent for it.

Both are kept in the process's memory (a dict update per frame, no I/O on the hot path).
With Redis, a task of each web process writes them there every `FLUSH_SECONDS`: its open
sockets as a hash that expires unless heartbeat'd (a process that dies stops counting), and
its latency counts added (HINCRBY) to one shared hash. A scrape sums those, and adds this
process's own values that are not written yet. Without Redis (the in-memory layer) each
process reports its own values.

Labels are bounded: a socket kind is one of `KINDS`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import weakref
from collections import Counter
from typing import Any

from django.conf import settings

log = logging.getLogger(__name__)

KINDS = ("fleet", "session", "chat", "nav", "alerts", "approvals", "cron")
# Seconds; the buckets of the push latency histogram (+Inf is implied).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FLUSH_SECONDS = 5.0
SOCKETS_TTL = 30  # seconds: three missed heartbeats and a process no longer counts

PROCESS = uuid.uuid4().hex[:16]

_open: Counter[str] = Counter()
# Latency per kind: bucket index (as text) -> count, and "sum" -> seconds.
Counts = dict[str, float]
_pending: dict[str, Counts] = {}  # not written to Redis yet
_total: dict[
    str, Counts
] = {}  # all this process observed (the in-memory layer's answer)


def _add(into: dict[str, Counts], kind: str, counts: Counts) -> None:
    mine = into.setdefault(kind, {})
    for field, n in counts.items():
        mine[field] = mine.get(field, 0) + n


def _kind(kind: str) -> str:
    return kind if kind in KINDS else "other"


def opened(kind: str) -> None:
    _open[_kind(kind)] += 1
    _ensure_flusher()


def closed(kind: str) -> None:
    kind = _kind(kind)
    _open[kind] = max(_open[kind] - 1, 0)


def observe(kind: str, sent_at: Any) -> None:
    """A frame went out for a note stamped `sent_at` (wall-clock seconds) by the worker."""
    if not isinstance(sent_at, int | float) or isinstance(sent_at, bool):
        return
    seconds = max(time.time() - float(sent_at), 0.0)
    kind = _kind(kind)
    index = next((i for i, b in enumerate(BUCKETS) if seconds <= b), len(BUCKETS))
    one: Counts = {str(index): 1, "sum": seconds}
    _add(_pending, kind, one)
    _add(_total, kind, one)


# -- Redis ---------------------------------------------------------------------------------


def _prefix() -> str:
    return f"{settings.CHANNEL_LAYER_PREFIX}:socketstats"


def _redis_url() -> str:
    return str(getattr(settings, "REDIS_URL", "") or "")


_flushers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
    weakref.WeakKeyDictionary()
)


def _ensure_flusher() -> None:
    if not _redis_url():
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    task = _flushers.get(loop)
    if task is None or task.done():
        _flushers[loop] = loop.create_task(_flush_loop(), name="socketstats")


async def _flush_loop() -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(_redis_url())
    try:
        while True:
            try:
                await flush(client)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: the next pass retries
                log.info("socket stats not written (%s)", type(exc).__name__)
            await asyncio.sleep(FLUSH_SECONDS)
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()


async def flush(client: Any) -> None:
    """Write this process's open sockets (with an expiry) and add its new latency counts."""
    prefix = _prefix()
    pending = {k: v for k, v in _pending.items() if v}
    for kind in pending:
        _pending[kind] = {}
    pipe = client.pipeline(transaction=False)
    key = f"{prefix}:sockets:{PROCESS}"
    pipe.delete(key)
    pipe.hset(key, mapping={k: _open.get(k, 0) for k in (*KINDS, "other")})
    pipe.expire(key, SOCKETS_TTL)
    for kind, counts in pending.items():
        for field, n in counts.items():
            if field == "sum":
                pipe.hincrbyfloat(f"{prefix}:latency", f"{kind}:sum", float(n))
            else:
                pipe.hincrby(f"{prefix}:latency", f"{kind}:{field}", int(n))
    try:
        await pipe.execute()
    except BaseException:
        for kind, counts in pending.items():  # counted at the next pass instead
            _add(_pending, kind, counts)
        raise


# -- a scrape --------------------------------------------------------------------------------


def read() -> tuple[dict[str, int], dict[str, Counts]]:
    """(open sockets per kind, latency counts per kind) of every web process."""
    sockets: Counter[str] = Counter(dict.fromkeys(KINDS, 0))
    sockets.update(_open)
    url = _redis_url()
    if not url:
        return dict(sockets), {k: dict(v) for k, v in _total.items()}
    import redis

    prefix = _prefix()
    latency: dict[str, Counts] = {k: dict(v) for k, v in _pending.items()}
    client = redis.Redis.from_url(url, socket_timeout=2, decode_responses=True)
    try:
        own = f"{prefix}:sockets:{PROCESS}"
        for key in client.scan_iter(match=f"{prefix}:sockets:*", count=500):
            if str(key) == own:
                continue  # this process's live counts are already in
            for kind, n in client.hgetall(key).items():
                sockets[str(kind)] += int(n)
        for field, n in client.hgetall(f"{prefix}:latency").items():
            kind, _, name = str(field).rpartition(":")
            _add(latency, kind, {name: float(n) if name == "sum" else int(n)})
    finally:
        client.close()
    return dict(sockets), latency
