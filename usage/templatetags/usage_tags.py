"""`{% session_usage session %}`: the session page's cost over time and its runs, from the
ledger (the fleet's template loads this library; fleet's code does not import usage)."""

from __future__ import annotations

from typing import Any

from django import template

from usage.queries import session_usage as read_session_usage

register = template.Library()


@register.inclusion_tag("usage/session_usage.html")
def session_usage(session: Any) -> dict[str, Any]:
    return read_session_usage(session.gateway_id, session.key)


@register.inclusion_tag("usage/budget_states.html")
def budget_states() -> dict[str, Any]:
    """The fleet page's budget strip (the usage page has the same in full)."""
    from usage.budgets import states

    return {"budgets": states()}
