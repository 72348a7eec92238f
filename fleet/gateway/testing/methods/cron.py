"""Cron methods: cron.status, .list, .runs (read), .add, .update, .remove, .run (admin), and
the `cron` event (added/updated/removed/started/finished), shaped after 2026.9.6.

Like the real gateway on the shared harness, a job with the default delivery (`announce`)
and no channels ends `error` ("Channel is required"); `delivery: {mode: "none"}` ends `ok`.
Test hooks: `add_cron_job(name, ...)`, `fail_cron_job(job_id, error)` (its runs end in
error until `fail_cron_job(job_id, None)`), `cron_run_seconds` (how long a run takes)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from fleet.gateway.testing.core import ADMIN, READ, Conn, Ctx, invalid, method, now_ms
from fleet.gateway.testing.runs import Runs
from fleet.gateway.testing.schema import BOOL, NE, OBJ, STRS, Field, S, Schema

_LIMIT = Field("integer", minimum=1, maximum=200)
_OFFSET = Field("integer", minimum=0)
_LIST = Schema(
    {"limit": _LIMIT, "offset": _OFFSET, "includeDisabled": BOOL, "query": S}
)
_RUNS = Schema(
    {
        "id": NE,
        "jobId": NE,
        "scope": S,
        "runId": S,
        "statuses": STRS,
        "deliveryStatuses": STRS,
        "query": S,
        "limit": _LIMIT,
        "offset": _OFFSET,
    }
)
_ADD = Schema(
    {
        "name": NE,
        "schedule": OBJ,
        "payload": OBJ,
        "delivery": OBJ,
        "agentId": S,
        "enabled": BOOL,
        "description": S,
        "sessionTarget": S,
        "wakeMode": S,
        "deleteAfterRun": BOOL,
    },
    ("name", "schedule", "payload"),
)
_UPDATE = Schema({"id": NE, "jobId": NE, "patch": OBJ}, ("patch",))
_ID = Schema({"id": NE, "jobId": NE})
_RUN = Schema({"id": NE, "jobId": NE, "mode": Field("string", enum=("force", "due"))})
RUNS_KEPT = 200  # the gateway's window per job: older entries fall off


class CronMethods(Runs):
    """cron.*: jobs held in memory, runs that take `cron_run_seconds`."""

    cron_run_seconds = 0.2

    def _cron(self) -> dict[str, dict[str, Any]]:
        jobs = self.__dict__.get("_cron_jobs")
        if jobs is None:
            jobs = self.__dict__["_cron_jobs"] = {}
            self.__dict__["_cron_entries"] = {}
            self.__dict__["_cron_failing"] = {}
            self.__dict__["_cron_tasks"] = set()
        return jobs

    def _cron_job(self, p: dict[str, Any]) -> dict[str, Any]:
        job_id = p.get("id") or p.get("jobId")
        job = self._cron().get(str(job_id))
        if job is None:
            raise invalid(f"unknown cron job id: {job_id}")
        return job

    def _cron_event(self, payload: dict[str, Any]) -> None:
        self._broadcast("cron", payload)

    # --- test hooks ---------------------------------------------------------------------

    def add_cron_job(
        self,
        name: str,
        *,
        every_ms: int = 3_600_000,
        delivery: str = "none",
        agent_id: str = "main",
        enabled: bool = True,
    ) -> dict[str, Any]:
        return self._cron_add(
            {
                "name": name,
                "schedule": {"kind": "every", "everyMs": every_ms},
                "payload": {"kind": "agentTurn", "message": f"Run {name}"},
                "delivery": {"mode": delivery},
                "agentId": agent_id,
                "enabled": enabled,
            }
        )

    def fail_cron_job(
        self, job_id: str, error: str | None = "simulated failure"
    ) -> None:
        self._cron()
        failing = self.__dict__["_cron_failing"]
        if error is None:
            failing.pop(job_id, None)
        else:
            failing[job_id] = error

    def start_cron_run(self, job_id: str) -> str:
        return self._cron_start(self._cron()[job_id])

    def start_cron_demo(self, every: float = 20.0) -> None:
        """`serve --demo`: a job that succeeds and one that fails, run every `every` s (so
        the cron page fills and the failing one raises alerts)."""
        ok = self.add_cron_job("Hourly digest", every_ms=3_600_000)
        bad = self.add_cron_job("Nightly backup", every_ms=86_400_000)
        self.fail_cron_job(bad["id"], "backup target unreachable (simulated)")
        self.add_cron_job(
            "Weekly announcement", every_ms=604_800_000, delivery="announce"
        )

        async def loop() -> None:
            while True:
                for job in (ok, bad):
                    idle = not job["state"].get("runningAtMs")
                    if job["id"] in self._cron() and job["enabled"] and idle:
                        self._cron_start(job)
                    await asyncio.sleep(every / 2)

        self._background.append(asyncio.get_running_loop().create_task(loop()))

    # --- the methods --------------------------------------------------------------------

    @method("cron.status", READ)
    def _m_cron_status(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        jobs = self._cron()
        wakes = [j["state"]["nextRunAtMs"] for j in jobs.values() if j["enabled"]]
        return {
            "enabled": True,
            "triggersEnabled": True,
            "storage": "memory",
            "jobs": len(jobs),
            "nextWakeAtMs": min(wakes) if wakes else None,
        }

    @method("cron.list", READ, params=_LIST)
    def _m_cron_list(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        jobs = list(self._cron().values())
        limit, offset = int(p.get("limit", 50)), int(p.get("offset", 0))
        page = jobs[offset : offset + limit]
        return {
            "jobs": page,
            "total": len(jobs),
            "hasMore": offset + limit < len(jobs),
        }

    @method("cron.runs", READ, params=_RUNS)
    def _m_cron_runs(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        self._cron()
        job_id = p.get("id") or p.get("jobId")
        entries: list[dict[str, Any]] = []
        for jid, kept in self.__dict__["_cron_entries"].items():
            if job_id is None or jid == job_id:
                entries.extend(kept)
        if p.get("statuses"):
            entries = [e for e in entries if e["status"] in p["statuses"]]
        entries.sort(key=lambda e: e["ts"], reverse=True)
        limit, offset = int(p.get("limit", 50)), int(p.get("offset", 0))
        return {
            "entries": entries[offset : offset + limit],
            "total": len(entries),
            "hasMore": offset + limit < len(entries),
        }

    def _cron_add(self, p: dict[str, Any]) -> dict[str, Any]:
        now = now_ms()
        schedule = dict(p["schedule"])
        every = schedule.get("everyMs")
        job = {
            "id": str(uuid.uuid4()),
            "name": p["name"],
            "enabled": bool(p.get("enabled", True)),
            "agentId": p.get("agentId") or "main",
            "schedule": schedule,
            "payload": dict(p["payload"]),
            "delivery": dict(p.get("delivery") or {"mode": "announce"}),
            "createdAtMs": now,
            "updatedAtMs": now,
            "state": {
                "nextRunAtMs": now + int(every) if isinstance(every, int) else None
            },
        }
        self._cron()[job["id"]] = job
        self._cron_event({"jobId": job["id"], "action": "added", "job": job})
        return job

    @method("cron.add", ADMIN, params=_ADD)
    def _m_cron_add(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        return self._cron_add(p)

    @method("cron.update", ADMIN, params=_UPDATE)
    def _m_cron_update(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        job = self._cron_job(p)
        for name, value in dict(p["patch"]).items():
            if name in (
                "enabled",
                "name",
                "schedule",
                "payload",
                "delivery",
                "agentId",
            ):
                job[name] = value
        job["updatedAtMs"] = now_ms()
        ctx.after.append(
            lambda: self._cron_event(
                {"jobId": job["id"], "action": "updated", "job": job}
            )
        )
        return job

    @method("cron.remove", ADMIN, params=_ID)
    def _m_cron_remove(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        job = self._cron_job(p)
        del self._cron()[job["id"]]
        ctx.after.append(
            lambda: self._cron_event({"jobId": job["id"], "action": "removed"})
        )
        return {"ok": True, "removed": True}

    @method("cron.run", ADMIN, params=_RUN)
    def _m_cron_run(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        job = self._cron_job(p)
        if job["state"].get("runningAtMs"):
            return {"ok": True, "ran": False, "reason": "already-running"}
        run_id = str(uuid.uuid4())

        def start() -> None:
            self._cron_start(job, run_id)

        ctx.after.append(start)
        return {"ok": True, "ran": True, "runId": run_id}

    def _cron_start(self, job: dict[str, Any], run_id: str | None = None) -> str:
        run_id = run_id or str(uuid.uuid4())
        started = now_ms()
        job["state"]["runningAtMs"] = started
        session_key = f"agent:{job['agentId']}:cron:{job['id']}"
        self._cron_event(
            {
                "jobId": job["id"],
                "action": "started",
                "runId": run_id,
                "runAtMs": started,
                "sessionKey": session_key,
            }
        )
        task = asyncio.get_running_loop().create_task(
            self._cron_finish(job, run_id, started, session_key)
        )
        tasks = self.__dict__["_cron_tasks"]
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return run_id

    async def _cron_finish(
        self, job: dict[str, Any], run_id: str, started: int, session_key: str
    ) -> None:
        await asyncio.sleep(self.cron_run_seconds)
        failing = self.__dict__["_cron_failing"].get(job["id"])
        announce = (job.get("delivery") or {}).get("mode", "announce") == "announce"
        error = failing or ("Channel is required" if announce else None)
        finished = now_ms()
        every = job["schedule"].get("everyMs")
        next_run = finished + int(every) if isinstance(every, int) else None
        entry: dict[str, Any] = {
            "ts": finished,
            "jobId": job["id"],
            "action": "finished",
            "status": "error" if error else "ok",
            "completionStatus": "failed" if error else "succeeded",
            "error": error,
            "summary": None if error else f"{job['name']}: done",
            "deliveryStatus": "failed" if announce else "not-requested",
            "runId": run_id,
            "runAtMs": started,
            "durationMs": finished - started,
            "model": "fake-model",
            "provider": "fake",
            "usage": {"input": 12, "output": 5, "total": 17},
            "jobName": job["name"],
            "sessionKey": session_key,
            "nextRunAtMs": next_run,
        }
        kept = self.__dict__["_cron_entries"].setdefault(job["id"], [])
        kept.append(entry)
        del kept[:-RUNS_KEPT]
        job["state"].pop("runningAtMs", None)
        job["state"].update(
            lastRunAtMs=started,
            lastStatus=entry["status"],
            lastError=error,
            lastDurationMs=entry["durationMs"],
            nextRunAtMs=next_run,
        )
        if job["id"] in self._cron():
            self._cron_event(entry)
