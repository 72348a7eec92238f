"""Channel-layer group names, built in one place from primary keys so they always match
`^[a-zA-Z0-9\\-_.]+$` and stay short; and the one helper that pushes to them.

Pushes are small JSON notes ("session 42 changed"), not rendered HTML: each consumer renders
for its own user and coalesces bursts, reading the database the worker wrote first."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

log = logging.getLogger(__name__)

FLEET = "fleet"


def fleet_group() -> str:
    return FLEET


def session_group(session_pk: int) -> str:
    return f"session.{int(session_pk)}"


def user_group(user_pk: int) -> str:
    """Every open socket of one user: told when the user logs out or their account or
    roles change (fleet.live), so a socket never outlives the rights it was opened with."""
    return f"user.{int(user_pk)}"


# While the channel layer is down every push fails the same way: say so once, then once per
# interval with a count, and once more when pushes go through again.
PUSH_FAILURE_LOG_INTERVAL = 30.0


class _PushFailures:
    def __init__(self) -> None:
        self.failing_since: float | None = None
        self.dropped = 0
        self.logged_at = 0.0

    def failed(self, group: str, exc: BaseException) -> None:
        now = time.monotonic()
        self.dropped += 1
        if self.failing_since is None:
            self.failing_since = now
        elif now - self.logged_at < PUSH_FAILURE_LOG_INTERVAL:
            return
        self.logged_at = now
        log.warning(
            "push to %s failed (%s: %s); %d push(es) dropped since the channel layer "
            "went away; pages catch up when it is back",
            group,
            exc.__class__.__name__,
            exc,
            self.dropped,
        )

    def succeeded(self) -> None:
        if self.failing_since is None:
            return
        log.warning(
            "pushes go through again after %.1f s (%d dropped)",
            time.monotonic() - self.failing_since,
            self.dropped,
        )
        self.failing_since, self.dropped = None, 0


_failures = _PushFailures()


async def apush(group: str, type_: str, **fields: Any) -> None:
    """Send an event to a group. A channel layer that is down (Redis gone) must not stop
    the caller: the database already holds the state, and consumers catch up on reconnect.
    Failures are logged, but not once per push (an event storm would flood the log)."""
    layer = get_channel_layer()
    if layer is None:
        return
    # Stamped for /metrics' push latency (fleet.socketstats): wall-clock, as it crosses
    # processes.
    message = {"type": type_, "sent_at": time.time(), **fields}
    # Two tries: after a Redis restart the first use of each pooled connection fails
    # ("closed by server") and a fresh one works. While Redis is down both fail at once.
    for attempt in (1, 2):
        try:
            await layer.group_send(group, message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any transport failure is logged, not raised
            if attempt == 2:
                _failures.failed(group, exc)
        else:
            _failures.succeeded()
            return


def push(group: str, type_: str, **fields: Any) -> None:
    async_to_sync(apush)(group, type_, **fields)
