"""Cron over a real socket to the simulator: the worker mirrors jobs and runs on connect
(paged) and from `cron` events, runs are kept idempotently, /cron/ shows them (filtered by
gateway, live over /ws/cron/), the admin's actions go through the worker and are audited,
and a failed run raises one alert through the alerts app's source registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.test import AsyncClient

from alerts import evaluate
from alerts.models import Alert, AlertRule
from cron import services
from cron.models import CronJob, CronRun
from fleet.models import AuditEvent, Gateway
from tests.helpers import admin_request, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


async def _connected(
    sim: Any, make_gateway: Callable[..., Gateway], running_worker: Any
) -> Gateway:
    gateway = await database_sync_to_async(make_gateway)(sim.url)
    await running_worker()

    async def up() -> bool:
        g = await Gateway.objects.aget(pk=gateway.pk)
        return g.state == Gateway.State.CONNECTED

    await wait_for(up, 15)
    return gateway


async def _job(gateway: Gateway, job_id: str) -> CronJob | None:
    return await CronJob.objects.filter(gateway=gateway, job_id=job_id).afirst()


async def test_it_mirrors_jobs_and_runs_on_connect(
    sim: Any, make_gateway: Any, running_worker: Any
) -> None:
    sim.cron_run_seconds = 0.01
    ok = sim.add_cron_job("nightly report")
    sim.add_cron_job("announcer", delivery="announce")
    for _ in range(3):
        sim.start_cron_run(ok["id"])
        await wait_for(lambda: _idle(sim, ok["id"]), 5)
    gateway = await _connected(sim, make_gateway, running_worker)

    async def mirrored() -> bool:
        runs = await CronRun.objects.filter(gateway=gateway, job_id=ok["id"]).acount()
        return runs == 3 and await CronJob.objects.filter(gateway=gateway).acount() == 2

    await wait_for(mirrored, 10)
    job = await _job(gateway, ok["id"])
    assert (
        job is not None and job.schedule == "every 3600 s" and job.last_status == "ok"
    )
    run = await CronRun.objects.filter(job_id=ok["id"]).afirst()
    assert run is not None and run.total_tokens == 17 and run.model == "fake-model"
    # A second reconcile (a reconnect) stores nothing twice.
    await sim.close_all(4000, "test")
    await wait_for(lambda: _reconnected(sim), 15)
    await database_sync_to_async(services.record_runs)(
        gateway.pk, sim._cron_entries[ok["id"]]
    )
    assert await CronRun.objects.filter(job_id=ok["id"]).acount() == 3


async def _idle(sim: Any, job_id: str) -> bool:
    return not sim._cron_jobs[job_id]["state"].get("runningAtMs")


async def _reconnected(sim: Any) -> bool:
    return any(c.authed for c in sim._conns.values())


async def test_it_follows_cron_events_and_a_failed_run_raises_one_alert(
    sim: Any, make_gateway: Any, running_worker: Any, personas: Any
) -> None:
    gateway = await _connected(sim, make_gateway, running_worker)
    rule = await AlertRule.objects.acreate(
        name="cron failures", kind=AlertRule.Kind.CRON_FAILED, cooldown_seconds=0
    )
    job = sim.add_cron_job("flaky")

    async def known() -> bool:
        return await _job(gateway, job["id"]) is not None

    await wait_for(known, 5)
    sim.fail_cron_job(job["id"], "disk full")
    sim.cron_run_seconds = 0.5
    sim.start_cron_run(job["id"])

    async def running() -> bool:
        row = await _job(gateway, job["id"])
        return row is not None and row.running

    await wait_for(running, 5)

    async def failed() -> bool:
        row = await _job(gateway, job["id"])
        return row is not None and not row.running and row.last_status == "error"

    await wait_for(failed, 5)
    run = await CronRun.objects.aget(gateway=gateway, job_id=job["id"])
    assert run.error == "disk full" and run.failed
    await database_sync_to_async(evaluate.evaluate_once)()
    await database_sync_to_async(evaluate.evaluate_once)()
    alerts = [a async for a in Alert.objects.filter(rule=rule)]
    assert len(alerts) == 1
    assert "flaky" in alerts[0].title and "disk full" in alerts[0].detail
    assert alerts[0].gateway_id == gateway.pk


async def test_it_shows_jobs_filtered_and_admins_act_through_the_worker(
    sim: Any, make_gateway: Any, running_worker: Any, personas: Any
) -> None:
    gateway = await _connected(sim, make_gateway, running_worker)
    other = await database_sync_to_async(make_gateway)(
        "ws://127.0.0.1:9/", enabled=False
    )
    await CronJob.objects.acreate(gateway=other, job_id="x", name="elsewhere")
    job = sim.add_cron_job("<b>report</b>")

    async def known() -> bool:
        return await _job(gateway, job["id"]) is not None

    await wait_for(known, 5)
    row = await _job(gateway, job["id"])
    assert row is not None
    client = AsyncClient()
    await client.aforce_login(personas["alice"])
    page = (await client.get("/cron/")).content.decode()
    assert "&lt;b&gt;report&lt;/b&gt;" in page and "elsewhere" in page
    page = (await client.get(f"/cron/?gateway={gateway.pk}")).content.decode()
    assert "&lt;b&gt;report&lt;/b&gt;" in page and "elsewhere" not in page
    assert 'ws-connect="/ws/cron/?gateway=' in page

    response = await admin_request(client, "post", f"/cron/{row.pk}/run/")
    assert response.status_code == 200

    async def ran() -> bool:
        return await CronRun.objects.filter(job_id=job["id"]).aexists()

    await wait_for(ran, 5)
    event = await AuditEvent.objects.filter(action="cron.run").alatest("created_at")
    assert (
        event.result == AuditEvent.Result.OK and event.user_id == personas["alice"].pk
    )

    await admin_request(client, "post", f"/cron/{row.pk}/disable/")
    disabled = await AuditEvent.objects.filter(action="cron.disable").alatest(
        "created_at"
    )
    assert disabled.result == AuditEvent.Result.OK, disabled.detail
    assert sim._cron_jobs[job["id"]]["enabled"] is False
    row = await _job(gateway, job["id"])
    assert row is not None and not row.enabled

    await admin_request(client, "post", f"/cron/{row.pk}/remove/")
    assert job["id"] not in sim._cron_jobs
    row = await _job(gateway, job["id"])
    assert row is not None and row.removed_at is not None

    # An operator may look, not act: refused and audited.
    bob = AsyncClient()
    await bob.aforce_login(personas["bob"])
    assert (await bob.get("/cron/")).status_code == 200
    refusal = await admin_request(bob, "post", f"/cron/{row.pk}/run/")
    assert refusal.status_code == 403
    refused = await AuditEvent.objects.filter(
        action="cron.run", user=personas["bob"]
    ).alatest("created_at")
    assert refused.result == AuditEvent.Result.ERROR


async def test_the_demo_runs_cron_jobs_and_its_failing_job_raises_an_alert(
    sim: Any, make_gateway: Any, running_worker: Any
) -> None:
    from django.core.management import call_command

    gateway = await _connected(sim, make_gateway, running_worker)
    await database_sync_to_async(call_command)("demo_alert_rules")
    await database_sync_to_async(call_command)("demo_alert_rules")  # once only
    assert await AlertRule.objects.acount() == 4
    sim.cron_run_seconds = 0.05
    sim.start_cron_demo(every=0.2)

    async def both() -> bool:
        ok = await CronRun.objects.filter(gateway=gateway, status="ok").aexists()
        bad = await CronRun.objects.filter(gateway=gateway, status="error").aexists()
        return ok and bad

    await wait_for(both, 10)
    await database_sync_to_async(evaluate.evaluate_once)()
    cron_alerts = Alert.objects.filter(kind=AlertRule.Kind.CRON_FAILED)
    assert await cron_alerts.filter(title__contains="Nightly backup").aexists()


async def test_it_reconciles_runs_whose_events_were_dropped_after_a_gap(
    sim: Any, make_gateway: Any, running_worker: Any
) -> None:
    gateway = await _connected(sim, make_gateway, running_worker)
    rule = await AlertRule.objects.acreate(
        name="cron", kind=AlertRule.Kind.CRON_FAILED, gateway=gateway
    )
    job = sim.add_cron_job("quiet")

    async def known() -> bool:
        return await _job(gateway, job["id"]) is not None

    await wait_for(known, 5)
    # A run the gateway finished while its `cron` events were dropped (dropIfSlow).
    sim._cron_entries[job["id"]] = [
        {
            "ts": 1_700_000_000_000,
            "jobId": job["id"],
            "action": "finished",
            "status": "ok",
            "completionStatus": "failed",
            "error": None,
            "runId": "dropped-run",
            "runAtMs": 1_699_999_999_000,
            "durationMs": 1000,
            "jobName": "quiet",
        }
    ]
    await sim.skip_seq(3)

    async def reconciled() -> bool:
        return await CronRun.objects.filter(run_id="dropped-run").aexists()

    await wait_for(reconciled, 10)
    run = await CronRun.objects.aget(run_id="dropped-run")
    # `ok` with an error completion status counts as failed.
    assert run.failed and run.duration_s == 1.0
    await database_sync_to_async(evaluate.evaluate_once)()
    alert = await Alert.objects.aget(rule=rule)
    assert "quiet" in alert.title and "failed" in alert.detail
