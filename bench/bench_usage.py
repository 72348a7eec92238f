"""Benchmark of the usage page and /metrics on PostgreSQL.

    .venv/bin/python bench/bench_usage.py [--rows 1000000] [--requests 50]
        [--metrics-gateways 50]

1. A year of a busy team in the ledger: --rows UsageEntry rows (10 gateways, 50 agents,
   4 models, 6 channels, 5,000 sessions) made with INSERT ... SELECT generate_series, and
   their daily rollup made from them with one GROUP BY (what the worker keeps up to date
   row by row). Then server time per request (Django test Client, logged in,
   in-process) of /usage/ for 30 days, 7 days, today, a custom 90-day range stacked by
   model, one agent's 30 days, and the CSV.
2. /metrics with 50 gateways (and their sessions and ledger) and the bearer token.

A throwaway PostgreSQL database (BENCH_PG_URL, default the local server) is dropped
afterwards."""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from _common import DEFAULT_PG_URL, database_env, loadavg, pct  # noqa: E402


def fmt(values: list[float]) -> str:
    return f"p50 {pct(values, 50):6.1f} ms   p99 {pct(values, 99):6.1f} ms   (n={len(values)})"


def fill(rows: int, n_gateways: int) -> None:
    from django.db import connection
    from django.utils import timezone

    from fleet.models import Gateway, Session

    gateways = [
        Gateway.objects.create(
            name=f"gw{i:02d}", url=f"ws://127.0.0.1:{20000 + i}", enabled=False
        )
        for i in range(n_gateways)
    ]
    now = timezone.now()
    sessions = [
        Session(
            gateway=gateways[i % n_gateways],
            key=f"agent:agent{i % 50}:s{i:05d}",
            agent_key=f"agent{i % 50}",
            session_id=f"sid{i}",
            model="fake-model",
            channel="slack",
            status="done" if i % 7 else "running",
            has_active_run=i % 97 == 0,
            input_tokens=1000,
            output_tokens=300,
            updated_at=now,
        )
        for i in range(5000)
    ]
    Session.objects.bulk_create(sessions, batch_size=1000)
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO usage_usageentry (gateway_id, session_id, session_key,
                gateway_session_id, agent_key, model, provider, channel, run_id,
                person_id, input_tokens, output_tokens, cache_read_tokens,
                cache_write_tokens, cost_usd, occurred_at)
            SELECT s.gateway_id, s.id, s.key, s.session_id, s.agent_key,
                (ARRAY['fake-model','claude-sonnet-4-5','gpt-5-mini','llama3.3:70b'])[1 + n %% 4],
                'fake',
                (ARRAY['slack','telegram','whatsapp','discord','webchat','cron'])[1 + n %% 6],
                'run-' || n, NULL, 500 + n %% 1000, 100 + n %% 300, 0, 0,
                ((500 + n %% 1000) * 3 + (100 + n %% 300) * 15) / 1000000.0,
                now() - (n %% 365) * interval '1 day' - (n %% 86400) * interval '1 second'
            FROM generate_series(1, %s) AS n
            JOIN (SELECT id, gateway_id, key, session_id, agent_key,
                         row_number() OVER (ORDER BY id) - 1 AS k
                  FROM fleet_session) s ON s.k = n %% 5000
            """,
            [rows],
        )
        cursor.execute(
            """
            INSERT INTO usage_usageday (day, gateway_id, agent_key, model, provider,
                channel, person_id, runs, input_tokens, output_tokens,
                cache_read_tokens, cache_write_tokens, cost_usd)
            SELECT (occurred_at AT TIME ZONE 'UTC')::date, gateway_id, agent_key, model,
                provider, channel, person_id, count(*), sum(input_tokens),
                sum(output_tokens), 0, 0, sum(cost_usd)
            FROM usage_usageentry GROUP BY 1, 2, 3, 4, 5, 6, 7
            """
        )
        cursor.execute("VACUUM ANALYZE")  # the index-only scans need the visibility map


def timed(
    client: object, url: str, requests: int, headers: dict[str, str] | None = None
) -> list[float]:
    times = []
    for i in range(requests + 3):
        t0 = time.perf_counter()
        response = client.get(url, headers=headers or {})  # type: ignore[attr-defined]
        if response.streaming:
            b"".join(response.streaming_content)
        elapsed = (time.perf_counter() - t0) * 1000
        assert response.status_code == 200, (url, response.status_code)
        if i >= 3:  # warm-up
            times.append(elapsed)
    return times


def run_phase(phase: str, gateways: int, rows: int, requests: int) -> None:
    token = os.environ["CONTROLCENTER_METRICS_TOKEN"]
    import django

    django.setup()
    from django.contrib.auth.models import Group, User
    from django.core.management import call_command
    from django.test import Client

    call_command("migrate", verbosity=0)
    t0 = time.perf_counter()
    fill(rows, gateways)
    print(
        f"[{phase}] {rows:,} ledger rows, {gateways} gateways, filled in "
        f"{time.perf_counter() - t0:.1f} s (load {loadavg()})"
    )
    user = User.objects.create_user("bencher", password=secrets.token_urlsafe(8))
    user.groups.add(Group.objects.get_or_create(name="viewer")[0])
    client = Client()
    client.force_login(user)
    if phase == "page":
        cases = {
            "/usage/ 30 days (default)": "/usage/",
            "/usage/ 7 days": "/usage/?period=7d",
            "/usage/ today": "/usage/?period=today",
            "/usage/ custom 90 days by model": "/usage/?period=custom&start=2026-09-01&end=2026-11-29&stack=model",
            "/usage/ one agent, 30 days": "/usage/?agent=agent7",
            "/usage/usage.csv 30 days": "/usage/usage.csv",
        }
        for name, url in cases.items():
            print(f"  {name:36} {fmt(timed(client, url, requests))}")
    else:
        times = timed(
            Client(), "/metrics", requests, {"Authorization": f"Bearer {token}"}
        )
        label = f"/metrics, {gateways} gateways"
        print(f"  {label:36} {fmt(times)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--metrics-gateways", type=int, default=50)
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--phase", choices=("page", "metrics"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        gateways = 10 if args.phase == "page" else args.metrics_gateways
        rows = args.rows if args.phase == "page" else 200_000
        run_phase(args.phase, gateways, rows, args.requests)
        return
    for phase in ("page", "metrics"):
        with database_env("postgres", args.pg_url, f"bench_usage_{phase}") as env:
            child = {
                **os.environ,
                **env,
                "CONTROLCENTER_METRICS_TOKEN": secrets.token_urlsafe(16),
                "DJANGO_SETTINGS_MODULE": "controlcenter.settings",
                "DJANGO_ALLOWED_HOSTS": "testserver,localhost",
            }
            subprocess.run(
                [sys.executable, __file__, "--phase", phase, *sys.argv[1:]],
                env=child,
                check=True,
            )


if __name__ == "__main__":
    main()
