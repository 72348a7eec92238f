"""The gateway simulator against a real websockets client and httpx: the handshake and its
refusals, strict params, paging, streaming runs, pairing, restarts, HTTP and protocol 3."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fleet.gateway import DeviceKey, request_frame
from fleet.gateway.testing import FakeGateway, RpcError
from fleet.gateway.testing.core import READ, WRITE, Conn, Ctx, method
from fleet.gateway.testing.data import REPLY
from fleet.gateway.testing.runs import Runs
from fleet.gateway.testing.schema import NE, Schema
from tests.simclient import (
    SCOPES,
    TOKEN,
    Client,
    handshake,
    open_client,
)


async def close_of(ws: ClientConnection) -> tuple[int, str]:
    """Read until the server closes; returns the close code and reason it sent."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason or ""


@pytest.fixture
async def sim() -> AsyncIterator[FakeGateway]:
    async with FakeGateway(
        token=TOKEN, agents=3, sessions=20, delta_interval=0.002
    ) as gw:
        yield gw


async def test_it_completes_the_handshake_with_a_signed_device(
    sim: FakeGateway,
) -> None:
    key = DeviceKey.generate()
    ws, challenge, res = await handshake(sim, key=key)
    assert challenge["event"] == "connect.challenge" and "seq" not in challenge
    assert challenge["payload"]["capabilities"] == ["model-catalog-snapshot"]
    assert res["ok"] and res["id"] == "c1"
    hello = res["payload"]
    assert hello["type"] == "hello-ok" and hello["protocol"] == 4
    assert hello["server"]["version"] and hello["server"]["connId"]
    assert {"sessions.list", "chat.send", "agent"} <= set(hello["features"]["methods"])
    assert hello["snapshot"]["sessionDefaults"] == {
        "defaultAgentId": "main",
        "mainKey": "main",
        "mainSessionKey": "agent:main:main",
        "scope": "per-sender",
        "modelConfigured": True,
        "ownership": "sole",
        "selectionRequired": False,
    }
    assert hello["policy"]["tickIntervalMs"] == 30000
    assert hello["auth"]["role"] == "operator" and hello["auth"]["scopes"] == SCOPES
    device_token = hello["auth"]["deviceToken"]
    client = Client(ws, hello)
    presence = await client.event("presence")
    health = await client.event("health")
    assert (presence["seq"], health["seq"]) == (1, 2)
    assert sim.calls[0][0] == "connect"
    await client.close()

    # The device token alone (no shared token) is accepted on reconnect.
    again = await open_client(sim, key=key, token=None, device_token=device_token)
    assert again.hello["auth"]["deviceToken"] == device_token
    assert (await again.ok("health"))["ok"] is True
    await again.close()


async def test_it_refuses_a_wrong_or_missing_token_with_1008(sim: FakeGateway) -> None:
    ws, _, res = await handshake(sim, token="nope")
    assert res["error"]["code"] == "INVALID_REQUEST"
    assert res["error"]["message"].startswith("unauthorized: gateway token mismatch")
    assert res["error"]["details"]["code"] == "AUTH_TOKEN_MISMATCH"
    code, reason = await close_of(ws)
    assert code == 1008 and reason.startswith("unauthorized: gateway token mismatch")

    ws, _, res = await handshake(sim, token=None)
    assert res["error"]["details"]["code"] == "AUTH_TOKEN_MISSING"
    assert (await close_of(ws))[0] == 1008


async def test_it_refuses_a_protocol_mismatch_with_1002(sim: FakeGateway) -> None:
    ws, _, res = await handshake(sim, protocols=(3, 3))
    assert res["error"]["message"] == "protocol mismatch"
    assert res["error"]["details"]["code"] == "PROTOCOL_MISMATCH"
    assert res["error"]["details"]["expectedProtocol"] == 4
    assert await close_of(ws) == (1002, "protocol mismatch")


async def test_it_closes_on_bad_first_frames() -> None:
    async with FakeGateway(token=TOKEN, handshake_timeout=0.3) as sim:
        ws = await connect(sim.url)
        await ws.recv()
        await ws.send("this is not json")
        assert (await close_of(ws))[0] == 1000

        ws = await connect(sim.url)
        await ws.recv()
        await ws.send(request_frame("h1", "health", {}))
        res = json.loads(await ws.recv())
        assert (
            res["error"]["message"]
            == "invalid handshake: first request must be connect"
        )
        assert await close_of(ws) == (
            1008,
            "invalid handshake: first request must be connect",
        )

        ws = await connect(sim.url, max_size=None)
        await ws.recv()
        await ws.send(request_frame("c1", "connect", {"pad": "x" * 70_000}))
        assert (await close_of(ws))[0] == 1009

        ws = await connect(sim.url)
        await ws.recv()
        started = time.monotonic()
        assert (await close_of(ws))[0] == 1000  # no connect: the handshake timeout
        assert time.monotonic() - started < 2


async def test_it_rejects_a_bad_device_signature(sim: FakeGateway) -> None:
    ws, _, res = await handshake(
        sim, key=DeviceKey.generate(), nonce="not-the-challenge"
    )
    assert res["error"]["details"]["code"] == "DEVICE_AUTH_SIGNATURE_INVALID"
    assert (await close_of(ws))[0] == 1008


async def test_it_validates_params_strictly(sim: FakeGateway) -> None:
    ws, _, res = await handshake(sim, bogus=1)
    assert (
        res["error"]["message"]
        == "invalid connect params: at root: unexpected property 'bogus'"
    )
    assert (await close_of(ws))[0] == 1008

    client = await open_client(sim)
    res = await client.call("sessions.reset", {"bogus": 1})
    assert res["error"] == {
        "code": "INVALID_REQUEST",
        "message": "invalid sessions.reset params: must have required property 'key'; "
        "at root: unexpected property 'bogus'",
    }
    res = await client.call("agents.list", {"sessionKey": "agent:main:main"})
    assert (
        res["error"]["message"]
        == "invalid agents.list params: at root: unexpected property 'sessionKey'"
    )
    res = await client.call("no.such.method")
    assert res["error"]["message"] == "unknown method: no.such.method"
    res = await client.call("connect", {})
    assert res["error"]["message"] == "connect is only valid as the first request"
    assert (await client.ok("health"))["ok"] is True  # still open
    await client.close()


async def test_it_pages_sessions_list() -> None:
    async with FakeGateway(token=TOKEN, agents=4, sessions=250) as sim:
        client = await open_client(sim)
        first = await client.ok("sessions.list", {"limit": 100})
        assert (first["count"], first["totalCount"], first["limitApplied"]) == (
            100,
            250,
            100,
        )
        assert first["hasMore"] is True and first["nextOffset"] == 100
        last = await client.ok("sessions.list", {"limit": 100, "offset": 200})
        assert (last["count"], last["hasMore"], last["nextOffset"]) == (50, False, None)
        middle = await client.ok("sessions.list", {"limit": 100, "offset": 100})
        stamps = [
            r["updatedAt"] for page in (first, middle, last) for r in page["sessions"]
        ]
        assert stamps == sorted(stamps, reverse=True)
        keys = {r["key"] for page in (first, middle, last) for r in page["sessions"]}
        assert len(keys) == 250 and "agent:main:main" in keys
        assert (await client.ok("sessions.list"))["limitApplied"] == 100  # the default
        research = await client.ok(
            "sessions.list", {"agentId": "research", "limit": 1000}
        )
        assert research["totalCount"] > 0
        assert {r["agentId"] for r in research["sessions"]} == {"research"}
        found = await client.ok("sessions.list", {"search": "AGENT:MAIN:MAIN"})
        assert [r["key"] for r in found["sessions"]] == ["agent:main:main"]
        await client.close()


async def test_it_streams_a_chat_send_run_in_order(sim: FakeGateway) -> None:
    client = await open_client(sim)
    assert (await client.ok("sessions.subscribe")) == {"subscribed": True}
    ack = await client.ok(
        "chat.send",
        {
            "sessionKey": "agent:main:main",
            "message": "hello",
            "idempotencyKey": "run-1",
        },
    )
    assert ack["runId"] == "run-1" and ack["status"] == "started"
    final = await client.event("chat", lambda p: p["state"] == "final")
    mine = [
        f
        for f in client.events
        if f["event"] in ("agent", "chat") and f["payload"].get("runId") == "run-1"
    ]
    streams = [f["payload"].get("stream") or f["payload"]["state"] for f in mine]
    assert streams[0] == "lifecycle" and streams[-1] == "final"
    assert streams.index("assistant") < streams.index("delta") < streams.index("usage")
    ends = [
        f["payload"]["data"]["phase"]
        for f in mine
        if f["payload"].get("stream") == "lifecycle"
    ]
    assert ends[0] == "start" and ends[-1] == "end"
    deltas = [f["payload"] for f in mine if f["payload"].get("state") == "delta"]
    assert "".join(d["deltaText"] for d in deltas) == REPLY
    assert deltas[-1]["message"]["content"][0]["text"] == REPLY
    assert final["payload"]["message"] == {
        "role": "assistant",
        "content": [{"type": "text", "text": REPLY}],
        "timestamp": final["payload"]["message"]["timestamp"],
    }
    assert final["payload"]["stopReason"] == "stop"
    assert final["payload"]["sessionKey"] == "agent:main:main"
    # Broadcast events count 1, 2, 3... without gaps; targeted ones carry no seq.
    seqs = [f["seq"] for f in client.events if "seq" in f]
    assert seqs == list(range(1, len(seqs) + 1))
    targeted = [
        f
        for f in client.events
        if f["event"] in ("sessions.changed", "session.message")
    ]
    assert targeted and all("seq" not in f for f in targeted)
    messages = [f["payload"] for f in client.events if f["event"] == "session.message"]
    assert [m["message"]["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["messageSeq"] == ack["messageSeq"]
    assert messages[1]["message"]["__openclaw"]["seq"] == messages[1]["messageSeq"]
    await client.event("sessions.changed", lambda p: p.get("phase") == "end")
    by_phase = {
        f["payload"].get("phase"): f["payload"]["session"]
        for f in client.events
        if f["event"] == "sessions.changed"
    }
    assert by_phase["start"]["status"] == "running"
    assert by_phase["start"]["activeRunIds"] == ["run-1"]
    assert (
        by_phase["end"]["status"] == "done" and by_phase["end"]["hasActiveRun"] is False
    )
    history = await client.ok(
        "chat.history", {"sessionKey": "agent:main:main", "limit": 2}
    )
    user, reply = history["messages"]
    assert user["content"] == "hello" and reply["content"][0]["text"] == REPLY
    assert user["__openclaw"]["seq"] < reply["__openclaw"]["seq"]
    await client.close()


async def test_it_creates_a_session_on_first_send(sim: FakeGateway) -> None:
    client = await open_client(sim)
    await client.ok("sessions.subscribe")
    key = "agent:research:scratch"
    await client.ok(
        "chat.send", {"sessionKey": key, "message": "hi", "idempotencyKey": "new-1"}
    )
    created = await client.event(
        "sessions.changed", lambda p: p.get("reason") == "create"
    )
    assert created["payload"]["sessionKey"] == key
    await client.event("chat", lambda p: p["state"] == "final")
    assert sim.session(key) is not None
    res = await client.call(
        "chat.send",
        {"sessionKey": "agent:nobody:x", "message": "hi", "idempotencyKey": "n2"},
    )
    assert res["error"]["message"] == 'unknown agent id "nobody"'
    await client.close()


async def test_it_runs_a_duplicate_idempotency_key_once() -> None:
    async with FakeGateway(token=TOKEN, delta_interval=0.02) as sim:
        client = await open_client(sim)
        params = {
            "sessionKey": "agent:main:main",
            "message": "once",
            "idempotencyKey": "dup",
        }
        assert (await client.ok("chat.send", params))["status"] == "started"
        assert (await client.ok("chat.send", params)) == {
            "runId": "dup",
            "status": "in_flight",
        }
        await client.event("chat", lambda p: p["state"] == "final")
        assert (await client.ok("chat.send", params)) == {
            "runId": "dup",
            "status": "ok",
        }
        await asyncio.sleep(0.1)
        starts = [
            f
            for f in client.events
            if f["event"] == "agent" and f["payload"]["data"].get("phase") == "start"
        ]
        assert len(starts) == 1
        await client.close()


async def test_it_aborts_a_run() -> None:
    async with FakeGateway(token=TOKEN, delta_interval=0.05) as sim:
        client = await open_client(sim)
        params = {
            "sessionKey": "agent:main:main",
            "message": "long one",
            "idempotencyKey": "ab",
        }
        await client.ok("chat.send", params)
        await client.event("chat", lambda p: p["state"] == "delta")
        res = await client.ok(
            "chat.abort", {"sessionKey": "agent:main:main", "runId": "ab"}
        )
        assert res == {"ok": True, "aborted": True, "runIds": ["ab"]}
        aborted = await client.event("chat", lambda p: p["state"] == "aborted")
        partial = aborted["payload"]["message"]["content"][0]["text"]
        assert partial and REPLY.startswith(partial) and partial != REPLY
        await asyncio.sleep(0.2)
        assert not [
            f
            for f in client.events
            if f["event"] == "chat" and f["payload"]["state"] == "final"
        ]
        again = await client.ok("chat.abort", {"sessionKey": "agent:main:main"})
        assert again == {"ok": True, "aborted": False, "runIds": []}
        assert sim.session("agent:main:main")["abortedLastRun"] is True  # type: ignore[index]
        await client.close()


async def test_it_answers_agent_twice_on_one_request_id(sim: FakeGateway) -> None:
    client = await open_client(sim)
    rid = "agent-req"
    await client.ws.send(
        request_frame(
            rid,
            "agent",
            {"message": "hello", "idempotencyKey": "ag-1", "agentId": "research"},
        )
    )
    accepted, done = await client.responses(rid, 2)
    assert accepted["payload"]["status"] == "accepted"
    assert accepted["payload"]["sessionKey"] == "agent:research:main"
    assert done["payload"]["status"] == "ok" and done["payload"]["runId"] == "ag-1"
    assert done["payload"]["result"]["payloads"][0]["text"] == REPLY
    await client.close()


async def test_it_follows_the_fake_model_directives(sim: FakeGateway) -> None:
    client = await open_client(sim)
    main = "agent:main:main"
    await client.ok(
        "chat.send",
        {
            "sessionKey": main,
            "message": "[[fake:echo]] just this [[/fake]]",
            "idempotencyKey": "e",
        },
    )
    final = await client.event(
        "chat", lambda p: p["runId"] == "e" and p["state"] == "final"
    )
    assert final["payload"]["message"]["content"][0]["text"] == "just this"

    await client.ok(
        "chat.send",
        {"sessionKey": main, "message": "[[fake:fail]]", "idempotencyKey": "f"},
    )
    failed = await client.event(
        "chat", lambda p: p["runId"] == "f" and p["state"] != "delta"
    )
    assert failed["payload"]["state"] == "error" and failed["payload"]["errorMessage"]

    await client.ok(
        "chat.send",
        {"sessionKey": main, "message": "[[fake:tool]] go", "idempotencyKey": "t"},
    )
    await client.event("chat", lambda p: p["runId"] == "t" and p["state"] == "final")
    run = [
        f
        for f in client.events
        if f["event"] == "agent" and f["payload"]["runId"] == "t"
    ]
    kinds = [(f["payload"]["stream"], f["payload"]["data"].get("phase")) for f in run]
    tool_start, tool_result = (
        kinds.index(("tool", "start")),
        kinds.index(("tool", "result")),
    )
    assert tool_start < tool_result < kinds.index(("assistant", None))
    result = run[tool_result]["payload"]["data"]
    assert {"name", "toolCallId", "args", "result"} <= set(result)
    await client.close()


async def test_it_requires_pairing_until_approved() -> None:
    async with FakeGateway(token=TOKEN, pairing=True) as sim:
        key = DeviceKey.generate()
        ws, _, res = await handshake(sim, key=key)
        assert (
            res["error"]["code"] == "NOT_PAIRED"
            # The real gateway's words (2026.9.6, off loopback).
            and res["error"]["message"]
            == "pairing required: device is not approved yet"
        )
        details = res["error"]["details"]
        assert (
            details["code"] == "PAIRING_REQUIRED" and details["reason"] == "not-paired"
        )
        assert (await close_of(ws))[0] == 1008
        ws, _, again = await handshake(sim, key=key)
        assert again["error"]["details"]["requestId"] == details["requestId"]
        await close_of(ws)
        assert [r["requestId"] for r in sim.pending_requests] == [details["requestId"]]
        assert sim.pending_requests[0]["deviceId"] == key.device_id

        sim.approve(details["requestId"])
        assert sim.pending_requests == []
        client = await open_client(sim, key=key)
        auth = client.hello["auth"]
        assert (
            auth["deviceToken"]
            and auth["role"] == "operator"
            and auth["scopes"] == SCOPES
        )
        await client.close()


async def test_it_refuses_connects_while_starting_with_1013(sim: FakeGateway) -> None:
    sim.fail_next_connects(1, retry_after_ms=250)
    ws, _, res = await handshake(sim, key=DeviceKey.generate())
    error = res["error"]
    assert (error["code"], error["message"]) == (
        "UNAVAILABLE",
        "gateway starting; retry shortly",
    )
    assert error["retryable"] is True and error["retryAfterMs"] == 250
    assert error["details"] == {"reason": "startup-sidecars"}
    assert await close_of(ws) == (1013, "gateway starting")
    client = await open_client(sim)
    await client.close()


async def test_it_announces_a_shutdown_then_closes_1012(sim: FakeGateway) -> None:
    client = await open_client(sim)
    await sim.shutdown(restart_expected_ms=1500)
    event = await client.event("shutdown")
    assert event["payload"]["restartExpectedMs"] == 1500 and "seq" in event
    assert await client.closed() == (1012, "service restart")
    again = await open_client(sim)  # still listening
    await sim.close_all(4000, "bye")
    assert (await again.closed())[0] == 4000


async def test_it_serves_http_probes_and_tools_invoke(sim: FakeGateway) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=sim.http_url) as http:
        for path in ("/healthz", "/health"):
            res = await http.get(path)
            assert res.status_code == 200 and res.json() == {
                "ok": True,
                "status": "live",
            }
        ready = (await http.get("/readyz")).json()
        assert (
            ready["ready"] is True and ready["failing"] == [] and ready["uptimeMs"] >= 0
        )

        res = await http.post(
            "/tools/invoke", json={"tool": "sessions_list", "args": {}}, headers=auth
        )
        assert res.status_code == 200
        body = res.json()
        assert body["ok"] is True
        assert (
            json.loads(body["result"]["content"][0]["text"])
            == body["result"]["details"]
        )
        details = body["result"]["details"]
        assert details["count"] == 20 and details["sessions"][0]["key"]

        res = await http.post(
            "/tools/invoke", json={"tool": "agents_list", "args": {}}, headers=auth
        )
        agents = res.json()["result"]["details"]
        assert agents["requester"] == "main" and agents["allowAny"] is False
        assert [a["id"] for a in agents["agents"]] == ["main", "research", "support"]

        for headers in ({}, {"Authorization": "Bearer wrong"}):
            res = await http.post(
                "/tools/invoke",
                json={"tool": "sessions_list", "args": {}},
                headers=headers,
            )
            assert res.status_code == 401
            assert res.json() == {
                "error": {"message": "Unauthorized", "type": "unauthorized"}
            }
        res = await http.post(
            "/tools/invoke", json={"tool": "nope", "args": {}}, headers=auth
        )
        assert res.status_code == 404
        assert (await http.get("/api/agents")).status_code == 404

        sim.ws_enabled = False
        with pytest.raises(InvalidStatus) as refused:
            await connect(sim.url)
        assert refused.value.response.status_code == 503
        assert (await http.get("/healthz")).status_code == 200
    assert ("GET", "/healthz") in sim.http_calls
    assert ("sessions_list", {}) in sim.tool_calls


async def test_it_speaks_protocol_3() -> None:
    async with FakeGateway(token=TOKEN, protocol=3, delta_interval=0.01) as sim:
        ws, challenge, res = await handshake(sim, protocols=(4, 4))
        assert "capabilities" not in challenge["payload"]
        assert res["error"]["details"]["expectedProtocol"] == 3
        assert (await close_of(ws))[0] == 1002

        ws, _, res = await handshake(
            sim,
            client={
                "id": "cli",
                "version": "1",
                "platform": "linux",
                "mode": "cli",
                "buildId": "dev",
            },
        )
        assert (
            res["error"]["message"]
            == "invalid connect params: at /client: unexpected property 'buildId'"
        )
        assert (await close_of(ws))[0] == 1008

        bare = await open_client(sim, key=None)  # no device: scopes are cleared
        assert "auth" not in bare.hello and bare.hello["protocol"] == 3
        res = await bare.call("sessions.list")
        assert res["error"] == {
            "code": "INVALID_REQUEST",
            "message": "missing scope: operator.read",
        }
        assert (await bare.ok("health"))["ok"] is True
        await bare.close()

        client = await open_client(sim)
        assert "auth" not in client.hello  # backend + device: no device token on v3
        listed = await client.ok("sessions.list", {"limit": 3})
        assert (
            listed["count"] == 3
            and "hasMore" not in listed
            and "totalCount" not in listed
        )
        res = await client.call("sessions.list", {"offset": 0})
        assert (
            res["error"]["message"]
            == "invalid sessions.list params: at root: unexpected property 'offset'"
        )
        await client.ok(
            "chat.send", {"sessionKey": "main", "message": "v3", "idempotencyKey": "v3"}
        )
        final = await client.event("chat", lambda p: p["state"] == "final")
        assert (
            "stopReason" not in final["payload"] and "agentId" not in final["payload"]
        )
        deltas = [
            f["payload"]
            for f in client.events
            if f["event"] == "chat" and f["payload"]["state"] == "delta"
        ]
        assert deltas and all("deltaText" not in d for d in deltas)
        assert deltas[-1]["message"]["content"][0]["text"] == REPLY  # cumulative
        history = await client.ok("chat.history", {"sessionKey": "agent:main:main"})
        assert history["messages"][-2]["content"] == [{"type": "text", "text": "v3"}]
        await client.close()


async def test_it_closes_4001_after_the_token_changes(sim: FakeGateway) -> None:
    client = await open_client(sim)
    sim.set_token("rotated")
    await client.ws.send(request_frame("x", "health", {}))
    assert await client.closed() == (4001, "gateway auth changed")
    rotated = await open_client(sim, token="rotated")
    await rotated.close()


async def test_it_deletes_and_resets_sessions_like_the_gateway(
    sim: FakeGateway,
) -> None:
    client = await open_client(sim)
    await client.ok("sessions.subscribe")
    res = await client.call("sessions.delete", {"key": "agent:main:main"})
    assert (
        res["error"]["message"] == "Cannot delete the main session (agent:main:main)."
    )
    key = next(k for k in sim.session_keys() if k != "agent:main:main")
    done = await client.ok("sessions.delete", {"key": key})
    assert done["ok"] is True and done["deleted"] is True and done["key"] == key
    await client.event(
        "sessions.changed",
        lambda p: p.get("sessionKey") == key and p["reason"] == "delete",
    )
    await client.event(
        "sessions.changed", lambda p: p == {"reason": "delete", "ts": p["ts"]}
    )
    assert sim.session(key) is None
    reset = await client.ok("sessions.reset", {"key": "agent:main:main"})
    assert reset["ok"] is True and reset["entry"]["sessionId"]
    changed = await client.event(
        "sessions.changed", lambda p: p.get("reason") == "reset"
    )
    assert changed["payload"]["session"]["totalTokens"] == 0
    patched = await client.ok(
        "sessions.patch", {"key": "agent:main:main", "label": "Renamed"}
    )
    assert patched["entry"]["label"] == "Renamed"
    await client.event("sessions.changed", lambda p: p.get("reason") == "patch")
    await client.close()


async def test_it_offers_hooks_for_tests(sim: FakeGateway) -> None:
    client = await open_client(sim)
    await client.ok("sessions.subscribe")
    row = await sim.emit_session_changed(
        "agent:main:main", status="running", totalTokens=777
    )
    assert row["totalTokens"] == 777
    changed = await client.event(
        "sessions.changed", lambda p: p.get("totalTokens") == 777
    )
    assert changed["payload"]["session"]["status"] == "running"
    await sim.emit_rowless_sessions_changed()
    await client.event("sessions.changed", lambda p: "sessionKey" not in p)

    before = max(f["seq"] for f in client.events if "seq" in f)
    await sim.skip_seq(5)  # then a tick shows the gap at once
    tick = await client.event("tick")
    assert tick["seq"] == before + 6
    await sim.skip_seq(2, emit=False)
    run_id = sim.start_external_run("agent:support:main", "from elsewhere")
    first = await client.event("agent", lambda p: p["runId"] == run_id)
    assert first["seq"] == before + 9
    await client.event("chat", lambda p: p["runId"] == run_id and p["state"] == "final")

    await sim.send_raw("{not json")
    await client.wait(lambda f: f.get("type") == "raw")

    added = sim.add_session("agent:main:extra", label="Extra")
    assert added["label"] == "Extra" and "agent:main:extra" in sim.session_keys()
    await client.event(
        "sessions.changed", lambda p: p.get("sessionKey") == "agent:main:extra"
    )
    assert sim.remove_session("agent:main:extra") is True
    assert sim.connections == 1 and sim.clients == 1
    assert ("sessions.subscribe", {}) in sim.calls
    await client.close()
    await sim.wait_connections(0)


async def test_it_ticks_and_keeps_a_demo_fleet_alive() -> None:
    async with FakeGateway(
        token=TOKEN, tick_interval_ms=50, event_rate=40, sessions=50
    ) as sim:
        client = await open_client(sim)
        await client.ok("sessions.subscribe")
        tick = await client.event("tick", timeout=2)
        assert tick["payload"]["ts"] > 0
        await client.event("sessions.changed", timeout=2)
        await client.close()


async def test_it_scales_to_ten_thousand_sessions() -> None:
    started = time.monotonic()
    sim = FakeGateway(token=TOKEN, agents=100, sessions=10_000)
    await sim.start()
    try:
        assert time.monotonic() - started < 1.0
        client = await open_client(sim)
        paged = time.monotonic()
        offset: int | None = 0
        pages = 0
        while offset is not None and pages < 5:
            page = await client.ok("sessions.list", {"limit": 200, "offset": offset})
            assert page["totalCount"] == 10_000 and page["count"] == 200
            offset, pages = page["nextOffset"], pages + 1
        assert time.monotonic() - paged < 2.0
        agents = await client.ok("agents.list")
        assert len(agents["agents"]) == 100 and agents["defaultId"] == "main"
        await client.close()
    finally:
        await sim.stop()


class _EchoMethods(Runs):
    """A method family as a later one (exec approvals, usage, cron) is added: a module with
    a mixin whose handlers register themselves."""

    @method("echo.say", READ, params=Schema({"text": NE}, ("text",)))
    def _m_echo_say(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        return {"text": p["text"], "protocol": self.protocol}

    @method("echo.fail", WRITE, protocols=(4,))
    def _m_echo_fail(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        raise RpcError("UNAVAILABLE", "echo is down")


class _EchoGateway(_EchoMethods, FakeGateway):
    pass


async def test_it_serves_a_method_family_added_as_a_mixin() -> None:
    async with _EchoGateway(token=TOKEN) as sim:
        client = await open_client(sim, scopes=["operator.read"])
        methods = client.hello["features"]["methods"]
        assert methods[:2] == ["echo.say", "echo.fail"] and "chat.send" in methods
        assert await client.ok("echo.say", {"text": "hi"}) == {
            "text": "hi",
            "protocol": 4,
        }
        bad = await client.call("echo.say", {"text": "hi", "bogus": 1})
        assert "unexpected property 'bogus'" in bad["error"]["message"]
        refused = await client.call("echo.fail")
        assert refused["error"]["details"]["missingScope"] == "operator.write"
        await client.close()
        writer = await open_client(sim)
        failed = await writer.call("echo.fail")
        assert failed["error"]["message"] == "echo is down"
        await writer.close()
    async with _EchoGateway(token=TOKEN, protocol=3) as old:
        client = await open_client(old)
        assert "echo.fail" not in client.hello["features"]["methods"]
        unknown = await client.call("echo.fail")
        assert unknown["error"]["message"] == "unknown method: echo.fail"
        await client.close()


def test_it_imports_without_django() -> None:
    """The test kit is the client library's, like fleet/gateway/: no Django, no Channels."""
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    probe = (
        "import sys, fleet.gateway.testing; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'django', 'channels'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"
