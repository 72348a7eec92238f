"""The approval cards of one chat session: what the chat page shows (through the
`approval_cards` tag) and what the chat consumer re-renders when a note says they moved."""

from __future__ import annotations

from typing import Any

from django.template.loader import render_to_string
from django.urls import reverse

from approvals import services
from approvals.models import Approval
from fleet.models import Session

TEMPLATE = "approvals/chat_cards.html"
RECENT = 10


def cards_context(session_pk: int, user: Any) -> dict[str, Any]:
    session = Session.objects.filter(pk=session_pk).only("gateway_id", "key").first()
    rows: list[Approval] = []
    if session is not None:
        rows = list(
            Approval.objects.filter(
                gateway_id=session.gateway_id, session_key=session.key
            )
            .select_related("gateway")
            .order_by("-requested_at")[:RECENT]
        )
        rows.reverse()
    return {
        "cards": rows,
        "session_pk": session_pk,
        "can_decide": services.can_decide(user),
        "can_allow_always": services.can_allow_always(user),
        "next": reverse("chat:session", args=[session_pk]),
    }


def render_cards(session_pk: int, user: Any, oob: bool = False) -> str:
    context = cards_context(session_pk, user)
    context["oob"] = oob
    return render_to_string(TEMPLATE, context)
