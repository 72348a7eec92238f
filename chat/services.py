"""Transcript persistence, shared by the worker and the chat views."""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction

from chat.models import Message
from fleet.gateway.protocol import chat_text
from fleet.models import Session
from fleet.services import agent_id_from_key


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
    except IntegrityError:
        return (
            Session.objects.filter(gateway_id=gateway_id, key=key)
            .values_list("pk", flat=True)
            .first()
        )
    return session.pk


def _message_identity(
    payload: dict[str, Any], message: dict[str, Any]
) -> tuple[str, int | None]:
    meta = (
        message.get("__openclaw") if isinstance(message.get("__openclaw"), dict) else {}
    )
    mid = payload.get("messageId") or meta.get("id") or ""
    seq = payload.get("messageSeq")
    if not isinstance(seq, int):
        seq = meta.get("seq") if isinstance(meta.get("seq"), int) else None
    return (mid if isinstance(mid, str) else ""), seq


def store_session_message(gateway_id: int, payload: Any) -> tuple[int, Any] | None:
    """Store one `session.message`; a message seen before (same gateway id) is skipped.
    Returns (session pk, message id) when something new was stored."""
    if not isinstance(payload, dict) or not isinstance(payload.get("sessionKey"), str):
        return None
    message = payload.get("message")
    if not isinstance(message, dict):
        return None
    role = message.get("role")
    if role not in Message.Role.values:
        return None
    gateway_message_id, seq = _message_identity(payload, message)
    if not gateway_message_id:
        # Protocol 3 first sends the user's message without an id, then again with one.
        return None
    session_pk = session_pk_for(gateway_id, payload["sessionKey"])
    if session_pk is None:
        return None
    if Message.objects.filter(
        session_id=session_pk, gateway_message_id=gateway_message_id
    ).exists():
        return None
    usage = message.get("usage") if isinstance(message.get("usage"), dict) else {}
    try:
        with transaction.atomic():
            stored = Message.objects.create(
                session_id=session_pk,
                role=role,
                text=chat_text(message),
                state=Message.State.FINAL,
                gateway_message_id=gateway_message_id[:200],
                gateway_seq=seq,
                model=str(message.get("model") or "")[:200],
                usage=usage,
                raw=message,
            )
    except IntegrityError:
        return None
    return session_pk, stored.pk
