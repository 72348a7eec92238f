"""The capability table (fleet/capabilities.py) as the worker uses it, over a real socket to the
simulator: a registered capability's connect caps are declared, its events reach its handler,
its on_ready runs after the sync, its calls are allowed with its role, and its periodic step
runs in the worker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from fleet import calls, capabilities, roles
from tests.helpers import wait_for


def holds(check: Any) -> Any:
    async def predicate() -> bool:
        return bool(check())

    return predicate


pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def probe_capability() -> Iterator[dict[str, list[Any]]]:
    seen: dict[str, list[Any]] = {"events": [], "ready": [], "lost": [], "steps": []}

    async def on_thing(link: capabilities.GatewayLink, payload: Any) -> None:
        seen["events"].append((link.gateway_id, payload))

    async def on_ready(link: capabilities.GatewayLink) -> None:
        seen["ready"].append(await link.call("health", {}))

    async def on_lost(link: capabilities.GatewayLink) -> None:
        seen["lost"].append(link.gateway_id)

    capabilities.register(
        capabilities.Capability(
            name="probe",
            events={"probe.thing": on_thing},
            calls={"probe.read": roles.VIEWER},
            connect_caps=("probe-cap",),
            on_ready=on_ready,
            on_lost=on_lost,
            periodic=(
                capabilities.Periodic(0.2, lambda: seen["steps"].append(1), "probe"),
            ),
        )
    )
    try:
        yield seen
    finally:
        capabilities._registry.pop("probe", None)


async def test_it_routes_a_registered_capability(
    sim, make_gateway, running_worker, probe_capability
) -> None:
    gateway = await asyncio.to_thread(make_gateway, sim.url)
    await running_worker()
    await wait_for(holds(lambda: bool(probe_capability["ready"])), 10)
    conn = next(iter(sim._conns.values()))
    assert {"tool-events", "probe-cap"} <= conn.caps

    sim._broadcast("probe.thing", {"n": 1})
    await wait_for(holds(lambda: bool(probe_capability["events"])), 5)
    assert probe_capability["events"] == [(gateway.pk, {"n": 1})]
    await wait_for(holds(lambda: len(probe_capability["steps"]) >= 2), 5)

    await sim.close_all(4000, "test")
    await wait_for(holds(lambda: bool(probe_capability["lost"])), 5)


def test_it_lets_the_web_ask_for_a_capability_method_with_its_role(
    probe_capability, personas
) -> None:
    calls.check_role(personas["carol"], "probe.read")  # a viewer
    with pytest.raises(PermissionError):
        calls.check_role(personas["dave"], "probe.read")  # no role
    with pytest.raises(PermissionError):
        calls.check_role(personas["alice"], "probe.write")  # not a listed call


@pytest.fixture
def batch_probe() -> Iterator[list[list[Any]]]:
    runs: list[list[Any]] = []

    async def on_changed(link: capabilities.GatewayLink, payloads: list[Any]) -> None:
        runs.append(payloads)

    capabilities.register(
        capabilities.Capability(
            name="batch-probe", batched={"sessions.changed": on_changed}
        )
    )
    try:
        yield runs
    finally:
        capabilities._registry.pop("batch-probe", None)


async def test_it_hands_a_burst_of_session_changes_to_a_batch_handler_in_runs(
    sim, make_gateway, running_worker, batch_probe
) -> None:
    """A capability that takes runs gets each `sessions.changed` exactly once, and a burst
    in fewer calls than events (one database hop per run, not per event)."""
    await asyncio.to_thread(make_gateway, sim.url)
    await running_worker()
    await wait_for(holds(lambda: bool(sim._conns)), 10)
    await asyncio.sleep(0.5)  # the sync is done; what comes now is the burst
    batch_probe.clear()
    for n in range(300):
        await sim.emit_session_changed(f"agent:main:burst-{n % 30}", label=f"n{n}")

    def seen() -> int:
        return sum(len(run) for run in batch_probe)

    await wait_for(holds(lambda: seen() >= 300), 20)
    assert seen() == 300
    assert len(batch_probe) < 300


async def test_a_database_outage_in_one_capability_does_not_silence_the_next(
    sim, make_gateway, running_worker, caplog
) -> None:
    """Two capabilities hear one event; the first meets a database outage. The second
    still handles it, and the outage still leads to a resync (whatever the first missed
    is read again)."""
    from django.db import OperationalError

    heard: list[Any] = []

    async def broken(link: capabilities.GatewayLink, payload: Any) -> None:
        raise OperationalError("the database went away")

    async def listening(link: capabilities.GatewayLink, payload: Any) -> None:
        heard.append(payload)

    capabilities.register(
        capabilities.Capability(name="probe-broken", events={"probe.both": broken})
    )
    capabilities.register(
        capabilities.Capability(name="probe-after", events={"probe.both": listening})
    )
    try:
        await asyncio.to_thread(make_gateway, sim.url)
        await running_worker()
        await wait_for(holds(lambda: bool(sim._conns)), 10)
        await asyncio.sleep(0.3)  # past the first sync
        sim._broadcast("probe.both", {"n": 2})
        await wait_for(holds(lambda: bool(heard)), 5)
        assert heard == [{"n": 2}]
        await wait_for(
            holds(lambda: any("resyncing" in r.getMessage() for r in caplog.records)), 5
        )
        assert any("probe.both event dropped" in r.getMessage() for r in caplog.records)
    finally:
        capabilities._registry.pop("probe-broken", None)
        capabilities._registry.pop("probe-after", None)
