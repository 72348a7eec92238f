"""Persist and reconcile what gateways report. Plain sync functions: the worker calls them
through `database_sync_to_async`, the REST poller and the tests call them as they are.

Each function writes the database and returns what changed; pushing to browsers is the
caller's next step (database first, then push). One module per thing: `rows` (pure parsing,
no database), `reconcile`, `events` (`sessions.changed`), `presence`, `state` (the gateway's
connection state), `identity` (token, device key), `bootstrap` (the gateway from the
environment), `lease` and `summary` (the per-gateway counts and filter values kept on the
gateway row; import it as `fleet.services.summary`). `from fleet import services` keeps working: the names are
re-exported here."""

from __future__ import annotations

from fleet.services.bootstrap import (
    ensure_env_gateway,
)
from fleet.services.events import (
    BatchChange,
    SessionChange,
    apply_session_changed,
    apply_sessions_changed,
    mark_session_gone,
)
from fleet.services.identity import (
    device_key_for,
    gateway_token,
    rotate_device_identity,
    store_device_token,
)
from fleet.services.lease import (
    claim_gateway,
    gateways_to_run,
    release_gateway,
    renew_gateways,
)
from fleet.services.presence import (
    PRESENCE_CLOCK_FIELDS,
    clear_live_state,
    presence_key,
    replace_presence,
)
from fleet.services.reconcile import (
    AGENT_UPDATE_FIELDS,
    BULK_BATCH,
    SESSION_UPDATE_FIELDS,
    SyncResult,
    reconcile_agents,
    reconcile_sessions,
)
from fleet.services.rows import (
    EVENT_META_KEYS,
    INT64,
    agent_fields,
    agent_id_from_key,
    from_ms,
    row_hash,
    session_event,
    session_fields,
)
from fleet.services.state import (
    record_health,
    record_hello,
    set_state,
    touch_events,
    touch_events_many,
)

__all__ = [
    "AGENT_UPDATE_FIELDS",
    "BULK_BATCH",
    "BatchChange",
    "EVENT_META_KEYS",
    "INT64",
    "PRESENCE_CLOCK_FIELDS",
    "SESSION_UPDATE_FIELDS",
    "SessionChange",
    "SyncResult",
    "agent_fields",
    "agent_id_from_key",
    "apply_session_changed",
    "apply_sessions_changed",
    "claim_gateway",
    "clear_live_state",
    "device_key_for",
    "ensure_env_gateway",
    "from_ms",
    "gateway_token",
    "gateways_to_run",
    "mark_session_gone",
    "presence_key",
    "reconcile_agents",
    "reconcile_sessions",
    "record_health",
    "record_hello",
    "release_gateway",
    "renew_gateways",
    "replace_presence",
    "rotate_device_identity",
    "row_hash",
    "session_event",
    "session_fields",
    "set_state",
    "store_device_token",
    "touch_events",
    "touch_events_many",
]
