"""`{% nav_badges %}`: the registered navigation badges (fleet/nav.py) for the page's user."""

from __future__ import annotations

from typing import Any

from django import template
from django.utils.safestring import SafeString, mark_safe

from fleet.nav import render_badges

register = template.Library()


@register.simple_tag(takes_context=True)
def nav_badges(context: Any) -> SafeString:
    request = context.get("request")
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return mark_safe("")
    # Rendered from autoescaped templates: safe to include as it is.
    return mark_safe(render_badges(user))  # noqa: S308
