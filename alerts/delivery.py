"""The sender: one sync step, `deliver_due(now)`, that the worker runs every
ALERTS_DELIVER_INTERVAL seconds (registered in alerts/apps.py through fleet/capabilities.py). It claims each due outbox row with a
conditional UPDATE (another worker, or a later pass, skips it), sends it, and marks it sent;
a failure puts it back with a later `next_attempt_at` (doubling up to a cap) until
ALERTS_MAX_ATTEMPTS, then it shows as given up.

Exactly once per destination, as far as a sender can promise it: a row is marked sent in
the same step that sent it, and a worker killed between attempts leaves it `pending`, so
the next worker sends it once. A worker killed in the instant between the send and the mark
leaves it `sending`; once its claim runs out it is sent again, with the same idempotency
key (X-ControlCenter-Delivery header, email Message-ID) so the receiver can drop the repeat.

Webhooks are signed: X-ControlCenter-Signature: sha256=HMAC-SHA256(secret,
"<X-ControlCenter-Timestamp>.<body>") in hex, the secret read from the worker's environment
variable the rule names. Nothing logged or stored here carries the URL's path (Slack's
token) or the secret."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from datetime import datetime, timedelta
from typing import Any

import httpx
from django.conf import settings
from django.core.mail import EmailMessage, get_connection
from django.db.models import F, Q
from django.utils import timezone

from alerts import notify, secrets
from alerts.models import Delivery

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-ControlCenter-Signature"
TIMESTAMP_HEADER = "X-ControlCenter-Timestamp"
DELIVERY_HEADER = "X-ControlCenter-Delivery"
MESSAGE_ID_DOMAIN = "controlcenter.alerts"
BATCH = 50


class DeliveryError(Exception):
    """A send that failed, with a message safe to store and show."""


def _due(now: datetime) -> Q:
    # Waiting and due, or claimed by a worker that died before it marked the row.
    return Q(status=Delivery.Status.PENDING, next_attempt_at__lte=now) | Q(
        status=Delivery.Status.SENDING, claimed_until__lt=now
    )


def claim_seconds() -> float:
    return float(settings.ALERTS_SEND_TIMEOUT) * 3 + 5


def retry_delay(attempts: int) -> float:
    first, cap = float(settings.ALERTS_RETRY_FIRST), float(settings.ALERTS_RETRY_CAP)
    return float(min(first * 2 ** max(attempts - 1, 0), cap))


def deliver_due(now: datetime | None = None) -> int:
    """Send what is due; returns how many were sent."""
    now = now or timezone.now()
    ids = list(
        Delivery.objects.filter(_due(now))
        .order_by("next_attempt_at", "pk")
        .values_list("pk", flat=True)[:BATCH]
    )
    sent = 0
    for pk in ids:
        claimed = (
            Delivery.objects.filter(_due(now), pk=pk).update(
                status=Delivery.Status.SENDING,
                claimed_until=now + timedelta(seconds=claim_seconds()),
                attempts=F("attempts") + 1,
            )
            == 1
        )
        if not claimed:
            continue  # another worker has it
        delivery = Delivery.objects.select_related("notice__rule").get(pk=pk)
        try:
            send(delivery)
        except Exception as exc:  # noqa: BLE001 - every failure is retried, none crashes
            _failed(delivery, exc, now)
        else:
            Delivery.objects.filter(pk=pk, status=Delivery.Status.SENDING).update(
                status=Delivery.Status.SENT,
                sent_at=timezone.now(),
                claimed_until=None,
                last_error="",
            )
            sent += 1
        notify.alerts_changed()  # the delivery state shows on the alerts page
    return sent


def _failed(delivery: Delivery, exc: BaseException, now: datetime) -> None:
    rule = delivery.notice.rule
    url = rule.webhook_url if rule is not None else ""
    text = (
        str(exc)
        if isinstance(exc, DeliveryError)
        else f"{exc.__class__.__name__}: {exc}"
    )
    text = secrets.scrub(text, url)[:500]
    # A removed rule takes its destinations with it: nothing to retry.
    give_up = rule is None or delivery.attempts >= settings.ALERTS_MAX_ATTEMPTS
    Delivery.objects.filter(pk=delivery.pk, status=Delivery.Status.SENDING).update(
        status=Delivery.Status.FAILED if give_up else Delivery.Status.PENDING,
        next_attempt_at=now + timedelta(seconds=retry_delay(delivery.attempts)),
        claimed_until=None,
        last_error=text,
    )
    log.warning(
        "alert delivery %s (%s) failed, attempt %d%s: %s",
        delivery.pk,
        destination(delivery),
        delivery.attempts,
        ", giving up" if give_up else "",
        text,
    )


def destination(delivery: Delivery) -> str:
    """What pages and logs may show: the address, or the webhook's scheme and host."""
    if delivery.channel == Delivery.Channel.EMAIL:
        return delivery.address
    rule = delivery.notice.rule
    return "webhook " + (rule.webhook_display if rule is not None else "(rule removed)")


def send(delivery: Delivery) -> None:
    rule = delivery.notice.rule
    if rule is None:
        raise DeliveryError("the rule was removed")
    if delivery.channel == Delivery.Channel.EMAIL:
        send_email(delivery)
    else:
        send_webhook(delivery, rule.webhook_url, rule.webhook_secret_env)


def send_email(delivery: Delivery) -> None:
    notice = delivery.notice
    key = str(delivery.idempotency_key)
    message = EmailMessage(
        subject=notice.subject,
        body=notice.text,
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=[delivery.address],
        headers={
            "Message-ID": f"<{key}@{MESSAGE_ID_DOMAIN}>",
            DELIVERY_HEADER: key,
        },
        connection=get_connection(
            fail_silently=False,
            timeout=getattr(settings, "EMAIL_TIMEOUT", None)
            or settings.ALERTS_SEND_TIMEOUT,
        ),
    )
    message.send()


def slack_escape(text: str) -> str:
    """Slack's mrkdwn gives <, > and & a meaning (links, mentions): gateway text stays text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def webhook_body(delivery: Delivery) -> bytes:
    notice = delivery.notice
    body: dict[str, Any] = {
        "text": slack_escape(notice.text),
        "subject": notice.subject,
        "delivery": str(delivery.idempotency_key),
        "notice_id": notice.pk,
        **notice.payload,
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def send_webhook(delivery: Delivery, url: str, secret_env: str) -> None:
    if not url:
        raise DeliveryError("the rule has no webhook URL any more")
    body = webhook_body(delivery)
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "OpenClaw-Control-Center-Alerts",
        DELIVERY_HEADER: str(delivery.idempotency_key),
        "Idempotency-Key": str(delivery.idempotency_key),
        TIMESTAMP_HEADER: timestamp,
    }
    if secret_env:
        try:
            headers[SIGNATURE_HEADER] = sign(
                secrets.secret_from_env(secret_env), timestamp, body
            )
        except ValueError as exc:
            raise DeliveryError(str(exc)) from None
    try:
        response = httpx.post(
            url,
            content=body,
            headers=headers,
            timeout=float(settings.ALERTS_SEND_TIMEOUT),
            follow_redirects=False,
        )
    except httpx.HTTPError as exc:
        # httpx's texts may quote the URL; the caller scrubs, but keep to the class and
        # the OS reason where there is one.
        reason = str(exc.__cause__ or exc) or exc.__class__.__name__
        raise DeliveryError(
            f"{exc.__class__.__name__}: {secrets.scrub(reason, url)}"
        ) from None
    if not 200 <= response.status_code < 300:
        raise DeliveryError(f"the receiver answered HTTP {response.status_code}")
