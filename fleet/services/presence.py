"""The gateway's presence list (connected clients and nodes), replacing ours, and the
live state cleared when a connection ends."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.db import transaction

from fleet.models import PresenceEntry
from fleet.services.rows import bounded_int, bounded_str, from_ms


def presence_key(entry: Mapping[str, Any]) -> str:
    for name in ("instanceId", "deviceId"):
        value = entry.get(name)
        if isinstance(value, str) and value:
            return value[:300]
    return f"{entry.get('host', '')}|{entry.get('mode', '')}|{entry.get('ip', '')}"[
        :300
    ]


def replace_presence(gateway_id: int, payload: Any) -> bool:
    """The gateway's presence list (a bare array, or `{presence: [...]}`) replaces ours."""
    entries = payload.get("presence") if isinstance(payload, dict) else payload
    if not isinstance(entries, list):
        return False
    wanted: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if isinstance(entry, dict):
            wanted[presence_key(entry)] = entry
    with transaction.atomic():
        existing = {
            p.instance_key: p
            for p in PresenceEntry.objects.filter(gateway_id=gateway_id)
        }
        stale = [p.pk for k, p in existing.items() if k not in wanted]
        changed = bool(stale)
        PresenceEntry.objects.filter(pk__in=stale).delete()
        for key, entry in wanted.items():
            current = existing.get(key)
            if current is not None and _lasting(current.raw) == _lasting(entry):
                continue
            roles = entry.get("roles")
            scopes = entry.get("scopes")
            PresenceEntry.objects.update_or_create(
                gateway_id=gateway_id,
                instance_key=key,
                defaults={
                    "host": bounded_str(entry, "host", limit=300),
                    "ip": bounded_str(entry, "ip", limit=100),
                    "mode": bounded_str(entry, "mode", limit=50),
                    "platform": bounded_str(entry, "platform", limit=100),
                    "version": bounded_str(entry, "version", limit=100),
                    "device_family": bounded_str(entry, "deviceFamily", limit=100),
                    "roles": roles if isinstance(roles, list) else [],
                    "scopes": scopes if isinstance(scopes, list) else [],
                    "reason": bounded_str(entry, "reason", limit=100),
                    "text": bounded_str(entry, "text", limit=2000),
                    "last_input_seconds": bounded_int(
                        entry, "lastInputSeconds", 2**31 - 1
                    ),
                    "seen_at": from_ms(entry.get("ts")),
                    "raw": entry,
                },
            )
            changed = True
    return changed


# Presence fields that move on every report (the gateway's own entry carries the time of
# the call): a change in these alone is not written, nor pushed to every fleet page.
PRESENCE_CLOCK_FIELDS = ("ts", "lastInputSeconds")


def _lasting(entry: Any) -> Any:
    if not isinstance(entry, dict):
        return entry
    return {k: v for k, v in entry.items() if k not in PRESENCE_CLOCK_FIELDS}


def clear_live_state(gateway_id: int) -> None:
    """When the connection ends: nobody can vouch for presence or running runs any more."""
    PresenceEntry.objects.filter(gateway_id=gateway_id).delete()
