"""`manage.py fakegateway`: run the OpenClaw gateway simulator until Ctrl-C / SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from fleet.gateway.testing import FakeGateway


class Command(BaseCommand):
    help = (
        "Run a simulated OpenClaw gateway (HTTP and WebSocket on one port) until "
        "interrupted. The token comes from --token or OPENCLAW_GATEWAY_TOKEN."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=18789)
        parser.add_argument(
            "--token",
            default=None,
            help="the gateway token (default: the OPENCLAW_GATEWAY_TOKEN environment variable)",
        )
        parser.add_argument("--protocol", type=int, choices=(3, 4), default=4)
        parser.add_argument("--agents", type=int, default=2)
        parser.add_argument("--sessions", type=int, default=5)
        parser.add_argument(
            "--event-rate",
            type=float,
            default=0.0,
            help="background session updates per second (0: none)",
        )
        parser.add_argument(
            "--pairing",
            action="store_true",
            help="unknown devices must be approved (type the requestId and Enter)",
        )
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument(
            "--count",
            type=int,
            default=1,
            help="run this many gateways in this process, on --port, --port + 1, ... "
            "(each its own seed; --port 0: free ports)",
        )
        parser.add_argument("--tick-interval-ms", type=int, default=30000)
        parser.add_argument("--delta-interval", type=float, default=0.02)
        parser.add_argument(
            "--tls-cert",
            default="",
            help="PEM certificate (chain): serve wss:// and https:// (with --tls-key)",
        )
        parser.add_argument(
            "--tls-key", default="", help="PEM private key for --tls-cert"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        token = options["token"] or os.environ.get("OPENCLAW_GATEWAY_TOKEN", "")
        if not token:
            raise CommandError(
                "No gateway token: pass --token or set OPENCLAW_GATEWAY_TOKEN."
            )
        if (
            options["agents"] < 1
            or options["sessions"] < 0
            or options["event_rate"] < 0
        ):
            raise CommandError(
                "--agents must be >= 1, --sessions and --event-rate >= 0."
            )
        if bool(options["tls_cert"]) != bool(options["tls_key"]):
            raise CommandError("--tls-cert and --tls-key go together.")
        asyncio.run(self._serve(token, options))

    async def _serve(self, token: str, options: dict[str, Any]) -> None:
        sims: list[FakeGateway] = []
        for i in range(max(1, options["count"])):
            port = options["port"] + i if options["port"] else 0
            sim = FakeGateway(
                token=token,
                protocol=options["protocol"],
                agents=options["agents"],
                sessions=options["sessions"],
                seed=options["seed"] + i,
                pairing=options["pairing"],
                tick_interval_ms=options["tick_interval_ms"],
                delta_interval=options["delta_interval"],
                event_rate=options["event_rate"],
                host=options["host"],
                port=port,
                on_pairing_request=self._show_pairing_request,
                tls_certfile=options["tls_cert"],
                tls_keyfile=options["tls_key"],
            )
            try:
                await sim.start()
            except OSError as exc:
                for started in sims:
                    await started.stop()
                raise CommandError(
                    f"Cannot listen on {options['host']}:{port}: {exc.strerror or exc}"
                ) from None
            sims.append(sim)
            self.stdout.write(
                f"Simulated OpenClaw gateway {sim.version} (protocol {sim.protocol}) on {sim.url} "
                f"(HTTP {sim.http_url}); {options['agents']} agents, {options['sessions']} sessions. "
                "Ctrl-C stops it."
            )
        sim = sims[0]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        reading = options["pairing"] and self._read_approvals(loop, sim)
        try:
            await stop.wait()
        finally:
            if reading:
                loop.remove_reader(sys.stdin.fileno())
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
            for each in sims:
                await each.stop()
            self.stdout.write("Stopped.")

    def _show_pairing_request(self, request: dict[str, Any]) -> None:
        self.stdout.write(
            f"Pairing requested by {request.get('clientId')} ({request.get('displayName') or '-'}), "
            f"device {str(request['deviceId'])[:16]}...: type {request['requestId']} and Enter to approve."
        )

    def _read_approvals(
        self, loop: asyncio.AbstractEventLoop, sim: FakeGateway
    ) -> bool:
        """Approve pairing requests typed on stdin (one requestId per line)."""
        try:
            fd = sys.stdin.fileno()
        except (OSError, ValueError):
            return False

        def on_line() -> None:
            line = sys.stdin.readline()
            if not line:  # EOF: stop reading, keep serving
                loop.remove_reader(fd)
                return
            request_id = line.strip()
            if not request_id:
                return
            try:
                sim.approve(request_id)
            except KeyError:
                self.stderr.write(f"No pending pairing request {request_id}.")
            else:
                self.stdout.write(f"Approved {request_id}.")

        try:
            loop.add_reader(fd, on_line)
        except (OSError, ValueError, NotImplementedError, PermissionError):
            return False
        return True
