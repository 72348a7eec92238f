"""The approval cards of one chat session: what the chat page shows (through the
`approval_cards` tag) and what the chat consumer re-renders when a note says they moved."""

from __future__ import annotations

from collections import OrderedDict
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


# One note reaches every open page of the session: the first page renders, the others with
# the same rights reuse it (50 pages cost one query and one render per kind of viewer).
_rendered: OrderedDict[tuple[int, str, bool, bool], str] = OrderedDict()
RENDERED_KEPT = 64


def render_cards(session_pk: int, user: Any, oob: bool = False, note: str = "") -> str:
    rights = (services.can_decide(user), services.can_allow_always(user))
    key = (session_pk, note, *rights)
    if note and oob and key in _rendered:
        return _rendered[key]
    context = cards_context(session_pk, user)
    context["oob"] = oob
    html = render_to_string(TEMPLATE, context)
    if note and oob:
        _rendered[key] = html
        while len(_rendered) > RENDERED_KEPT:
            _rendered.popitem(last=False)
    return html
