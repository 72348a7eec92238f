"""The calls from the web: the commands the web sends on the worker's own channel.

Each `gateway.call` is checked again here (the caller's role, the call's own rules), made on
the live connection of the gateway it names, recorded with the recorder its caller named,
and only then answered (to `reply_to`) and announced (to a `notify` group).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model

from fleet import calls
from fleet.capabilities import GatewayLink
from fleet.dbretry import db
from fleet.gateway import ErrorShape, GatewayError
from fleet.groups import apush

log = logging.getLogger(__name__)


class WebCalls:
    """Takes the worker's commands; `link_for(gateway_id)` is the runner this worker holds
    for a gateway, or None."""

    def __init__(self, link_for: Callable[[int], GatewayLink | None]) -> None:
        self.link_for = link_for
        self._tasks: set[asyncio.Task[None]] = set()

    async def receive(self, channel: str) -> None:
        """Read commands from `channel` until cancelled; each call runs on a task of its own."""
        layer = get_channel_layer()
        if layer is None or not channel:
            return
        failing_since: float | None = None
        while True:
            try:
                message = await layer.receive(channel)
            except asyncio.CancelledError:
                raise
            except (
                Exception
            ) as exc:  # the channel layer (Redis) is down: keep syncing, retry
                now = time.monotonic()
                if failing_since is None or now - failing_since >= 60:
                    # Once, then once a minute: not a line per second while Redis is gone.
                    failing_since = now
                    log.warning("worker: cannot read commands (%s); retrying", exc)
                await asyncio.sleep(1)
                continue
            if failing_since is not None:
                log.warning("worker: reading commands again")
                failing_since = None
            if message.get("type") == "gateway.call":
                task = asyncio.create_task(self.handle_call(message))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def cancel(self) -> None:
        """The worker stops: the calls still in flight are cancelled."""
        for task in list(self._tasks):
            task.cancel()

    async def handle_call(self, message: dict[str, Any]) -> None:
        method = str(message.get("method", ""))
        raw_params = message.get("params")
        params: dict[str, Any] = raw_params if isinstance(raw_params, dict) else {}
        reply: dict[str, Any]
        try:
            await check_caller(message.get("user_id"), method, params)
            link = self.link_for(int(message.get("gateway_id") or 0))
            if link is None:
                raise GatewayError(
                    method,
                    ErrorShape(
                        "UNAVAILABLE_HERE", "This worker does not hold that gateway."
                    ),
                )
            payload = await link.call(method, params)
            reply = {"ok": True, "payload": payload}
        except PermissionError as exc:
            reply = {"ok": False, "error": {"code": "FORBIDDEN", "message": str(exc)}}
        except GatewayError as exc:
            reply = {
                "ok": False,
                "error": {"code": exc.error.code, "message": exc.error.message},
            }
        except TimeoutError:
            reply = {
                "ok": False,
                "error": {
                    "code": "TIMEOUT",
                    "message": f"The gateway did not answer {method} in time.",
                },
            }
        await record_outcome(message.get("record"), method, reply)
        layer = get_channel_layer()
        if layer is None:
            return
        with contextlib.suppress(Exception):
            if message.get("reply_to"):
                await layer.send(
                    message["reply_to"], {"type": "gateway.reply", **reply}
                )
        notify = message.get("notify")
        if isinstance(notify, dict) and isinstance(notify.get("group"), str):
            extra = {k: v for k, v in notify.items() if k not in ("group", "type")}
            await apush(
                notify["group"],
                str(notify.get("type", "gateway.reply")),
                reply=reply,
                **extra,
            )


async def record_outcome(record: Any, method: str, reply: dict[str, Any]) -> None:
    """Write the call's outcome with the recorder its caller named, once, before anyone
    is told: the database holds the outcome whether or not a page or a caller waits."""
    if not isinstance(record, dict):
        return
    recorder = calls.recorder(str(record.get("with", "")))
    if recorder is None:
        log.error("%s: no recorder named %r", method, record.get("with"))
        return
    try:
        await db(recorder)(record, reply)
    except Exception:  # the outcome is lost, but the caller still gets its answer
        log.exception("%s: recording the outcome failed", method)


async def check_caller(
    user_id: Any, method: str, params: dict[str, Any] | None = None
) -> None:
    """The role is checked by the web and again here, before anything reaches the gateway."""
    user = (
        await get_user_model().objects.filter(pk=user_id, is_active=True).afirst()
        if user_id
        else None
    )
    await db(calls.check_role)(user, method, params)
