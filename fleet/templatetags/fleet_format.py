"""Small display filters for the fleet pages (numbers that fit a phone screen)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from django import template
from django.utils import timezone
from django.utils.timesince import timesince
from django.utils.translation import get_language

register = template.Library()


@register.filter
def tokens(value: Any) -> str:
    """12345 -> "12.3k", 2500000 -> "2.5M", None -> "–"."""
    if value is None or value == "":
        return "–"
    try:
        n = float(value)
    except (TypeError, ValueError):
        return "–"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= limit:
            text = f"{n / limit:.1f}".removesuffix(".0")
            return f"{text}{suffix}"
    return str(int(n))


@register.filter
def percent(value: Any) -> str:
    if value is None:
        return ""
    try:
        return f"{float(value) * 100:.0f}%"
    except (TypeError, ValueError):
        return ""


# Below four weeks, `timesince` depends only on the whole minutes between the two times
# (its months and years are calendar work; weeks, days, hours and minutes are divisions).
_SHORT = timedelta(days=28)


@lru_cache(maxsize=4096)
def _since_minutes(minutes: int, language: str) -> str:
    now = datetime(2000, 1, 1, tzinfo=UTC)
    return timesince(now - timedelta(minutes=minutes), now)


@register.filter(is_safe=False)
def ago(value: Any) -> str:
    """Django's `timesince` (same text), cached by the minute: it renders for every row of
    the session list and of the gateway table, and its translations were half of a row's
    cost."""
    if not isinstance(value, datetime):
        return ""
    now = timezone.now() if timezone.is_aware(value) else datetime.now()
    delta = now - value
    if timedelta(0) <= delta < _SHORT:
        return _since_minutes(int(delta.total_seconds() // 60), get_language() or "")
    return timesince(value, now)
