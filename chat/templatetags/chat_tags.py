from __future__ import annotations

import json
from typing import Any

from django import template
from django.utils.safestring import SafeString

from chat.markdown import render_markdown

register = template.Library()


@register.filter
def markdown(text: str) -> SafeString:
    """Untrusted Markdown to sanitized HTML (see chat/markdown.py)."""
    return render_markdown(text)


@register.filter
def pretty_json(value: Any) -> str:
    """Tool arguments and results, as indented JSON text (escaped by the template)."""
    if isinstance(value, str):
        return value[:20_000]
    try:
        return json.dumps(value, indent=2, ensure_ascii=False, default=str)[:20_000]
    except (TypeError, ValueError):
        return str(value)[:20_000]
