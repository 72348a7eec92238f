"""What the gateway worker runs for cron (registered in cron/apps.py): the `cron` event,
and the reconcile after every hello (and every seq gap: the event is dropIfSlow, so
some may be gone) from `cron.list` and `cron.runs`, paged."""

from __future__ import annotations

import logging
from typing import Any

from cron import services
from fleet.capabilities import GatewayLink
from fleet.dbretry import db

log = logging.getLogger(__name__)

PAGE = 200  # the gateway's limit for cron.list and cron.runs
MAX_PAGES = 50  # a reconcile reads at most this many pages of one job's runs


def _apply_and_note(gateway_id: int, payload: Any) -> None:
    if services.apply_event(gateway_id, payload):
        services.changed()


async def on_cron(link: GatewayLink, payload: Any) -> None:
    await db(_apply_and_note)(link.gateway_id, payload)


def _items(reply: Any, name: str) -> list[Any]:
    if isinstance(reply, dict) and isinstance(reply.get(name), list):
        return list(reply[name])
    return reply if isinstance(reply, list) else []


def _more(reply: Any, got: int) -> bool:
    if isinstance(reply, dict) and "hasMore" in reply:
        return bool(reply["hasMore"])
    return got >= PAGE


async def reconcile(link: GatewayLink) -> None:
    """Mirror the jobs, then each job's runs newest first until a page holds nothing new."""
    await link.call("cron.status", {})
    jobs: list[Any] = []
    for page in range(MAX_PAGES):
        reply = await link.call("cron.list", {"limit": PAGE, "offset": page * PAGE})
        got = _items(reply, "jobs")
        jobs.extend(got)
        if not got or not _more(reply, len(got)):
            break
    await db(services.sync_jobs)(link.gateway_id, jobs)
    for job in jobs:
        job_id = job.get("id") if isinstance(job, dict) else None
        if not isinstance(job_id, str):
            continue
        for page in range(MAX_PAGES):
            reply = await link.call(
                "cron.runs", {"id": job_id, "limit": PAGE, "offset": page * PAGE}
            )
            entries = _items(reply, "entries")
            new = await db(services.record_runs)(link.gateway_id, entries)
            if not new or not _more(reply, len(entries)):
                break
    await db(services.changed)()
