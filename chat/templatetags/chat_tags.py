from __future__ import annotations

import json
from typing import Any

from django import template
from django.utils.safestring import SafeString

from chat import reading
from chat.markdown import render_markdown

register = template.Library()
# The session page shows the newest of the transcript; the chat page has all of it.
SESSION_PAGE_MESSAGES = 30


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


@register.inclusion_tag("chat/transcript.html")
def session_transcript(session: Any) -> dict[str, Any]:
    """`{% session_transcript session %}`: the session page's recent transcript, drawn with
    the chat's message partial. The fleet's template loads this library (its page and its
    live re-render alike); fleet's code does not import chat."""
    messages, more = reading.recent_messages(session, SESSION_PAGE_MESSAGES)
    return {"messages": messages, "more": more, "session": session}
