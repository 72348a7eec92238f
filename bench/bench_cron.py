"""Benchmark of the cron mirror and the /cron/ page on PostgreSQL.

    .venv/bin/python bench/bench_cron.py [--jobs 200] [--runs 200] [--requests 30]

1. The reconcile's write side: --jobs jobs with --runs entries each recorded through
   services.record_runs (as cron.runs pages arrive), then the same pages again (a
   reconnect: nothing new; what a reconcile costs when it finds nothing).
2. Server time per request (Django test Client, logged in, in-process) of /cron/ with all
   the jobs and their newest 20 runs each, and of one gateway's jobs.

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


def run(jobs: int, runs: int, requests: int) -> None:
    import django

    django.setup()
    from django.contrib.auth.models import Group, User
    from django.core.management import call_command
    from django.test import Client

    from cron import services
    from fleet.models import Gateway

    call_command("migrate", verbosity=0)
    gateways = [
        Gateway.objects.create(
            name=f"gw{i}", url=f"ws://127.0.0.1:{20000 + i}", enabled=False
        )
        for i in range(4)
    ]
    base = 1_790_000_000_000
    pages = []
    for j in range(jobs):
        gw = gateways[j % len(gateways)]
        job_id = f"job-{j}"
        services.upsert_job(
            gw.pk,
            {
                "id": job_id,
                "name": f"job {j}",
                "schedule": {"kind": "every", "everyMs": 60_000},
                "state": {"nextRunAtMs": base + 10**9},
            },
        )
        entries = [
            {
                "ts": base + k * 60_000,
                "jobId": job_id,
                "status": "error" if k % 10 == 0 else "ok",
                "error": "Channel is required" if k % 10 == 0 else None,
                "runId": f"{job_id}-{k}",
                "runAtMs": base + k * 60_000 - 900,
                "durationMs": 900,
                "model": "fake-model",
                "usage": {"input": 10, "output": 5, "total": 15},
                "jobName": f"job {j}",
            }
            for k in range(runs)
        ]
        pages.append((gw.pk, entries))
    for label in ("new runs", "again (nothing new)"):
        t0 = time.perf_counter()
        for gw_pk, entries in pages:
            services.record_runs(gw_pk, entries)
        took = time.perf_counter() - t0
        total = jobs * runs
        print(
            f"  record_runs, {label:20} {total:,} entries in {took:5.1f} s "
            f"({total / took:,.0f}/s, load {loadavg()})"
        )
    user = User.objects.create_user("bencher", password=secrets.token_urlsafe(8))
    user.groups.add(Group.objects.get_or_create(name="viewer")[0])
    client = Client(HTTP_HOST="localhost")
    client.force_login(user)
    for name, url in (
        (f"/cron/ {jobs} jobs", "/cron/"),
        (f"/cron/ one gateway ({jobs // 4} jobs)", f"/cron/?gateway={gateways[0].pk}"),
    ):
        times = []
        for i in range(requests + 3):
            t0 = time.perf_counter()
            response = client.get(url)
            assert response.status_code == 200
            if i >= 3:
                times.append((time.perf_counter() - t0) * 1000)
        print(f"  {name:32} {fmt(times)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run(args.jobs, args.runs, args.requests)
        return
    with database_env("postgres", args.pg_url, "bench_cron") as env:
        child = {
            **os.environ,
            **env,
            "DJANGO_SETTINGS_MODULE": "controlcenter.settings",
        }
        subprocess.run(
            [sys.executable, __file__, "--child", *sys.argv[1:]], env=child, check=True
        )


if __name__ == "__main__":
    main()
