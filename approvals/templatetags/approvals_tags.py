from __future__ import annotations

from typing import Any

from django import template

from approvals.chat import TEMPLATE, cards_context

register = template.Library()


@register.inclusion_tag(TEMPLATE)
def approval_cards(session: Any, user: Any) -> dict[str, Any]:
    """The session's approval cards in the chat page (the consumer keeps them live)."""
    return cards_context(session.pk, user)
