"""Sending: the user's message is stored first (create_user_message), then handed to the
worker as `chat.send` with its audit event (asend_message); the worker records how it went
(record_send_outcome, registered from ChatConfig.ready) whether or not a page waits."""

from __future__ import annotations

import uuid
from typing import Any

from channels.db import database_sync_to_async
from django.db import IntegrityError, transaction

from chat.models import Message
from chat.payloads import as_uuid, text_or_empty
from fleet import audit
from fleet.calls import GatewayUnavailable, acall
from fleet.groups import session_group
from fleet.models import AuditEvent, Session

MAX_MESSAGE_CHARS = 20_000


def create_user_message(
    session: Session, user: Any, text: str, message_id: uuid.UUID
) -> tuple[Message, bool]:
    """The user's message, stored before it is sent. The id comes from the form, so a double
    submit finds the row made by the first one instead of making a second."""
    try:
        with transaction.atomic():
            return Message.objects.get_or_create(
                pk=message_id,
                defaults={
                    "session": session,
                    "role": Message.Role.USER,
                    "text": text,
                    "state": Message.State.PENDING,
                    "sender": user,
                    "run_id": str(message_id),
                },
            )
    except IntegrityError:
        return Message.objects.get(pk=message_id), False


def mark_sent(message_id: uuid.UUID, ack: Any) -> None:
    run_id = text_or_empty(ack.get("runId")) if isinstance(ack, dict) else ""
    updates: dict[str, Any] = {"state": Message.State.SENT, "error": ""}
    if run_id:
        updates["run_id"] = run_id[:200]
    Message.objects.filter(
        pk=message_id, state__in=[Message.State.PENDING, Message.State.ERROR]
    ).update(**updates)


def mark_failed(message_id: uuid.UUID, reason: str) -> None:
    Message.objects.filter(pk=message_id).exclude(state=Message.State.FINAL).update(
        state=Message.State.ERROR, error=reason[:2000]
    )


# -- the outcome (recorded by the worker) --------------------------------------------------


def _reply_error(reply: Any) -> str:
    if not isinstance(reply, dict) or reply.get("ok"):
        return ""
    error = reply.get("error")
    if not isinstance(error, dict):
        error = {}
    code, text = str(error.get("code", "")), str(error.get("message", "unknown error"))
    if code in ("UNAVAILABLE_HERE", "FORBIDDEN"):
        return text
    return f"The gateway refused the message: {text}"


def record_send_outcome(fields: dict[str, Any], reply: dict[str, Any]) -> None:
    """The recorder of `chat.send` (fleet.calls.register_recorder, in ChatConfig.ready): the
    worker runs it once the gateway answered, before it pushes to the session's pages. The
    message is sent, or failed with the reason; its audit event gets the result."""
    pk = as_uuid(str(fields.get("message_id", "")))
    error = _reply_error(reply)
    if pk is not None:
        if error:
            mark_failed(pk, error)
        else:
            payload = reply.get("payload") if isinstance(reply, dict) else None
            mark_sent(pk, payload if isinstance(payload, dict) else {})
    audit.finish_from_reply(str(fields.get("audit_id", "")), reply, error)


def _send_failed(message_id: uuid.UUID, event: AuditEvent, error: str) -> None:
    mark_failed(message_id, error)
    audit.finish_unless_recorded(event, False, error)


async def asend_message(
    session: Session, user: Any, message: Message, *, request: Any = None
) -> str:
    """Hand a stored user message (create_user_message) to the worker as `chat.send`, with
    its audit event. The worker records how it went (sent, or the gateway's error) and then
    pushes it to the session's pages: a page need not be open. Returns "", or the reason the
    call could not be handed over at all (stored on the message and the audit event)."""
    event = await database_sync_to_async(audit.record)(
        "chat.send",
        user=user,
        request=request,
        session=session,
        params={"message_id": str(message.pk), "chars": len(message.text)},
    )
    try:
        await acall(
            session.gateway_id,
            "chat.send",
            {
                "sessionKey": session.key,
                "message": message.text,
                "idempotencyKey": str(message.pk),
            },
            user=user,
            wait=False,
            record={
                "with": "chat.send",
                "message_id": str(message.pk),
                "audit_id": str(event.pk),
            },
            notify={
                "group": session_group(session.pk),
                "type": "chat.send_result",
                "message_id": str(message.pk),
            },
        )
    except (GatewayUnavailable, PermissionError) as exc:
        await database_sync_to_async(_send_failed)(message.pk, event, str(exc))
        return str(exc)
    return ""
