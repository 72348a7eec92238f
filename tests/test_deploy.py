"""The Docker image and the Compose file, checked with what runs on this machine (Docker does
not): their shape is parsed, and the image's own commands run outside Docker, in the order
the image runs them, on a copy of the tree as `COPY . .` (with .dockerignore) would make it:
the build's `manage.py` steps (collectstatic), Compose's one-shot migrate, `check --deploy`,
then the image's CMD (daphne) and Compose's worker command beside it, probed with the image's
HEALTHCHECK command. Paths of the image (/app, /venv) map to the copy and to this venv.

What this cannot check: the base image, apt/pip inside it, file ownership, Compose's own
interpolation and networking. Those need `docker compose build && docker compose up`."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
VENV_BIN = Path(sys.executable).parent
# Where the code reads the environment (the tests, bench and scripts are not the product).
CODE_DIRS = ("controlcenter", "fleet", "chat", "usage")
ENV_READ = re.compile(
    r"""(?:os\.getenv|os\.environ\.get|envbool|envint|envfloat|envsecret)\(\s*["']([A-Z][A-Z0-9_]*)["']"""
    r"""|os\.environ\[\s*["']([A-Z][A-Z0-9_]*)["']\s*\]"""
)
SECRET_READ = re.compile(r"""envsecret\(\s*["']([A-Z][A-Z0-9_]*)["']""")
DOCUMENTED = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$")
INTERPOLATED = re.compile(r"\$\{([A-Z][A-Z0-9_]*)")


# -- reading the files ---------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.base}"
        return found[-1]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                values[key] = value
        return values


def dockerfile_stages(text: str) -> list[Stage]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation line"
    stages: list[Stage] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
            stages.append(Stage(parts[0], name))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, args))
    return stages


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) argument list; anything else fails the test."""
    assert args.startswith("["), f"not exec form: {args}"
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def healthcheck(stage: Stage) -> tuple[dict[str, str], list[str]]:
    options: dict[str, str] = {}
    rest = stage.last("HEALTHCHECK")
    while rest.startswith("--"):
        option, _, rest = rest.partition(" ")
        key, _, value = option[2:].partition("=")
        options[key] = value
        rest = rest.lstrip()
    keyword, _, command = rest.partition(" ")
    assert keyword.upper() == "CMD", rest
    return options, exec_form(command.strip())


def env_file(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(active NAME=value lines, commented `# NAME=value` lines)."""
    active: dict[str, str] = {}
    commented: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = DOCUMENTED.match(line.strip())
        if match:
            target = commented if line.lstrip().startswith("#") else active
            target[match.group(1)] = match.group(2)
    return active, commented


def variables_read_by_the_code() -> set[str]:
    names: set[str] = set()
    for folder in CODE_DIRS:
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            for match in ENV_READ.finditer(text):
                names.add(match.group(1) or match.group(2))
            names.update(f"{m.group(1)}_FILE" for m in SECRET_READ.finditer(text))
    return names


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return dockerfile_stages((REPO / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


# -- the Dockerfile ------------------------------------------------------------------------


def test_it_builds_in_stages_and_runs_as_a_plain_user(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    build, final = stages[0], stages[-1]
    assert build.name, "the build stage is named, so the final stage can copy from it"
    copies = final.all("COPY")
    assert any(f"--from={build.name}" in c for c in copies)
    # The final stage installs nothing: no pip, no compilers.
    assert not any("pip " in r or "apt-get" in r for r in final.all("RUN"))
    user = final.last("USER").split(":")[0]
    assert user not in ("root", "0")
    assert any(user in r for r in final.all("RUN")), "the user is made in the image"


def test_it_collects_static_files_at_build(stages: list[Stage]) -> None:
    build_runs = [r for s in stages[:-1] for r in s.all("RUN")]
    assert any("manage.py collectstatic" in r and "--noinput" in r for r in build_runs)


def test_it_starts_and_probes_with_exec_form_commands(stages: list[Stage]) -> None:
    final = stages[-1]
    cmd = exec_form(final.last("CMD"))
    assert cmd[0] == "daphne" and "controlcenter.asgi:application" in cmd
    port = cmd[cmd.index("--port") + 1]
    assert final.last("EXPOSE").split()[0] == port
    options, probe = healthcheck(final)
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(probe)
    assert probe[0] == "python", "no curl in a slim image: the probe is Python"
    assert {"interval", "timeout", "start-period"} <= set(options)


def test_it_keeps_local_state_and_secrets_out_of_the_image() -> None:
    copied = {p.relative_to(REPO).as_posix() for p in _image_tree_paths(REPO)}
    for left_out in (".env", ".venv", ".git", "data", "build"):
        assert not any(p == left_out or p.startswith(left_out + "/") for p in copied)
    for kept in ("manage.py", "controlcenter/settings.py", "static", "templates"):
        assert any(p == kept or p.startswith(kept + "/") for p in copied), kept


# -- docker-compose.yml ----------------------------------------------------------------------


def test_it_composes_web_worker_redis_postgres_and_a_simulator(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert {"web", "worker", "redis", "postgres", "gateway", "migrate"} <= set(services)
    # web runs the image's CMD (daphne); the worker and the simulator are manage.py commands.
    assert "command" not in services["web"]
    assert services["worker"]["command"] == ["python", "manage.py", "gatewayworker"]
    assert services["gateway"]["command"][:3] == ["python", "manage.py", "fakegateway"]
    assert services["gateway"]["profiles"] == ["sim"]
    for name in ("web", "worker", "migrate", "redis", "postgres"):
        assert "profiles" not in services[name], f"{name} runs without a profile"
    for name in ("web", "worker"):
        env = services[name]["environment"]
        assert "redis://redis:6379" in env["REDIS_URL"]
        assert "@postgres:5432/" in env["DATABASE_URL"]
        assert "host.docker.internal:host-gateway" in services[name]["extra_hosts"]


def test_it_migrates_once_before_web_and_worker_start(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["migrate"]["command"][:3] == ["python", "manage.py", "migrate"]
    assert services["migrate"]["restart"] == "no"
    for name in ("web", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["redis"]["condition"] == "service_healthy"
    # Whatever a service waits for as healthy has a health check of its own.
    for name, service in services.items():
        for target, rule in (service.get("depends_on") or {}).items():
            if rule.get("condition") == "service_healthy":
                check = services[target].get("healthcheck") or {}
                assert check.get("test") and not check.get("disable"), (name, target)


def test_it_reaches_a_gateway_on_the_docker_host_by_default(
    compose: dict[str, Any],
) -> None:
    active, _ = env_file(REPO / ".env.example")
    assert active["OPENCLAW_GATEWAY_URL"].startswith("ws://host.docker.internal:")
    port = active["OPENCLAW_GATEWAY_URL"].rsplit(":", 1)[1]
    gateway = compose["services"]["gateway"]
    # The simulator is published on the host at that port, so the default reaches it too.
    assert f"{port}:{port}" in gateway["ports"]
    assert gateway["command"][gateway["command"].index("--port") + 1] == port
    assert gateway["command"][gateway["command"].index("--host") + 1] == "0.0.0.0"


def test_it_lets_the_token_go_in_clear_to_the_docker_host_only(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default gateway is plain ws:// to host.docker.internal: Compose names that host
    in CONTROLCENTER_INSECURE_HOSTS for web and worker, and the rule then lets it through
    (while any other plain address stays refused)."""
    from fleet.envrules import url_refusal

    active, _ = env_file(REPO / ".env.example")
    default_url = active["OPENCLAW_GATEWAY_URL"]
    for name in ("web", "worker"):
        value = compose["services"][name]["environment"]["CONTROLCENTER_INSECURE_HOSTS"]
        match = re.fullmatch(r"\$\{CONTROLCENTER_INSECURE_HOSTS:-([^}]*)\}", value)
        assert match, value
        monkeypatch.setenv("CONTROLCENTER_INSECURE_HOSTS", match.group(1))
        assert url_refusal(default_url) == ""
        assert "in clear" in url_refusal("ws://gateway.example:18789")
    monkeypatch.delenv("CONTROLCENTER_INSECURE_HOSTS")
    assert "in clear" in url_refusal(default_url)


def test_it_makes_the_image_data_folder_private(stages: list[Stage]) -> None:
    runs = " ".join(stages[-1].all("RUN"))
    assert re.search(r"install -d -m 0?700 .*/app/data", runs), runs


# -- .env.example --------------------------------------------------------------------------


def test_it_documents_every_variable_the_code_reads_and_no_other() -> None:
    read = variables_read_by_the_code()
    # The scan finds what it must (else this test would pass on nothing).
    assert {"DATABASE_URL", "REDIS_URL", "DJANGO_SECRET_KEY", "LOG_LEVEL"} <= read
    assert "OPENCLAW_GATEWAY_TOKEN" in read
    active, commented = env_file(REPO / ".env.example")
    documented = set(active) | set(commented)
    compose_text = (REPO / "docker-compose.yml").read_text()
    used_by_compose = set(INTERPOLATED.findall(compose_text))
    assert not read - documented, f"read but not in .env.example: {read - documented}"
    unknown = documented - read - used_by_compose
    assert not unknown, f"in .env.example but read by nothing: {unknown}"
    assert not used_by_compose - documented, (
        f"docker-compose.yml uses undocumented {used_by_compose - documented}"
    )


# -- the image's commands, outside Docker ----------------------------------------------------


def _dockerignore_patterns() -> list[str]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            patterns.append(line.rstrip("/"))
    return patterns


def _ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    for pattern in patterns:
        if pattern.startswith("**/"):
            tail = pattern[3:]
            if any(fnmatch.fnmatch(p, tail) for p in parts):
                return True
        # A pattern names a path from the root; a directory excludes what is inside it.
        for i in range(1, len(parts) + 1):
            if fnmatch.fnmatch("/".join(parts[:i]), pattern):
                return True
    return False


def _image_tree_paths(root: Path) -> Iterator[Path]:
    """The files `COPY . .` would copy from `root`, given .dockerignore."""
    patterns = _dockerignore_patterns()
    for folder, dirs, files in os.walk(root):
        rel_folder = Path(folder).relative_to(root).as_posix()
        prefix = "" if rel_folder == "." else rel_folder + "/"
        dirs[:] = [d for d in dirs if not _ignored(prefix + d, patterns)]
        for name in files:
            if not _ignored(prefix + name, patterns):
                yield Path(folder) / name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Image:
    """The image's paths mapped onto a folder of this machine."""

    def __init__(self, root: Path) -> None:
        self.app = root / "app"
        self.build_data = root / "build-data"

    def map(self, value: str) -> str:
        value = value.replace("/venv/bin", str(VENV_BIN))
        value = value.replace("/tmp/build-data", str(self.build_data))
        value = re.sub(r"(?<![\w.])/(?:src|app)(?=/|$)", str(self.app), value)
        return value

    def argv(self, args: list[str]) -> list[str]:
        """An exec-form command as it runs in the image (PATH=/venv/bin:...)."""
        program = args[0]
        if program in ("python", str(VENV_BIN / "python")):
            return [PYTHON, *args[1:]]
        found = shutil.which(program, path=str(VENV_BIN))
        assert found, f"{program} is not in the virtualenv"
        return [found, *args[1:]]


def _run(argv: list[str], env: dict[str, str], cwd: Path, what: str) -> None:
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (
        f"{what} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )


def _probe(command: list[str], env: dict[str, str], cwd: Path) -> int:
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, timeout=30
    ).returncode


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10) -> float:
    """SIGTERM as `docker stop` sends it; returns how long the process took to exit."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{proc.args!r} ignored SIGTERM for {timeout} s") from None
    return time.monotonic() - started


def _get(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_it_runs_the_images_commands_in_order(
    stages: list[Stage], compose: dict[str, Any], tmp_path: Path
) -> None:
    image = Image(tmp_path)
    build, final = stages[0], stages[-1]

    # COPY . . (with .dockerignore): the image's tree.
    for path in _image_tree_paths(REPO):
        target = image.app / path.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    assert not (image.app / "data").exists() and not (image.app / "build").exists()

    # The build stage's Python steps (collectstatic, compileall). Creating the venv and
    # installing into it are skipped: this test's virtualenv stands in for /venv.
    base_env = {
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
    }
    ran = []
    for run in build.all("RUN"):
        words = shlex.split(run)
        step_env = dict(base_env)
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            key, _, value = words.pop(0).partition("=")
            step_env[key] = image.map(value)
        if words[0] != "/venv/bin/python" or words[1:3] == ["-m", "pip"]:
            continue
        argv = [PYTHON, *(image.map(w) for w in words[1:])]
        _run(argv, step_env, image.app, f"RUN {run}")
        ran.append(words[1:3])
    assert ["manage.py", "collectstatic"] in ran
    manifest = image.app / "build" / "static" / "staticfiles.json"
    assert manifest.exists(), "collectstatic wrote no manifest"

    # The final stage's environment, plus what Compose adds from .env (the example, with
    # its blanks filled in). No Compose PostgreSQL or Redis here: SQLite in the data folder
    # and the in-memory layer (tests/test_processes.py runs the processes on both).
    (image.app / "data").mkdir(mode=0o700)  # RUN install -d -m 0700 ... /app/data
    active, _ = env_file(REPO / ".env.example")
    env = {**base_env, **{k: image.map(v) for k, v in final.env().items()}}
    env["PATH"] = base_env["PATH"]
    env.update(active)
    env.update(
        {
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
            "OPENCLAW_GATEWAY_TOKEN": secrets.token_urlsafe(16),
            # Not resolvable outside Docker: the worker reports it offline, as it should.
            "OPENCLAW_GATEWAY_URL": "ws://host.docker.internal:18789",
            "DATABASE_URL": "",
            "REDIS_URL": "",
            "LOG_LEVEL": "WARNING",
        }
    )
    assert env["CONTROLCENTER_DATA_DIR"] == str(image.app / "data")

    # Compose's one-shot migrate, then Django's deployment checks: with the production
    # values of .env.example, not even a warning.
    migrate = compose["services"]["migrate"]["command"]
    _run(image.argv(migrate), env, image.app, "migrate")
    checked = subprocess.run(
        image.argv(["python", "manage.py", "check", "--deploy"]),
        cwd=image.app,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "System check identified no issues" in checked.stdout, (
        checked.stdout[-3000:] + checked.stderr[-3000:]
    )

    # The image's CMD on a free port (8000 may be taken here), and the worker beside it.
    cmd = exec_form(final.last("CMD"))
    port = str(_free_port())
    image_port, cmd[cmd.index("--port") + 1] = cmd[cmd.index("--port") + 1], port
    _, probe = healthcheck(final)
    probe_argv = image.argv(
        [p.replace(f"127.0.0.1:{image_port}/", f"127.0.0.1:{port}/") for p in probe]
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], name: str) -> subprocess.Popen[bytes]:
        with (logs / f"{name}.log").open("wb") as out:
            proc = subprocess.Popen(
                image.argv(argv),
                cwd=image.app,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        return proc

    try:
        assert _probe(probe_argv, env, image.app) != 0, (
            "the probe passes with nothing listening"
        )
        web = start(cmd, "web")
        worker = start(compose["services"]["worker"]["command"], "worker")
        deadline = time.monotonic() + 30
        while _probe(probe_argv, env, image.app) != 0:
            assert web.poll() is None, (logs / "web.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "HEALTHCHECK never passed"
            time.sleep(0.3)

        base = f"http://127.0.0.1:{port}"
        # The worker added the gateway of OPENCLAW_GATEWAY_URL and holds it.
        deadline = time.monotonic() + 20
        while True:
            status, body = _get(f"{base}/healthz")
            health = json.loads(body)
            # Anonymous, as the probe asks: counts only, no names.
            if health.get("held_by_worker") == 1:
                break
            assert worker.poll() is None, (logs / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"no worker holds a gateway: {body}"
            time.sleep(0.3)
        assert status == 200 and health["ok"] is True

        # Pages use the static files collected at build: hashed names, served by WhiteNoise.
        status, page = _get(f"{base}/accounts/login/")
        assert status == 200
        css = re.search(r'href="(/static/css/app\.[0-9a-f]{12}\.css)"', page)
        assert css, "the login page does not link the collected (hashed) stylesheet"
        assert _get(base + css.group(1))[0] == 200

        # docker stop: SIGTERM, and each process ends cleanly well within the grace period.
        assert _stop(worker) < 5 and worker.returncode == 0
        # Outside Compose there is no Redis here, and the worker says what that costs.
        assert "REDIS_URL is not set" in (logs / "worker.log").read_text()
        assert _stop(web) < 10
        assert _probe(probe_argv, env, image.app) != 0, "the probe passes after stop"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
