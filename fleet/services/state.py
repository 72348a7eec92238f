"""The gateway row's connection state as the worker sees it: state and error, the
`hello-ok` facts, health, and when events last arrived."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db.models import Case, F, Value, When
from django.utils import timezone

from fleet.models import Gateway

State = Gateway.State


def set_state(gateway_id: int, state: str, error: str = "", **fields: Any) -> bool:
    """Set the connection state and the message people see; True when anything changed."""
    gateway = Gateway.objects.filter(pk=gateway_id).first()
    if gateway is None:
        return False
    changed = []
    if gateway.state != state:
        gateway.state = state
        gateway.state_changed_at = timezone.now()
        changed += ["state", "state_changed_at"]
    if gateway.last_error != error:
        gateway.last_error = error
        changed.append("last_error")
    if state != State.CONNECTED and gateway.connected_since is not None:
        gateway.connected_since = None
        changed.append("connected_since")
    if (state == State.CONNECTED) == (gateway.not_connected_since is not None):
        gateway.not_connected_since = (
            None if state == State.CONNECTED else timezone.now()
        )
        changed.append("not_connected_since")
    if state != State.PAIRING_REQUIRED and "pairing_request_id" not in fields:
        fields.setdefault("pairing_request_id", "")
        fields.setdefault("pairing_reason", "")
    for name, value in fields.items():
        if getattr(gateway, name) != value:
            setattr(gateway, name, value)
            changed.append(name)
    if changed:
        gateway.save(update_fields=[*changed, "updated_at"])
    return bool(changed)


def record_hello(
    gateway_id: int, *, protocol: int, server_version: str, main_session_key: str
) -> None:
    Gateway.objects.filter(pk=gateway_id).update(
        state=State.CONNECTED,
        state_changed_at=timezone.now(),
        last_error="",
        protocol=protocol,
        server_version=server_version[:100],
        connected_since=timezone.now(),
        not_connected_since=None,
        pairing_request_id="",
        pairing_reason="",
        main_session_key=main_session_key[:200],
        updated_at=timezone.now(),
    )


def record_health(gateway_id: int, health: Any) -> bool:
    if not isinstance(health, dict):
        return False
    summary = {
        k: health[k]
        for k in ("ok", "ts", "durationMs", "heartbeatSeconds")
        if k in health
    }
    sessions = health.get("sessions")
    if isinstance(sessions, dict) and isinstance(sessions.get("count"), int):
        summary["sessionCount"] = sessions["count"]
    agents = health.get("agents")
    if isinstance(agents, list):
        summary["agentCount"] = len(agents)
    channels = health.get("channels")
    if isinstance(channels, dict):
        summary["channels"] = sorted(str(c) for c in channels)
    # `ts` and `durationMs` change every time: compare without them.
    current = (
        Gateway.objects.filter(pk=gateway_id).values_list("health", flat=True).first()
    )
    stable = {k: v for k, v in summary.items() if k not in ("ts", "durationMs")}
    if isinstance(current, dict) and stable == {
        k: v for k, v in current.items() if k not in ("ts", "durationMs")
    }:
        return False
    Gateway.objects.filter(pk=gateway_id).update(health=summary)
    return True


def touch_events(gateway_id: int, when: datetime) -> None:
    Gateway.objects.filter(pk=gateway_id).update(last_event_at=when)


def touch_events_many(last_events: dict[int, datetime]) -> None:
    """`touch_events` for several gateways in one UPDATE."""
    if last_events:
        Gateway.objects.filter(pk__in=list(last_events)).update(
            last_event_at=Case(
                *(When(pk=pk, then=Value(when)) for pk, when in last_events.items()),
                default=F("last_event_at"),
            )
        )
