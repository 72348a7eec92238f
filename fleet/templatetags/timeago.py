"""`{% ago value %}`: the one way a page shows a past time relative to now.

It renders a `<time class="ago">` with the ISO moment in `datetime` and the exact local
time in `title`, whose text ("5 minutes ago") the static `js/ago.js` keeps current between
pushes. A value of None renders "–". The markup is `templates/fleet/ago.html`'s, built here
in Python: the tag renders for every row of the session list and of the gateway table, and
an inclusion template plus `timesince`'s translations per row were most of a row's cost.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache

from django import template
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.timesince import timesince
from django.utils.translation import get_language

register = template.Library()

# Below four weeks, `timesince` depends only on the whole minutes between the two times
# (its months and years are calendar work; weeks, days, hours and minutes are divisions).
_SHORT = timedelta(days=28)


@lru_cache(maxsize=4096)
def _since_minutes(minutes: int, language: str) -> str:
    now = datetime(2000, 1, 1, tzinfo=UTC)
    return timesince(now - timedelta(minutes=minutes), now)


def since(value: datetime) -> str:
    """Django's `timesince(value)` (the same text), cached by the minute."""
    now = timezone.now() if timezone.is_aware(value) else datetime.now()
    delta = now - value
    if timedelta(0) <= delta < _SHORT:
        return _since_minutes(int(delta.total_seconds() // 60), get_language() or "")
    return timesince(value, now)


@register.simple_tag
def ago(value: datetime | None) -> SafeString | str:
    if not isinstance(value, datetime):
        return "–"
    local = timezone.localtime(value) if timezone.is_aware(value) else value
    # The same text as the date formats "c" and "Y-m-d H:i:s e", without dateformat's
    # per-call parsing (a third of the tag's time).
    return format_html(
        '<time class="ago" datetime="{}" title="{}">{} ago</time>',
        local.isoformat(),
        local.strftime("%Y-%m-%d %H:%M:%S ") + (local.tzname() or ""),
        since(value),
    )
