"""Booking usage: sync functions the worker calls (wrapped once in usage/apps.py).

On 2026.9.6 a session row's counters (`inputTokens`, `outputTokens`, `estimatedCostUsd`)
are the usage of its LAST RUN, which `lastRunId` names; while the next run is under way
`lastRunId` is absent and the counters are still the previous run's. So the ledger holds
exactly one row per (gateway, run id): a row naming run R with figures F books R at F if R
is not booked yet; if R is booked at other figures (the gateway may name a run before its
counters arrive, with the previous run's figures still in the row), that entry and its
rollups are corrected by the difference, in one transaction. A row that names no run, or
shows zeros (a reset), books nothing; a replay changes nothing. The final `chat` event
names the run's person. Runs that ended while no worker watched come from the session's
`sessions.usage.timeseries` points newer than the mark's `point_ms` (usage/catchup.py)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from fleet.models import Session
from usage.models import UsageDay, UsageEntry, UsageMark, UsageSessionDay

ZERO = Decimal(0)


def to_decimal(value: Any) -> Decimal:
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
    return to_decimal(raw.get("estimatedCostUsd"))


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


def last_run_id(session: Session) -> str:
    """The run whose usage the row's counters show (absent while a run is under way)."""
    raw = session.raw if isinstance(session.raw, dict) else {}
    value = raw.get("lastRunId")
    return value[:200] if isinstance(value, str) else ""


def _figures(session: Session) -> tuple[int, int, Decimal]:
    return (
        max(session.input_tokens or 0, 0),
        max(session.output_tokens or 0, 0),
        session_cost(session),
    )


def _gateway_ms(session: Session) -> int:
    """The gateway's time of the row (its `updatedAt`, ms): the run it names ended by then."""
    raw = session.raw if isinstance(session.raw, dict) else {}
    for name in ("updatedAt", "endedAt"):
        value = raw.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def book_session(session: Session, *, now: datetime | None = None) -> UsageEntry | None:
    """Book the run the row names at the row's figures (or correct its entry); returns
    the entry created or corrected, None when nothing changed."""
    with transaction.atomic():
        return _book_session(session, now or timezone.now())


def _book_session(session: Session, now: datetime) -> UsageEntry | None:
    """`book_session` in the caller's transaction."""
    run = last_run_id(session)
    figures = _figures(session)
    if not run or not any(figures):
        return None  # a run under way, or a reset's zeros: nothing to book
    mark, _ = UsageMark.objects.select_for_update().get_or_create(
        gateway_id=session.gateway_id,
        session_key=session.key,
        defaults={"gateway_session_id": session.session_id},
    )
    entry = book_run_at(session, run, figures, now)
    mark.gateway_session_id = session.session_id or mark.gateway_session_id
    mark.last_run_id = run
    mark.input_tokens, mark.output_tokens, mark.cost_usd = figures
    mark.point_ms = max(mark.point_ms, _gateway_ms(session))
    mark.updated_at = now
    mark.save()
    return entry


def new_entry(
    session: Session,
    figures: tuple[int, int, Decimal],
    when: datetime,
    *,
    run: str = "",
) -> UsageEntry:
    """A ledger row (not saved) for the session's usage `figures` at `when` (never in the
    future), with what the session says of its agent, model and channel."""
    ins, outs, cost = figures
    return UsageEntry(
        gateway_id=session.gateway_id,
        session=session,
        session_key=session.key,
        gateway_session_id=session.session_id,
        agent_key=session.agent_key,
        model=session.model,
        provider=session.model_provider,
        channel=session.channel,
        run_id=run,
        input_tokens=ins,
        output_tokens=outs,
        cost_usd=cost,
        occurred_at=min(when, timezone.now()),
    )


def book_run_at(
    session: Session,
    run: str,
    figures: tuple[int, int, Decimal],
    when: datetime,
) -> UsageEntry | None:
    """Run `run` at `figures`: a new entry, or its entry corrected (in the caller's
    transaction); None if it is booked at these figures already."""
    ins, outs, cost = figures
    entry = (
        UsageEntry.objects.select_for_update()
        .filter(gateway_id=session.gateway_id, run_id=run)
        .first()
    )
    if entry is None:
        entry = new_entry(session, figures, when, run=run)
        entry.person_id = _person_id(session, run)
        entry.save()
        _roll_up(entry)
        return entry
    d_in, d_out = ins - entry.input_tokens, outs - entry.output_tokens
    d_cost = cost - entry.cost_usd
    if not (d_in or d_out or d_cost):
        return None
    # Named before its counters came: the entry moves to the right figures.
    entry.input_tokens, entry.output_tokens, entry.cost_usd = ins, outs, cost
    entry.save(update_fields=["input_tokens", "output_tokens", "cost_usd"])
    _correct_rollups(entry, d_in, d_out, d_cost)
    return entry


def _correct_rollups(entry: UsageEntry, d_in: int, d_out: int, d_cost: Decimal) -> None:
    day = timezone.localdate(entry.occurred_at)
    change = {
        "input_tokens": F("input_tokens") + d_in,
        "output_tokens": F("output_tokens") + d_out,
        "cost_usd": F("cost_usd") + d_cost,
    }
    UsageDay.objects.filter(
        day=day,
        gateway_id=entry.gateway_id,
        agent_key=entry.agent_key,
        model=entry.model,
        provider=entry.provider,
        channel=entry.channel,
        person_id=entry.person_id,
    ).update(**change)
    UsageSessionDay.objects.filter(
        day=day,
        gateway_id=entry.gateway_id,
        session_key=entry.session_key,
        agent_key=entry.agent_key,
        model=entry.model,
    ).update(**change)


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


def roll_up_many(entries: list[UsageEntry]) -> None:
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


def book_key(gateway_id: int, key: str) -> UsageEntry | None:
    session = Session.objects.filter(gateway_id=gateway_id, key=key).first()
    if session is None:
        return None
    return book_session(session)


def book_keys(gateway_id: int, keys: Iterable[str]) -> int:
    """A run of `sessions.changed`: book the sessions whose rows name a run at figures
    unlike their marks'. Two queries for the whole run; a row and its mark are written
    only where a run is new or corrected, so status-only changes cost nothing more."""
    wanted = set(keys)
    if not wanted:
        return 0
    marks = {
        mark.session_key: mark
        for mark in UsageMark.objects.filter(
            gateway_id=gateway_id, session_key__in=wanted
        )
    }
    due = [
        session
        for session in Session.objects.filter(
            gateway_id=gateway_id, key__in=wanted
        ).order_by("key")  # marks locked in one order
        if not _at_mark(session, marks.get(session.key))
    ]
    if not due:
        return 0
    now = timezone.now()
    # One commit for the whole run, not one per session booked.
    with transaction.atomic():
        return sum(_book_session(session, now) is not None for session in due)


def _at_mark(session: Session, mark: UsageMark | None) -> bool:
    """Nothing to book: the row names no run, shows zeros, or what the mark booked."""
    run = last_run_id(session)
    figures = _figures(session)
    if not run or not any(figures):
        return True
    return (
        mark is not None
        and run == mark.last_run_id
        and figures == (mark.input_tokens, mark.output_tokens, mark.cost_usd)
    )


def book_run(gateway_id: int, key: str, run_id: str) -> None:
    """A run's final `chat` event: its entry (booked from the row that shows its usage,
    before or after this event) is the person's who sent it from our chat."""
    if not run_id:
        return
    entry = UsageEntry.objects.filter(
        gateway_id=gateway_id, run_id=run_id[:200], person__isnull=True
    ).first()
    if entry is None:
        return  # unknown yet (the row books it with its person) or named already
    session = Session.objects.filter(gateway_id=gateway_id, key=key).first()
    person = _person_id(session, run_id) if session else None
    if person is None:
        return
    with transaction.atomic():
        if UsageEntry.objects.filter(pk=entry.pk, person__isnull=True).update(
            person_id=person
        ):
            _move_to_person(entry, person)


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
        booked += book_keys(gateway_id, [s.key for s in chunk])  # one commit a chunk
        if seen is not None:
            seen.remember(gateway_id, {s.key: _counters(s) for s in chunk})


def _counters(session: Session) -> tuple[Any, ...]:
    """A stored session's counters as a `sessions.changed` row names them (COUNTER_FIELDS)."""
    raw = session.raw if isinstance(session.raw, dict) else {}
    return tuple(raw.get(name) for name in COUNTER_FIELDS)


REBUILD_CHUNK = 200


COUNTER_FIELDS = (
    "inputTokens",
    "outputTokens",
    "estimatedCostUsd",
    "sessionId",
    "lastRunId",
)


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
