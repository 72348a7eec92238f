"""What the worker does with a gateway's chat traffic: `session.message` is stored (the
durable transcript), `chat` and `agent` events are relayed to the session's group for live
streaming, and a run's end is stored before it is announced. Called by the worker for every
such event, in the order they arrived, inside the worker process.

The relay keeps a little state per run in flight (session, text so far, model, usage, start
time), one table per gateway connection, only until the run ends or the connection drops.
Deltas cost one channel-layer send each: no database write, no template. Database work runs
on a store lane per gateway (in order, each write followed by its push), so a transcript
write never holds back the deltas behind it. Its database calls retry through an outage
like the worker's others (fleet/dbretry.py): a run that ends while the database is away is
stored when it is back."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from chat import services
from chat.models import Message
from fleet import capabilities
from fleet.dbretry import db
from fleet.gateway.protocol import chat_text
from fleet.groups import apush, session_group

log = logging.getLogger(__name__)
Job = Callable[[], Awaitable[None]]

TERMINAL = {
    "final": Message.State.FINAL,
    "error": Message.State.ERROR,
    "aborted": Message.State.ABORTED,
}
# Agent streams a page shows; `assistant` duplicates the chat deltas and `usage` is kept
# here for the stored message, so neither is forwarded.
FORWARDED_AGENT_STREAMS = {"lifecycle", "run_status", "tool", "item", "error"}
MAX_RUN_SECONDS = 3600.0
SESSION_CACHE_SIZE = 10_000


@dataclass
class Run:
    session_pk: int
    session_key: str
    started: float = field(default_factory=time.monotonic)
    started_at_ms: int | None = None
    text: str = ""
    model: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, dict[str, Any]] = field(default_factory=dict)
    tool_seqs: set[int] = field(default_factory=set)  # tool frames seen, by run seq


def tool_card(data: dict[str, Any]) -> dict[str, Any]:
    """The part of a `tool` agent event a card shows (shared with the consumer)."""
    card: dict[str, Any] = {
        "id": str(data.get("toolCallId") or data.get("name") or "tool")[:200],
        "name": str(data.get("name") or "tool")[:200],
        "phase": str(data.get("phase") or ""),
    }
    for key in ("args", "partialResult", "result", "meta"):
        if key in data and data[key] is not None:
            card[key] = data[key]
    card["isError"] = data.get("isError") is True
    return card


# gateway id -> run id -> Run. Only the worker holding that gateway writes here.
_runs: dict[int, dict[str, Run]] = {}
# gateway id -> run ids that ended lately: late events of theirs are not a new run.
_finished: dict[int, OrderedDict[str, None]] = {}
FINISHED_MEMORY = 1000
# (gateway id, session key) -> session pk: a delta must not cost a query.
_session_pks: OrderedDict[tuple[int, str], int] = OrderedDict()


# gateway id -> (loop, queue, task): the store lane. Database work of the chat (transcript
# entries, run ends) runs there in arrival order, each followed by its push, so the worker's
# event loop goes on relaying deltas instead of waiting for a database thread.
_lanes: dict[
    int, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Job], asyncio.Task[None]]
] = {}


def _enqueue(gateway_id: int, job: Job) -> None:
    loop = asyncio.get_running_loop()
    lane = _lanes.get(gateway_id)
    if lane is None or lane[0] is not loop or lane[2].done():
        queue: asyncio.Queue[Job] = asyncio.Queue()
        lane = (
            loop,
            queue,
            loop.create_task(_run_lane(queue), name=f"chat-store-{gateway_id}"),
        )
        _lanes[gateway_id] = lane
    lane[1].put_nowait(job)


async def _run_lane(queue: asyncio.Queue[Job]) -> None:
    while True:
        job = await queue.get()
        try:
            await job()
        except Exception:  # one bad row must not stop the transcript
            log.exception("chat relay: storing failed")
        finally:
            queue.task_done()


async def drain(gateway_id: int) -> None:
    """Wait until everything queued for a gateway is stored and pushed (tests, shutdown)."""
    lane = _lanes.get(gateway_id)
    if lane is not None and lane[0] is asyncio.get_running_loop():
        await lane[1].join()


def runs_in_flight(gateway_id: int) -> dict[str, Run]:
    return _runs.setdefault(gateway_id, {})


async def _session_pk(gateway_id: int, key: str) -> int | None:
    cache_key = (gateway_id, key)
    pk = _session_pks.get(cache_key)
    if pk is not None:
        _session_pks.move_to_end(cache_key)
        return pk
    pk = await db(services.session_pk_for)(gateway_id, key)
    if pk is not None:
        _session_pks[cache_key] = pk
        if len(_session_pks) > SESSION_CACHE_SIZE:
            _session_pks.popitem(last=False)
    return pk


async def _run_for(gateway_id: int, payload: dict[str, Any]) -> Run | None:
    run_id, key = payload.get("runId"), payload.get("sessionKey")
    if not isinstance(run_id, str) or not run_id or not isinstance(key, str):
        return None
    runs = runs_in_flight(gateway_id)
    run = runs.get(run_id)
    if run is None:
        if run_id in _finished.get(gateway_id, ()):
            return None
        session_pk = await _session_pk(gateway_id, key)
        if session_pk is None:
            return None
        _prune(runs)
        run = runs[run_id] = Run(session_pk=session_pk, session_key=key)
    return run


def _prune(runs: dict[str, Run]) -> None:
    """A run whose end never came (a lost event) must not stay forever."""
    now = time.monotonic()
    for run_id in [r for r, run in runs.items() if now - run.started > MAX_RUN_SECONDS]:
        del runs[run_id]


async def on_session_message(gateway_id: int, payload: Any) -> None:
    hint = ""
    if isinstance(payload, dict) and isinstance(payload.get("sessionKey"), str):
        # An assistant entry without its run id belongs to the run in flight in its session.
        active = [
            run_id
            for run_id, run in runs_in_flight(gateway_id).items()
            if run.session_key == payload["sessionKey"]
        ]
        hint = active[0] if len(active) == 1 else ""
    in_flight = set(runs_in_flight(gateway_id))

    async def job() -> None:
        stored = await db(services.store_session_message)(gateway_id, payload, hint)
        if stored is None:
            return
        if stored.role == Message.Role.ASSISTANT and stored.run_id in in_flight:
            return  # the run's end announces the finished reply
        await apush(
            session_group(stored.session_pk),
            "chat.stored",
            message_id=str(stored.message_id),
            run_id=stored.run_id,
        )

    _enqueue(gateway_id, job)


async def on_chat_event(gateway_id: int, payload: Any) -> None:
    if not isinstance(payload, dict):
        return
    run = await _run_for(gateway_id, payload)
    if run is None:
        return
    state = payload.get("state")
    if isinstance(state, str) and state in TERMINAL:
        await _finish(gateway_id, str(payload["runId"]), run, payload)
        return
    if state == "delta":
        delta = payload.get("deltaText")
        if isinstance(delta, str):
            run.text += delta
        else:
            cumulative = chat_text(payload.get("message"))
            if cumulative:
                run.text = cumulative
    await apush(session_group(run.session_pk), "gateway.chat", payload=payload)


async def on_agent_event(gateway_id: int, payload: Any) -> None:
    if not isinstance(payload, dict):
        return
    run = await _run_for(gateway_id, payload)
    if run is None:
        return
    stream, data = payload.get("stream"), payload.get("data")
    data = data if isinstance(data, dict) else {}
    if stream == "lifecycle":
        if isinstance(data.get("startedAt"), int):
            run.started_at_ms = data["startedAt"]
        if isinstance(data.get("model"), str) and data["model"]:
            run.model = data["model"]
    elif stream == "tool":
        seq = payload.get("seq")
        if isinstance(seq, int):
            if seq in run.tool_seqs:
                return  # the same frame, as `agent` and as `session.tool`
            run.tool_seqs.add(seq)
        card = tool_card(data)
        merged = run.tools.setdefault(card["id"], {})
        merged.update(card)
    elif stream == "usage":
        run.usage.update({k: v for k, v in data.items() if isinstance(v, int | float)})
    if isinstance(stream, str) and stream in FORWARDED_AGENT_STREAMS:
        await apush(session_group(run.session_pk), "gateway.agent", payload=payload)


async def on_session_tool(gateway_id: int, payload: Any) -> None:
    """`session.tool` goes to session subscribers: the tool frames of every run, also the
    ones started elsewhere (whose `agent` tool frames reach only the client that started
    them). The worker's own runs bring each frame twice; the run's seq tells them apart."""
    if isinstance(payload, dict):
        await on_agent_event(gateway_id, {**payload, "stream": "tool"})


async def _finish(
    gateway_id: int, run_id: str, run: Run, payload: dict[str, Any]
) -> None:
    """Store the run's reply, forget the run, and only then say it is stored."""
    runs_in_flight(gateway_id).pop(run_id, None)
    finished = _finished.setdefault(gateway_id, OrderedDict())
    finished[run_id] = None
    if len(finished) > FINISHED_MEMORY:
        finished.popitem(last=False)
    state = TERMINAL[str(payload["state"])]
    message = payload.get("message")
    text = chat_text(message) or run.text
    error = ""
    if state == Message.State.ERROR:
        error = str(payload.get("errorMessage") or "The run failed.")
    usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else None
    model = message.get("model") if isinstance(message, dict) else None
    duration_ms = int((time.monotonic() - run.started) * 1000)

    async def job() -> None:
        await _store_end(
            run_id,
            run,
            state,
            text=text,
            error=error,
            model=model if isinstance(model, str) and model else run.model,
            usage=usage or run.usage or None,
            duration_ms=duration_ms,
            raw=payload,
        )

    _enqueue(gateway_id, job)


async def _store_end(
    run_id: str,
    run: Run,
    state: str,
    *,
    text: str,
    error: str,
    model: str,
    usage: dict[str, Any] | None,
    duration_ms: int,
    raw: dict[str, Any] | None = None,
) -> None:
    """Store a run's reply with its tool cards, then tell the session's pages it is stored."""
    stored = await db(services.store_run_end)(
        run.session_pk,
        run_id,
        state=state,
        text=text,
        error=error,
        model=model,
        usage=usage,
        duration_ms=duration_ms,
        raw=raw,
        tools=list(run.tools.values()),
    )
    await apush(
        session_group(run.session_pk),
        "chat.stored",
        message_id=str(stored.message_id),
        run_id=run_id,
        state=state,
    )


async def on_connection_lost(gateway_id: int) -> None:
    """Runs in flight lose their terminal event when the socket drops: store what they had
    as interrupted, tell the pages, and back-fill transcripts on the next view."""
    runs = _runs.pop(gateway_id, {})
    for cache_key in [k for k in _session_pks if k[0] == gateway_id]:
        del _session_pks[cache_key]

    async def job() -> None:
        for run_id, run in runs.items():
            await _store_end(
                run_id,
                run,
                Message.State.ERROR,
                text=run.text,
                error=services.INTERRUPTED,
                model=run.model,
                usage=run.usage or None,
                duration_ms=int((time.monotonic() - run.started) * 1000),
            )
        await db(services.forget_history_sync)(gateway_id)

    _enqueue(gateway_id, job)


# -- the capability: what chat plugs into the worker ------------------------------------------


def capability() -> capabilities.Capability:
    """Chat's events and its connection-lost step, registered from `ChatConfig.ready`: the
    worker routes them here by its table and never imports chat."""

    async def session_message(link: capabilities.GatewayLink, payload: Any) -> None:
        await on_session_message(link.gateway_id, payload)

    async def chat_event(link: capabilities.GatewayLink, payload: Any) -> None:
        await on_chat_event(link.gateway_id, payload)

    async def agent_event(link: capabilities.GatewayLink, payload: Any) -> None:
        await on_agent_event(link.gateway_id, payload)

    async def session_tool(link: capabilities.GatewayLink, payload: Any) -> None:
        await on_session_tool(link.gateway_id, payload)

    async def lost(link: capabilities.GatewayLink) -> None:
        await on_connection_lost(link.gateway_id)

    return capabilities.Capability(
        name="chat",
        events={
            "session.message": session_message,
            "chat": chat_event,
            "agent": agent_event,
            "session.tool": session_tool,
        },
        on_lost=lost,
    )
