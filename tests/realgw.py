"""The real OpenClaw gateway as session-scoped pytest fixtures (a helper module, not a conftest).

- ``real_gateway``: openclaw 2026.9.6 (protocol 4), installed by ``scripts/realgw/setup.sh`` into
  ``$REALGW_ROOT`` (default ``/tmp/controlcenter-realgw``). When it is not installed the tests
  using it are skipped, except under ``CI=true``, where the fixture installs it and never skips.
- ``real_gateway_v3``: openclaw 2026.4.12 (protocol 3), installed by
  ``VERSION=v3 scripts/realgw/setup.sh`` into ``$REALGW_V3_ROOT`` (default
  ``/tmp/controlcenter-realgw-v3``). Skipped when not installed, except under ``CI=true``, as
  for v4: the older protocol is a real part the tests hold the worker to.

Register them in ``tests/conftest.py``::

    from tests.realgw import real_gateway, real_gateway_v3  # noqa: F401

Each test session starts its own gateway and fake model server (``scripts/realgw/start.sh``) on a
free port pair, with a random token and a fresh state directory under ``ROOT/runs/``, waits until
``/healthz`` answers and a ``connect`` is accepted (not refused with 1013 "gateway starting"), and
stops both at the end (``scripts/realgw/stop.sh``). The logs are kept, with the token redacted,
in ``test-artifacts/realgw-<version>/<run>/`` (the newest five runs). The fixture value is a :class:`RealGateway`:
``.url``, ``.http_url``, ``.token``, ``.root``, ``.cli(*args)``, ``.fake_model_log``, ...
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.sync.client import connect as ws_connect

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts" / "realgw"
ARTIFACTS = REPO / "test-artifacts"

INSTALL_TIMEOUT_S = 1800.0  # setup.sh: about a minute with a warm npm cache
# /healthz answers after 12-17 s (v4) or 6-9 s (v3) on an idle 2-core machine, but after 27-45 s
# when it is busy (load 10); a connect is then refused ("gateway starting", close 1013) for about
# a second when idle, up to 15 s when busy.
HEALTHZ_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Flavor:
    """One gateway release line, as the ``VERSION`` of ``scripts/realgw/*.sh`` names it."""

    version: str  # "v4" | "v3"
    protocol: int  # what hello-ok.protocol says
    root_env: str  # environment variable that overrides the install root
    default_root: str
    missing: str  # the skip message when it is not installed

    @property
    def root(self) -> Path:
        return Path(os.environ.get(self.root_env) or self.default_root)


V4 = Flavor(
    version="v4",
    protocol=4,
    root_env="REALGW_ROOT",
    default_root="/tmp/controlcenter-realgw",
    missing="real OpenClaw gateway not installed: run scripts/realgw/setup.sh",
)
V3 = Flavor(
    version="v3",
    protocol=3,
    root_env="REALGW_V3_ROOT",
    default_root="/tmp/controlcenter-realgw-v3",
    missing=(
        "real OpenClaw v3 gateway (openclaw 2026.4.12, protocol 3) not installed: "
        "run VERSION=v3 scripts/realgw/setup.sh (about 2 minutes, 1.1 GB)"
    ),
)


@dataclass
class RealGateway:
    """A running real gateway. Never put the token into a message or a file name."""

    version: str
    root: Path  # the install (node, openclaw)
    run_dir: Path  # state, config, logs and temp files of this gateway
    port: int
    fake_port: int
    token: str = field(repr=False)
    env: dict[str, str] = field(repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    protocol: int = 0  # from hello-ok
    server_version: str = ""  # hello-ok.server.version
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def fake_model_url(self) -> str:
        return f"http://127.0.0.1:{self.fake_port}/v1"

    @property
    def log_path(self) -> Path:
        """stdout and stderr of the gateway (with ``--ws-log full``: every frame)."""
        return self.run_dir / "logs" / "gateway.out"

    @property
    def fake_model_log(self) -> Path:
        """One JSON line per request the gateway made to the fake model."""
        return self.run_dir / "logs" / "fake-model.jsonl"

    def cli(
        self,
        *args: str,
        timeout: float = 120.0,
        check: bool = False,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the openclaw CLI with the gateway's own environment (config, state, token), e.g.
        ``gw.cli("devices", "approve", request_id)`` or ``gw.cli("gateway", "call", "health",
        "--json")``. Output is captured as text; ``check=True`` raises on a non-zero exit."""
        return subprocess.run(
            [str(SCRIPTS / "openclaw.sh"), *args],
            env=self.env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )


def under_ci() -> bool:
    return os.environ.get("CI") == "true"


def is_installed(flavor: Flavor, root: Path | None = None) -> bool:
    result = subprocess.run(
        [str(SCRIPTS / "setup.sh"), "--check"],
        env=_script_env(flavor, root or flavor.root),
        capture_output=True,
        timeout=60,
    )
    return result.returncode == 0


def install(flavor: Flavor, root: Path | None = None) -> float:
    """Run setup.sh (idempotent); its output goes to test-artifacts/realgw-setup-<version>.log.
    Returns the seconds it took."""
    root = root or flavor.root
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / f"realgw-setup-{flavor.version}.log"
    started = time.monotonic()
    with log.open("wb") as out:
        result = subprocess.run(
            [str(SCRIPTS / "setup.sh")],
            env=_script_env(flavor, root),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=INSTALL_TIMEOUT_S,
        )
    if result.returncode != 0:
        raise RuntimeError(
            f"scripts/realgw/setup.sh failed (exit {result.returncode}) for {flavor.version} "
            f"in {root}:\n{_tail(log)}"
        )
    return time.monotonic() - started


def start_gateway(
    flavor: Flavor, root: Path | None = None, *, token: str | None = None
) -> RealGateway:
    """Start a gateway and its fake model on a free port pair and wait until it accepts a
    connect. The caller must stop it with :func:`stop_gateway`."""
    root = root or flavor.root
    runs = root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    _sweep_stale_runs(flavor, root)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=runs))
    (run_dir / "owner").write_text(f"{os.getpid()}\n")
    (run_dir / "logs").mkdir()
    token = token or secrets.token_urlsafe(32)
    last_error: Exception | None = None
    # Another process may take a free port before the gateway binds it: then try new ports.
    for _attempt in range(3):
        port, fake_port = _free_port_pair()
        gw = RealGateway(
            version=flavor.version,
            root=root,
            run_dir=run_dir,
            port=port,
            fake_port=fake_port,
            token=token,
            env=_script_env(flavor, root, run_dir, port, fake_port, token),
        )
        started = time.monotonic()
        with gw.log_path.open("ab") as out:
            gw.process = subprocess.Popen(
                [str(SCRIPTS / "start.sh")],
                env=gw.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop.sh can end it whole
            )
        try:
            _wait_healthz(gw, started + HEALTHZ_TIMEOUT_S)
            gw.timings["start_to_healthz_s"] = time.monotonic() - started
            _wait_connect_accepted(gw, time.monotonic() + READY_TIMEOUT_S)
            gw.timings["start_to_ready_s"] = time.monotonic() - started
        except _PortTaken as exc:
            last_error = exc
            _stop_processes(gw)
            continue
        except BaseException:
            stop_gateway(gw)
            raise
        if gw.protocol != flavor.protocol:
            stop_gateway(gw)
            raise RuntimeError(
                f"expected a protocol-{flavor.protocol} gateway in {root}, "
                f"got protocol {gw.protocol} ({gw.server_version})"
            )
        return gw
    shutil.rmtree(run_dir, ignore_errors=True)
    raise RuntimeError(f"could not start the {flavor.version} gateway: {last_error}")


def stop_gateway(gw: RealGateway) -> None:
    """Stop the gateway and its fake model (stop.sh), keep the logs, remove the state."""
    try:
        _stop_processes(gw)
    finally:
        _save_logs(gw)
        shutil.rmtree(gw.run_dir, ignore_errors=True)


def session_gateway(
    flavor: Flavor, *, install_if_missing: bool
) -> Iterator[RealGateway]:
    """The body of the session fixtures: skip or install, start, yield, stop."""
    root = flavor.root
    timings: dict[str, float] = {}
    if not is_installed(flavor, root):
        if not install_if_missing:
            pytest.skip(
                flavor.missing
                + ("" if root == Path(flavor.default_root) else f" (ROOT={root})")
            )
        with _outside_test_timeout():
            timings["install_s"] = install(flavor, root)
    with _outside_test_timeout():
        gw = start_gateway(flavor, root)
    gw.timings.update(timings)
    try:
        yield gw
    finally:
        stop_gateway(gw)


@pytest.fixture(scope="session")
def real_gateway() -> Iterator[RealGateway]:
    """The real openclaw 2026.9.6 gateway (protocol 4); under CI=true installed when missing."""
    yield from session_gateway(V4, install_if_missing=under_ci())


@pytest.fixture(scope="session")
def real_gateway_v3() -> Iterator[RealGateway]:
    """The real openclaw 2026.4.12 gateway (protocol 3); under CI=true installed when missing."""
    yield from session_gateway(V3, install_if_missing=under_ci())


# ---------------------------------------------------------------- internals


class _PortTaken(RuntimeError):
    pass


_NO_IPV6 = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)


def _script_env(
    flavor: Flavor,
    root: Path,
    run_dir: Path | None = None,
    port: int | None = None,
    fake_port: int | None = None,
    token: str | None = None,
) -> dict[str, str]:
    # A developer's own OPENCLAW_* settings (OPENCLAW_GATEWAY_URL would send the CLI elsewhere)
    # must not reach the test gateway or its CLI.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCLAW_")}
    env.update(VERSION=flavor.version, ROOT=str(root), PYTHON=sys.executable)
    if run_dir is not None:
        env["RUN_DIR"] = str(run_dir)
    if port is not None:
        env["PORT"] = str(port)
    if fake_port is not None:
        env["FAKE_PORT"] = str(fake_port)
    if token is not None:
        env["OPENCLAW_GATEWAY_TOKEN"] = token
    return env


def _port_free(family: socket.AddressFamily, host: str, port: int) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, port))
    except OSError as exc:
        # No IPv6 on this machine: the gateway then listens on 127.0.0.1 only.
        return family == socket.AF_INET6 and exc.errno in _NO_IPV6
    return True


def _free_port_pair() -> tuple[int, int]:
    """Two distinct free loopback ports: the gateway's (free on 127.0.0.1 and ::1, where it also
    listens) and the fake model's."""
    ports: list[int] = []
    while len(ports) < 2:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port in ports or not _port_free(socket.AF_INET6, "::1", port):
            continue
        ports.append(port)
    return ports[0], ports[1]


def _no_proxy_opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _wait_healthz(gw: RealGateway, deadline: float) -> None:
    opener = _no_proxy_opener()
    assert gw.process is not None
    while True:
        code = gw.process.poll()
        if code is not None:
            tail = _tail(gw.log_path)
            if "EADDRINUSE" in tail or "already listens" in tail:
                raise _PortTaken(f"port {gw.port} or {gw.fake_port} was taken")
            raise RuntimeError(
                f"the {gw.version} gateway exited with {code} before /healthz answered; "
                f"last lines of {gw.log_path}:\n{tail}"
            )
        try:
            with opener.open(f"{gw.http_url}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"no /healthz from the {gw.version} gateway on port {gw.port} after "
                f"{HEALTHZ_TIMEOUT_S:.0f} s; last lines of {gw.log_path}:\n{_tail(gw.log_path)}"
            )
        time.sleep(0.25)


def _connect_params(token: str) -> dict[str, Any]:
    # The identity that keeps its scopes on loopback without a device key (REAL-GATEWAY-v4.md);
    # only keys that protocol 3 accepts too (no client.buildId).
    return {
        "minProtocol": 3,
        "maxProtocol": 4,
        "client": {
            "id": "gateway-client",
            "version": "0.0.0-test",
            "platform": "linux",
            "mode": "backend",
        },
        "role": "operator",
        "scopes": ["operator.read"],
        "caps": [],
        "locale": "en-US",
        "userAgent": "controlcenter-tests/realgw",
        "auth": {"token": token},
    }


def _wait_connect_accepted(gw: RealGateway, deadline: float) -> None:
    """Connect until hello-ok: right after /healthz the gateway refuses a connect for about a
    second with UNAVAILABLE "gateway starting" (retryable, close 1013)."""
    last = "no answer"
    while time.monotonic() < deadline:
        delay = 0.5
        try:
            with ws_connect(
                gw.url, proxy=None, open_timeout=5, max_size=16 * 2**20
            ) as ws:
                challenge = json.loads(ws.recv(timeout=10))
                if challenge.get("event") != "connect.challenge":
                    raise RuntimeError(
                        f"expected connect.challenge, got {challenge.get('type')}"
                    )
                request_id = str(uuid.uuid4())
                ws.send(
                    json.dumps(
                        {
                            "type": "req",
                            "id": request_id,
                            "method": "connect",
                            "params": _connect_params(gw.token),
                        }
                    )
                )
                while True:
                    frame = json.loads(ws.recv(timeout=20))
                    if frame.get("type") == "res" and frame.get("id") == request_id:
                        break
            if frame.get("ok"):
                hello = frame.get("payload") or {}
                gw.protocol = int(hello.get("protocol") or 0)
                gw.server_version = str(
                    (hello.get("server") or {}).get("version") or ""
                )
                return
            error = frame.get("error") or {}
            last = f"{error.get('code')}: {error.get('message')}"
            if not (error.get("retryable") or error.get("code") == "UNAVAILABLE"):
                raise RuntimeError(
                    f"the {gw.version} gateway refused the connect: {last}"
                )
            delay = max(0.1, float(error.get("retryAfterMs") or 500) / 1000)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            last = f"closed with {code}"
            if code not in (1012, 1013, None):
                raise RuntimeError(
                    f"the {gw.version} gateway closed the connect: {last}"
                ) from exc
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(delay)
    raise RuntimeError(
        f"the {gw.version} gateway did not accept a connect within {READY_TIMEOUT_S:.0f} s "
        f"({last}); last lines of {gw.log_path}:\n{_tail(gw.log_path)}"
    )


def _stop_processes(gw: RealGateway) -> None:
    result = subprocess.run(
        [str(SCRIPTS / "stop.sh")],
        env=gw.env,
        capture_output=True,
        text=True,
        timeout=STOP_TIMEOUT_S,
    )
    if gw.process is None:
        return
    try:
        gw.process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # start.sh ran in its own session, so its process group is ours alone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(gw.process.pid, signal.SIGKILL)
        gw.process.wait(timeout=10)
    if result.returncode != 0:
        raise RuntimeError(f"scripts/realgw/stop.sh failed: {result.stderr.strip()}")


def _sweep_stale_runs(flavor: Flavor, root: Path) -> None:
    """Stop and remove the runs of test sessions that died without their teardown (kill -9)."""
    for run_dir in (root / "runs").iterdir():
        owner_file = run_dir / "owner"
        try:
            owner = int(owner_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if owner == os.getpid() or _alive(owner):
            continue
        subprocess.run(
            [str(SCRIPTS / "stop.sh")],
            env=_script_env(flavor, root, run_dir),
            capture_output=True,
            timeout=STOP_TIMEOUT_S,
        )
        shutil.rmtree(run_dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


KEEP_ARTIFACT_RUNS = 5


def _save_logs(gw: RealGateway) -> None:
    """Copy the logs, the rendered config and the timings to
    test-artifacts/realgw-<version>/<run>/ with the token redacted; keep the newest few runs
    (test sessions run side by side in one checkout)."""
    parent = ARTIFACTS / f"realgw-{gw.version}"
    target = parent / gw.run_dir.name
    with contextlib.suppress(OSError):
        target.mkdir(parents=True, exist_ok=True)
        sources = [
            *sorted((gw.run_dir / "logs").glob("*")),
            gw.run_dir / "state" / "openclaw.json",
        ]
        for source in sources:
            if source.is_file() and source.suffix != ".pid":
                text = source.read_text(errors="replace").replace(gw.token, "<token>")
                (target / source.name).write_text(text)
        timings = {k: round(v, 1) for k, v in gw.timings.items()}
        (target / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
        runs = sorted(
            (p for p in parent.iterdir() if p.is_dir()),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for old in runs[KEEP_ARTIFACT_RUNS:]:
            shutil.rmtree(old, ignore_errors=True)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def _outside_test_timeout() -> Iterator[None]:
    """Pause pytest-timeout while a session fixture installs or starts the gateway.

    pytest-timeout's default (signal) method arms ITIMER_REAL for the setup, call and teardown
    of each test, so the first test that requests a session fixture pays for the whole install
    (a minute with a warm npm cache, several with a cold one) and start (15-30 s). Those steps
    have their own deadlines above; the test's remaining time is restored afterwards."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "setitimer"
    ):
        yield
        return
    remaining, interval = signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        yield
    finally:
        if remaining > 0:
            signal.setitimer(signal.ITIMER_REAL, remaining, interval)
