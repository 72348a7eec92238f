"""Alerts: rules evaluated from the database, notices written with their outbox rows, and
the sender, against real parts: the gateway simulator on a real socket with the real
worker running the steps, a local webhook receiver (a real HTTP server on a free port,
checking the HMAC signature), a local SMTP server (aiosmtpd), the ASGI stack for the live
navigation count. The steps are also called directly, with explicit clocks."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.test import Client
from django.utils import timezone

from alerts import secrets as alert_secrets
from alerts.delivery import deliver_due, retry_delay
from alerts.evaluate import evaluate_once
from alerts.models import Alert, AlertRule, Delivery, Notice
from chat.models import Message
from chat.store import INTERRUPTED
from fleet import capabilities, services
from fleet.models import Agent, AuditEvent, Gateway, Session
from tests.helpers import SmtpSink, WebhookReceiver, wait_for

SECRET_ENV = "CC_TEST_ALERTS_WEBHOOK_SECRET"
IN_MEMORY = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}


@pytest.fixture(autouse=True)
def _in_memory_layer(settings: Any) -> None:
    settings.CHANNEL_LAYERS = IN_MEMORY


@pytest.fixture
def fast_alerts(settings: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Short retries, and the worker running the alert steps every 0.2 s."""
    settings.ALERTS_RETRY_FIRST = 0.5
    settings.ALERTS_RETRY_CAP = 2.0
    fast = capabilities.Capability(
        name="alerts",
        periodic=(
            capabilities.Periodic(0.2, evaluate_once, "alerts-evaluate"),
            capabilities.Periodic(0.2, deliver_due, "alerts-deliver"),
        ),
    )
    monkeypatch.setitem(capabilities._registry, "alerts", fast)
    return settings


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[WebhookReceiver]:
    """Not started: a test starts it when the receiver should be up."""
    secret = secrets.token_urlsafe(24)
    monkeypatch.setenv(SECRET_ENV, secret)
    hook = WebhookReceiver(secret=secret)
    try:
        yield hook
    finally:
        hook.stop()


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


def make_rule(**fields: Any) -> AlertRule:
    fields.setdefault("name", f"rule-{secrets.token_hex(3)}")
    fields.setdefault("kind", AlertRule.Kind.GATEWAY_OFFLINE)
    fields.setdefault("cooldown_seconds", 0)
    return AlertRule.objects.create(**fields)


def offline_gateway(seconds: float = 60, **fields: Any) -> Gateway:
    fields.setdefault("name", f"gw-{secrets.token_hex(3)}")
    return Gateway.objects.create(
        url="ws://127.0.0.1:9",
        state=Gateway.State.OFFLINE,
        last_error="Cannot reach the gateway",
        not_connected_since=timezone.now() - timedelta(seconds=seconds),
        **fields,
    )


# -- the real worker against the simulator ----------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(90)
async def test_it_raises_one_offline_alert_and_one_recovery(
    sim: Any,
    make_gateway: Callable[..., Gateway],
    running_worker: Any,
    receiver: WebhookReceiver,
    fast_alerts: Any,
) -> None:
    receiver.start()
    gateway = await sync_to_async(make_gateway)(sim.url)
    await sync_to_async(make_rule)(
        for_seconds=2, webhook_url=receiver.url, webhook_secret_env=SECRET_ENV
    )
    await running_worker()

    async def connected() -> bool:
        row = await Gateway.objects.aget(pk=gateway.pk)
        return row.state == Gateway.State.CONNECTED

    await wait_for(connected, 20)
    await asyncio.sleep(1)
    assert receiver.received == []  # connected: nothing to say

    port = sim.port
    # Timed from before the stop: the worker may see the socket close (and the gateway's
    # state change) while stop() is still shutting the simulator down.
    stopped = time.monotonic()
    await sim.stop()

    async def posts(n: int) -> bool:
        return len(receiver.received) >= n

    await wait_for(lambda: posts(1), 20)
    assert time.monotonic() - stopped >= 2  # not before the rule's N
    await asyncio.sleep(2)  # ten more evaluations: still one alert, one post
    assert len(receiver.received) == 1
    assert await Alert.objects.acount() == 1
    raised = receiver.received[0]
    assert raised["verified"], "the signature did not verify"
    assert raised["json"]["kind"] == "raised"
    assert f"Gateway {gateway.name} is not connected" in raised["json"]["text"]

    await sim.start(port=port)
    await wait_for(connected, 20)
    await wait_for(lambda: posts(2), 20)
    await asyncio.sleep(1.5)
    assert len(receiver.received) == 2
    recovery = receiver.received[1]
    assert recovery["verified"]
    assert recovery["json"]["kind"] == "recovered"
    assert "Recovered" in recovery["json"]["text"]
    alert = await Alert.objects.aget()
    assert alert.status == Alert.Status.RESOLVED and alert.resolved_by_id is None
    # Each post its own delivery key (a receiver de-duplicates on it).
    keys = {r["headers"]["x-controlcenter-delivery"] for r in receiver.received}
    assert len(keys) == 2


# -- the steps, with explicit clocks -------------------------------------------------------------


def test_it_retries_a_webhook_until_the_receiver_is_back(
    db: Any,
    receiver: WebhookReceiver,
    fast_alerts: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    offline_gateway()
    make_rule(for_seconds=10, webhook_url=receiver.url, webhook_secret_env=SECRET_ENV)
    now = timezone.now()
    assert evaluate_once(now) == 1
    assert deliver_due(now) == 0  # the receiver is down
    delivery = Delivery.objects.get()
    assert delivery.status == Delivery.Status.PENDING
    assert delivery.attempts == 1
    assert delivery.last_error
    assert deliver_due(now) == 0  # not due again yet
    delivery.refresh_from_db()
    assert delivery.attempts == 1

    later = now + timedelta(seconds=retry_delay(1) + 0.1)
    assert deliver_due(later) == 0  # still down: a second attempt, a longer wait
    delivery.refresh_from_db()
    assert delivery.attempts == 2
    assert delivery.next_attempt_at >= later + timedelta(seconds=retry_delay(2))

    receiver.start()
    assert deliver_due(later + timedelta(seconds=10)) == 1
    assert deliver_due(later + timedelta(hours=1)) == 0
    assert len(receiver.received) == 1
    (post,) = receiver.received
    assert post["verified"]
    assert post["headers"]["x-controlcenter-delivery"] == str(delivery.idempotency_key)
    delivery.refresh_from_db()
    assert delivery.status == Delivery.Status.SENT and delivery.attempts == 3

    # The URL's path (a Slack URL's token) is in no error and no log line.
    assert "T0KEN" not in delivery.last_error
    assert not any("T0KEN" in r.getMessage() for r in caplog.records)
    assert any("webhook http://127.0.0.1" in r.getMessage() for r in caplog.records)


def test_it_gives_up_after_the_last_attempt_and_says_so(
    db: Any, receiver: WebhookReceiver, fast_alerts: Any, settings: Any
) -> None:
    settings.ALERTS_MAX_ATTEMPTS = 2
    offline_gateway()
    make_rule(for_seconds=1, webhook_url=receiver.url)
    now = timezone.now()
    evaluate_once(now)
    deliver_due(now)
    deliver_due(now + timedelta(seconds=60))
    delivery = Delivery.objects.get()
    assert delivery.status == Delivery.Status.FAILED
    assert deliver_due(now + timedelta(days=1)) == 0


def test_it_reclaims_a_send_a_dead_worker_left_half_done(
    db: Any, receiver: WebhookReceiver, fast_alerts: Any
) -> None:
    """Claimed (sending) by a worker that died before marking it: sent again once the
    claim runs out, with the same delivery key."""
    receiver.start()
    offline_gateway()
    make_rule(for_seconds=1, webhook_url=receiver.url, webhook_secret_env=SECRET_ENV)
    now = timezone.now()
    evaluate_once(now)
    Delivery.objects.update(
        status=Delivery.Status.SENDING,
        attempts=1,
        claimed_until=now + timedelta(seconds=30),
    )
    assert deliver_due(now + timedelta(seconds=5)) == 0  # still claimed
    assert deliver_due(now + timedelta(seconds=31)) == 1
    assert len(receiver.received) == 1


def test_it_emails_each_recipient_exactly_once(db: Any, smtp: SmtpSink) -> None:
    offline_gateway(name="north")
    make_rule(for_seconds=5, email_to="ops@example.com,\noncall@example.com")
    now = timezone.now()
    evaluate_once(now)
    assert deliver_due(now) == 2
    assert deliver_due(now + timedelta(hours=1)) == 0
    evaluate_once(now + timedelta(seconds=30))  # still down: no second alert
    assert deliver_due(now + timedelta(hours=2)) == 0
    assert sorted(to for to, _ in smtp.messages) == [
        ["oncall@example.com"],
        ["ops@example.com"],
    ]
    keys = {str(d.idempotency_key) for d in Delivery.objects.all()}
    for _, message in smtp.messages:
        assert "ALERT: Gateway north is not connected" in message["Subject"]
        assert message["X-ControlCenter-Delivery"] in keys
        assert message["Message-ID"] == (
            f"<{message['X-ControlCenter-Delivery']}@controlcenter.alerts>"
        )


def test_it_counts_not_connected_from_the_first_state_that_left_connected(
    db: Any,
) -> None:
    gateway = Gateway.objects.create(name="g", url="ws://127.0.0.1:9")

    def since() -> Any:
        return Gateway.objects.get(pk=gateway.pk).not_connected_since

    services.record_hello(
        gateway.pk, protocol=4, server_version="x", main_session_key=""
    )
    assert since() is None
    services.set_state(gateway.pk, Gateway.State.CONNECTING, "lost")
    first = since()
    assert first is not None
    # A reconnect loop flips between states: the count goes on from the first.
    for state in (
        Gateway.State.OFFLINE,
        Gateway.State.CONNECTING,
        Gateway.State.OFFLINE,
    ):
        services.set_state(gateway.pk, state, "still down")
        assert since() == first
    services.set_state(gateway.pk, Gateway.State.CONNECTED)
    assert since() is None


def test_it_keeps_one_alert_per_condition_until_it_clears(db: Any) -> None:
    gateway = offline_gateway()
    rule = make_rule(for_seconds=10, email_to="ops@example.com")
    now = timezone.now()
    for tick in range(3):
        evaluate_once(now + timedelta(seconds=tick))
    assert Alert.objects.count() == 1
    assert Notice.objects.count() == 1

    services.record_hello(
        gateway.pk, protocol=4, server_version="", main_session_key=""
    )
    evaluate_once(timezone.now())
    alert = Alert.objects.get()
    assert alert.status == Alert.Status.RESOLVED
    assert alert.recovery_notice is not None
    assert alert.recovery_notice.kind == Notice.Kind.RECOVERED
    evaluate_once(timezone.now())
    assert Notice.objects.count() == 2  # the recovery once

    services.set_state(gateway.pk, Gateway.State.OFFLINE, "down again")
    evaluate_once(timezone.now() + timedelta(seconds=5))
    assert Alert.objects.count() == 1  # not for N yet
    evaluate_once(timezone.now() + timedelta(seconds=11))
    assert rule.alerts.filter(resolved_at=None).count() == 1
    assert Alert.objects.count() == 2


def test_it_holds_notices_for_the_cooldown_and_digests_many(db: Any) -> None:
    gateway = Gateway.objects.create(name="g", url="ws://127.0.0.1:9")
    agent = Agent.objects.create(gateway=gateway, agent_id="main")
    session = Session.objects.create(gateway=gateway, agent=agent, key="agent:main:x")
    rule = make_rule(
        kind=AlertRule.Kind.RUN_FAILED, cooldown_seconds=60, email_to="ops@example.com"
    )

    def failed_run(error: str = "model exploded") -> Message:
        return Message.objects.create(
            session=session,
            role=Message.Role.ASSISTANT,
            state=Message.State.ERROR,
            error=error,
        )

    for _ in range(5):
        failed_run()
    failed_run(INTERRUPTED)  # a dropped connection: the gateway rules cover it
    now = timezone.now()
    assert evaluate_once(now) == 5
    (digest,) = Notice.objects.all()
    assert digest.kind == Notice.Kind.DIGEST
    assert digest.payload["count"] == 5
    assert Delivery.objects.count() == 1  # one message, not five
    assert evaluate_once(now + timedelta(seconds=1)) == 0  # an event alerts once

    failed_run("again")
    assert evaluate_once(now + timedelta(seconds=5)) == 1
    assert Notice.objects.count() == 1  # cooling down: it waits
    evaluate_once(now + timedelta(seconds=61))
    assert Notice.objects.count() == 2
    latest = Notice.objects.latest("pk")
    assert latest.kind == Notice.Kind.RAISED and "again" in latest.text

    # Scoped to another agent: none of these are its business.
    other = Agent.objects.create(gateway=gateway, agent_id="other")
    scoped = make_rule(kind=AlertRule.Kind.RUN_FAILED, agent=other)
    evaluate_once(now + timedelta(seconds=62))
    assert not scoped.alerts.exists()
    assert rule.alerts.count() == 6


def test_it_raises_and_clears_the_states_a_person_must_fix(db: Any) -> None:
    gateway = Gateway.objects.create(
        name="g",
        url="ws://127.0.0.1:9",
        state=Gateway.State.AUTH_FAILED,
        last_error="The gateway refused the shared token",
    )
    make_rule(kind=AlertRule.Kind.GATEWAY_ATTENTION, for_seconds=0)
    evaluate_once(timezone.now())
    alert = Alert.objects.get()
    assert "Authentication failed" in alert.title
    services.set_state(
        gateway.pk,
        Gateway.State.PAIRING_REQUIRED,
        "pairing",
        pairing_request_id="req-1",
    )
    evaluate_once(timezone.now())
    alert.refresh_from_db()
    assert alert.status == Alert.Status.RESOLVED
    new = Alert.objects.get(resolved_at=None)
    assert "openclaw devices approve req-1" in new.detail


def test_it_does_not_raise_again_what_a_person_resolved_while_it_holds(
    db: Any, personas: dict[str, User]
) -> None:
    offline_gateway()
    make_rule(for_seconds=1)
    evaluate_once(timezone.now())
    client = Client()
    client.force_login(personas["alice"])
    alert = Alert.objects.get()
    assert client.post(f"/alerts/{alert.pk}/resolve/").status_code == 302
    evaluate_once(timezone.now())
    assert Alert.objects.count() == 1


def test_it_skips_rules_whose_kind_no_app_provides_yet(
    db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alerts import sources

    # As if the approvals app were not installed.
    monkeypatch.delitem(sources._sources, AlertRule.Kind.APPROVAL_WAITING)
    offline_gateway()
    make_rule(kind=AlertRule.Kind.APPROVAL_WAITING)
    make_rule(kind=AlertRule.Kind.BUDGET, threshold=80)
    assert evaluate_once(timezone.now()) == 0


# -- secrets -----------------------------------------------------------------------------------


def test_it_accepts_only_webhook_secret_names_and_plain_http_urls(db: Any) -> None:
    assert alert_secrets.allowed_secret_env_name("OPS_WEBHOOK_SECRET")
    for bad in (
        "DJANGO_SECRET_KEY",
        "OPENCLAW_GATEWAY_TOKEN",
        "ops_webhook_secret",
        "A B_WEBHOOK_SECRET",
    ):
        assert not alert_secrets.allowed_secret_env_name(bad)
    rule = AlertRule(name="r", kind=AlertRule.Kind.GATEWAY_OFFLINE)
    for url in (
        "ftp://example.com/x",
        "https://user:pw@example.com/x",
        "javascript:alert(1)",
    ):
        rule.webhook_url = url
        with pytest.raises(ValidationError) as err:
            rule.full_clean()
        assert "pw" not in str(err.value)
    rule.webhook_url = "https://hooks.slack.com/services/T000/B000/XXXX"
    rule.webhook_secret_env = "DJANGO_SECRET_KEY"
    with pytest.raises(ValidationError):
        rule.full_clean()
    rule.webhook_secret_env = "OPS_WEBHOOK_SECRET"
    rule.full_clean()
    assert rule.webhook_display == "https://hooks.slack.com/…"


def test_it_names_a_missing_secret_variable_without_sending_unsigned(
    db: Any, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver.start()
    monkeypatch.delenv(SECRET_ENV)
    offline_gateway()
    make_rule(for_seconds=1, webhook_url=receiver.url, webhook_secret_env=SECRET_ENV)
    now = timezone.now()
    evaluate_once(now)
    assert deliver_due(now) == 0
    delivery = Delivery.objects.get()
    assert SECRET_ENV in delivery.last_error and "not set" in delivery.last_error
    assert receiver.received == []


# -- the app: list, acknowledge, resolve, the live count -----------------------------------------


def test_it_lets_operators_acknowledge_and_admins_resolve_audited(
    db: Any, personas: dict[str, User]
) -> None:
    offline_gateway(name="south")
    make_rule(
        for_seconds=1, webhook_url="https://hooks.example.com/services/SECRETPATH"
    )
    evaluate_once(timezone.now())
    alert = Alert.objects.get()
    clients = {}
    for name in ("alice", "bob", "carol", "dave"):
        clients[name] = Client()
        clients[name].force_login(personas[name])

    page = clients["carol"].get("/alerts/")
    assert page.status_code == 200
    body = page.content.decode()
    assert "Gateway south is not connected" in body
    assert "https://hooks.example.com/…" in body and "SECRETPATH" not in body
    assert "Acknowledge" not in body and "Resolve" not in body
    assert 'data-count="1"' in body  # the navigation's count
    assert clients["dave"].get("/alerts/").status_code == 403

    assert clients["carol"].post(f"/alerts/{alert.pk}/acknowledge/").status_code == 403
    assert clients["bob"].post(f"/alerts/{alert.pk}/acknowledge/").status_code == 302
    alert.refresh_from_db()
    assert alert.status == Alert.Status.ACKNOWLEDGED
    assert alert.acknowledged_by == personas["bob"]
    assert 'data-count="0"' in clients["bob"].get("/alerts/").content.decode()
    assert clients["bob"].post(f"/alerts/{alert.pk}/resolve/").status_code == 403
    response = clients["alice"].post(
        f"/alerts/{alert.pk}/resolve/", HTTP_HX_REQUEST="true"
    )
    assert (
        response.status_code == 200 and 'id="alert-list"' in response.content.decode()
    )
    alert.refresh_from_db()
    assert (
        alert.status == Alert.Status.RESOLVED and alert.resolved_by == personas["alice"]
    )

    events = {
        (e.action, e.username, e.result)
        for e in AuditEvent.objects.filter(action__startswith="alert.")
    }
    assert ("alert.acknowledge", "bob", "ok") in events
    assert ("alert.acknowledge", "carol", "error") in events
    assert ("alert.resolve", "bob", "error") in events
    assert ("alert.resolve", "alice", "ok") in events
    assert clients["alice"].get("/alerts/x/").status_code == 404


def _headers(user: User) -> list[tuple[bytes, bytes]]:
    client = Client()
    client.force_login(user)
    cookie = client.cookies["sessionid"].value
    return [
        (b"origin", b"http://localhost"),
        (b"cookie", f"sessionid={cookie}".encode()),
        (b"host", b"localhost"),
    ]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("role_groups")
async def test_it_pushes_the_alert_count_to_the_navigation(
    personas: dict[str, User],
) -> None:
    from controlcenter.asgi import application

    headers = await sync_to_async(_headers)(personas["carol"])
    nav = WebsocketCommunicator(application, "/ws/nav/", headers=headers)
    connected, _ = await nav.connect()
    assert connected
    first = await nav.receive_from(timeout=5)
    assert 'id="nav-badge-alerts"' in first and 'data-count="0"' in first

    await sync_to_async(offline_gateway)()
    await sync_to_async(make_rule)(for_seconds=1)
    await sync_to_async(evaluate_once)(timezone.now())  # pushes the note itself
    frame = await nav.receive_from(timeout=5)
    assert 'data-count="1"' in frame
    await nav.disconnect()

    nobody = await sync_to_async(_headers)(personas["dave"])
    refused = WebsocketCommunicator(application, "/ws/nav/", headers=nobody)
    ok, _ = await refused.connect()
    assert not ok


def test_it_lets_admins_manage_rules_audited_with_the_url_masked(
    db: Any, personas: dict[str, User], monkeypatch: pytest.MonkeyPatch
) -> None:
    from alerts import sources

    # A kind whose app is not installed (as if approvals were not).
    monkeypatch.delitem(sources._sources, AlertRule.Kind.APPROVAL_WAITING)
    form = {
        "name": "ops",
        "kind": AlertRule.Kind.GATEWAY_OFFLINE,
        "enabled": "on",
        "for_seconds": "120",
        "threshold": "",
        "gateway": "",
        "agent": "",
        "cooldown_seconds": "300",
        "email_to": "ops@example.com",
        "webhook_url": "https://hooks.slack.com/services/T1/B2/SECRETPATH",
        "webhook_secret_env": "OPENCLAW_GATEWAY_TOKEN",
    }
    operator = Client()
    operator.force_login(personas["bob"])
    assert operator.get("/admin/alerts/alertrule/add/").status_code in (302, 403)
    admin = Client()
    admin.force_login(personas["alice"])
    refused = admin.post("/admin/alerts/alertrule/add/", form)
    assert refused.status_code == 200  # the form again, with the error
    assert "_WEBHOOK_SECRET" in refused.content.decode()
    assert not AlertRule.objects.exists()

    form["webhook_secret_env"] = "OPS_WEBHOOK_SECRET"
    form["email_to"] = "not an address"
    assert admin.post("/admin/alerts/alertrule/add/", form).status_code == 200
    form["email_to"] = "ops@example.com"
    assert admin.post("/admin/alerts/alertrule/add/", form).status_code == 302
    rule = AlertRule.objects.get()
    event = AuditEvent.objects.get(action="alert_rule.add")
    assert event.username == "alice"
    assert event.params["webhook_url"] == "https://hooks.slack.com/…"
    assert "SECRETPATH" not in str(event.params)
    listing = admin.get("/admin/alerts/alertrule/").content.decode()
    assert "SECRETPATH" not in listing

    # A kind that no installed app provides: saved, with a warning that it waits.
    form["kind"] = AlertRule.Kind.APPROVAL_WAITING
    changed = admin.post(
        f"/admin/alerts/alertrule/{rule.pk}/change/", form, follow=True
    )
    assert "not installed" in changed.content.decode()
    assert AuditEvent.objects.filter(action="alert_rule.change").count() == 1


def test_it_reaches_new_failed_runs_behind_a_backlog_already_alerted(
    db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alerts import sources

    monkeypatch.setattr(sources, "EVENT_BATCH", 3)
    gateway = Gateway.objects.create(name="g", url="ws://127.0.0.1:9")
    session = Session.objects.create(gateway=gateway, key="agent:main:x")
    rule = make_rule(kind=AlertRule.Kind.RUN_FAILED)

    def fail(n: int) -> None:
        for _ in range(n):
            Message.objects.create(
                session=session, role=Message.Role.ASSISTANT, state=Message.State.ERROR
            )

    fail(7)
    now = timezone.now()
    assert [evaluate_once(now + timedelta(seconds=i)) for i in range(4)] == [3, 3, 1, 0]
    fail(2)
    assert evaluate_once(timezone.now()) == 2
    assert rule.alerts.count() == 9


def test_it_gives_up_at_once_on_deliveries_of_a_removed_rule(
    db: Any, receiver: WebhookReceiver
) -> None:
    offline_gateway()
    rule = make_rule(for_seconds=1, webhook_url=receiver.url)
    now = timezone.now()
    evaluate_once(now)
    rule.delete()
    assert deliver_due(now) == 0
    delivery = Delivery.objects.get()
    assert delivery.status == Delivery.Status.FAILED
    assert "removed" in delivery.last_error


def test_it_shows_delivery_states_and_keeps_gateway_text_as_text(
    db: Any, personas: dict[str, User], receiver: WebhookReceiver
) -> None:
    xss = "<img src=x onerror=alert(1)>"
    gateway = Gateway.objects.create(name="g", url="ws://127.0.0.1:9")
    session = Session.objects.create(gateway=gateway, key="agent:main:x")
    make_rule(
        kind=AlertRule.Kind.RUN_FAILED,
        webhook_url=receiver.url,
        email_to="ops@example.com",
    )
    Message.objects.create(
        session=session,
        role=Message.Role.ASSISTANT,
        state=Message.State.ERROR,
        error=xss,
    )
    now = timezone.now()
    evaluate_once(now)
    deliver_due(now)  # the receiver is down; the email goes to Django's test outbox
    client = Client()
    client.force_login(personas["carol"])
    body = client.get("/alerts/").content.decode()
    assert "Sent" in body and "email to ops@example.com" in body
    assert "Waiting</strong>, 1 attempt" in body
    assert "webhook to http://127.0.0.1:" in body and "T0KEN" not in body
    assert xss not in body and "&lt;img src=x onerror=alert(1)&gt;" in body

    receiver.start()
    deliver_due(now + timedelta(minutes=5))
    (post,) = receiver.received
    assert "&lt;img src=x onerror=alert(1)&gt;" in post["json"]["text"]  # Slack: text


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("role_groups")
async def test_it_pushes_the_alert_list_to_the_alerts_page(
    personas: dict[str, User],
) -> None:
    from controlcenter.asgi import application

    headers = await sync_to_async(_headers)(personas["bob"])
    page = WebsocketCommunicator(application, "/ws/alerts/", headers=headers)
    connected, _ = await page.connect()
    assert connected
    first = await page.receive_from(timeout=5)
    assert 'id="alert-list"' in first and "No open alerts" in first

    await sync_to_async(offline_gateway)(name="east")
    await sync_to_async(make_rule)(for_seconds=1)
    await sync_to_async(evaluate_once)(timezone.now())
    frame = await page.receive_from(timeout=5)
    assert "Gateway east is not connected" in frame
    assert "Acknowledge" in frame and "Resolve" not in frame  # an operator's buttons
    await page.disconnect()
