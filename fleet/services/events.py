"""Apply `sessions.changed` events: upserts batched into one reconcile, deletes marking the
row gone, a row-less event asking for a resync."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction
from django.utils import timezone

from fleet.models import Session
from fleet.services import summary
from fleet.services.reconcile import (
    reconcile_sessions,
)
from fleet.services.rows import (
    session_event,
)


@dataclass
class SessionChange:
    """What a `sessions.changed` event did: the session it touched, or a full resync needed."""

    session_id: int | None = None
    resync: bool = False
    counts_changed: bool = True


def apply_session_changed(gateway_id: int, payload: Any) -> SessionChange:
    """One `sessions.changed` event. With a row (`session`, or the flattened fields): upsert
    it. A delete names the key only: mark the row gone. Without a key: resync the list."""
    batch = apply_sessions_changed(gateway_id, [payload])
    if batch.resync:
        return SessionChange(resync=True)
    return SessionChange(
        session_id=batch.session_ids[0] if batch.session_ids else None,
        counts_changed=batch.counts_changed,
    )


@dataclass
class BatchChange:
    """What a run of `sessions.changed` events did: the sessions whose rows changed (each
    once, in order), how many events were taken, and whether the last one taken asks for a
    full resync (the caller resyncs, then applies the events after it)."""

    session_ids: list[int] = field(default_factory=list)
    consumed: int = 0
    resync: bool = False
    counts_changed: bool = False  # see SyncResult.counts_changed


def apply_sessions_changed(gateway_id: int, payloads: list[Any]) -> BatchChange:
    """Consecutive `sessions.changed` events in one transaction, with the same end state as
    applying them one by one: a run of upserts becomes one reconcile (a full row replaces
    what came before it for its key, flattened fields are laid over it), a delete ends the
    run. Stops after the first event that needs a resync (see BatchChange)."""
    batch = BatchChange()
    # key -> (fields, merge): the state of each key after the run so far.
    pending: dict[str, tuple[dict[str, Any], bool]] = {}

    def changed(ids: Iterable[int]) -> None:
        for pk in ids:
            if pk not in seen:
                seen.add(pk)
                batch.session_ids.append(pk)

    def flush() -> None:
        for merge in (False, True):
            rows = [f for f, m in pending.values() if m is merge]
            if rows:
                result = reconcile_sessions(
                    gateway_id, rows, complete=False, merge=merge
                )
                changed(result.changed_ids)
                batch.counts_changed |= result.counts_changed
        pending.clear()

    seen: set[int] = set()
    with transaction.atomic():
        for payload in payloads:
            kind, key, fields, merge = session_event(payload)
            batch.consumed += 1
            if kind == "resync":
                batch.resync = True
                break
            if kind == "delete":
                flush()
                pk = mark_session_gone(gateway_id, key)
                if pk is not None:
                    changed([pk])
                    batch.counts_changed = True
                continue
            assert fields is not None
            key = str(fields["key"])[:512]
            before = pending.get(key)
            if merge and before is not None:
                pending[key] = ({**before[0], **fields}, before[1])
            else:
                pending[key] = (fields, merge)
        flush()
    return batch


def mark_session_gone(gateway_id: int, key: str) -> int | None:
    session = Session.objects.filter(gateway_id=gateway_id, key=key).first()
    if session is None or session.gone_at is not None:
        return None
    session.gone_at = timezone.now()
    session.has_active_run = False
    session.save(update_fields=["gone_at", "has_active_run"])
    summary.refresh_counts(gateway_id)
    return session.pk
