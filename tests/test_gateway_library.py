"""fleet.gateway as a library: its declared API, no environment or product words inside,
the README's example run against the test kit, the typed payloads against real frames, and
the import direction the project enforces."""

from __future__ import annotations

import ast
import asyncio
import re
import subprocess
import types
import uuid
from pathlib import Path
from typing import (
    Any,
    Literal,
    Union,
    get_args,
    get_origin,
    get_type_hints,
    is_typeddict,
)

import pytest

import fleet.gateway
from fleet.gateway import (
    AgentEvent,
    ChatEvent,
    ConnectOptions,
    DeviceKey,
    Event,
    GatewayConnection,
    GatewayError,
    Health,
    HelloOkPayload,
    PresenceEntry,
    SessionMessage,
    SessionsChanged,
    SessionsListResult,
)

REPO = Path(__file__).resolve().parent.parent
LIBRARY = REPO / "fleet" / "gateway"


def test_it_declares_a_public_api_that_imports() -> None:
    names = fleet.gateway.__all__
    assert len(names) == len(set(names))
    missing = [name for name in names if not hasattr(fleet.gateway, name)]
    assert not missing
    for needed in ("GatewayConnection", "ConnectOptions", "RestClient", "DeviceKey"):
        assert needed in names


def _sources() -> list[Path]:
    return sorted(p for p in LIBRARY.rglob("*.py") if "__pycache__" not in p.parts)


def test_it_reads_no_environment_and_carries_no_product_words() -> None:
    """The caller passes tokens, the CA bundle and its name: nothing in the library (nor
    its test kit) reads os.environ or names the Control Center."""
    found: list[str] = []
    for path in _sources():
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                found.append(f"{path.name}:{node.lineno} os.{node.attr}")
        for word in (
            "Control Center",
            "controlcenter",
            "control-center",
            "CONTROLCENTER",
        ):
            if word.lower() in text.lower():
                found.append(f"{path.name}: {word}")
    assert not found


def _readme_example() -> str:
    text = (LIBRARY / "README.md").read_text()
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match
    return match.group(1)


async def test_it_runs_the_readme_example_against_the_test_kit(sim, capsys) -> None:
    code = _readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 17
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    await namespace["main"](sim.url, sim.token)
    out = capsys.readouterr().out
    assert re.search(r"protocol \d sessions \d+", out), out
    assert "event" in out


def _mismatches(value: Any, hint: Any, path: str) -> list[str]:
    """Where `value` does not have the type `hint` declares (keys not declared are free)."""
    if hint is Any:
        return []
    if is_typeddict(hint):
        if not isinstance(value, dict):
            return [f"{path}: not an object"]
        hints = get_type_hints(hint)
        out: list[str] = []
        for key, item in value.items():
            if key in hints:
                out += _mismatches(item, hints[key], f"{path}.{key}")
        return out
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if any(not _mismatches(value, option, path) for option in options):
            return []
        return [f"{path}: {value!r:.60} is none of {hint}"]
    if origin is Literal:
        return [] if value in get_args(hint) else [f"{path}: {value!r} not in {hint}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: not a list"]
        (item_hint,) = get_args(hint)
        return [
            e
            for i, v in enumerate(value)
            for e in _mismatches(v, item_hint, f"{path}[{i}]")
        ]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{path}: not an object"]
        return [
            e
            for k, v in value.items()
            for e in _mismatches(v, get_args(hint)[1], f"{path}.{k}")
        ]
    if hint is type(None):
        return [] if value is None else [f"{path}: not null"]
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{path}: {value!r:.60} is not an integer"]
    assert isinstance(hint, type), hint
    return [] if isinstance(value, hint) else [f"{path}: {value!r:.60} is not {hint}"]


EVENT_TYPES: dict[str, Any] = {
    "sessions.changed": SessionsChanged,
    "session.message": SessionMessage,
    "chat": ChatEvent,
    "agent": AgentEvent,
    "session.tool": AgentEvent,
    "health": Health,
}


async def test_its_typed_payloads_fit_the_frames_of_a_chat_run(sim) -> None:
    """Over a real socket to the test kit: hello-ok, sessions.list, health, presence and
    every event of a chat run have the types the TypedDicts declare."""
    events: list[Event] = []

    async def keep(event: Event) -> None:
        events.append(event)

    conn = GatewayConnection(
        ConnectOptions(url=sim.url, token=sim.token, device=DeviceKey.generate()), keep
    )
    hello = await conn.connect()
    reader = asyncio.create_task(conn.run())
    try:
        problems = _mismatches(hello.raw, HelloOkPayload, "hello-ok")
        listed = await conn.request("sessions.list", {"limit": 50})
        problems += _mismatches(listed, SessionsListResult, "sessions.list")
        assert listed["sessions"]
        problems += _mismatches(await conn.request("health", {}), Health, "health")
        presence = await conn.request("system-presence", {})
        problems += _mismatches(presence, list[PresenceEntry], "system-presence")
        await conn.request("sessions.subscribe", {})
        key = sim.main_session_key
        await conn.request(
            "chat.send",
            {"sessionKey": key, "message": "hello", "idempotencyKey": uuid.uuid4().hex},
        )

        async def finished() -> bool:
            return any(
                e.event == "chat" and e.payload.get("state") == "final" for e in events
            )

        deadline = asyncio.get_running_loop().time() + 10
        while not await finished():
            assert asyncio.get_running_loop().time() < deadline, "no final chat event"
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
        await reader
    seen = {e.event for e in events}
    assert {"chat", "agent", "session.message", "sessions.changed"} <= seen, seen
    for event in events:
        if event.event in EVENT_TYPES:
            problems += _mismatches(
                event.payload, EVENT_TYPES[event.event], event.event
            )
    assert not problems


def test_it_keeps_an_error_payload_as_error_shape() -> None:
    error = GatewayError(
        "x", fleet.gateway.ErrorShape.parse({"code": "A", "message": "b"})
    )
    assert error.error.to_dict() == {"code": "A", "message": "b"}


@pytest.mark.timeout(120)
def test_it_keeps_the_import_direction() -> None:
    """The import-linter contracts of pyproject.toml (fleet.gateway imports no Django nor
    project package; fleet imports no capability app; the worker's modules import
    downwards and its refusal mapping decides only) hold."""
    result = subprocess.run(
        [str(REPO / ".venv" / "bin" / "lint-imports"), "--no-cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    kept = re.search(r"Contracts: (\d+) kept, 0 broken\.", result.stdout)
    # Every contract of pyproject.toml ran (chat-payloads-are-pure and the two worker contracts among them).
    assert kept is not None and int(kept.group(1)) >= 6, result.stdout[-3000:]
