"""Everything in one process on the embedded defaults: the web server (daphne), the gateway
worker, and with --demo the built-in gateway simulator. All share daphne's asyncio loop, so
the in-memory channel layer connects them."""

from __future__ import annotations

import asyncio
import os
import secrets
from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from fleet.bootstrap import ensure_admin_account

DEMO_GATEWAY_NAME = "demo"
DEMO_TOKEN_ENV = "CONTROLCENTER_DEMO_GATEWAY_TOKEN"


class Command(BaseCommand):
    help = "Run the Control Center in one process: web, worker, and with --demo a simulated gateway."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--demo", action="store_true", help="also run the gateway simulator"
        )
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--demo-sessions", type=int, default=40)
        parser.add_argument("--demo-agents", type=int, default=3)
        parser.add_argument("--demo-event-rate", type=float, default=0.5)
        parser.add_argument(
            "--demo-gateways",
            type=int,
            default=1,
            help="simulated gateways (above 3 the fleet page shows its compact table)",
        )
        parser.add_argument(
            "--demo-approval-every",
            type=float,
            default=180.0,
            help="seconds between demo runs that ask for an exec approval (0: never)",
        )
        parser.add_argument("--no-migrate", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        if not options["no_migrate"]:
            call_command("migrate", interactive=False, verbosity=0)
        password = ensure_admin_account()
        if password:
            self.stdout.write(
                self.style.WARNING(
                    f"Created the account 'admin' with the password {password} "
                    "(shown once; set CONTROLCENTER_ADMIN_PASSWORD to choose it)."
                )
            )
        if options["demo"]:
            os.environ.setdefault(DEMO_TOKEN_ENV, secrets.token_urlsafe(24))

        # Importing daphne's server installs the asyncio reactor: do it only now.
        from daphne.endpoints import build_endpoint_description_strings
        from daphne.server import Server
        from twisted.internet import defer
        from twisted.internet import reactor as twisted_reactor

        from controlcenter.asgi import application

        # The installed reactor is the asyncio one; its stubs type it as a bare module.
        reactor: Any = twisted_reactor
        stop = asyncio.Event()
        background: list[asyncio.Task[None]] = []

        def start_background() -> None:
            loop = asyncio.get_running_loop()
            background.append(loop.create_task(self._background(stop, options)))

        def stop_background() -> defer.Deferred[None] | None:
            stop.set()
            if not background:
                return None
            return defer.Deferred.fromFuture(
                asyncio.ensure_future(_wait(background[0]))
            )

        # Startup triggers fire before the asyncio loop runs: start one tick later.
        reactor.callWhenRunning(lambda: reactor.callLater(0, start_background))
        reactor.addSystemEventTrigger("before", "shutdown", stop_background)
        self.stdout.write(
            f"Control Center on http://{options['host']}:{options['port']}/"
        )
        Server(
            application=application,
            endpoints=build_endpoint_description_strings(
                host=options["host"], port=options["port"]
            ),
            signal_handlers=True,
            verbosity=0,
        ).run()

    async def _background(self, stop: asyncio.Event, options: dict[str, Any]) -> None:
        from channels.db import database_sync_to_async

        from fleet.worker import run_worker

        sims: list[Any] = []
        if options["demo"]:
            from fleet.gateway.testing import FakeGateway

            for i in range(max(1, options["demo_gateways"])):
                sim = FakeGateway(
                    token=os.environ[DEMO_TOKEN_ENV],
                    agents=options["demo_agents"],
                    sessions=options["demo_sessions"],
                    event_rate=options["demo_event_rate"],
                    seed=i + 1,
                )
                await sim.start(host="127.0.0.1", port=0)
                sims.append(sim)
                name = DEMO_GATEWAY_NAME if i == 0 else f"{DEMO_GATEWAY_NAME}-{i + 1}"
                await database_sync_to_async(_point_demo_gateway)(sim.url, name)
                sim.start_cron_demo()
                self.stdout.write(f"Gateway simulator {name} on {sim.url}")
            await database_sync_to_async(_demo_alert_rules)()
        # The first demo gateway's agent asks for an exec approval every few minutes.
        asker = (
            asyncio.create_task(
                _ask_for_approvals(sims[0], options["demo_approval_every"])
            )
            if sims and options["demo_approval_every"] > 0
            else None
        )
        try:
            await run_worker(stop)
        finally:
            if asker is not None:
                asker.cancel()
            for sim in sims:
                await sim.stop()


DEMO_COMMANDS = (
    "uname -a",
    "df -h /",
    "git status",
    "ls -la ~/notes",
    "sudo systemctl restart nginx",
)


async def _ask_for_approvals(sim: Any, every: float) -> None:
    """The demo's agent: every few minutes a run elsewhere (a channel) wants to run a
    command, and waits for someone to decide in the chat or the inbox."""
    turn = 0
    await asyncio.sleep(min(every, 20.0))
    while True:
        command = DEMO_COMMANDS[turn % len(DEMO_COMMANDS)]
        turn += 1
        if sim._approval_clients():
            sim.start_external_run(
                sim.main_session_key, f"please [[fake:exec {command}]] now"
            )
        await asyncio.sleep(every)


async def _wait(task: asyncio.Task[None]) -> None:
    await asyncio.wait_for(asyncio.shield(task), 10)


def _demo_alert_rules() -> None:
    """The alerts app's demo rules, on first start (a command by name: fleet imports no
    capability app)."""
    from django.core.management import call_command, get_commands

    if "demo_alert_rules" in get_commands():
        call_command("demo_alert_rules")


def _point_demo_gateway(url: str, name: str = DEMO_GATEWAY_NAME) -> None:
    from fleet.models import Gateway

    Gateway.objects.update_or_create(
        name=name,
        defaults={
            "url": url,
            "token_env": DEMO_TOKEN_ENV,
            "enabled": True,
            "rest_url": "",
        },
    )
