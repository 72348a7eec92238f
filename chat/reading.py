"""Reading the stored transcript: the newest page, the page before a message, a search, one
message. Sync ORM work returning fully loaded rows (the sender joined), so the chat views,
the chat socket (through `database_sync_to_async`) and the session page's transcript
(`{% session_transcript %}`) render them without a lazy query."""

from __future__ import annotations

from django.db.models import Q, QuerySet

from chat.models import Message
from chat.payloads import as_uuid
from fleet.models import Session

PAGE_SIZE = 50
SEARCH_LIMIT = 100


def recent_messages(
    session: Session, limit: int = PAGE_SIZE
) -> tuple[list[Message], bool]:
    """The newest `limit` messages, oldest first, and whether older ones exist."""
    rows = list(
        Message.objects.filter(session_id=session.pk)
        .select_related("sender")
        .order_by("-created_at", "-id")[: limit + 1]
    )
    more = len(rows) > limit
    return rows[:limit][::-1], more


def older_messages(
    session: Session, before: Message, limit: int = PAGE_SIZE
) -> tuple[list[Message], bool]:
    """The `limit` messages before `before`, oldest first, and whether older ones exist."""
    rows = list(
        Message.objects.filter(session_id=session.pk)
        .filter(
            Q(created_at__lt=before.created_at)
            | Q(created_at=before.created_at, id__lt=before.id)
        )
        .select_related("sender")
        .order_by("-created_at", "-id")[: limit + 1]
    )
    more = len(rows) > limit
    return rows[:limit][::-1], more


def search_messages(query: str, limit: int = SEARCH_LIMIT) -> QuerySet[Message]:
    return (
        Message.objects.filter(text__icontains=query)
        .select_related("session", "session__gateway")
        .order_by("-created_at")[:limit]
    )


def load_message(message_id: str) -> Message | None:
    """One message by its id as a string (from a channel-layer event), or None."""
    pk = as_uuid(message_id)
    if pk is None:
        return None
    return Message.objects.select_related("sender").filter(pk=pk).first()
