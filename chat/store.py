"""Storing the transcript: one row per message however many ways we learn about it. Shared
by the worker (chat/relay.py, on its store lane) and the chat socket's back-fill.

The user's message is stored by the view before it is sent (chat/sending.py); its id is the
`idempotencyKey`, and so the gateway's `runId`. When the gateway later echoes it
(`session.message`, `chat.history`), the echo is matched to that row (by idempotency key or
run id, else by text) and fills in the gateway's message id. The assistant's reply is one
row per run: whichever comes first, the transcript entry or the run's terminal `chat` event,
creates it; the other completes it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from channels.db import database_sync_to_async
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from chat.models import Message
from chat.payloads import (
    as_uuid,
    entry_identity,
    entry_meta,
    entry_timestamp,
    entry_usage,
    text_or_empty,
)
from fleet.calls import GatewayCallFailed, GatewayUnavailable, acall
from fleet.gateway.protocol import chat_text
from fleet.models import Session
from fleet.services import agent_id_from_key, summary

HISTORY_LIMIT = 1000
HISTORY_TIMEOUT = 10.0
# How far back an echo without ids may be matched to a message of ours by its text.
MATCH_WINDOW = timedelta(hours=6)
INTERRUPTED = (
    "The gateway connection dropped during the run; the reply may be incomplete."
)


@dataclass(frozen=True)
class Stored:
    session_pk: int
    message_id: uuid.UUID
    role: str
    run_id: str


def session_pk_for(gateway_id: int, key: str) -> int | None:
    """The session's primary key; a session the gateway just started is created here so its
    stream has somewhere to go (the next list sync fills in the rest)."""
    pk = (
        Session.objects.filter(gateway_id=gateway_id, key=key)
        .values_list("pk", flat=True)
        .first()
    )
    if pk is not None:
        return pk
    try:
        with transaction.atomic():
            session = Session.objects.create(
                gateway_id=gateway_id, key=key[:512], agent_key=agent_id_from_key(key)
            )
            summary.refresh_counts(gateway_id)
    except IntegrityError:
        return (
            Session.objects.filter(gateway_id=gateway_id, key=key)
            .values_list("pk", flat=True)
            .first()
        )
    return session.pk


def _find_own_user_message(
    session_pk: int, keys: list[str], text: str
) -> Message | None:
    """Our stored user message that this echo is: by idempotency key / run id, else the
    latest of ours not yet matched whose text the echo contains (protocol 3 wraps the text
    in sender metadata)."""
    ours = Message.objects.filter(
        session_id=session_pk, role=Message.Role.USER, gateway_message_id=""
    )
    for key in keys:
        as_id = as_uuid(key)
        found = (
            ours.filter(Q(pk=as_id) | Q(run_id=key)).first()
            if as_id
            else ours.filter(run_id=key).first()
        )
        if found is not None:
            return found
    since = timezone.now() - MATCH_WINDOW
    for candidate in ours.filter(created_at__gte=since, sender__isnull=False).order_by(
        "-created_at"
    )[:5]:
        if candidate.text and (candidate.text == text or candidate.text in text):
            return candidate
    return None


def _find_run_reply(
    session_pk: int, run_id: str, text: str, *, from_transcript: bool
) -> Message | None:
    """The assistant row of a run. By run id; failing that, the row the other source made
    without it: a transcript echo (no run id) looks for a run end's row not yet matched to
    the transcript, and a run end looks for a transcript row without a run id."""
    replies = Message.objects.filter(session_id=session_pk, role=Message.Role.ASSISTANT)
    if run_id:
        found = replies.filter(run_id=run_id).first()
        if found is not None or from_transcript:
            return found
    since = timezone.now() - MATCH_WINDOW
    candidates = replies.filter(created_at__gte=since, text=text)
    if from_transcript:
        candidates = candidates.filter(gateway_message_id="").exclude(run_id="")
    else:
        candidates = candidates.filter(run_id="").exclude(gateway_message_id="")
    return candidates.order_by("-created_at").first()


def store_transcript_entry(
    session_pk: int,
    message: dict[str, Any],
    gateway_message_id: str,
    seq: int | None,
    run_hint: str = "",
) -> Message | None:
    """Store one transcript message (from `session.message` or `chat.history`), or complete
    the row we already have for it. Returns the row when something changed, else None."""
    role = message.get("role")
    if role not in Message.Role.values:
        return None
    gateway_message_id = gateway_message_id[:200]
    existing = Message.objects.filter(session_id=session_pk)
    if gateway_message_id:
        if existing.filter(gateway_message_id=gateway_message_id).exists():
            return None
    elif seq is not None:
        if existing.filter(gateway_seq=seq).exists():
            return None
    else:
        return None  # nothing identifies it; a later copy with an id will
    meta = entry_meta(message)
    idem = text_or_empty(meta.get("idempotencyKey"))
    run_id = text_or_empty(meta.get("runId")) or run_hint
    text = chat_text(message)
    row: Message | None = None
    if role == Message.Role.USER:
        row = _find_own_user_message(session_pk, [k for k in (idem, run_id) if k], text)
        if row is not None:
            row.state = Message.State.FINAL
            row.error = ""
    elif role == Message.Role.ASSISTANT:
        row = _find_run_reply(session_pk, run_id, text, from_transcript=True)
        if row is not None:
            if row.error == INTERRUPTED:
                # The run did finish on the gateway; the transcript has its reply.
                row.state, row.error = Message.State.FINAL, ""
                row.text = text
            elif not row.text:
                row.text = text
            row.model = row.model or text_or_empty(message.get("model"))[:200]
            row.usage = row.usage or entry_usage(message)
            row.run_id = row.run_id or run_id[:200]
    try:
        with transaction.atomic():
            if row is not None:
                row.gateway_message_id = gateway_message_id
                row.gateway_seq = seq
                tools = row.tool_calls
                row.raw = {**message, "tools": tools} if tools else message
                row.save()
                return row
            return Message.objects.create(
                session_id=session_pk,
                role=role,
                text=text,
                state=Message.State.FINAL,
                run_id=run_id[:200],
                gateway_message_id=gateway_message_id,
                gateway_seq=seq,
                model=text_or_empty(message.get("model"))[:200],
                usage=entry_usage(message),
                raw=message,
                created_at=entry_timestamp(message) or timezone.now(),
            )
    except IntegrityError:
        return None


def store_session_message(
    gateway_id: int, payload: Any, run_hint: str = ""
) -> Stored | None:
    """Store one `session.message` event. Returns what changed, or None (seen before).
    `run_hint` is the run in flight in that session, if the caller knows it."""
    if not isinstance(payload, dict) or not isinstance(payload.get("sessionKey"), str):
        return None
    message = payload.get("message")
    if not isinstance(message, dict):
        return None
    gateway_message_id, seq = entry_identity(payload, message)
    if not gateway_message_id:
        # Protocol 3 first sends the user's message without an id, then again with one.
        return None
    session_pk = session_pk_for(gateway_id, payload["sessionKey"])
    if session_pk is None:
        return None
    row = store_transcript_entry(
        session_pk,
        message,
        gateway_message_id,
        seq,
        text_or_empty(payload.get("runId")) or run_hint,
    )
    if row is None:
        return None
    return Stored(session_pk, row.pk, row.role, row.run_id)


def store_history(session_pk: int, payload: Any) -> int:
    """Back-fill from a `chat.history` answer; returns how many rows changed. The session is
    marked synced either way, so the next page view does not ask again."""
    changed = 0
    messages = payload.get("messages") if isinstance(payload, dict) else None
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        mid, seq = entry_identity({}, message)
        if store_transcript_entry(session_pk, message, mid, seq) is not None:
            changed += 1
    Session.objects.filter(pk=session_pk).update(history_synced_at=timezone.now())
    return changed


def forget_history_sync(gateway_id: int) -> None:
    """After a connection loss, events may have been missed: back-fill again on next view."""
    Session.objects.filter(
        gateway_id=gateway_id, history_synced_at__isnull=False
    ).update(history_synced_at=None)


# -- run ends (the worker) ---------------------------------------------------------------


def store_run_end(
    session_pk: int,
    run_id: str,
    *,
    state: str,
    text: str,
    error: str = "",
    model: str = "",
    usage: dict[str, Any] | None = None,
    duration_ms: int | None = None,
    raw: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> Stored:
    """The assistant's row for a finished run (final, error, aborted or interrupted)."""
    row = _find_run_reply(session_pk, run_id, text, from_transcript=False)
    if row is None:
        row = Message(session_id=session_pk, role=Message.Role.ASSISTANT)
    if text or not row.text:
        row.text = text if text else row.text
    row.run_id = run_id[:200]
    row.state = state
    row.error = error[:2000]
    row.model = model[:200] or row.model
    row.usage = usage or row.usage
    if duration_ms is not None:
        row.duration_ms = duration_ms
    if raw is not None and not row.gateway_message_id:
        row.raw = raw
    if tools:
        row.raw = {**(row.raw if isinstance(row.raw, dict) else {}), "tools": tools}
    row.save()
    # Our user message of this run was accepted: it is no longer "pending".
    as_id = as_uuid(run_id)
    if as_id is not None:
        Message.objects.filter(
            pk=as_id, session_id=session_pk, state=Message.State.PENDING
        ).update(state=Message.State.SENT)
    return Stored(session_pk, row.pk, row.role, row.run_id)


async def abackfill(session: Session, user: Any) -> int:
    """Back-fill a session's transcript from the gateway's `chat.history` (first view, or
    first after a reconnect). Returns how many rows changed; 0 when the gateway cannot be
    asked now (the stored transcript stays as it is)."""
    try:
        history = await acall(
            session.gateway_id,
            "chat.history",
            {"sessionKey": session.key, "limit": HISTORY_LIMIT},
            user=user,
            timeout=HISTORY_TIMEOUT,
        )
    except (GatewayUnavailable, GatewayCallFailed, PermissionError):
        return 0
    changed: int = await database_sync_to_async(store_history)(session.pk, history)
    return changed
