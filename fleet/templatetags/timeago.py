"""`{% ago value %}`: the one way a page shows a past time relative to now.

It renders `templates/fleet/ago.html`: a `<time class="ago">` with the ISO moment in
`datetime` and the exact local time in `title`, whose text ("5 minutes ago") the static
`js/ago.js` keeps current between pushes. A value of None renders "–".
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django import template

register = template.Library()


@register.inclusion_tag("fleet/ago.html")
def ago(value: datetime | None) -> dict[str, Any]:
    return {"value": value}
