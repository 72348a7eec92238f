"""Booking usage: sync functions the worker calls (wrapped once in usage/apps.py).

The source of truth is the session's own counters (`inputTokens`, `outputTokens`,
`estimatedCostUsd`), as the fleet stored them: each growth past the high-water mark
(UsageMark) becomes one ledger row, in the same transaction as the mark moves, so a replay,
a resync or a restarted worker books nothing twice. A run's final `chat` event names the
run: the growth it caused is booked under its run id and the person who sent it from our
chat. A new gateway session id (a reset) starts from zero; a counter that went down
otherwise moves the mark down and books nothing (no negative usage)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from fleet.models import Session
from usage.models import UsageDay, UsageEntry, UsageMark, UsageSessionDay

ZERO = Decimal(0)
# A final `chat` event that arrives after its growth was booked names that row if it was
# booked this recently without a run.
ATTRIBUTE_WINDOW = timedelta(minutes=10)


def _decimal(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return ZERO
    try:
        found = Decimal(str(value))
    except InvalidOperation:
        return ZERO
    if not found.is_finite() or found < 0 or found > Decimal("1e8"):
        return ZERO
    return found.quantize(Decimal("0.000001"))


def session_cost(session: Session) -> Decimal:
    raw = session.raw if isinstance(session.raw, dict) else {}
    return _decimal(raw.get("estimatedCostUsd"))


def _cache_tokens(session: Session) -> tuple[int, int]:
    raw = session.raw if isinstance(session.raw, dict) else {}
    out = []
    for name in ("cacheRead", "cacheWrite"):
        value = raw.get(name)
        out.append(value if isinstance(value, int) and value > 0 else 0)
    return out[0], out[1]


def _person_id(session: Session, run_id: str) -> int | None:
    if not run_id:
        return None
    from chat.models import Message

    found: int | None = (
        Message.objects.filter(
            session=session, run_id=run_id, role=Message.Role.USER, sender__isnull=False
        )
        .values_list("sender_id", flat=True)
        .first()
    )
    return found


def book_session(
    session: Session, *, run_id: str = "", now: datetime | None = None
) -> UsageEntry | None:
    """Book the growth of one session's counters since the mark; returns the new row."""
    now = now or timezone.now()
    ins = max(session.input_tokens or 0, 0)
    outs = max(session.output_tokens or 0, 0)
    cost = session_cost(session)
    with transaction.atomic():
        mark, _ = UsageMark.objects.select_for_update().get_or_create(
            gateway_id=session.gateway_id,
            session_key=session.key,
            defaults={"gateway_session_id": session.session_id},
        )
        base_in, base_out, base_cost = (
            mark.input_tokens,
            mark.output_tokens,
            mark.cost_usd,
        )
        if (
            session.session_id
            and mark.gateway_session_id
            and session.session_id != mark.gateway_session_id
        ):
            base_in, base_out, base_cost = (
                0,
                0,
                ZERO,
            )  # a new transcript: its own counters
        d_in, d_out, d_cost = ins - base_in, outs - base_out, cost - base_cost
        run = run_id or mark.pending_run_id
        entry = None
        if d_in > 0 or d_out > 0 or d_cost > 0:
            if (
                run
                and UsageEntry.objects.filter(
                    gateway_id=session.gateway_id, run_id=run
                ).exists()
            ):
                run = ""  # that run is booked already; this growth is another one's
            entry = UsageEntry.objects.create(
                gateway_id=session.gateway_id,
                session=session,
                session_key=session.key,
                gateway_session_id=session.session_id,
                agent_key=session.agent_key,
                model=session.model,
                provider=session.model_provider,
                channel=session.channel,
                run_id=run[:200],
                person_id=_person_id(session, run),
                input_tokens=max(d_in, 0),
                output_tokens=max(d_out, 0),
                cost_usd=max(d_cost, ZERO),
                occurred_at=now,
            )
            _roll_up(entry)
            mark.pending_run_id = ""
        elif run_id:
            mark.pending_run_id = run_id[:200]  # its growth comes with the next row
        # Up, or down after a reset: the mark follows the counters, never books a decrease.
        mark.gateway_session_id = session.session_id or mark.gateway_session_id
        mark.input_tokens, mark.output_tokens, mark.cost_usd = ins, outs, cost
        mark.updated_at = now
        mark.save()
    return entry


def _roll_up(entry: UsageEntry, session_day: bool = True) -> None:
    """Add the ledger row to the daily rollups (in the caller's transaction); a row that
    only moves to its person is already in the per-session one."""
    if session_day:
        _roll_up_session(entry)
    key = {
        "day": timezone.localdate(entry.occurred_at),
        "gateway_id": entry.gateway_id,
        "agent_key": entry.agent_key,
        "model": entry.model,
        "provider": entry.provider,
        "channel": entry.channel,
        "person_id": entry.person_id,
    }
    grow = {
        "runs": F("runs") + 1,
        "input_tokens": F("input_tokens") + entry.input_tokens,
        "output_tokens": F("output_tokens") + entry.output_tokens,
        "cache_read_tokens": F("cache_read_tokens") + entry.cache_read_tokens,
        "cache_write_tokens": F("cache_write_tokens") + entry.cache_write_tokens,
        "cost_usd": F("cost_usd") + entry.cost_usd,
    }
    if not UsageDay.objects.filter(**key).update(**grow):
        UsageDay.objects.create(
            **key,
            runs=1,
            input_tokens=entry.input_tokens,
            output_tokens=entry.output_tokens,
            cache_read_tokens=entry.cache_read_tokens,
            cache_write_tokens=entry.cache_write_tokens,
            cost_usd=entry.cost_usd,
        )


def _roll_up_many(entries: list[UsageEntry]) -> None:
    """`_roll_up` for many new rows of one session (a backfill): the sums per rollup row,
    one UPDATE (or INSERT) each, not two per ledger row."""
    days: dict[tuple[Any, ...], list[UsageEntry]] = {}
    session_days: dict[tuple[Any, ...], list[UsageEntry]] = {}
    for e in entries:
        day = timezone.localdate(e.occurred_at)
        days.setdefault(
            (
                day,
                e.gateway_id,
                e.agent_key,
                e.model,
                e.provider,
                e.channel,
                e.person_id,
            ),
            [],
        ).append(e)
        session_days.setdefault(
            (day, e.gateway_id, e.session_key, e.agent_key, e.model), []
        ).append(e)
    for (day, gw, agent, model, provider, channel, person), group in days.items():
        key = {
            "day": day,
            "gateway_id": gw,
            "agent_key": agent,
            "model": model,
            "provider": provider,
            "channel": channel,
            "person_id": person,
        }
        sums: dict[str, Any] = {
            "runs": len(group),
            "input_tokens": sum(e.input_tokens for e in group),
            "output_tokens": sum(e.output_tokens for e in group),
            "cache_read_tokens": sum(e.cache_read_tokens for e in group),
            "cache_write_tokens": sum(e.cache_write_tokens for e in group),
            "cost_usd": sum((e.cost_usd for e in group), ZERO),
        }
        if not UsageDay.objects.filter(**key).update(
            **{name: F(name) + value for name, value in sums.items()}
        ):
            UsageDay.objects.create(**key, **sums)
    for (day, gw, session_key, agent, model), group in session_days.items():
        key = {
            "day": day,
            "gateway_id": gw,
            "session_key": session_key,
            "agent_key": agent,
            "model": model,
        }
        sums = {
            "runs": len(group),
            "input_tokens": sum(e.input_tokens for e in group),
            "output_tokens": sum(e.output_tokens for e in group),
            "cost_usd": sum((e.cost_usd for e in group), ZERO),
        }
        grow: dict[str, Any] = {name: F(name) + value for name, value in sums.items()}
        session_id = group[-1].session_id
        if session_id is not None:
            grow["session_id"] = session_id
        if not UsageSessionDay.objects.filter(**key).update(**grow):
            UsageSessionDay.objects.create(**key, session_id=session_id, **sums)


def _roll_up_session(entry: UsageEntry) -> None:
    key = {
        "day": timezone.localdate(entry.occurred_at),
        "gateway_id": entry.gateway_id,
        "session_key": entry.session_key,
        "agent_key": entry.agent_key,
        "model": entry.model,
    }
    grow: dict[str, Any] = {
        "runs": F("runs") + 1,
        "input_tokens": F("input_tokens") + entry.input_tokens,
        "output_tokens": F("output_tokens") + entry.output_tokens,
        "cost_usd": F("cost_usd") + entry.cost_usd,
    }
    if entry.session_id is not None:
        grow["session_id"] = entry.session_id  # the link the page shows: the newest row
    if not UsageSessionDay.objects.filter(**key).update(**grow):
        UsageSessionDay.objects.create(
            **key,
            session_id=entry.session_id,
            runs=1,
            input_tokens=entry.input_tokens,
            output_tokens=entry.output_tokens,
            cost_usd=entry.cost_usd,
        )


def book_key(gateway_id: int, key: str, run_id: str = "") -> UsageEntry | None:
    session = Session.objects.filter(gateway_id=gateway_id, key=key).first()
    if session is None:
        return None
    return book_session(session, run_id=run_id)


def book_keys(gateway_id: int, keys: Iterable[str]) -> int:
    """A run of `sessions.changed`: book the sessions whose counters moved past their marks.
    Two queries for the whole run; a row and its mark are written only where something grew
    or a transcript was reset, so status-only changes cost nothing more."""
    wanted = set(keys)
    if not wanted:
        return 0
    marks = {
        mark.session_key: mark
        for mark in UsageMark.objects.filter(
            gateway_id=gateway_id, session_key__in=wanted
        )
    }
    booked = 0
    for session in Session.objects.filter(gateway_id=gateway_id, key__in=wanted):
        mark = marks.get(session.key)
        if mark is not None and _at_mark(session, mark):
            continue
        if book_session(session) is not None:
            booked += 1
    return booked


def _at_mark(session: Session, mark: UsageMark) -> bool:
    return (
        max(session.input_tokens or 0, 0) == mark.input_tokens
        and max(session.output_tokens or 0, 0) == mark.output_tokens
        and session_cost(session) == mark.cost_usd
        and (not session.session_id or session.session_id == mark.gateway_session_id)
    )


def book_run(gateway_id: int, key: str, run_id: str) -> None:
    """A run's final `chat` event: book its growth under its id, or, when the session's
    row already brought the growth, name the row it made."""
    if not run_id:
        return
    if UsageEntry.objects.filter(gateway_id=gateway_id, run_id=run_id).exists():
        return
    if book_key(gateway_id, key, run_id) is not None:
        return
    recent = (
        UsageEntry.objects.filter(
            gateway_id=gateway_id,
            session_key=key,
            run_id="",
            occurred_at__gte=timezone.now() - ATTRIBUTE_WINDOW,
        )
        .order_by("-occurred_at", "-pk")
        .first()
    )
    if recent is not None:
        session = Session.objects.filter(gateway_id=gateway_id, key=key).first()
        person = _person_id(session, run_id) if session else None
        with transaction.atomic():
            UsageEntry.objects.filter(pk=recent.pk, run_id="").update(
                run_id=run_id[:200], person_id=person
            )
            if person is not None:
                # Move the row's share of the rollup to the person.
                _move_to_person(recent, person)
        UsageMark.objects.filter(
            gateway_id=gateway_id, session_key=key, pending_run_id=run_id[:200]
        ).update(pending_run_id="")


def _move_to_person(entry: UsageEntry, person_id: int) -> None:
    key = {
        "day": timezone.localdate(entry.occurred_at),
        "gateway_id": entry.gateway_id,
        "agent_key": entry.agent_key,
        "model": entry.model,
        "provider": entry.provider,
        "channel": entry.channel,
    }
    UsageDay.objects.filter(**key, person_id=None).update(
        runs=F("runs") - 1,
        input_tokens=F("input_tokens") - entry.input_tokens,
        output_tokens=F("output_tokens") - entry.output_tokens,
        cache_read_tokens=F("cache_read_tokens") - entry.cache_read_tokens,
        cache_write_tokens=F("cache_write_tokens") - entry.cache_write_tokens,
        cost_usd=F("cost_usd") - entry.cost_usd,
    )
    entry.person_id = person_id
    _roll_up(entry, session_day=False)


def rebuild(gateway_id: int, seen: SeenCounters | None = None) -> int:
    """After a (re)connect and its sync: book what grew while nobody watched, from the
    session counters the sync just stored. Idempotent (the marks). With `seen`, the
    counters now booked are remembered, so the events that follow cost no look."""
    booked = 0
    start = 0
    while True:
        chunk = list(
            Session.objects.filter(gateway_id=gateway_id, pk__gt=start)
            .order_by("pk")
            .only("pk", "key", "input_tokens", "output_tokens", "session_id", "raw")[
                :REBUILD_CHUNK
            ]
        )
        if not chunk:
            return booked
        start = chunk[-1].pk
        # One commit per chunk (each session's booking is a savepoint inside it).
        with transaction.atomic():
            booked += book_keys(gateway_id, [s.key for s in chunk])
        if seen is not None:
            seen.remember(gateway_id, {s.key: _counters(s) for s in chunk})


def _counters(session: Session) -> tuple[Any, ...]:
    """A stored session's counters as a `sessions.changed` row names them (COUNTER_FIELDS)."""
    raw = session.raw if isinstance(session.raw, dict) else {}
    return tuple(raw.get(name) for name in COUNTER_FIELDS)


REBUILD_CHUNK = 200


COUNTER_FIELDS = ("inputTokens", "outputTokens", "estimatedCostUsd", "sessionId")


class SeenCounters:
    """What the worker last booked for each session, in memory, so that the many
    `sessions.changed` whose counters did not move (a label, a status, a run's phase) cost
    no database hop. The marks in the database stay the authority: a payload that names
    counters unlike the remembered ones only sends its key to `book_keys` for a look.
    A payload without counters moved none (a flattened event names what changed)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[int, str], tuple[Any, ...]] = {}

    def moved(self, gateway_id: int, payloads: list[Any]) -> dict[str, tuple[Any, ...]]:
        """The keys of the run whose counters differ from the remembered ones, with theirs."""
        moved: dict[str, tuple[Any, ...]] = {}
        for payload in payloads:
            for key in session_keys(payload):
                row = payload.get("session")
                fields = row if isinstance(row, dict) else payload
                if not any(name in fields for name in COUNTER_FIELDS):
                    continue
                counters = tuple(fields.get(name) for name in COUNTER_FIELDS)
                if self._seen.get((gateway_id, key)) != counters:
                    moved[key] = counters
        return moved

    def remember(self, gateway_id: int, moved: dict[str, tuple[Any, ...]]) -> None:
        for key, counters in moved.items():
            self._seen[(gateway_id, key)] = counters

    def forget(self, gateway_id: int) -> None:
        """The connection ended: another worker may book this gateway's sessions next."""
        for seen in [k for k in self._seen if k[0] == gateway_id]:
            del self._seen[seen]


def session_keys(payload: Any) -> list[str]:
    """The session keys a `sessions.changed` payload names (a row or a key)."""
    if not isinstance(payload, dict):
        return []
    key = payload.get("sessionKey")
    row = payload.get("session")
    if isinstance(row, dict) and isinstance(row.get("key"), str):
        key = row["key"]
    return [key] if isinstance(key, str) and key else []


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


def backfill(gateway_id: int, key: str, series: Any) -> int:
    """The first sight of a session: book its `sessions.usage.timeseries` points at the
    times they happened, and set the mark to what they add up to (the counters' rest is
    booked now by `book_session`). A session already marked is left alone."""
    points = series.get("points") if isinstance(series, dict) else None
    if not isinstance(points, list):
        return 0
    status = series.get("cacheStatus")
    if isinstance(status, dict) and status.get("status") == "refreshing":
        return 0  # a cold cache's zeros are not a fact: the counters book it instead
    session = Session.objects.filter(gateway_id=gateway_id, key=key).first()
    if session is None:
        return 0
    booked = 0
    with transaction.atomic():
        mark, created = UsageMark.objects.select_for_update().get_or_create(
            gateway_id=gateway_id,
            session_key=key,
            defaults={"gateway_session_id": session.session_id},
        )
        if not created:
            return 0
        entries: list[UsageEntry] = []
        for point in points[:1000]:
            if not isinstance(point, dict):
                continue
            ins, outs = point.get("input"), point.get("output")
            ins = ins if isinstance(ins, int) and ins > 0 else 0
            outs = outs if isinstance(outs, int) and outs > 0 else 0
            cost = _decimal(point.get("cost"))
            ts = point.get("timestamp")
            if not isinstance(ts, int) or (not ins and not outs and not cost):
                continue
            when = datetime.fromtimestamp(ts / 1000, tz=timezone.get_current_timezone())
            entry = UsageEntry(
                gateway_id=gateway_id,
                session=session,
                session_key=key,
                gateway_session_id=session.session_id,
                agent_key=session.agent_key,
                model=session.model,
                provider=session.model_provider,
                channel=session.channel,
                input_tokens=ins,
                output_tokens=outs,
                cost_usd=cost,
                occurred_at=min(when, timezone.now()),
            )
            entries.append(entry)
            mark.input_tokens += ins
            mark.output_tokens += outs
            mark.cost_usd += cost
        # One INSERT for the rows and one write per rollup row (not three per point).
        UsageEntry.objects.bulk_create(entries)
        _roll_up_many(entries)
        booked = len(entries)
        mark.save()
    return booked
