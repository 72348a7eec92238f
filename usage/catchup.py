"""Usage's catch-up after a (re)connect, on a thread of its own (usage/apps.py): sessions
never seen get their history from `sessions.usage.timeseries` at the times it happened
(`backfill`), and runs that ended while no worker watched are booked from the points newer
than the session's mark (`recover`). The marks keep this and the event path's booking
(usage/ledger.py) from counting anything twice."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db import transaction
from django.db.models.fields.json import KT
from django.utils import timezone

from fleet.models import Session
from usage.ledger import (
    book_run_at,
    last_run_id,
    new_entry,
    roll_up_many,
    to_decimal,
)
from usage.models import UsageEntry, UsageMark

BACKFILL_SESSIONS = 200  # per (re)connect: the rest are booked from their counters


def unmarked_sessions(gateway_id: int, limit: int = BACKFILL_SESSIONS) -> list[str]:
    """Sessions with usage the ledger has never seen (no mark yet), newest first."""
    marked = UsageMark.objects.filter(gateway_id=gateway_id).values("session_key")
    return list(
        Session.objects.filter(gateway_id=gateway_id)
        .exclude(key__in=marked)
        .filter(input_tokens__gt=0)
        .order_by("-updated_at")
        .values_list("key", flat=True)[:limit]
    )


def _points(series: Any) -> list[tuple[int, int, int, Decimal]] | None:
    """A `sessions.usage.timeseries` answer's points (gateway ms, in, out, cost), oldest
    first; None for a refreshing cold cache (its zeros are not a fact) or no answer."""
    points = series.get("points") if isinstance(series, dict) else None
    if not isinstance(points, list):
        return None
    status = series.get("cacheStatus")
    if isinstance(status, dict) and status.get("status") == "refreshing":
        return None
    out = []
    for point in points[:1000]:
        if not isinstance(point, dict):
            continue
        ins, outs = point.get("input"), point.get("output")
        ins = ins if isinstance(ins, int) and ins > 0 else 0
        outs = outs if isinstance(outs, int) and outs > 0 else 0
        cost = to_decimal(point.get("cost"))
        ts = point.get("timestamp")
        if not isinstance(ts, int) or (not ins and not outs and not cost):
            continue
        out.append((ts, ins, outs, cost))
    out.sort(key=lambda p: p[0])
    return out


def _book_points(
    session: Session, mark: UsageMark, points: list[tuple[int, int, int, Decimal]]
) -> int:
    """Book the points after the mark's `point_ms` at the times they happened (in the
    caller's transaction): the newest is the run the row names when that run is not
    booked yet, the others ended unseen (no id to book them by: the mark keeps them
    once). Returns the entries made."""
    new = [p for p in points if p[0] > mark.point_ms]
    if not new:
        return 0
    run = last_run_id(session)
    if (
        run
        and UsageEntry.objects.filter(
            gateway_id=session.gateway_id, run_id=run
        ).exists()
    ):
        run = ""
    booked = 0
    entries: list[UsageEntry] = []
    for n, (ts, ins, outs, cost) in enumerate(new):
        when = datetime.fromtimestamp(ts / 1000, tz=timezone.get_current_timezone())
        if run and n == len(new) - 1:
            book_run_at(session, run, (ins, outs, cost), when)
            booked += 1
            continue
        entries.append(new_entry(session, (ins, outs, cost), when))
    # One INSERT for the rows and one write per rollup row (not three per point).
    UsageEntry.objects.bulk_create(entries)
    roll_up_many(entries)
    mark.point_ms = max(mark.point_ms, new[-1][0])
    return booked + len(entries)


def _session_and_points(
    gateway_id: int, key: str, series: Any
) -> tuple[Session, list[tuple[int, int, int, Decimal]]] | None:
    """The session and its timeseries points, or None when the answer holds no facts
    (a cold cache, no points) or the session is not stored."""
    points = _points(series)
    if points is None:
        return None
    session = Session.objects.filter(gateway_id=gateway_id, key=key).first()
    return None if session is None else (session, points)


def backfill(gateway_id: int, key: str, series: Any) -> int:
    """The first sight of a session: book its `sessions.usage.timeseries` points at the
    times they happened (the newest under the run the row names). A session already
    marked is left alone (`recover` books what it missed)."""
    found = _session_and_points(gateway_id, key, series)
    if found is None:
        return 0
    session, points = found
    with transaction.atomic():
        mark, created = UsageMark.objects.select_for_update().get_or_create(
            gateway_id=gateway_id,
            session_key=key,
            defaults={"gateway_session_id": session.session_id},
        )
        if not created:
            return 0
        booked = _book_points(session, mark, points)
        mark.save()
    return booked


def recover(gateway_id: int, key: str, series: Any) -> int:
    """After a worker was down: book the runs of a marked session that ended unseen (its
    timeseries points newer than the mark), once; the run its row names last under its
    id, so the row's own booking finds it booked."""
    found = _session_and_points(gateway_id, key, series)
    if found is None:
        return 0
    session, points = found
    with transaction.atomic():
        mark = (
            UsageMark.objects.select_for_update()
            .filter(gateway_id=gateway_id, session_key=key)
            .first()
        )
        if mark is None:
            return 0
        booked = _book_points(session, mark, points)
        if booked:
            mark.save(update_fields=["point_ms"])
    return booked


def missed_sessions(gateway_id: int, limit: int = BACKFILL_SESSIONS) -> list[str]:
    """Marked sessions whose row changed after the newest usage booked and names another
    run than the one booked (or none: a run under way): runs may have ended unseen."""
    marks = {
        key: (run, ms)
        for key, run, ms in UsageMark.objects.filter(gateway_id=gateway_id).values_list(
            "session_key", "last_run_id", "point_ms"
        )
    }
    found: list[str] = []
    rows = (
        Session.objects.filter(gateway_id=gateway_id, gone_at__isnull=True)
        .annotate(run=KT("raw__lastRunId"), at=KT("raw__updatedAt"))
        .values_list("key", "run", "at")
        .order_by("-updated_at")
    )
    for key, run, at in rows.iterator():
        if key not in marks:
            continue
        booked_run, booked_ms = marks[key]
        try:
            touched = int(at or 0) > booked_ms
        except ValueError:
            touched = False
        if touched and (run or "") != booked_run:
            found.append(key)
            if len(found) >= limit:
                break
    return found
