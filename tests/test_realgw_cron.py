"""Cron against the real OpenClaw gateway (2026.9.6, offline harness with the fake model):
a job added with `cron.add` (an agent turn) shows on /cron/ within seconds; `cron.run` goes
from started to finished live on /ws/cron/; a job with the default delivery (`announce`,
no channels) ends in error and raises one alert, emailed to a local SMTP server and posted
to a local webhook receiver, each exactly once, signed."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import AsyncClient, Client

from alerts.delivery import deliver_due
from alerts.evaluate import evaluate_once
from alerts.models import Alert, AlertRule
from cron.models import CronJob, CronRun
from fleet import calls, capabilities
from fleet.models import Gateway
from tests.helpers import (
    TEST_TOKEN_ENV,
    SmtpSink,
    WebhookReceiver,
    admin_request,
    wait_for,
)

pytestmark = [pytest.mark.realgw, pytest.mark.django_db(transaction=True)]
SECRET_ENV = "CC_REALGW_CRON_WEBHOOK_SECRET"


@pytest.fixture
def smtp(settings: Any) -> Iterator[SmtpSink]:
    sink = SmtpSink()
    sink.start()
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST = "127.0.0.1"
    settings.EMAIL_PORT = sink.port
    settings.EMAIL_USE_TLS = settings.EMAIL_USE_SSL = False
    settings.EMAIL_HOST_USER = settings.EMAIL_HOST_PASSWORD = ""
    try:
        yield sink
    finally:
        sink.stop()


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[WebhookReceiver]:
    secret = secrets.token_urlsafe(24)
    monkeypatch.setenv(SECRET_ENV, secret)
    hook = WebhookReceiver(secret=secret)
    hook.start()
    try:
        yield hook
    finally:
        hook.stop()


@pytest.fixture
def fast_alerts(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = capabilities.Capability(
        name="alerts",
        periodic=(
            capabilities.Periodic(0.3, evaluate_once, "alerts-evaluate"),
            capabilities.Periodic(0.3, deliver_due, "alerts-deliver"),
        ),
    )
    monkeypatch.setitem(capabilities._registry, "alerts", fast)


def _headers(user: Any) -> list[tuple[bytes, bytes]]:
    client = Client()
    client.force_login(user)
    cookie = client.cookies["sessionid"].value
    return [
        (b"origin", b"http://localhost"),
        (b"cookie", f"sessionid={cookie}".encode()),
        (b"host", b"localhost"),
    ]


async def _add(gateway: Gateway, user: Any, name: str, **extra: Any) -> str:
    job = await calls.acall(
        gateway.pk,
        "cron.add",
        {
            "name": name,
            "schedule": {"kind": "every", "everyMs": 86_400_000},
            "payload": {"kind": "agentTurn", "message": "Say hello."},
            **extra,
        },
        user=user,
        timeout=60,
    )
    assert isinstance(job, dict) and job.get("id"), job
    return str(job["id"])


@pytest.mark.timeout(300)
async def test_cron_jobs_runs_and_a_failed_run_alert_on_the_real_gateway(
    real_gateway: Any,
    make_gateway: Any,
    running_worker: Any,
    personas: Any,
    monkeypatch: pytest.MonkeyPatch,
    smtp: SmtpSink,
    receiver: WebhookReceiver,
    fast_alerts: None,
) -> None:
    from django.conf import settings

    from controlcenter.asgi import application

    monkeypatch.setattr(settings, "GATEWAY_CALL_TIMEOUT", 60.0)
    monkeypatch.setenv(TEST_TOKEN_ENV, real_gateway.token)
    gateway = await asyncio.to_thread(make_gateway, real_gateway.url)
    await running_worker()

    async def connected() -> bool:
        g = await Gateway.objects.aget(pk=gateway.pk)
        return g.state == Gateway.State.CONNECTED

    await wait_for(connected, timeout=60)
    alice = personas["alice"]
    name = f"cc-ok-{secrets.token_hex(3)}"
    added = time.monotonic()
    job_id = await _add(gateway, alice, name, delivery={"mode": "none"})

    async def listed() -> bool:
        return await CronJob.objects.filter(gateway=gateway, job_id=job_id).aexists()

    await wait_for(listed, timeout=10)
    client = AsyncClient()
    await client.aforce_login(alice)
    page = (await admin_request(client, "get", "/cron/")).content.decode()
    assert name in page
    assert time.monotonic() - added < 10

    # Run now: started, then finished, pushed to the open page.
    headers = await sync_to_async(_headers)(alice)
    live = WebsocketCommunicator(application, "/ws/cron/", headers=headers)
    ok, _ = await live.connect()
    assert ok
    await live.receive_from(timeout=10)
    row = await CronJob.objects.aget(gateway=gateway, job_id=job_id)
    await admin_request(client, "post", f"/cron/{row.pk}/run/")
    states: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "ok" not in states:
        frame = await live.receive_from(timeout=120)
        marker = f'data-job="{job_id}" data-status="'
        if marker in frame:
            status = frame.split(marker, 1)[1].split('"', 1)[0]
            running = frame.split(marker, 1)[1].split('data-running="', 1)[1][:3]
            states.append("running" if running == "yes" else status)
    await live.disconnect()
    assert "running" in states and states[-1] == "ok", states
    assert states.index("running") < states.index("ok")
    run = await CronRun.objects.aget(gateway=gateway, job_id=job_id)
    assert run.status == "ok" and run.duration_ms is not None

    # The default delivery ends in error: one alert, one email, one signed POST.
    rule = await AlertRule.objects.acreate(
        name="cron failed",
        kind=AlertRule.Kind.CRON_FAILED,
        cooldown_seconds=0,
        email_to="ops@example.com",
        webhook_url=receiver.url,
        webhook_secret_env=SECRET_ENV,
    )
    failing = await _add(gateway, alice, f"cc-announce-{secrets.token_hex(3)}")
    await calls.acall(
        gateway.pk, "cron.run", {"id": failing, "mode": "force"}, user=alice
    )

    async def failed() -> bool:
        return await CronRun.objects.filter(
            gateway=gateway, job_id=failing, status="error"
        ).aexists()

    await wait_for(failed, timeout=120)

    async def delivered() -> bool:
        return bool(smtp.messages) and bool(receiver.received)

    await wait_for(delivered, timeout=30)
    await asyncio.sleep(2)  # a repeat would have come by now
    assert await Alert.objects.filter(rule=rule).acount() == 1
    assert len(smtp.messages) == 1 and len(receiver.received) == 1
    assert receiver.received[0]["verified"]
    assert "Channel is required" in receiver.received[0]["json"]["text"]


def _restart(gw: Any) -> None:
    """Start the stopped gateway again on its port, with its state (as after a crash)."""
    import subprocess

    from tests import realgw

    started = time.monotonic()
    with gw.log_path.open("ab") as out:
        gw.process = subprocess.Popen(
            [str(realgw.SCRIPTS / "start.sh")],
            env=gw.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    realgw._wait_healthz(gw, started + realgw.HEALTHZ_TIMEOUT_S)


@pytest.fixture
def own_gateway() -> Iterator[Any]:
    """A real gateway of this test's own (it is stopped and started again)."""
    from tests import realgw

    if not realgw.is_installed(realgw.V4):
        if realgw.under_ci():
            pytest.fail(realgw.V4.missing)
        pytest.skip(realgw.V4.missing)
    gw = realgw.start_gateway(realgw.V4)
    try:
        yield gw
    finally:
        realgw.stop_gateway(gw)


@pytest.mark.timeout(400)
async def test_a_stopped_real_gateway_raises_one_offline_alert_and_one_recovery(
    own_gateway: Any,
    make_gateway: Any,
    running_worker: Any,
    monkeypatch: pytest.MonkeyPatch,
    receiver: WebhookReceiver,
    fast_alerts: None,
) -> None:
    from tests import realgw

    monkeypatch.setenv(TEST_TOKEN_ENV, own_gateway.token)
    gateway = await asyncio.to_thread(make_gateway, own_gateway.url)
    rule = await AlertRule.objects.acreate(
        name="offline",
        kind=AlertRule.Kind.GATEWAY_OFFLINE,
        for_seconds=3,
        cooldown_seconds=0,
        gateway=gateway,
        webhook_url=receiver.url,
        webhook_secret_env=SECRET_ENV,
    )
    await running_worker()

    async def state_is(state: str) -> bool:
        g = await Gateway.objects.aget(pk=gateway.pk)
        return g.state == state

    await wait_for(lambda: state_is(Gateway.State.CONNECTED), timeout=60)
    await asyncio.sleep(1)
    assert receiver.received == []

    await asyncio.to_thread(realgw._stop_processes, own_gateway)

    async def posted(n: int) -> bool:
        return len(receiver.received) >= n

    await wait_for(lambda: posted(1), timeout=60)
    await asyncio.sleep(2)  # the rule's N has long passed: still one
    assert len(receiver.received) == 1
    assert "not connected" in receiver.received[0]["json"]["text"]
    assert await Alert.objects.filter(rule=rule).acount() == 1

    await asyncio.to_thread(_restart, own_gateway)
    await wait_for(lambda: state_is(Gateway.State.CONNECTED), timeout=120)
    await wait_for(lambda: posted(2), timeout=30)
    await asyncio.sleep(2)
    assert len(receiver.received) == 2
    assert receiver.received[1]["json"]["kind"] == "recovered"
    assert all(r["verified"] for r in receiver.received)
