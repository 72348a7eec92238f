"""The worker alone, for production beside daphne: one live connection per gateway."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from controlcenter.heap import freeze_startup_objects
from fleet.worker import Worker, run_worker

log = logging.getLogger(__name__)

WORKER_CONN_MAX_AGE = 300  # seconds a worker thread's connection is reused


class Command(BaseCommand):
    help = "Hold a live connection to every enabled gateway, persist what they report and push it."

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.REDIS_URL:
            # It still syncs the database, but nothing else can reach it: say so up front.
            log.warning(
                "REDIS_URL is not set: the web processes cannot reach this worker (no live "
                "updates, no chat or session actions). Set REDIS_URL for separate "
                "processes, or run everything in one with `manage.py serve`."
            )
        # The worker's calls run on threads of its own (the loop's ORM thread, the lease
        # thread, usage's catch-up): they must not open a connection per call (at 50
        # events a second the connects were ~15 % of its CPU). On PostgreSQL the pool
        # (settings.py) hands each call a kept connection; elsewhere each thread keeps its
        # own (a pool refuses CONN_MAX_AGE). The periodic steps close theirs
        # (supervisor.py); an error closes a connection and the retry opens a new one.
        for database in settings.DATABASES.values():
            if not database.get("OPTIONS", {}).get("pool"):
                database["CONN_MAX_AGE"] = WORKER_CONN_MAX_AGE
        freeze_startup_objects()  # the worker's modules are loaded: see heap.py
        asyncio.run(self._main())

    async def _main(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)  # signals only set the flag
        worker = Worker()
        log.info("gateway worker %s starting", worker.owner)
        await run_worker(stop, worker)
        log.info("gateway worker stopped")
