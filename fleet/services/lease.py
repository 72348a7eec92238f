"""The worker lease: which worker holds which gateway, claimed with a conditional UPDATE
and released with the row's state."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Q
from django.db.models.functions import Coalesce, Now
from django.utils import timezone

from fleet.models import Gateway
from fleet.services.presence import clear_live_state

State = Gateway.State


def _free_for(owner: str, now: datetime) -> Q:
    return (
        Q(lease_owner="")
        | Q(lease_owner=owner)
        | Q(lease_expires_at__lt=now)
        | Q(lease_expires_at=None)
    )


def claim_gateway(gateway_id: int, owner: str, channel: str) -> bool:
    """Take or renew this gateway for one worker: a conditional UPDATE, so when two workers
    race exactly one wins, with no row locks."""
    now = timezone.now()
    expires = now + timedelta(seconds=settings.GATEWAY_LEASE_SECONDS)
    return (
        Gateway.objects.filter(
            _free_for(owner, now), pk=gateway_id, enabled=True
        ).update(lease_owner=owner, lease_expires_at=expires, worker_channel=channel)
        == 1
    )


def renew_gateways(gateway_ids: list[int], owner: str, channel: str) -> set[int]:
    """`claim_gateway` for all the gateways a worker runs, in one UPDATE: the ids it
    still holds (renewed now, so stamped with this very expiry) are read back."""
    if not gateway_ids:
        return set()
    now = timezone.now()
    expires = now + timedelta(seconds=settings.GATEWAY_LEASE_SECONDS)
    Gateway.objects.filter(
        _free_for(owner, now), pk__in=gateway_ids, enabled=True
    ).update(lease_owner=owner, lease_expires_at=expires, worker_channel=channel)
    return set(
        Gateway.objects.filter(
            pk__in=gateway_ids, lease_owner=owner, lease_expires_at=expires
        ).values_list("pk", flat=True)
    )


def release_gateway(gateway_id: int, owner: str, error: str) -> None:
    updated = Gateway.objects.filter(pk=gateway_id, lease_owner=owner).update(
        lease_owner="",
        lease_expires_at=None,
        worker_channel="",
        state=State.OFFLINE,
        state_changed_at=timezone.now(),
        connected_since=None,
        not_connected_since=Coalesce("not_connected_since", Now()),
        last_error=error,
    )
    if updated:
        clear_live_state(gateway_id)


def gateways_to_run() -> list[Gateway]:
    return list(Gateway.objects.filter(enabled=True).order_by("pk"))
