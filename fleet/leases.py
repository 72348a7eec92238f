"""Workers share the gateways: heartbeats, the fair share, and who holds what.

Each worker beats once per lease step (`beat`): that row says it is alive. The live workers
(seen within `GATEWAY_LEASE_SECONDS`) divide the enabled gateways between them: a worker
claims free gateways only while it holds fewer than its share, `ceil(gateways / live)`, and
when it holds more than the share plus `GATEWAY_LEASE_MARGIN` (a new worker appeared) it
gives the surplus back down to the share, so the newcomer finds free ones; it does so too
above the share alone while another live worker holds fewer than the share (workers that
started together would else stay at 5/4/3). The margin keeps a worker from handing
gateways back and forth when nobody is short. A dead worker stops
beating and stops renewing: after the lease time its gateways are free and the others' shares
have grown to cover them.

The claim itself stays the conditional UPDATE in `fleet.services.claim_gateway`, so two
workers never hold one gateway whatever their view of the shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from fleet import services
from fleet.models import Gateway, WorkerHeartbeat

# Heartbeats of workers gone this long are deleted (the admin shows them as gone till then).
PRUNE_AFTER = timedelta(minutes=10)


def fair_share(gateways: int, live_workers: int) -> int:
    return math.ceil(gateways / max(live_workers, 1))


@dataclass(frozen=True)
class Share:
    gateways: int  # enabled gateways in all
    live_workers: int  # this one included
    share: int  # what this worker may claim up to
    least_held: int  # the fewest gateways another live worker held at its last beat

    @property
    def keep(self) -> int:
        """Held above this, a worker gives the surplus back (down to `share`): above the
        share plus the margin, or above the share while another worker is short of its."""
        if self.least_held < self.share:
            return self.share
        return self.share + max(settings.GATEWAY_LEASE_MARGIN, 0)


def _live_since() -> datetime:
    return timezone.now() - timedelta(seconds=settings.GATEWAY_LEASE_SECONDS)


def beat(owner: str, held: int) -> Share:
    """Say this worker is alive and how many gateways it holds; return its share."""
    now = timezone.now()
    WorkerHeartbeat.objects.update_or_create(
        owner=owner, defaults={"seen_at": now, "held": held}
    )
    WorkerHeartbeat.objects.filter(seen_at__lt=now - PRUNE_AFTER).delete()
    others = list(
        WorkerHeartbeat.objects.filter(seen_at__gte=_live_since())
        .exclude(owner=owner)
        .values_list("held", flat=True)
    )
    gateways = Gateway.objects.filter(enabled=True).count()
    share = fair_share(gateways, len(others) + 1)
    return Share(gateways, len(others) + 1, share, min(others, default=share))


def survey(owner: str, held: int) -> tuple[list[Gateway], Share]:
    """A lease step's first call: the enabled gateways, and this worker's beat."""
    return services.gateways_to_run(), beat(owner, held)


def surplus(held: list[int], share: Share) -> list[int]:
    """Which held gateways to give back: none while within share + margin, else the
    newest claims (the highest ids) down to the share."""
    if len(held) <= share.keep:
        return []
    return sorted(held)[share.share :]


@dataclass(frozen=True)
class Claims:
    started: list[int]  # claimed in this step: runners to start
    lost: list[int]  # running here, but the renewal failed: runners to stop


def claim_share(
    owner: str,
    channel: str,
    running: dict[int, datetime | None],
    gateways: list[int],
    share: Share,
) -> Claims:
    """One lease step's claims in one call (one trip to the worker's lease thread, not one
    per gateway): renew every running gateway in one UPDATE (and note their last events in
    another), then claim free ones in id order while holding fewer than the share.
    `running` maps each running gateway to its last event."""
    renewed = services.renew_gateways(list(running), owner, channel)
    # Taken over by another worker, or disabled meanwhile.
    lost = [pk for pk in running if pk not in renewed]
    services.touch_events_many(
        {pk: last for pk, last in running.items() if pk in renewed and last is not None}
    )
    held = len(renewed)
    started: list[int] = []
    for pk in gateways:
        if held >= share.share:
            break  # our share is full: leave the rest to the other workers
        if pk not in running and services.claim_gateway(pk, owner, channel):
            started.append(pk)
            held += 1
    return Claims(started, lost)


def leave(owner: str) -> None:
    """A worker that stops cleanly says so, and the others' shares grow at once."""
    WorkerHeartbeat.objects.filter(owner=owner).delete()


@dataclass(frozen=True)
class WorkerShare:
    owner: str
    alive: bool
    started_at: datetime
    seen_at: datetime
    gateways: list[str]  # names of the gateways whose lease it holds now


def held_by(owner: str) -> list[str]:
    return list(
        Gateway.objects.filter(lease_owner=owner, lease_expires_at__gt=timezone.now())
        .order_by("name")
        .values_list("name", flat=True)
    )


def worker_shares() -> list[WorkerShare]:
    """Each known worker and the gateways it holds: for /healthz and the admin."""
    now = timezone.now()
    held: dict[str, list[str]] = {}
    for owner, name in (
        Gateway.objects.filter(lease_expires_at__gt=now)
        .exclude(lease_owner="")
        .order_by("name")
        .values_list("lease_owner", "name")
    ):
        held.setdefault(owner, []).append(name)
    since = _live_since()
    shares = [
        WorkerShare(
            owner=w.owner,
            alive=w.seen_at >= since,
            started_at=w.started_at,
            seen_at=w.seen_at,
            gateways=held.pop(w.owner, []),
        )
        for w in WorkerHeartbeat.objects.all()
    ]
    # A lease without a heartbeat: a worker from before heartbeats, or one just pruned.
    shares += [
        WorkerShare(owner, True, now, now, names) for owner, names in held.items()
    ]
    return shares
