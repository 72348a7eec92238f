"""The Worker: holds the gateways it can claim, one runner each.

It claims gateways through a lease in the database (so two workers never hold the same
one; fleet/leases.py shares them out), starts, restarts and stops runners to match, runs
the capabilities' periodic steps, and takes the web's calls on a channel of its own
(webcalls.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connections

from fleet import capabilities, leases, services
from fleet.capabilities import GatewayLink
from fleet.dbretry import DB_ERRORS, db, retry_db
from fleet.groups import apush, fleet_group
from fleet.worker.runner import GatewayRunner, runner_config
from fleet.worker.webcalls import WebCalls

log = logging.getLogger(__name__)

# Why a worker let a gateway go while running: its share shrank (fleet/leases.py).
HANDED_OVER = "Handed over to another worker: the workers share the gateways."


def worker_owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    """Holds the gateways it can claim; see the module docstring."""

    def __init__(
        self, owner: str | None = None, step_interval: float | None = None
    ) -> None:
        self.owner = owner or worker_owner_id()
        self.step_interval = step_interval or max(
            settings.GATEWAY_LEASE_SECONDS / 3, 0.2
        )
        self.runners: dict[int, tuple[GatewayRunner, asyncio.Task[None]]] = {}
        self.channel = ""
        self.stopping = asyncio.Event()
        self.web = WebCalls(self._link_for)
        # The lease step's own database thread: on the one ORM thread it would queue behind
        # the runners' syncs and event batches, and a busy worker would miss its beats and
        # renewals (the other worker then sees it dead and takes its gateways, and back).
        self.leases = ThreadPoolExecutor(1, thread_name_prefix="worker-leases")

    async def run(self) -> None:
        await db(services.ensure_env_gateway)()
        layer = get_channel_layer()
        self.channel = (
            # The default prefix (see fleet/calls.py): `serve` on Redis shares the process
            # with consumers, whose channels would otherwise starve this one.
            await layer.new_channel() if layer is not None else ""
        )
        commands = asyncio.create_task(
            self.web.receive(self.channel), name="worker-commands"
        )
        periodic = [  # the capabilities' steps (fleet/capabilities.py): alerts, ...
            asyncio.create_task(
                self._periodic(p.seconds, p.step), name=f"worker-{p.name}"
            )
            for capability in capabilities.all_capabilities()
            for p in capability.periodic
        ]
        try:
            while not self.stopping.is_set():
                try:
                    await self.step()
                except DB_ERRORS as exc:  # retried for a while already; try next step
                    log.error(
                        "worker: lease step failed, the database is down: %s", exc
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), self.step_interval)
        finally:
            for task in (commands, *periodic):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.shutdown()
            self.leases.shutdown(wait=False)

    def stop(self) -> None:
        self.stopping.set()

    async def handle_call(self, message: dict[str, Any]) -> None:
        """One call from the web (see webcalls.py); the channel reader calls it too."""
        await self.web.handle_call(message)

    def _link_for(self, gateway_id: int) -> GatewayLink | None:
        entry = self.runners.get(gateway_id)
        return entry[0] if entry is not None else None

    async def _periodic(self, interval: float, step: capabilities.PeriodicStep) -> None:
        """Run one capability periodic step every `interval` seconds. Its own thread
        (not the worker's one ORM thread), since a step may wait on the network; a failing
        step is logged and tried again on the next tick."""

        def once() -> None:
            # On the loop's pool: close the connection here, whatever CONN_MAX_AGE says
            # (the worker keeps its own threads' connections, not the pool's).
            try:
                step()
            finally:
                connections.close_all()

        call = database_sync_to_async(once, thread_sensitive=False)
        what = getattr(step, "__qualname__", "a periodic step")
        while not self.stopping.is_set():
            try:
                await retry_db(call, what)
            except Exception:
                log.exception(
                    "worker: %s failed; tried again in %.0f s", what, interval
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval)

    async def step(self) -> None:
        """Claim or renew each enabled gateway; start, restart or stop runners to match.
        Its database calls go to the worker's lease thread (see `__init__`)."""
        gateway_list, share = await db(leases.survey, self.leases)(
            self.owner, len(self.runners)
        )
        gateways = {g.pk: g for g in gateway_list}
        for pk in list(self.runners):
            runner, task = self.runners[pk]
            gateway = gateways.get(pk)
            stale = gateway is None or runner_config(gateway) != runner.config
            if stale or task.done():
                await self._stop_runner(
                    pk,
                    "The gateway's settings changed."
                    if gateway
                    else "The gateway was disabled.",
                )
        running = {
            pk: None
            if runner.last_event_at is None
            else datetime.fromtimestamp(runner.last_event_at, tz=UTC)
            for pk, (runner, _) in self.runners.items()
        }
        claims = await db(leases.claim_share, self.leases)(
            self.owner, self.channel, running, list(gateways), share
        )
        for pk in claims.lost:
            # Taken over by another worker, or disabled since the list above was read
            # (the claim asks for an enabled row). The release changes only a row this
            # worker still holds, so it lets go of the disabled one and leaves the taken
            # one alone.
            log.warning(
                "gateway %s: lease lost (another worker took it, or it was "
                "disabled meanwhile)",
                gateways[pk].name,
            )
        await self._stop_runners(claims.lost, "The gateway was disabled.")
        for pk in claims.started:
            runner = GatewayRunner(gateways[pk])
            task = asyncio.create_task(
                self._run_guarded(runner), name=f"gateway-{runner.name}"
            )
            self.runners[pk] = (runner, task)
        # A new worker appeared: hand the surplus over, all at once.
        await self._stop_runners(leases.surplus(list(self.runners), share), HANDED_OVER)

    async def _run_guarded(self, runner: GatewayRunner) -> None:
        """A crash in one gateway's runner is logged and that gateway restarted by the next
        step; the other gateways go on."""
        try:
            await runner.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "gateway %s: the runner crashed; it restarts on the next step",
                runner.name,
            )
            await asyncio.sleep(1)

    async def _stop_runner(self, pk: int, reason: str, release: bool = True) -> None:
        runner, task = self.runners.pop(pk)
        await runner.stop()
        try:
            await asyncio.wait_for(task, 5)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
        except Exception:
            log.exception("gateway %s: runner ended with an error", runner.name)
        if release:
            await db(services.release_gateway, self.leases)(pk, self.owner, reason)
            await apush(fleet_group(), "fleet.gateway", gateway_id=pk)

    async def _stop_runners(self, pks: list[int], reason: str) -> None:
        """Stop several runners side by side: each may wait up to 5 s for its task, and
        a worker handing 25 over one by one would hold its next lease step that long."""
        await asyncio.gather(*(self._stop_runner(pk, reason) for pk in pks))

    async def shutdown(self) -> None:
        await self._stop_runners(list(self.runners), "The gateway worker stopped.")
        with contextlib.suppress(*DB_ERRORS):
            await db(leases.leave, self.leases)(self.owner)
        self.web.cancel()


async def run_worker(stop: asyncio.Event, worker: Worker | None = None) -> None:
    """Run a worker until `stop` is set (the commands wire signals to it)."""
    worker = worker or Worker()
    task = asyncio.create_task(worker.run(), name="gateway-worker")
    await stop.wait()
    worker.stop()
    await task
