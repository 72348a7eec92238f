"""Usage and cost: the ledger (one entry per run, booked from the row's last-run counters
named by lastRunId, corrected when named before its counters, runs missed while the worker
was down from the timeseries; kept across resets and deletes, never twice), budgets raising one alert per crossing, /metrics,
the usage page and its CSV, and the simulator's usage methods. Real sockets to the
simulator and a real worker where the gateway matters."""

from __future__ import annotations

import asyncio
import csv
import io
import re
import uuid
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection, transaction
from django.test import Client
from django.test.utils import CaptureQueriesContext
from prometheus_client.parser import text_string_to_metric_families

from alerts.evaluate import evaluate_once
from alerts.models import Alert, AlertRule
from chat.models import Message
from fleet.models import Gateway, Session
from tests.helpers import (
    IN_MEMORY,
    Chat,
    connect,
    connected_gateway,
    receive_all,
    stored_reply,
    wait_for,
)
from tests.simclient import TOKEN, open_client
from usage import catchup, ledger
from usage.budgets import ensure_budget_rule, state_of
from usage.models import Budget, UsageDay, UsageEntry, UsageSessionDay

pytestmark = pytest.mark.django_db(transaction=True)


def _gateway(name: str = "gw") -> Gateway:
    return Gateway.objects.create(name=name, url="ws://127.0.0.1:1", token_env="X")


def _session(gateway: Gateway, key: str = "agent:main:main", **fields: Any) -> Session:
    """A session row as 2026.9.6 sends it: its counters are the last run's usage, which
    `lastRunId` names (absent while a run is under way)."""
    cost = fields.pop("cost", None)
    run = fields.pop("run", f"run-{uuid.uuid4().hex[:8]}")
    raw: dict[str, Any] = {"estimatedCostUsd": cost} if cost is not None else {}
    if run:
        raw["lastRunId"] = run
    raw["updatedAt"] = fields.pop("at", 1_000)
    fields.setdefault("session_id", "s1")
    fields.setdefault("agent_key", key.split(":")[1])
    fields.setdefault("model", "fake-model")
    return Session.objects.create(gateway=gateway, key=key, raw=raw, **fields)


def _grow(
    session: Session,
    ins: int,
    outs: int,
    cost: float,
    run: str | None = None,
    at: int | None = None,
    **fields: Any,
) -> None:
    """The row after another run (or a reset): its counters, the run it names (None: no
    lastRunId, a run under way) and the gateway's time."""
    session.input_tokens, session.output_tokens = ins, outs
    raw = {**session.raw, "estimatedCostUsd": cost}
    raw.pop("lastRunId", None)
    if run:
        raw["lastRunId"] = run
    raw["updatedAt"] = at if at is not None else int(raw.get("updatedAt") or 0) + 1_000
    session.raw = raw
    for k, v in fields.items():
        setattr(session, k, v)
    session.save()


def _total() -> Decimal:
    return sum((e.cost_usd for e in UsageEntry.objects.all()), Decimal(0))


def _assert_rollups_match_the_ledger() -> None:
    from django.db.models import Sum

    want = UsageEntry.objects.aggregate(
        i=Sum("input_tokens"), o=Sum("output_tokens"), c=Sum("cost_usd")
    )
    for model in (UsageDay, UsageSessionDay):
        assert (
            model.objects.aggregate(
                i=Sum("input_tokens"), o=Sum("output_tokens"), c=Sum("cost_usd")
            )
            == want
        ), model
    _assert_session_days_match_the_ledger()


def test_two_runs_at_different_costs_are_both_booked_and_a_replay_books_nothing() -> (
    None
):
    gw = _gateway()
    s = _session(gw, input_tokens=10, output_tokens=20, cost=0.00033, run="r1")
    assert ledger.book_session(s) is not None
    assert ledger.book_session(s) is None  # a replay, a resync, a restarted worker
    assert ledger.rebuild(gw.pk) == 0
    # The next run under way: no lastRunId, the previous run's figures still shown.
    _grow(s, 10, 20, 0.00033, run=None)
    assert ledger.book_session(s) is None
    _grow(s, 30, 50, 0.00084, run="r2")
    entry = ledger.book_session(s)
    assert entry is not None and entry.run_id == "r2"
    assert (entry.input_tokens, entry.output_tokens) == (30, 50)
    assert entry.cost_usd == Decimal("0.000840")
    # A cheaper third run is booked too (no high-water mark to pass).
    _grow(s, 5, 5, 0.0001, run="r3")
    assert ledger.book_session(s) is not None
    assert ledger.book_session(s) is None
    assert ledger.book_keys(gw.pk, [s.key] * 3) == 0
    assert _total() == Decimal("0.001270")
    assert UsageEntry.objects.filter(cost_usd__lt=0).count() == 0
    assert sorted(UsageEntry.objects.values_list("run_id", flat=True)) == [
        "r1",
        "r2",
        "r3",
    ]
    day = UsageDay.objects.get()
    assert day.cost_usd == Decimal("0.001270") and day.runs == 3
    _assert_rollups_match_the_ledger()


def test_a_run_named_before_its_counters_is_corrected_with_its_rollups() -> None:
    gw = _gateway()
    s = _session(gw, input_tokens=10, output_tokens=20, cost=0.00033, run="r1")
    ledger.book_session(s)
    # The gateway names r2 while the row still carries r1's figures...
    _grow(s, 10, 20, 0.00033, run="r2")
    assert ledger.book_session(s) is not None
    # ...and a later row with the same lastRunId brings r2's figures.
    _grow(s, 40, 60, 0.00102, run="r2")
    fixed = ledger.book_session(s)
    assert fixed is not None and fixed.run_id == "r2"
    assert UsageEntry.objects.count() == 2
    r2 = UsageEntry.objects.get(run_id="r2")
    assert (r2.input_tokens, r2.output_tokens, r2.cost_usd) == (
        40,
        60,
        Decimal("0.001020"),
    )
    assert ledger.book_session(s) is None  # the same row again changes nothing
    assert _total() == Decimal("0.001350")
    day = UsageDay.objects.get()
    assert day.runs == 2 and day.cost_usd == Decimal("0.001350")
    _assert_rollups_match_the_ledger()


def test_a_run_of_changes_books_only_the_sessions_that_moved(
    django_assert_max_num_queries: Any,
) -> None:
    gw = _gateway()
    sessions = [
        _session(
            gw,
            f"agent:main:s{n}",
            input_tokens=10,
            output_tokens=20,
            cost=0.00033,
            run=f"r{n}",
        )
        for n in range(20)
    ]
    keys = [s.key for s in sessions] * 5  # a burst names each session several times
    assert ledger.book_keys(gw.pk, keys) == 20
    # Nothing moved (status or label changes): two reads for the whole run, no writes.
    with django_assert_max_num_queries(2):
        assert ledger.book_keys(gw.pk, keys) == 0
    _grow(sessions[3], 30, 50, 0.00084, run="r3b")
    _grow(sessions[7], 0, 0, 0.0, session_id="reset")  # a reset: nothing to book
    _grow(sessions[8], 10, 20, 0.00033)  # a run under way: nothing yet
    assert ledger.book_keys(gw.pk, keys + ["agent:main:unknown"]) == 1
    assert UsageEntry.objects.count() == 21
    _grow(sessions[7], 10, 10, 0.00018, run="r7b")  # the first run after the reset
    assert ledger.book_keys(gw.pk, [sessions[7].key]) == 1
    assert UsageEntry.objects.filter(session=sessions[7]).count() == 2


def test_a_run_of_changes_is_booked_in_one_transaction() -> None:
    """The worker's event thread commits once per run of changes, not once per booked
    session: on a slow disk each commit is a wait for the WAL (issue 16's worker lag)."""
    gw = _gateway()
    sessions = [
        _session(
            gw,
            f"agent:main:s{n}",
            input_tokens=10,
            output_tokens=20,
            cost=0.00033,
            run=f"r{n}",
        )
        for n in range(20)
    ]
    keys = [s.key for s in sessions]
    assert ledger.book_keys(gw.pk, keys) == 20  # first sight: the marks are made
    for n, session in enumerate(sessions):
        _grow(
            session, 30, 50, 0.00084, run=f"r{n}b"
        )  # the steady state: every row moved
    # Inside a transaction of the test's own, each atomic block shows itself as a
    # savepoint on either database.
    with transaction.atomic(), CaptureQueriesContext(connection) as queries:
        assert ledger.book_keys(gw.pk, keys) == 20
    savepoints = [q for q in queries if q["sql"].startswith("SAVEPOINT")]
    assert len(savepoints) == 1, [q["sql"] for q in savepoints]
    _assert_rollups_match_the_ledger()


def test_it_keeps_the_days_total_through_reset_and_delete() -> None:
    gw = _gateway()
    s = _session(gw, input_tokens=100, output_tokens=200, cost=0.0033, run="r1")
    ledger.book_session(s)
    before = _total()
    # sessions.reset: a new transcript id, counters back to zero.
    _grow(s, 0, 0, 0.0, session_id="s2")
    assert ledger.book_session(s) is None
    # Even a reset row that still names the old run: zeros book (and correct) nothing.
    _grow(s, 0, 0, 0.0, run="r1")
    assert ledger.book_session(s) is None
    assert _total() == before
    # A run after the reset.
    _grow(s, 10, 10, 0.00018, run="r2")
    assert ledger.book_session(s) is not None
    assert _total() == before + Decimal("0.00018")
    # Deleted on the gateway (gone) and then in our admin: the rows stay.
    s.delete()
    assert UsageEntry.objects.count() == 2
    assert UsageEntry.objects.filter(session=None).count() == 2
    assert _total() == before + Decimal("0.00018")


def test_it_names_the_person_whether_the_final_event_comes_before_or_after(
    personas: dict[str, Any],
) -> None:
    gw = _gateway()
    s = _session(gw, input_tokens=10, output_tokens=20, cost=0.00033, run="r1")
    ledger.book_session(s)  # booked before our chat stored the run's message
    Message.objects.create(
        session=s,
        role=Message.Role.USER,
        text="hi",
        sender=personas["bob"],
        run_id="r1",
    )
    ledger.book_run(gw.pk, s.key, "r1")
    entry = UsageEntry.objects.get()
    assert entry.run_id == "r1" and entry.person_id == personas["bob"].pk
    assert UsageDay.objects.get(person=personas["bob"]).runs == 1
    assert UsageDay.objects.filter(person=None).get().runs == 0
    # The run's final event first, its row after: the row books it with its person.
    Message.objects.create(
        session=s,
        role=Message.Role.USER,
        text="again",
        sender=personas["bob"],
        run_id="r2",
    )
    ledger.book_run(gw.pk, s.key, "r2")
    assert UsageEntry.objects.count() == 1
    _grow(s, 20, 40, 0.00066, run="r2")
    ledger.book_session(s)
    assert UsageEntry.objects.filter(run_id="r2", person=personas["bob"]).count() == 1
    ledger.book_run(gw.pk, s.key, "r2")  # a replayed final event
    assert UsageEntry.objects.count() == 2
    assert UsageDay.objects.get(person=personas["bob"]).runs == 2
    _assert_rollups_match_the_ledger()


def _series(*points: tuple[int, int, int, float]) -> dict[str, Any]:
    total, out = 0.0, []
    for ts, ins, outs, cost in points:
        total += cost
        out.append(
            {
                "timestamp": ts,
                "input": ins,
                "output": outs,
                "totalTokens": ins + outs,
                "cost": cost,
                "cumulativeCost": round(total, 6),
            }
        )
    return {"key": "k", "points": out}


def test_runs_missed_while_the_worker_was_down_come_from_the_timeseries_once() -> None:
    gw = _gateway()
    s = _session(gw, input_tokens=10, output_tokens=20, cost=0.00033, run="r1", at=1000)
    ledger.book_session(s)  # r1, booked live
    # Down: r2, r3 and r4 end unseen; the row shows r4.
    _grow(s, 40, 60, 0.00102, run="r4", at=4000)
    series = _series(
        (1000, 10, 20, 0.00033),
        (2000, 11, 21, 0.000348),
        (3000, 12, 22, 0.000366),
        (4000, 40, 60, 0.00102),
    )
    assert catchup.missed_sessions(gw.pk) == [s.key]
    assert catchup.recover(gw.pk, s.key, series) == 3
    assert ledger.rebuild(gw.pk) == 0  # r4 is booked under its id already
    assert catchup.recover(gw.pk, s.key, series) == 0  # once
    assert catchup.missed_sessions(gw.pk) == []
    assert UsageEntry.objects.count() == 4
    assert UsageEntry.objects.filter(run_id="r4").count() == 1
    assert _total() == Decimal("0.002064")  # the gateway's cumulativeCost
    # A cold cache's zeros are not a fact.
    _grow(s, 5, 5, 0.0001, run="r6", at=6000)
    cold = {**_series((5000, 5, 5, 0.0001)), "cacheStatus": {"status": "refreshing"}}
    assert catchup.recover(gw.pk, s.key, cold) == 0
    # A run under way when the worker came back: the runs before it, unnamed.
    _grow(s, 5, 5, 0.0001, run=None, at=7000)
    assert catchup.missed_sessions(gw.pk) == [s.key]
    assert catchup.recover(gw.pk, s.key, _series((5000, 5, 5, 0.0001))) == 1
    assert catchup.recover(gw.pk, s.key, _series((5000, 5, 5, 0.0001))) == 0
    _assert_rollups_match_the_ledger()


def _assert_session_days_match_the_ledger() -> None:
    """The per-session rollup (the top sessions) says what the ledger says."""
    from django.db.models import Count, Sum

    def rows(qs: Any, runs: Any) -> set[tuple[Any, ...]]:
        return {
            (r["gateway_id"], r["session_key"], r["n"], r["i"], r["o"], r["c"])
            for r in qs.values("gateway_id", "session_key").annotate(
                n=runs, i=Sum("input_tokens"), o=Sum("output_tokens"), c=Sum("cost_usd")
            )
        }

    assert rows(UsageEntry.objects, Count("pk")) == rows(
        UsageSessionDay.objects, Sum("runs")
    )


def test_the_top_sessions_rollup_follows_the_ledger_through_resets_and_backfill() -> (
    None
):
    gw = _gateway()
    a = _session(gw, input_tokens=10, output_tokens=20, cost=0.00033, run="a1")
    b = _session(
        gw, key="agent:ops:x", input_tokens=5, output_tokens=5, cost=0.0001, run="b1"
    )
    for s in (a, b):
        ledger.book_session(s)
    _grow(a, 30, 50, 0.00084, run="a2")
    ledger.book_session(a)
    _grow(a, 0, 0, 0.0, session_id="reset")
    ledger.book_session(a)
    _grow(a, 10, 10, 0.0002, run="a3")
    ledger.book_session(a)
    _assert_session_days_match_the_ledger()
    assert UsageSessionDay.objects.filter(session_key=a.key).get().runs == 3
    # The migration's fill of a ledger booked before the rollup existed: the same rows.
    import importlib

    from django.apps import apps

    made = set(UsageSessionDay.objects.values_list("day", "session_key", "runs"))
    UsageSessionDay.objects.all().delete()
    importlib.import_module("usage.migrations.0003_session_day").fill(apps, None)
    _assert_session_days_match_the_ledger()
    assert (
        set(UsageSessionDay.objects.values_list("day", "session_key", "runs")) == made
    )


async def test_it_books_a_chat_run_and_matches_the_sessions_cost(
    sim: Any, make_gateway: Any, running_worker: Any, personas: dict[str, Any]
) -> None:
    from django.contrib.auth.models import Group

    from fleet import roles

    await sync_to_async(
        lambda: personas["bob"].groups.add(
            Group.objects.get_or_create(name=roles.OPERATOR)[0]
        )
    )()
    gateway = await connected_gateway(sim, make_gateway, running_worker)
    session = await Session.objects.select_related("gateway").aget(
        gateway=gateway, key=sim.main_session_key
    )
    page = Chat(session, personas["bob"])
    await page.open()
    try:
        message_id = uuid.uuid4()
        await page.send("what does it cost?", message_id)
        await page.frames_until(stored_reply(message_id), timeout=15)

        async def booked() -> bool:
            return await UsageEntry.objects.filter(
                gateway=gateway, session_key=session.key, person=personas["bob"]
            ).aexists()

        await wait_for(booked, 10)
    finally:
        await page.close()

    async def matches() -> bool:
        booked = await sync_to_async(
            lambda: sum(
                (
                    e.cost_usd
                    for e in UsageEntry.objects.filter(
                        gateway=gateway, session_key=session.key
                    )
                ),
                Decimal(0),
            )
        )()
        total = _gateway_totals(sim).get(session.key, 0.0)
        return total > 0 and abs(float(booked) - total) < 1e-5

    await wait_for(matches, 10)
    entry = await UsageEntry.objects.filter(person=personas["bob"]).afirst()
    assert entry is not None and entry.run_id and entry.model
    # The run is booked at its own usage: what the row shows (its last run's).
    row = await Session.objects.aget(pk=session.pk)
    assert row.estimated_cost and abs(float(entry.cost_usd) - row.estimated_cost) < 1e-6


def _gateway_totals(sim: Any) -> dict[str, float]:
    """What the simulator says each session cost in all (its usage log: what
    sessions.usage and the timeseries' cumulativeCost add up)."""
    totals: dict[str, float] = {}
    for e in sim.__dict__.get("usage_log", []):
        totals[e["key"]] = totals.get(e["key"], 0.0) + round(e["cost"], 6)
    return totals


def test_one_alert_per_threshold_and_period() -> None:
    gw = _gateway()
    budget = Budget.objects.create(
        name="team", amount_usd=Decimal("1.00"), thresholds="80, 100"
    )
    ensure_budget_rule()
    ensure_budget_rule()
    assert AlertRule.objects.filter(kind=AlertRule.Kind.BUDGET).count() == 1
    s = _session(gw, input_tokens=1, output_tokens=1, cost=0.5)
    ledger.book_session(s)
    evaluate_once()
    assert Alert.objects.count() == 0
    _grow(s, 2, 2, 0.35, run="r2")  # 0.85 in all
    ledger.book_session(s)
    for _ in range(3):
        evaluate_once()
    assert list(Alert.objects.values_list("title", flat=True)) == [
        "Budget team: 80 % reached"
    ]
    _grow(s, 3, 3, 0.05, run="r3")  # 0.90
    ledger.book_session(s)
    evaluate_once()
    assert Alert.objects.count() == 1  # still past 80 %, not yet 100 %
    _grow(s, 4, 4, 0.3, run="r4")  # 1.20
    ledger.book_session(s)
    for _ in range(3):
        evaluate_once()
    assert sorted(Alert.objects.values_list("key", flat=True)) == sorted(
        [
            f"budget:{budget.pk}:{state_of(budget).period_start.isoformat()}:{p}"
            for p in (80, 100)
        ]
    )
    assert state_of(budget).level == "over"


def _metrics(client: Client, token: str | None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return client.get("/metrics", headers=headers)


def test_metrics_need_the_token_parse_and_only_grow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = Client()
    monkeypatch.delenv("CONTROLCENTER_METRICS_TOKEN", raising=False)
    assert _metrics(client, "x").status_code == 404
    monkeypatch.setenv("CONTROLCENTER_METRICS_TOKEN", "right-token")
    assert _metrics(client, None).status_code == 401
    assert _metrics(client, "wrong").status_code == 401
    gw = _gateway()
    s = _session(gw, input_tokens=10, output_tokens=20, cost=0.01, status="done")
    ledger.book_session(s)

    def read() -> dict[str, float]:
        response = _metrics(client, "right-token")
        assert response.status_code == 200
        text = response.content.decode()
        assert "agent:main:main" not in text  # no session keys as labels
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            assert family.name.startswith("controlcenter_")
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = sample.name + repr(sorted(sample.labels.items()))
                    values[key] = sample.value
        return values

    first = read()
    assert any("controlcenter_cost_usd_total" in k for k in first)
    _grow(s, 20, 40, 0.01, run="r2")
    ledger.book_session(s)
    _grow(s, 0, 0, 0.0, session_id="reset")  # a reset: nothing goes down
    ledger.book_session(s)
    second = read()
    assert all(second[k] >= v for k, v in first.items())
    assert sum(second.values()) > sum(first.values())


def _usage_data(personas: dict[str, Any]) -> Gateway:
    gw = _gateway("alpha")
    for agent, cost in (("main", 0.02), ("ops", 0.05)):
        s = _session(
            gw, key=f"agent:{agent}:x", input_tokens=10, output_tokens=10, cost=cost
        )
        ledger.book_session(s)
    return gw


def test_the_usage_page_draws_its_bars_filters_and_exports_what_it_shows(
    personas: dict[str, Any],
) -> None:
    _usage_data(personas)
    client = Client()
    client.force_login(personas["carol"])
    page = client.get("/usage/?period=7d&stack=agent")
    assert page.status_code == 200
    body = page.content.decode()
    assert (
        len(re.findall(r'<rect class="bar series-\d', body)) == 2
    )  # one day, two agents
    assert 'data-days="7"' in body
    assert "0.0700" in body  # the total
    filtered = client.get("/usage/?period=7d&agent=ops").content.decode()
    assert len(re.findall(r'<rect class="bar series-\d', filtered)) == 1
    assert "0.0500" in filtered and "0.0700" not in filtered
    assert 'href="/sessions/' in body  # the top sessions link to their pages
    exported = client.get("/usage/usage.csv?period=7d&agent=ops")
    assert exported.status_code == 200 and exported.streaming
    rows = list(csv.reader(io.StringIO(b"".join(exported.streaming_content).decode())))  # type: ignore[attr-defined]
    assert ["total", "Total", "1", "10", "10", "0.0500"] in rows
    assert ["agent", "ops", "1", "10", "10", "0.0500"] in rows
    assert not any(r[:2] == ["agent", "main"] for r in rows)


def test_the_usage_page_refuses_bad_filters_and_people_without_a_role(
    personas: dict[str, Any],
) -> None:
    client = Client()
    client.force_login(personas["carol"])
    bad = client.get("/usage/?period=custom&start=2026-12-31&end=2026-01-01")
    assert bad.status_code == 400
    assert "before the start date" in bad.content.decode()
    assert client.get("/usage/?period=forever").status_code == 400
    client.force_login(personas["dave"])
    assert client.get("/usage/").status_code == 403
    assert client.get("/usage/usage.csv").status_code == 403


def test_the_session_page_shows_its_runs_and_cost(personas: dict[str, Any]) -> None:
    gw = _gateway()
    s = _session(gw, input_tokens=10, output_tokens=20, cost=0.00033, run="r1")
    ledger.book_session(s)
    _grow(s, 30, 50, 0.00084, run="r2")
    ledger.book_session(s)
    client = Client()
    client.force_login(personas["carol"])
    body = client.get(f"/sessions/{s.pk}/").content.decode()
    assert 'id="session-usage"' in body and "<polyline" in body
    assert "<code>r1</code>" in body and "<code>r2</code>" in body
    # A run that ended unseen, booked from the timeseries, has no id to show.
    catchup.recover(gw.pk, s.key, _series((2500, 3, 3, 0.0001)))
    body = client.get(f"/sessions/{s.pk}/").content.decode()
    assert body.count("<code>(unnamed)</code>") == 1
    # The row's counters are its last run's: labelled so.
    assert "<dt>Last run</dt>" in body and "context in use" in body


async def test_the_simulator_answers_usage_with_a_cold_cache_first() -> None:
    from fleet.gateway.testing import FakeGateway

    async with FakeGateway(
        token=TOKEN, agents=2, sessions=3, delta_interval=0.002
    ) as sim:
        client = await open_client(sim)
        methods = client.hello["features"]["methods"]
        assert "usage.cost" in methods and "sessions.usage" not in methods
        await client.ok(
            "chat.send",
            {"sessionKey": "agent:main:main", "message": "hi", "idempotencyKey": "u1"},
        )
        final = await client.event("chat", lambda p: p["state"] == "final")
        assert final["payload"]["usage"]["cost"]["total"] > 0
        cold = await client.ok("usage.cost", {"days": 7})
        assert (
            cold["cacheStatus"]["status"] == "refreshing"
            and cold["totals"]["totalCost"] == 0
        )
        warm = await client.ok("usage.cost", {"days": 7})
        assert (
            warm["cacheStatus"]["status"] == "fresh" and warm["totals"]["totalCost"] > 0
        )
        listed = await client.ok("sessions.list", {})
        row = next(r for r in listed["sessions"] if r["key"] == "agent:main:main")
        await client.ok("sessions.usage", {"key": "agent:main:main"})
        per = await client.ok("sessions.usage", {"key": "agent:main:main"})
        assert per["aggregates"]["byModel"][0]["name"] == row["model"]
        series = await client.ok(
            "sessions.usage.timeseries", {"key": "agent:main:main"}
        )
        assert series["points"][-1]["cumulativeCost"] > 0
        await client.close()


async def test_the_simulator_reports_each_runs_usage_as_2026_9_6_does() -> None:
    """A row's counters are its last run's usage, named by lastRunId once the run ended
    and absent while one is under way; the timeseries has a point per run."""
    from fleet.gateway.testing import FakeGateway

    async with FakeGateway(
        token=TOKEN, agents=1, sessions=0, delta_interval=0.01
    ) as sim:
        client = await open_client(sim)
        key = "agent:main:per-run"
        finals = []
        for n, text in enumerate(("hi", "a longer question, with more words in it")):
            await client.ok(
                "chat.send",
                {"sessionKey": key, "message": text, "idempotencyKey": f"pr{n}"},
            )
            await client.event("chat", lambda p: p["state"] == "delta")
            running = sim.session(key)
            assert running is not None and "lastRunId" not in running
            run = f"pr{n}"

            def ended(p: dict[str, Any], run: str = run) -> bool:
                return bool(p["state"] == "final" and p["runId"] == run)

            final = await client.event("chat", ended)
            usage = final["payload"]["usage"]
            row = sim.session(key)
            assert row is not None and row["lastRunId"] == f"pr{n}"
            assert (row["inputTokens"], row["outputTokens"]) == (
                usage["input"],
                usage["output"],
            )
            assert row["estimatedCostUsd"] == usage["cost"]["total"]
            finals.append(usage["cost"]["total"])
        assert finals[0] != finals[1]
        series = await client.ok("sessions.usage.timeseries", {"key": key})
        assert [p["cost"] for p in series["points"]] == finals
        assert series["points"][-1]["cumulativeCost"] == round(sum(finals), 6)
        assert sim.usage_total(key) == round(sum(finals), 6)
        await client.close()


async def _connected(gateway: Gateway) -> None:
    async def ready() -> bool:
        row = await Gateway.objects.aget(pk=gateway.pk)
        return row.state == Gateway.State.CONNECTED

    await wait_for(ready, 15)


async def test_a_first_connect_books_the_month_of_history_and_a_restart_adds_nothing(
    sim: Any, make_gateway: Any, running_worker: Any
) -> None:
    gateway = await sync_to_async(make_gateway)(sim.url)
    first = await running_worker()
    await _connected(gateway)

    def ledger_matches_sessions() -> bool:
        sessions = list(Session.objects.filter(gateway=gateway, input_tokens__gt=0))
        totals = _gateway_totals(sim)
        for s in sessions:
            booked = sum(
                (
                    e.cost_usd
                    for e in UsageEntry.objects.filter(
                        gateway=gateway, session_key=s.key
                    )
                ),
                Decimal(0),
            )
            total = totals.get(s.key, 0.0)
            if not total or abs(float(booked) - total) > 1e-5:
                return False
        return bool(sessions)

    await wait_for(sync_to_async(ledger_matches_sessions), 15)
    days = await sync_to_async(
        lambda: {
            e.occurred_at.date() for e in UsageEntry.objects.filter(gateway=gateway)
        }
    )()
    assert len(days) > 3  # spread over the month, not all "now"
    count = await UsageEntry.objects.acount()
    total = await sync_to_async(_total)()
    # The worker stops (each mark was committed with its ledger rows) and another one
    # takes over: it re-reads every counter and books nothing twice.
    first.stop()

    async def released() -> bool:
        row = await Gateway.objects.aget(pk=gateway.pk)
        return row.state != Gateway.State.CONNECTED

    await wait_for(released, 15)
    await running_worker()
    await _connected(gateway)
    await asyncio.sleep(1.0)
    assert await UsageEntry.objects.acount() == count
    assert await sync_to_async(_total)() == total
    # Booked at the times they happened: the per-session rollup has them by day too.
    await sync_to_async(_assert_session_days_match_the_ledger)()
    assert await UsageSessionDay.objects.values("day").distinct().acount() > 3


def test_admins_manage_budgets_audited_and_both_pages_show_their_state(
    personas: dict[str, Any],
) -> None:
    from fleet.models import AuditEvent

    gw = _gateway()
    client = Client()
    client.force_login(personas["alice"])
    response = client.post(
        "/admin/usage/budget/add/",
        {
            "name": "daily cap",
            "gateway": "",
            "agent_key": "",
            "period": "day",
            "amount_usd": "0.10",
            "thresholds": "50,100",
            "enabled": "on",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    budget = Budget.objects.get()
    assert AuditEvent.objects.filter(
        action="budget.add", user=personas["alice"]
    ).exists()
    assert AlertRule.objects.filter(kind=AlertRule.Kind.BUDGET).count() == 1
    s = _session(gw, input_tokens=1, output_tokens=1, cost=0.06)
    ledger.book_session(s)
    client.force_login(personas["carol"])
    for url in ("/", "/usage/"):
        body = client.get(url).content.decode()
        assert f'data-budget="{budget.pk}" data-level="warn"' in body, url
        if url == "/":  # each figure says what it is: totalTokens is the context in use
            assert "context in use" in body and ">ctx <strong>" in body
    # Viewers and operators may not change budgets.
    assert client.post("/admin/usage/budget/add/", {"name": "x"}).status_code in (
        302,
        403,
    )
    assert Budget.objects.count() == 1
    # A cold cache's zeros are never booked as history.
    assert (
        catchup.backfill(
            gw.pk, s.key, {"points": [], "cacheStatus": {"status": "refreshing"}}
        )
        == 0
    )


# -- browser sockets and push latency (fleet.socketstats) ------------------------------------


def _socket_metrics(client: Client) -> tuple[dict[str, float], dict[str, float]]:
    """(controlcenter_browser_sockets by kind, push latency sample counts by kind)."""
    response = _metrics(client, "right-token")
    assert response.status_code == 200
    sockets: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(response.content.decode()):
        assert family.name.startswith("controlcenter_")
        for sample in family.samples:
            if sample.name == "controlcenter_browser_sockets":
                sockets[sample.labels["kind"]] = sample.value
            elif sample.name == "controlcenter_push_latency_seconds_count":
                counts[sample.labels["kind"]] = sample.value
            elif sample.name == "controlcenter_push_latency_seconds_bucket":
                assert set(sample.labels) == {"kind", "le"}
    return sockets, counts


@pytest.fixture
def headers_for(personas: dict[str, Any]) -> Any:
    def make(name: str) -> list[tuple[bytes, bytes]]:
        client = Client()
        client.force_login(personas[name])
        cookie = client.cookies["sessionid"].value
        return [
            (b"origin", b"http://localhost"),
            (b"cookie", f"sessionid={cookie}".encode()),
            (b"host", b"localhost"),
        ]

    return make


@pytest.fixture
def metrics_on(monkeypatch: pytest.MonkeyPatch, settings: Any) -> Client:
    monkeypatch.setenv("CONTROLCENTER_METRICS_TOKEN", "right-token")
    settings.CHANNEL_LAYERS = IN_MEMORY
    settings.REDIS_URL = ""
    return Client()


async def test_metrics_count_the_open_sockets_and_the_push_latency(
    metrics_on: Client, role_groups: Any, headers_for: Any
) -> None:
    from fleet.groups import apush, fleet_group

    await sync_to_async(_gateway)("alpha")
    scrape = sync_to_async(_socket_metrics)
    before, latency_before = await scrape(metrics_on)
    assert set(before) >= {"fleet", "chat", "nav", "alerts", "session"}
    fleet = await connect("/ws/fleet/", await sync_to_async(headers_for)("carol"))
    nav = await connect("/ws/nav/", await sync_to_async(headers_for)("carol"))
    try:
        await receive_all(fleet)
        opened, _ = await scrape(metrics_on)
        assert opened["fleet"] == before["fleet"] + 1
        assert opened["nav"] == before["nav"] + 1
        # A note from "the worker", and the frame it brings: one latency sample.
        await apush(fleet_group(), "fleet.gateway")
        assert await receive_all(fleet)
        _, latency = await scrape(metrics_on)
        assert latency["fleet"] == latency_before.get("fleet", 0) + 1
    finally:
        await fleet.disconnect()
        await nav.disconnect()
    closed, _ = await scrape(metrics_on)
    assert closed["fleet"] == before["fleet"]
    assert closed["nav"] == before["nav"]


async def test_web_processes_agree_on_sockets_and_latency_through_redis(
    metrics_on: Client,
    settings: Any,
    role_groups: Any,
    headers_for: Any,
    own_redis: Any,
    tmp_path: Any,
) -> None:
    """Another process (a fresh Python reading Redis) sees this one's socket and sample."""
    import json
    import subprocess
    import sys

    from fleet import socketstats
    from fleet.groups import apush, fleet_group
    from tests.helpers import daphne_env

    settings.REDIS_URL = own_redis.url
    settings.CHANNEL_LAYER_PREFIX = "socketstats-test"
    env = {
        **daphne_env(tmp_path),
        "REDIS_URL": own_redis.url,
        "CHANNEL_LAYER_PREFIX": "socketstats-test",
        "DJANGO_SETTINGS_MODULE": "controlcenter.settings",
    }
    code = (
        "import django, json; django.setup(); from fleet import socketstats; "
        "print(json.dumps(socketstats.read()))"
    )

    def elsewhere() -> tuple[dict[str, int], dict[str, dict[str, float]]]:
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, check=True
        )
        sockets, latency = json.loads(out.stdout.decode().strip().splitlines()[-1])
        return sockets, latency

    await sync_to_async(_gateway)("alpha")
    fleet = await connect("/ws/fleet/", await sync_to_async(headers_for)("carol"))
    try:
        await receive_all(fleet)
        await apush(fleet_group(), "fleet.gateway")
        assert await receive_all(fleet)

        async def seen() -> bool:
            sockets, latency = await sync_to_async(elsewhere)()
            count = sum(v for k, v in latency.get("fleet", {}).items() if k != "sum")
            return sockets["fleet"] >= 1 and count >= 1

        await wait_for(seen, timeout=20, interval=0.5)
    finally:
        await fleet.disconnect()
        for task in list(socketstats._flushers.values()):
            task.cancel()


def test_the_worker_looks_only_at_sessions_whose_counters_moved() -> None:
    seen = ledger.SeenCounters()
    row = {
        "key": "agent:main:a",
        "inputTokens": 10,
        "outputTokens": 20,
        "sessionId": "s1",
    }
    first = seen.moved(1, [{"sessionKey": "agent:main:a", "session": row}])
    assert list(first) == ["agent:main:a"]  # never seen: a look
    seen.remember(1, first)
    relabelled = {"sessionKey": "agent:main:a", "session": {**row, "label": "x"}}
    assert seen.moved(1, [relabelled]) == {}  # a label: no look
    assert seen.moved(1, [{"sessionKey": "agent:main:a", "phase": "run"}]) == {}
    grown = {"sessionKey": "agent:main:a", "session": {**row, "outputTokens": 30}}
    assert list(seen.moved(1, [grown])) == ["agent:main:a"]
    assert list(seen.moved(2, [relabelled])) == ["agent:main:a"]  # another gateway
    seen.forget(1)
    assert list(seen.moved(1, [relabelled])) == ["agent:main:a"]
