"""Persist and reconcile what gateways report. Plain sync functions: the worker calls them
through `database_sync_to_async`, the REST poller and the tests call them as they are.

Each function writes the database and returns what changed; pushing to browsers is the
caller's next step (database first, then push)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connections, transaction
from django.db.models import Q
from django.db.models.functions import Coalesce, Now
from django.utils import timezone

from fleet import envrules
from fleet.gateway import DeviceKey
from fleet.models import Agent, DeviceIdentity, Gateway, PresenceEntry, Session

State = Gateway.State
log = logging.getLogger(__name__)

# Fields of a `sessions.changed` payload that describe the event, not the session row.
EVENT_META_KEYS = frozenset(
    {
        "sessionKey",
        "reason",
        "phase",
        "runId",
        "messageId",
        "messageSeq",
        "ts",
        "session",
        "ancestorSessions",
        "recipientProfileId",
    }
)
BULK_BATCH = 500


# -- gateways --------------------------------------------------------------------------------


def ensure_env_gateway() -> Gateway | None:
    """The gateway named by OPENCLAW_GATEWAY_URL, created (or re-pointed) on start."""
    url = settings.OPENCLAW_GATEWAY_URL
    if not url:
        return None
    for value, name in (
        (url, "OPENCLAW_GATEWAY_URL"),
        (settings.GATEWAY_REST_URL, "GATEWAY_REST_URL"),
    ):
        why = envrules.url_shape_refusal(value, name) if value else ""
        if why:
            # Not stored: the database would keep the password. (A plain ws:// address
            # off loopback is stored; the worker refuses it and the fleet page says why.)
            log.error("The gateway from the environment was not added: %s", why)
            return None
    existing = Gateway.objects.filter(url=url).first()
    if existing is not None:
        if settings.GATEWAY_REST_URL and existing.rest_url != settings.GATEWAY_REST_URL:
            existing.rest_url = settings.GATEWAY_REST_URL
            existing.save(update_fields=["rest_url", "updated_at"])
        return existing
    host = urlsplit(url).hostname or "gateway"
    name = host if not Gateway.objects.filter(name=host).exists() else url
    return Gateway.objects.create(
        name=name[:100],
        url=url,
        rest_url=settings.GATEWAY_REST_URL,
        token_env="OPENCLAW_GATEWAY_TOKEN",
    )


def gateway_token(gateway: Gateway) -> str:
    """The shared token, read from the worker's environment (never stored)."""
    return envrules.read_env(gateway.token_env, envrules.TOKEN)


def device_key_for(gateway_id: int) -> tuple[DeviceKey, str]:
    """This gateway's device key (made on first use) and the device token it issued us."""
    identity = DeviceIdentity.objects.filter(gateway_id=gateway_id).first()
    if identity is None:
        key = DeviceKey.generate()
        identity, _ = DeviceIdentity.objects.get_or_create(
            gateway_id=gateway_id,
            defaults={
                "private_key_pem": key.to_pem(),
                "device_id": key.device_id,
                "public_key": key.public_key_b64url,
            },
        )
    return DeviceKey.from_pem(identity.private_key_pem), identity.device_token


def rotate_device_identity(gateway_id: int) -> tuple[str, str]:
    """A new Ed25519 key for this gateway, the old key and its device token forgotten;
    the worker sees `identity_rotated_at` change and reconnects with the new key (off
    loopback the gateway then asks for pairing again). Returns (old, new) device ids."""
    key = DeviceKey.generate()
    with transaction.atomic():
        gateway = Gateway.objects.select_for_update().get(pk=gateway_id)
        old = DeviceIdentity.objects.filter(gateway=gateway).first()
        old_id = old.device_id if old is not None else ""
        DeviceIdentity.objects.update_or_create(
            gateway=gateway,
            defaults={
                "private_key_pem": key.to_pem(),
                "device_id": key.device_id,
                "public_key": key.public_key_b64url,
                "device_token": "",
                "device_token_scopes": [],
            },
        )
        gateway.identity_rotated_at = timezone.now()
        gateway.save(update_fields=["identity_rotated_at", "updated_at"])
    return old_id, key.device_id


def store_device_token(gateway_id: int, token: str, scopes: Iterable[str] = ()) -> None:
    DeviceIdentity.objects.filter(gateway_id=gateway_id).update(
        device_token=token, device_token_scopes=list(scopes)
    )


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


# -- rows from the gateway --------------------------------------------------------------------


def row_hash(row: Mapping[str, Any]) -> str:
    return hashlib.blake2b(
        json.dumps(row, sort_keys=True, default=str).encode(), digest_size=16
    ).hexdigest()


def from_ms(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return None
    try:
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _str(row: Mapping[str, Any], *names: str, limit: int = 500) -> str:
    for name in names:
        value = row.get(name)
        if isinstance(value, str) and value:
            return value[:limit]
    return ""


def _dict(row: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = row.get(name)
    return value if isinstance(value, dict) else {}


INT64 = 2**63 - 1


def _int(row: Mapping[str, Any], name: str, limit: int = INT64) -> int | None:
    """A whole number the database column can hold, or None (JSON allows any size)."""
    value = row.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not -limit <= value <= limit:  # also false for NaN
        return None
    return int(value)


def agent_id_from_key(key: str) -> str:
    """`agent:<agentId>:<rest>` → agentId; other keys (`global`, `unknown`) have none."""
    parts = key.split(":", 2)
    return parts[1] if len(parts) >= 3 and parts[0] == "agent" else ""


def session_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """The model fields for one session row (protocol 3 and 4 shapes, and the REST rows)."""
    key = str(row.get("key", ""))
    origin = _dict(row, "origin")
    delivery = _dict(row, "deliveryContext")
    channel = _str(row, "channel", "lastChannel", limit=100) or _str(
        {**delivery, **origin}, "channel", "provider", "surface", limit=100
    )
    status = _str(row, "status", limit=50)
    active = row.get("hasActiveRun")
    return {
        "key": key[:512],
        "agent_key": agent_id_from_key(key)[:200],
        "session_id": _str(row, "sessionId", limit=200),
        "label": _str(row, "label"),
        "display_name": _str(row, "displayName", "derivedTitle", "subject"),
        "kind": _str(row, "kind", limit=50),
        "channel": channel,
        "model": _str(row, "model", limit=200),
        "model_provider": _str(row, "modelProvider", limit=100),
        "input_tokens": _int(row, "inputTokens"),
        "output_tokens": _int(row, "outputTokens"),
        "total_tokens": _int(row, "totalTokens"),
        "context_tokens": _int(row, "contextTokens"),
        "status": status,
        "has_active_run": active if isinstance(active, bool) else status == "running",
        "updated_at": from_ms(row.get("updatedAt")),
    }


def agent_fields(row: Mapping[str, Any], default_id: str) -> dict[str, Any]:
    identity = _dict(row, "identity")
    model = row.get("model")
    if isinstance(model, dict):
        model = model.get("primary")
    agent_id = str(row.get("id", ""))
    return {
        "agent_id": agent_id[:200],
        "name": _str(row, "name", limit=200) or _str(identity, "name", limit=200),
        "emoji": _str(identity, "emoji", limit=32) or _str(row, "emoji", limit=32),
        "identity": identity,
        "model": model[:200] if isinstance(model, str) else "",
        "is_default": agent_id == default_id,
    }


@dataclass
class SyncResult:
    created: list[int] = field(default_factory=list)
    updated: list[int] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)
    # Whether what the fleet counts (live sessions, running ones, per agent) moved: rows
    # came or went, or an update touched `has_active_run` or the agent.
    counts_changed: bool = False

    @property
    def changed_ids(self) -> list[int]:
        return self.created + self.updated + self.gone

    @property
    def rows_written(self) -> int:
        return len(self.created) + len(self.updated) + len(self.gone)


def reconcile_agents(
    gateway_id: int, payload: Any, *, merge: bool = False
) -> SyncResult:
    """Make the gateway's agents match `agents.list` (or the REST `agents_list` details,
    with merge=True: its rows carry less, so they are laid over what we know)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("agents"), list):
        raise ValueError("agents.list answer without an agents list")
    default_id = str(payload.get("defaultId") or payload.get("requester") or "")
    rows = {
        str(r["id"]): r
        for r in payload["agents"]
        if isinstance(r, dict) and isinstance(r.get("id"), str) and r["id"]
    }
    result = SyncResult()
    now = timezone.now()
    with transaction.atomic():
        existing = {a.agent_id: a for a in Agent.objects.filter(gateway_id=gateway_id)}
        to_create: list[Agent] = []
        to_update: list[Agent] = []
        for agent_id, row in rows.items():
            agent = existing.get(agent_id)
            raw = {**agent.raw, **row} if (merge and agent is not None) else dict(row)
            fields = agent_fields(
                raw, default_id or (agent_id if agent_id == "main" else "")
            )
            if agent is None:
                to_create.append(
                    Agent(gateway_id=gateway_id, raw=raw, synced_at=now, **fields)
                )
                continue
            if (
                agent.raw == raw
                and agent.gone_at is None
                and agent.is_default == fields["is_default"]
            ):
                continue
            for name, value in fields.items():
                setattr(agent, name, value)
            agent.raw, agent.gone_at, agent.synced_at = raw, None, now
            to_update.append(agent)
        gone = [
            agent
            for agent_id, agent in existing.items()
            if agent_id not in rows and agent.gone_at is None
        ]
        for agent in gone:
            agent.gone_at = now
        # In bulk: one statement per batch, not one per agent (100 agents on a sync).
        Agent.objects.bulk_create(to_create, batch_size=BULK_BATCH)
        if to_update:
            Agent.objects.bulk_update(
                to_update, AGENT_UPDATE_FIELDS, batch_size=BULK_BATCH
            )
        if gone:
            Agent.objects.filter(pk__in=[a.pk for a in gone]).update(gone_at=now)
        result.created = [a.pk for a in to_create]
        result.updated = [a.pk for a in to_update]
        result.gone = [a.pk for a in gone]
        if result.created:
            _link_sessions_to_agents(gateway_id)
    return result


AGENT_UPDATE_FIELDS = [
    "agent_id",
    "name",
    "emoji",
    "identity",
    "model",
    "is_default",
    "raw",
    "gone_at",
    "synced_at",
]


def _link_sessions_to_agents(gateway_id: int) -> None:
    """Sessions that arrived before their agent get linked once it is known: one UPDATE
    per agent that has such sessions (none on a first sync, when agents come first)."""
    waiting = set(
        Session.objects.filter(gateway_id=gateway_id, agent=None)
        .exclude(agent_key="")
        .values_list("agent_key", flat=True)
        .distinct()
    )
    if not waiting:
        return
    for agent in Agent.objects.filter(gateway_id=gateway_id, agent_id__in=waiting).only(
        "pk", "agent_id"
    ):
        Session.objects.filter(
            gateway_id=gateway_id, agent=None, agent_key=agent.agent_id
        ).update(agent=agent)


SESSION_UPDATE_FIELDS = [
    "agent",
    "agent_key",
    "session_id",
    "label",
    "display_name",
    "kind",
    "channel",
    "model",
    "model_provider",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "context_tokens",
    "status",
    "has_active_run",
    "updated_at",
    "gone_at",
    "raw",
    "raw_hash",
    "synced_at",
]


def reconcile_sessions(
    gateway_id: int, rows: Iterable[Any], *, complete: bool = True, merge: bool = False
) -> SyncResult:
    """See `_reconcile_sessions`. A row that someone else created meanwhile (the chat relay
    makes a session's row when its first stream event arrives) makes the insert conflict:
    then we read again and update it instead."""
    rows = list(rows)
    try:
        return _reconcile_sessions(gateway_id, rows, complete=complete, merge=merge)
    except IntegrityError:
        return _reconcile_sessions(gateway_id, rows, complete=complete, merge=merge)


def _reconcile_sessions(
    gateway_id: int, rows: list[Any], *, complete: bool, merge: bool
) -> SyncResult:
    """Make our sessions match the gateway's list, in bulk: create new rows, update rows
    whose content changed (compared by a hash of the raw row), and when the list is
    `complete`, mark rows it no longer has as gone (kept, with their history)."""
    incoming: dict[str, dict[str, Any]] = {}
    for row in rows:
        if isinstance(row, dict) and isinstance(row.get("key"), str) and row["key"]:
            incoming[row["key"][:512]] = row
    result = SyncResult()
    now = timezone.now()
    agent_rows = Agent.objects.filter(gateway_id=gateway_id)
    if not complete:
        # A few rows (an event): read only their agents and their sessions, not all.
        agent_rows = agent_rows.filter(
            agent_id__in={agent_id_from_key(k)[:200] for k in incoming}
        )
    agents = dict(agent_rows.values_list("agent_id", "pk"))
    columns = (
        "pk",
        "key",
        "raw_hash",
        "gone_at",
        "has_active_run",
        "agent_id",
        *(["raw"] if merge else []),
    )
    with transaction.atomic():
        sessions = Session.objects.filter(gateway_id=gateway_id).only(*columns)
        if complete:
            existing = {s.key: s for s in sessions}
        else:
            keys = list(incoming)
            existing = {
                s.key: s
                for start in range(0, len(keys), BULK_BATCH)
                for s in sessions.filter(key__in=keys[start : start + BULK_BATCH])
            }
        to_create: list[Session] = []
        to_update: list[Session] = []
        for key, row in incoming.items():
            current = existing.get(key)
            raw = {**current.raw, **row} if (merge and current is not None) else row
            digest = row_hash(raw)
            if (
                current is not None
                and current.raw_hash == digest
                and current.gone_at is None
            ):
                continue
            fields = session_fields(raw)
            session = current or Session(gateway_id=gateway_id)
            counted = (session.has_active_run, session.agent_id, session.gone_at)
            for name, value in fields.items():
                setattr(session, name, value)
            session.agent_id = agents.get(fields["agent_key"])
            if current is None or counted != (
                session.has_active_run,
                session.agent_id,
                None,  # a row the gateway lists again counts again
            ):
                result.counts_changed = True
            session.raw, session.raw_hash, session.gone_at, session.synced_at = (
                raw,
                digest,
                None,
                now,
            )
            (to_update if current is not None else to_create).append(session)
        _insert_sessions(gateway_id, to_create)
        _update_sessions(to_update)
        result.created = [s.pk for s in to_create]
        result.updated = [s.pk for s in to_update]
        if complete:
            gone = [
                s.pk
                for k, s in existing.items()
                if k not in incoming and s.gone_at is None
            ]
            for start in range(0, len(gone), BULK_BATCH):
                Session.objects.filter(pk__in=gone[start : start + BULK_BATCH]).update(
                    gone_at=now, has_active_run=False
                )
            result.gone = gone
            result.counts_changed |= bool(gone)
    return result


def _insert_sessions(gateway_id: int, sessions: list[Session]) -> None:
    """INSERT new rows with one prepared statement run many times (executemany), then read
    their ids back by key. Django's bulk_create compiles each value into its SQL in Python,
    which was most of an initial sync of 10,000 sessions (2 s of 2.4 s on SQLite)."""
    if not sessions:
        return
    fields = [f for f in Session._meta.concrete_fields if not f.primary_key]
    _executemany(
        f"INSERT INTO {_quote(Session._meta.db_table)} "
        f"({', '.join(_quote(f.column) for f in fields)}) "
        f"VALUES ({', '.join(['%s'] * len(fields))})",
        _values(fields, sessions),
    )
    keys = [s.key for s in sessions]
    ids: dict[str, int] = {}
    for start in range(0, len(keys), BULK_BATCH):
        ids.update(
            Session.objects.filter(
                gateway_id=gateway_id, key__in=keys[start : start + BULK_BATCH]
            ).values_list("key", "pk")
        )
    for s in sessions:
        s.pk = ids[s.key]
        s._state.adding = False


def _update_sessions(sessions: list[Session]) -> None:
    """UPDATE changed rows by id, one prepared statement run many times (bulk_update's one
    big CASE per column grows with the square of the rows on PostgreSQL)."""
    if not sessions:
        return
    fields: list[Any] = [
        Session._meta.get_field(name) for name in SESSION_UPDATE_FIELDS
    ]
    pk = Session._meta.pk
    assert pk is not None
    _executemany(
        f"UPDATE {_quote(Session._meta.db_table)} SET "
        f"{', '.join(f'{_quote(f.column)} = %s' for f in fields)} "
        f"WHERE {_quote(pk.column)} = %s",
        _values([*fields, pk], sessions),
    )


def _values(fields: list[Any], rows: list[Session]) -> list[list[Any]]:
    """Each row's values for `fields`, ready for the database. Only dates and JSON need a
    conversion: the other fields hold what session_fields() put there (str, int, bool,
    None), already the database's types."""
    db = connections[DEFAULT_DB_ALIAS]
    convert: list[Any] = []
    for f in fields:
        kind = f.get_internal_type()
        if kind == "DateTimeField":
            convert.append(db.ops.adapt_datetimefield_value)
        elif kind == "JSONField":
            convert.append(lambda value, f=f: f.get_db_prep_save(value, db))
        else:
            convert.append(None)
    names = [f.attname for f in fields]
    pairs = list(zip(names, convert, strict=True))
    return [
        [
            fn(getattr(row, name)) if fn is not None else getattr(row, name)
            for name, fn in pairs
        ]
        for row in rows
    ]


def _quote(name: str | None) -> str:
    assert name is not None
    return str(connections[DEFAULT_DB_ALIAS].ops.quote_name(name))


def _executemany(sql: str, params: list[list[Any]]) -> None:
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        for start in range(0, len(params), BULK_BATCH * 4):
            cursor.executemany(sql, params[start : start + BULK_BATCH * 4])


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


def _session_event(payload: Any) -> tuple[str, str, dict[str, Any] | None, bool]:
    """("upsert", key, fields, merge), ("delete", key, None, False) or ("resync", ...)."""
    if not isinstance(payload, dict):
        return ("resync", "", None, False)
    key = payload.get("sessionKey")
    row = payload.get("session")
    if not isinstance(key, str) or not key:
        if isinstance(row, dict) and isinstance(row.get("key"), str):
            key = row["key"]
        else:
            return ("resync", "", None, False)
    if payload.get("reason") == "delete" and not isinstance(row, dict):
        return ("delete", key, None, False)
    if isinstance(row, dict):
        return ("upsert", key, {**row, "key": row.get("key") or key}, False)
    fields = {k: v for k, v in payload.items() if k not in EVENT_META_KEYS}
    fields["key"] = key
    return ("upsert", key, fields, True)


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
            kind, key, fields, merge = _session_event(payload)
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
    return session.pk


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
                    "host": _str(entry, "host", limit=300),
                    "ip": _str(entry, "ip", limit=100),
                    "mode": _str(entry, "mode", limit=50),
                    "platform": _str(entry, "platform", limit=100),
                    "version": _str(entry, "version", limit=100),
                    "device_family": _str(entry, "deviceFamily", limit=100),
                    "roles": roles if isinstance(roles, list) else [],
                    "scopes": scopes if isinstance(scopes, list) else [],
                    "reason": _str(entry, "reason", limit=100),
                    "text": _str(entry, "text", limit=2000),
                    "last_input_seconds": _int(entry, "lastInputSeconds", 2**31 - 1),
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


# -- the worker lease ---------------------------------------------------------------------------


def claim_gateway(gateway_id: int, owner: str, channel: str) -> bool:
    """Take or renew this gateway for one worker: a conditional UPDATE, so when two workers
    race exactly one wins, with no row locks."""
    now = timezone.now()
    expires = now + timedelta(seconds=settings.GATEWAY_LEASE_SECONDS)
    free = (
        Q(lease_owner="")
        | Q(lease_owner=owner)
        | Q(lease_expires_at__lt=now)
        | Q(lease_expires_at=None)
    )
    return (
        Gateway.objects.filter(free, pk=gateway_id, enabled=True).update(
            lease_owner=owner, lease_expires_at=expires, worker_channel=channel
        )
        == 1
    )


def release_gateway(gateway_id: int, owner: str, error: str) -> None:
    updated = Gateway.objects.filter(pk=gateway_id, lease_owner=owner).update(
        lease_owner="",
        lease_expires_at=None,
        worker_channel="",
        state=State.OFFLINE,
        state_changed_at=timezone.now(),
        connected_since=None,
        not_connected_since=Coalesce("not_connected_since", Now()),
        last_error=error,
    )
    if updated:
        clear_live_state(gateway_id)


def gateways_to_run() -> list[Gateway]:
    return list(Gateway.objects.filter(enabled=True).order_by("pk"))
