"""Workers share the gateways (fleet/leases.py), as plain sync functions on the database:
the fair share from the live heartbeats, what a worker gives back, and who holds what."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from fleet import leases, services
from fleet.models import Gateway, WorkerHeartbeat


@pytest.fixture
def twelve(db: Any, settings: Any) -> list[Gateway]:
    settings.GATEWAY_LEASE_SECONDS = 10.0
    settings.GATEWAY_LEASE_MARGIN = 1
    return [
        Gateway.objects.create(name=f"gw-{i:02d}", url=f"ws://127.0.0.1:{i + 1}")
        for i in range(12)
    ]


def test_the_fair_share_is_the_ceiling_over_live_workers() -> None:
    assert [leases.fair_share(12, n) for n in (0, 1, 2, 3, 5)] == [12, 12, 6, 4, 3]
    assert leases.fair_share(0, 3) == 0


def test_a_worker_alone_takes_all_then_its_share_shrinks_as_others_beat(
    twelve: list[Gateway],
) -> None:
    assert leases.beat("a", 0).share == 12
    assert leases.beat("b", 0).share == 6
    share = leases.beat("a", 12)
    assert (share.live_workers, share.share) == (2, 6)
    # Another worker is short (it holds 0): give back down to the share.
    assert leases.surplus([g.pk for g in twelve], share) == [g.pk for g in twelve[6:]]


def test_the_margin_keeps_one_more_while_nobody_is_short(
    twelve: list[Gateway],
) -> None:
    leases.beat("b", 4)
    leases.beat("c", 3)
    share = leases.beat("a", 5)  # c holds 3 < 4: short
    assert leases.surplus([g.pk for g in twelve[:5]], share) == [twelve[4].pk]
    leases.beat("c", 4)
    share = leases.beat("a", 5)  # nobody short: 5 <= 4 + margin, kept
    assert leases.surplus([g.pk for g in twelve[:5]], share) == []
    assert leases.surplus([g.pk for g in twelve[:6]], share) == [
        twelve[4].pk,
        twelve[5].pk,
    ]


def test_a_dead_worker_stops_counting_after_the_lease_time_and_is_pruned_later(
    twelve: list[Gateway],
) -> None:
    leases.beat("dead", 4)
    WorkerHeartbeat.objects.filter(owner="dead").update(
        seen_at=timezone.now() - timedelta(seconds=11)
    )
    assert leases.beat("a", 0).live_workers == 1
    WorkerHeartbeat.objects.filter(owner="dead").update(
        seen_at=timezone.now() - leases.PRUNE_AFTER - timedelta(seconds=1)
    )
    leases.beat("a", 0)
    assert list(WorkerHeartbeat.objects.values_list("owner", flat=True)) == ["a"]


def test_a_clean_stop_leaves_at_once(twelve: list[Gateway]) -> None:
    leases.beat("a", 0)
    leases.beat("b", 0)
    leases.leave("b")
    assert leases.beat("a", 0).share == 12


def test_worker_shares_name_each_workers_gateways(twelve: list[Gateway]) -> None:
    leases.beat("a", 0)
    leases.beat("b", 0)
    for g in twelve[:3]:
        assert services.claim_gateway(g.pk, "a", "chan-a")
    assert services.claim_gateway(twelve[3].pk, "b", "chan-b")
    assert services.claim_gateway(twelve[4].pk, "old", "chan-old")  # no heartbeat
    shares = {s.owner: s for s in leases.worker_shares()}
    assert shares["a"].gateways == ["gw-00", "gw-01", "gw-02"] and shares["a"].alive
    assert shares["b"].gateways == ["gw-03"]
    assert shares["old"].gateways == ["gw-04"]
    assert leases.held_by("a") == ["gw-00", "gw-01", "gw-02"]


@pytest.mark.django_db(transaction=True)
async def test_a_gateway_disabled_while_the_worker_renews_is_let_go(
    sim: Any, make_gateway: Any, running_worker: Any, monkeypatch: Any
) -> None:
    """The admin disables a gateway between the worker's read of the list and its renewal
    of the lease: the renewal fails (it asks for an enabled row), and the worker releases
    the row instead of leaving it held and `connected`."""
    import asyncio

    from tests.helpers import wait_for

    gateway = await asyncio.to_thread(make_gateway, sim.url)
    stale = await asyncio.to_thread(services.gateways_to_run)  # read while enabled
    worker = await running_worker()

    async def connected() -> bool:
        g = await Gateway.objects.aget(pk=gateway.pk)
        return g.state == Gateway.State.CONNECTED

    await wait_for(connected, 15)
    # From now on every step reads the list as it was before the admin's change.
    monkeypatch.setattr(services, "gateways_to_run", lambda: stale)
    await Gateway.objects.filter(pk=gateway.pk).aupdate(enabled=False)

    async def released() -> bool:
        g = await Gateway.objects.aget(pk=gateway.pk)
        return g.lease_owner == "" and g.state == Gateway.State.OFFLINE

    await wait_for(released, 10)
    assert gateway.pk not in worker.runners
    g = await Gateway.objects.aget(pk=gateway.pk)
    assert g.last_error == "The gateway was disabled."


# Fifty gateways (issue 16): the split converges, and a busy worker keeps its beats.


@pytest.fixture
def fifty(db: Any, settings: Any) -> list[int]:
    settings.GATEWAY_LEASE_SECONDS = 10.0
    settings.GATEWAY_LEASE_MARGIN = 1
    return [
        Gateway.objects.create(name=f"gw-{i:02d}", url=f"ws://127.0.0.1:{i + 1}").pk
        for i in range(50)
    ]


def _lease_step(owner: str, running: dict[int, Any]) -> None:
    """The supervisor's lease step, without runners: what it claims and gives back."""
    gateways, share = leases.survey(owner, len(running))
    claims = leases.claim_share(owner, "", running, [g.pk for g in gateways], share)
    for pk in claims.lost:
        running.pop(pk)
    running.update(dict.fromkeys(claims.started))
    for pk in leases.surplus(list(running), share):
        services.release_gateway(pk, owner, "handed over")
        running.pop(pk)


def _held() -> list[int]:
    counts: dict[str, int] = {}
    for owner in Gateway.objects.values_list("lease_owner", flat=True):
        counts[owner] = counts.get(owner, 0) + 1
    return sorted((n for owner, n in counts.items() if owner), reverse=True)


def test_fifty_gateways_split_between_two_then_three_workers_in_a_few_steps(
    fifty: list[int],
) -> None:
    workers: dict[str, dict[int, Any]] = {"a": {}}
    _lease_step("a", workers["a"])
    assert _held() == [50]
    for newcomer, split in (("b", [25, 25]), ("c", [17, 17, 16])):
        workers[newcomer] = {}
        for _ in range(3):  # three rounds of steps, each worker in turn
            for owner, running in workers.items():
                _lease_step(owner, running)
        assert _held() == split
        assert sum(len(r) for r in workers.values()) == 50


@pytest.mark.django_db(transaction=True)
async def test_a_busy_worker_keeps_beating_and_renewing_its_share(
    fast_worker_settings: Any, settings: Any
) -> None:
    """The runners' syncs and event batches queue on the loop's one ORM thread. The lease
    step must not queue behind them: with that thread busy for longer than the lease time,
    each worker's step still completes at once, so neither sees the other dead and takes
    its gateways (the 21/29 that never settled at 50 gateways)."""
    import asyncio
    import time

    from channels.db import database_sync_to_async

    from fleet.worker import Worker

    settings.GATEWAY_LEASE_MARGIN = 1  # the lease: 3 s (fast_worker_settings)
    await database_sync_to_async(
        lambda: Gateway.objects.bulk_create(
            Gateway(name=f"gw-{i:02d}", url="ws://127.0.0.1:9", rest_url="")
            for i in range(50)
        )
    )()
    a, b = Worker(owner="a", step_interval=0.2), Worker(owner="b", step_interval=0.2)
    try:
        await a.step()
        await b.step()
        await a.step()  # gives its surplus back
        await b.step()  # claims it
        assert (len(a.runners), len(b.runners)) == (25, 25)
        busy = asyncio.ensure_future(database_sync_to_async(time.sleep)(4.5))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        while time.monotonic() - started < 4.0:  # well past the lease time
            await asyncio.wait_for(a.step(), 0.5)
            await asyncio.wait_for(b.step(), 0.5)
            await asyncio.sleep(0.2)
        assert (len(a.runners), len(b.runners)) == (25, 25)
        held = await database_sync_to_async(_held)()
        assert held == [25, 25]
        await busy
    finally:
        await asyncio.gather(a.shutdown(), b.shutdown())
        a.leases.shutdown(wait=False)
        b.leases.shutdown(wait=False)
