"""Pairing against the real OpenClaw gateway (2026.9.6) reached over a non-loopback
address, so that it really asks for pairing: the test makes a network namespace and a veth
pair with private addresses (10.213.x.y/30), runs the gateway inside the namespace bound to
its side (`--bind lan` inside the namespace means only its loopback and its veth end), and
the worker connects from the host side. Nothing uses the machine's own addresses. The
request is approved with the gateway's own CLI (`openclaw devices approve <requestId>`, run
inside the namespace, on the "gateway host") and the running worker connects by itself.
Then the gateway revokes the device token (4001 "device removed"; the next connect is a
role upgrade to approve), and then its shared secret changes (4001 "gateway auth changed";
the worker connects on its device token and says which variable needs the new token).

Needs root (`ip netns add`) and the real gateway (scripts/realgw/setup.sh); skipped with a
message otherwise, except under CI=true, where it must run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleet import calls
from fleet.models import Agent, DeviceIdentity, Gateway
from fleet.worker import refusals
from tests import realgw
from tests.helpers import TEST_TOKEN_ENV, until_state, wait_for

pytestmark = [pytest.mark.realgw, pytest.mark.django_db(transaction=True)]

GATEWAY_PORT = (
    18789  # inside the namespace: its own network stack, nothing else listens
)
FAKE_PORT = 18790


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")
    return result


def _skip_or_fail(message: str) -> None:
    if realgw.under_ci():
        pytest.fail(f"{message} (CI=true: this test must run)")
    pytest.skip(message)


@dataclass
class NetnsGateway(realgw.RealGateway):
    """A real gateway inside a network namespace, reached at `address` over a veth pair."""

    namespace: str = ""
    address: str = ""

    @property
    def url(self) -> str:
        return f"ws://{self.address}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def cli(
        self,
        *args: str,
        timeout: float = 120.0,
        check: bool = False,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """The openclaw CLI on the gateway's host: inside the namespace, with its env."""
        return subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.namespace,
                str(realgw.SCRIPTS / "openclaw.sh"),
                *args,
            ],
            env=self.env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )


class _Netns:
    """A namespace and a veth pair with a private /30, removed on exit."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.name = f"cc7-{tag}"
        self.host_if, self.ns_if = f"cc7{tag}h", f"cc7{tag}n"  # at most 15 characters
        used = _run("ip", "-4", "-o", "addr", "show").stdout
        while True:
            third, fourth = random.randrange(256), 4 * random.randrange(64)
            net = f"10.213.{third}."
            if net not in used:
                break
        self.host_ip, self.ns_ip = f"{net}{fourth + 1}", f"{net}{fourth + 2}"

    def create(self) -> None:
        _run("ip", "netns", "add", self.name)
        try:
            _run(
                "ip", "link", "add", self.host_if, "type", "veth", "peer", "name",
                self.ns_if,
            )  # fmt: skip
            _run("ip", "link", "set", self.ns_if, "netns", self.name)
            _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            _run("ip", "link", "set", self.host_if, "up")
            inside = ("ip", "netns", "exec", self.name, "ip")
            _run(*inside, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
            _run(*inside, "link", "set", self.ns_if, "up")
            _run(*inside, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        _run("ip", "netns", "del", self.name, check=False)
        _run(
            "ip", "link", "del", self.host_if, check=False
        )  # gone with the ns normally


def _check_netns_allowed() -> None:
    if shutil.which("ip") is None:
        _skip_or_fail(
            "the `ip` command (iproute2) is missing: apt-get install iproute2"
        )
    probe = f"cc7-probe-{secrets.token_hex(3)}"
    result = _run("ip", "netns", "add", probe, check=False)
    if result.returncode != 0:
        _skip_or_fail(
            "`ip netns add` is not permitted here (run the tests as root, or with "
            f"CAP_SYS_ADMIN and CAP_NET_ADMIN): {result.stderr.strip()}"
        )
    _run("ip", "netns", "del", probe, check=False)


def _wait_healthz(gw: NetnsGateway, deadline: float) -> None:
    opener = realgw._no_proxy_opener()
    assert gw.process is not None
    while time.monotonic() < deadline:
        if gw.process.poll() is not None:
            raise RuntimeError(
                f"the gateway in {gw.namespace} exited before /healthz answered:\n"
                + realgw._tail(gw.log_path)
            )
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            opener.open(f"{gw.http_url}/healthz", timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.25)
    raise RuntimeError(
        f"no /healthz from the gateway at {gw.http_url}:\n" + realgw._tail(gw.log_path)
    )


@pytest.fixture(scope="module")
def netns_gateway() -> Iterator[NetnsGateway]:
    _check_netns_allowed()
    flavor = realgw.V4
    root = flavor.root
    if not realgw.is_installed(flavor, root):
        if not realgw.under_ci():
            pytest.skip(flavor.missing)
        with realgw._outside_test_timeout():
            realgw.install(flavor, root)
    netns = _Netns()
    netns.create()
    runs = root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-netns-", dir=runs))
    (run_dir / "owner").write_text(f"{os.getpid()}\n")
    (run_dir / "logs").mkdir()
    token = secrets.token_urlsafe(32)
    gw = NetnsGateway(
        version=flavor.version,
        root=root,
        run_dir=run_dir,
        port=GATEWAY_PORT,
        fake_port=FAKE_PORT,
        token=token,
        env=realgw._script_env(flavor, root, run_dir, GATEWAY_PORT, FAKE_PORT, token),
        namespace=netns.name,
        address=netns.ns_ip,
    )
    try:
        with realgw._outside_test_timeout():
            started = time.monotonic()
            with gw.log_path.open("ab") as out:
                # `lan` inside the namespace: 0.0.0.0 there is its loopback and its veth
                # end only. The gateway's own CLI reaches it on the namespace's loopback.
                gw.process = subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        netns.name,
                        str(realgw.SCRIPTS / "start.sh"),
                        "--bind",
                        "lan",
                    ],
                    env=gw.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            _wait_healthz(gw, started + realgw.HEALTHZ_TIMEOUT_S)
            gw.timings["start_to_healthz_s"] = time.monotonic() - started
        yield gw
    finally:
        try:
            with contextlib.suppress(Exception):
                realgw._stop_processes(gw)
            if gw.process is not None and gw.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(gw.process.pid, signal.SIGKILL)
            realgw._save_logs(gw)
            shutil.rmtree(run_dir, ignore_errors=True)
        finally:
            netns.remove()
            assert netns.name not in _run("ip", "netns", "list").stdout


async def _device(gateway: Gateway) -> DeviceIdentity:
    return await DeviceIdentity.objects.aget(gateway_id=gateway.pk)


def _approve(gw: NetnsGateway, request_id: str) -> None:
    result = gw.cli("devices", "approve", request_id)
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]


async def test_the_real_gateway_asks_to_pair_and_the_worker_connects_once_approved(
    netns_gateway, make_gateway, running_worker, monkeypatch, caplog, settings, personas
) -> None:
    gw = netns_gateway
    monkeypatch.setenv(TEST_TOKEN_ENV, gw.token)
    # Plain ws:// off loopback, over a private veth pair: named as a VPN address would be.
    monkeypatch.setenv("CONTROLCENTER_INSECURE_HOSTS", gw.address)
    monkeypatch.setattr(refusals, "PAIRING_RETRY_SECONDS", 1.0)
    caplog.set_level(logging.INFO, logger="fleet.worker")
    gateway = await asyncio.to_thread(make_gateway, gw.url)
    await running_worker()
    # The REST fallback would stand in while the gateway says "starting"; not under test.
    settings.GATEWAY_WS_READY_TIMEOUT = 120.0

    # Off loopback the real gateway refuses the unknown device with a pairing request.
    pending = await until_state(gateway, Gateway.State.PAIRING_REQUIRED, timeout=90)
    request_id = pending.pairing_request_id
    assert request_id and pending.pairing_reason == "not-paired"
    assert f"openclaw devices approve {request_id}" in pending.last_error
    device = await _device(gateway)
    listed = await asyncio.to_thread(gw.cli, "devices", "list", "--json")
    assert request_id in listed.stdout and device.device_id in listed.stdout

    # Several slow retries later the request is still the same one.
    await asyncio.sleep(3)
    assert (await Gateway.objects.aget(pk=gateway.pk)).pairing_request_id == request_id

    # Approved with the gateway's CLI on its host: the running worker connects by itself.
    await asyncio.to_thread(_approve, gw, request_id)
    connected = await until_state(gateway, Gateway.State.CONNECTED, timeout=30)
    assert connected.protocol == 4 and connected.pairing_request_id == ""
    device = await _device(gateway)
    assert device.device_token  # issued by the gateway on the approved connect
    assert "operator.admin" in device.device_token_scopes
    await wait_for(
        lambda: Agent.objects.filter(gateway=gateway, agent_id="main").aexists(),
        timeout=30,
    )
    paired = json.loads(
        (await asyncio.to_thread(gw.cli, "devices", "list", "--json")).stdout
    )
    assert device.device_id in json.dumps(paired.get("paired", paired))

    # The gateway revokes the device token: the worker is told (close 4001), forgets the
    # token, and comes back on the shared token (re-approving if the gateway asks for it).
    old_token = device.device_token
    revoked = await asyncio.to_thread(
        gw.cli, "devices", "revoke", "--device", device.device_id, "--role", "operator"
    )
    assert revoked.returncode == 0, (revoked.stdout + revoked.stderr)[-2000:]

    approved: set[str] = {request_id}

    async def reconnected() -> bool:
        g = await Gateway.objects.aget(pk=gateway.pk)
        if (
            g.state == Gateway.State.PAIRING_REQUIRED
            and g.pairing_request_id
            and g.pairing_request_id
            not in approved  # once each: then the worker's turn
        ):
            approved.add(g.pairing_request_id)
            assert (
                g.pairing_reason == "role-upgrade"
            )  # what 2026.9.6 asks after a revoke
            await asyncio.to_thread(_approve, gw, g.pairing_request_id)
        current = await _device(gateway)
        return (
            g.state == Gateway.State.CONNECTED
            and current.device_token != old_token
            and "device session (close 4001" in caplog.text
        )

    await wait_for(reconnected, timeout=60, interval=0.5)

    # The gateway's shared secret changes (its config is edited; the gateway applies it
    # while running). The worker's environment still holds the old token: the gateway
    # refuses it and offers the device token, and the worker connects on that, saying
    # which variable needs the new token.
    config = gw.run_dir / "state" / "openclaw.json"
    new_secret = secrets.token_urlsafe(32)
    config.write_text(
        config.read_text().replace("${OPENCLAW_GATEWAY_TOKEN}", new_secret)
    )
    gw.token = new_secret  # the saved logs and config are redacted with it

    async def on_device_token() -> bool:
        g = await Gateway.objects.aget(pk=gateway.pk)
        if g.state == Gateway.State.CONNECTED and "device token" in g.last_error:
            return True
        with contextlib.suppress(Exception):  # a call notices a stale session sooner
            await calls.acall(gateway.pk, "health", {}, user=personas["alice"])
        return False

    await wait_for(on_device_token, timeout=90, interval=1.0)
    note = (await Gateway.objects.aget(pk=gateway.pk)).last_error
    assert TEST_TOKEN_ENV in note
    # Seen on 2026.9.6: it closes the shared-token session with 4001 "gateway auth changed".
    assert "shared secret changed (close 4001)" in caplog.text
