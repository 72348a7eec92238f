"""Benchmark of the worker's throughput: `sessions.changed` events per second that it
persists and pushes, end to end.

    .venv/bin/python bench/bench_throughput.py [--events 5000] [--sessions 5000]
        [--db sqlite,postgres] [--pg-url ...] [--redis-url redis://127.0.0.1:6379/9]
        [--runs 2]

Layout: the gateway simulator runs in the bench process; `manage.py gatewayworker` runs as
its own process against it, on a fresh database (SQLite file or a PostgreSQL database made
for the run) and Redis as the channel layer. The bench listens on the `fleet` group through
the channel layer, like a web process would.

One run: the simulator emits --events `sessions.changed` events as fast as it can, each with
a full row and a new label, for distinct sessions (event i changes session i mod
--sessions). The clock stops when the `fleet.sessions` pushes have named every changed
session, and the `session.changed` pushes for the sessions of the last 100 events (on their
own groups) have arrived; the worker pushes only after its transaction committed, so the
database holds them by then, and the bench checks that every row holds its last label. Events per second =
events / that time. Prints a markdown table with the load average beside each run."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (  # noqa: E402
    DEFAULT_PG_URL,
    DEFAULT_REDIS_URL,
    REPO,
    loadavg,
    manage,
    production_env,
    stop,
)

TOKEN_ENV = "OPENCLAW_GATEWAY_TOKEN"


async def measure(args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    from channels.layers import get_channel_layer
    from django.conf import settings
    from django.db import connection

    from fleet.gateway.testing import FakeGateway
    from fleet.models import Session

    token = os.environ[TOKEN_ENV]
    sim = FakeGateway(token=token, agents=5, sessions=args.sessions)
    await sim.start(host="127.0.0.1", port=0)
    env = {
        "OPENCLAW_GATEWAY_URL": sim.url,
        "LOG_LEVEL": "WARNING",
        "DJANGO_DEBUG": "False",
    }
    worker = manage(["gatewayworker"], env, log_dir / "worker.log")
    results: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 120
        while (
            await Session.objects.filter(gateway__url=sim.url).acount() < args.sessions
        ):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the worker did not sync; see {log_dir / 'worker.log'}"
                )
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)  # the sync's own pushes go out
        pks = {
            key: pk
            async for key, pk in Session.objects.filter(
                gateway__url=sim.url
            ).values_list("key", "pk")
        }
        keys = sim.session_keys()[: args.sessions]
        layer = get_channel_layer()
        assert layer is not None
        channel = await layer.new_channel("bench-throughput.")
        await layer.group_add("fleet", channel)

        async def drain(seconds: float) -> None:
            while True:
                try:
                    await asyncio.wait_for(layer.receive(channel), seconds)
                except TimeoutError:
                    return

        await drain(0.5)
        for run in range(args.runs):
            tag = f"tp{run}-{secrets.token_hex(2)}"
            wanted: dict[str, str] = {}
            for i in range(args.events):
                wanted[keys[i % len(keys)]] = f"{tag}-{i}"
            waiting = {pks[k] for k in wanted}
            # The sessions of the last events, followed on their own groups too: the
            # worker pushes `session.changed` in order, so the last one bounds them all.
            tail = {pks[keys[i % len(keys)]] for i in range(args.events)[-100:]}
            for pk in tail:
                await layer.group_add(f"session.{pk}", channel)
            tail_waiting = set(tail)
            pushes = 0
            load = loadavg()
            t0 = time.perf_counter()
            for i in range(args.events):
                key = keys[i % len(keys)]
                await sim.emit_session_changed(key, label=f"{tag}-{i}")
                if i % 200 == 199:
                    await asyncio.sleep(0)  # let the simulator's writer send
            emitted = time.perf_counter() - t0
            while waiting or tail_waiting:
                try:
                    message = await asyncio.wait_for(layer.receive(channel), 60)
                except TimeoutError:
                    raise RuntimeError(
                        f"{len(waiting) + len(tail_waiting)} pushes never came; "
                        f"see {log_dir / 'worker.log'}"
                    ) from None
                if message.get("type") == "session.changed":
                    tail_waiting.discard(message.get("session_id"))
                    continue
                if message.get("type") != "fleet.sessions":
                    continue
                pushes += 1
                ids = message.get("session_ids")
                if ids is None:
                    raise RuntimeError(
                        "the worker resynced the whole list (a dropped event?)"
                    )
                waiting.difference_update(ids)
            elapsed = time.perf_counter() - t0
            labels = {
                k: label
                async for k, label in Session.objects.filter(
                    gateway__url=sim.url, key__in=list(wanted)
                ).values_list("key", "label")
            }
            wrong = sum(1 for k, label in wanted.items() if labels.get(k) != label)
            results.append(
                {
                    "backend": connection.vendor,
                    "layer": str(settings.CHANNEL_LAYERS["default"]["BACKEND"]).rsplit(
                        ".", 1
                    )[-1],
                    "events": args.events,
                    "sessions": len(wanted),
                    "seconds": elapsed,
                    "emit_seconds": emitted,
                    "pushes": pushes,
                    "wrong": wrong,
                    "load": load,
                    "load_after": loadavg(),
                }
            )
            await drain(1.0)
            for pk in tail:
                await layer.group_discard(f"session.{pk}", channel)
        await layer.group_discard("fleet", channel)
    finally:
        stop(worker)
        await sim.stop()
    return results


def child(args: argparse.Namespace) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlcenter.settings")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"  # migrate below is plain sync
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)
    results = asyncio.run(measure(args, Path(args.log_dir)))
    print("RESULT " + json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument(
        "--db", default="sqlite,postgres", help="comma-separated: sqlite, postgres"
    )
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--log-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    rows: list[dict[str, Any]] = []
    for db in [d.strip() for d in args.db.split(",") if d.strip()]:
        log_dir = Path(tempfile.mkdtemp(prefix="cc-bench-tp-"))
        with production_env(
            db, args.pg_url, args.redis_url, "bench_tp", TOKEN_ENV
        ) as env:
            child_args = [
                sys.executable,
                __file__,
                "--child",
                "--log-dir",
                str(log_dir),
                "--events",
                str(args.events),
                "--sessions",
                str(args.sessions),
                "--runs",
                str(args.runs),
            ]
            out = subprocess.run(
                child_args,
                cwd=REPO,
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                check=False,
            )
        found = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if not found:
            raise SystemExit(f"the {db} run failed:\n{out.stdout}\n{out.stderr}")
        rows.extend(json.loads(found[-1][len("RESULT ") :]))

    print(
        "\n`sessions.changed` → database → push, worker process (gatewayworker), "
        "simulator in the bench process:\n"
    )
    print(
        "| database | channel layer | events (sessions) | time | events/s "
        "| simulator emit time | fleet pushes | rows wrong | load avg before / after |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['layer']} | {r['events']} ({r['sessions']}) "
            f"| {r['seconds']:.2f} s | **{r['events'] / r['seconds']:.0f}** "
            f"| {r['emit_seconds']:.2f} s | {r['pushes']} | {r['wrong']} "
            f"| {r['load']} / {r['load_after']} |"
        )


if __name__ == "__main__":
    main()
