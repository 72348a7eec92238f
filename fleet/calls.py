"""Gateway calls asked for by the web, carried to the worker that holds the gateway.

The web never talks to a gateway: it sends `{"type": "gateway.call", ...}` over the channel
layer to the worker channel recorded on the gateway's lease, and (usually) waits for the
answer on a channel of its own. The role is checked here, and again by the worker.

The outcome of a call that changes something (its audit result, a chat message's state) is
written by the worker, once, as soon as the gateway answered, whether or not anyone still
waits for it: the caller names a recorder (`record={"with": name, ...}`) that an app
registered with `register_recorder`, and the worker runs it before it replies or pushes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from fleet import audit, capabilities, roles
from fleet.models import Gateway

log = logging.getLogger(__name__)

# Every method the web may ask for, with the least role that may ask. Anything else is refused.
METHOD_ROLES = {
    "chat.send": roles.OPERATOR,
    "chat.abort": roles.OPERATOR,
    "chat.history": roles.VIEWER,
    "models.list": roles.VIEWER,
    "sessions.list": roles.VIEWER,
    "agents.list": roles.VIEWER,
    "health": roles.VIEWER,
    "sessions.patch": roles.ADMIN,
    "sessions.reset": roles.ADMIN,
    "sessions.delete": roles.ADMIN,
}


# name -> a sync function (the record's fields, the reply) that writes a call's outcome.
Recorder = Callable[[dict[str, Any], dict[str, Any]], None]
_recorders: dict[str, Recorder] = {}


def register_recorder(name: str, recorder: Recorder) -> None:
    """Name a function the worker may run to record the outcome of a call (from an app's
    `AppConfig.ready`, so the worker imports no app for it)."""
    _recorders[name] = recorder


def recorder(name: str) -> Recorder | None:
    return _recorders.get(name)


def record_audit(fields: dict[str, Any], reply: dict[str, Any]) -> None:
    """The recorder of calls whose only outcome is their audit event (`audit_id`)."""
    audit.finish_from_reply(str(fields.get("audit_id", "")), reply)


register_recorder("audit", record_audit)


class GatewayUnavailable(Exception):
    """The call cannot be made now; the message says why, in words for people."""


class GatewayCallFailed(Exception):
    """The gateway answered with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def method_role(method: str) -> str | None:
    """The least role that may ask for `method`: the core's, or a capability's own."""
    return METHOD_ROLES.get(method) or capabilities.method_roles().get(method)


def check_role(user: Any, method: str, params: dict[str, Any] | None = None) -> None:
    needed = method_role(method)
    if needed is None:
        raise PermissionError(f"{method} is not a call the Control Center makes")
    if not roles.has_role(user, needed):
        raise PermissionError(f"{method} needs the {needed} role")
    for authorize in capabilities.authorizers(method):
        authorize(user, params or {})


def unavailable_reason(gateway: Gateway) -> str:
    """Why a live call cannot go through, or "" when it can."""
    if not gateway.enabled:
        return f"The gateway {gateway.name} is disabled."
    if not gateway.worker_alive():
        return "The gateway worker is not running, so nothing can reach the gateway. Start `manage.py gatewayworker`."
    if gateway.state == Gateway.State.REST_FALLBACK:
        return (
            f"The gateway {gateway.name} is only reachable over its REST fallback right now: "
            "chat and session actions are unavailable until the WebSocket is back."
        )
    if gateway.state != Gateway.State.CONNECTED:
        detail = f" ({gateway.last_error})" if gateway.last_error else ""
        return f"The gateway {gateway.name} is not connected: {gateway.get_state_display().lower()}{detail}."
    return ""


async def acall(
    gateway_id: int,
    method: str,
    params: dict[str, Any],
    *,
    user: Any,
    timeout: float | None = None,
    wait: bool = True,
    notify: dict[str, Any] | None = None,
    record: dict[str, Any] | None = None,
) -> Any:
    """Ask the worker to call `method` on the gateway. With wait, return the payload or raise
    GatewayCallFailed / GatewayUnavailable; without, return None once the worker has it.
    `record` ({"with": a registered recorder, **fields}) makes the worker write the outcome;
    `notify` ({"group": ..., "type": ..., **extra}) makes it push the outcome there after."""
    if record is not None and recorder(str(record.get("with", ""))) is None:
        raise ValueError(f"no recorder named {record.get('with')!r} is registered")
    # Plain sync_to_async: a read-only check that must not close the connection of a
    # caller inside a transaction (the admin's change form calls us from one).
    await sync_to_async(check_role)(user, method, params)
    gateway = await Gateway.objects.filter(pk=gateway_id).afirst()
    if gateway is None:
        raise GatewayUnavailable("That gateway no longer exists.")
    reason = unavailable_reason(gateway)
    if reason:
        raise GatewayUnavailable(reason)
    layer = get_channel_layer()
    if layer is None:
        raise GatewayUnavailable(
            "No channel layer is configured, so the worker cannot be reached."
        )
    user_id = getattr(user, "pk", None)
    message: dict[str, Any] = {
        "type": "gateway.call",
        "gateway_id": gateway.pk,
        "method": method,
        "params": params,
        "user_id": user_id,
        "notify": notify,
        "record": record,
    }
    try:
        if wait:
            # The default prefix, like the consumers' own channels: channels_redis receives
            # every process-local channel through one Redis list per prefix, popped by
            # whichever receive holds the layer's lock. A second prefix in a process where
            # consumers wait (daphne) is never popped, and the reply never arrives.
            reply_to = await layer.new_channel()
            message["reply_to"] = reply_to
        try:
            await layer.send(gateway.worker_channel, message)
        except Exception:  # noqa: BLE001
            # After a Redis restart the first use of a pooled connection fails; a fresh
            # one works. (Redis still down: this fails too, and is answered below.)
            await layer.send(gateway.worker_channel, message)
        if not wait:
            return None
        limit = timeout or settings.GATEWAY_CALL_TIMEOUT
        reply = await asyncio.wait_for(layer.receive(reply_to), limit)
    except TimeoutError:
        raise GatewayUnavailable(
            f"The gateway worker did not answer within {limit:.0f} s. Is `manage.py gatewayworker` running?"
        ) from None
    except GatewayUnavailable:
        raise
    except Exception as exc:  # the channel layer itself (Redis) is down
        log.warning("gateway call %s: the channel layer failed: %r", method, exc)
        raise GatewayUnavailable(
            "The gateway worker cannot be reached right now: the channel layer (Redis) "
            f"is not answering ({exc.__class__.__name__}). Try again in a moment."
        ) from None
    if reply.get("ok"):
        return reply.get("payload")
    error = reply.get("error") or {}
    if error.get("code") == "UNAVAILABLE_HERE":
        raise GatewayUnavailable(
            str(error.get("message", "The gateway is not connected."))
        )
    raise GatewayCallFailed(
        str(error.get("code", "ERROR")), str(error.get("message", "unknown error"))
    )


def call(
    gateway_id: int, method: str, params: dict[str, Any], *, user: Any, **kwargs: Any
) -> Any:
    return async_to_sync(acall)(gateway_id, method, params, user=user, **kwargs)
