"""The stream of one gateway's runs, as the relay follows it: a `RunTracker` per gateway
connection holds the runs in flight (session, text so far, model, usage, tool cards, start
time), the runs that ended lately (so their late events start no new run), the session
keys it has looked up (a delta must not cost a query), and the store lane (the database
work of the chat, in arrival order, each write followed by its push).

Only the worker holding that gateway uses its tracker, on its event loop; nothing here
touches the database or a template (the relay does), so its tests need neither."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from chat import payloads

log = logging.getLogger(__name__)
Job = Callable[[], Awaitable[None]]

MAX_RUN_SECONDS = 3600.0
FINISHED_MEMORY = 1000
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

    def add_delta(self, payload: dict[str, Any]) -> None:
        """A `chat` delta: protocol 4 adds `deltaText`, protocol 3 sends all text so far."""
        delta = payloads.delta_text(payload)
        if delta is not None:
            self.text += delta
        else:
            cumulative = payloads.cumulative_text(payload)
            if cumulative:
                self.text = cumulative

    def add_agent(self, payload: dict[str, Any]) -> bool:
        """An `agent` event: keep what the stored reply needs. False for a tool frame seen
        before (the same frame comes as `agent` and as `session.tool`)."""
        stream = payload.get("stream")
        data = payloads.as_dict(payload.get("data"))
        if stream == "lifecycle":
            life = payloads.lifecycle(data)
            if life.started_at_ms is not None:
                self.started_at_ms = life.started_at_ms
            if life.model:
                self.model = life.model
        elif stream == "tool":
            seq = payload.get("seq")
            if isinstance(seq, int):
                if seq in self.tool_seqs:
                    return False
                self.tool_seqs.add(seq)
            card = payloads.tool_card(data)
            self.tools.setdefault(card["id"], {}).update(card)
        elif stream == "usage":
            self.usage.update(payloads.usage_numbers(data))
        return True

    def duration_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)


class RunTracker:
    """One gateway's runs in flight and its store lane (see the module's docstring)."""

    def __init__(self, gateway_id: int) -> None:
        self.gateway_id = gateway_id
        self.runs: dict[str, Run] = {}
        self.finished: OrderedDict[str, None] = OrderedDict()
        self.session_pks: OrderedDict[str, int] = OrderedDict()
        self._lane: (
            tuple[asyncio.AbstractEventLoop, asyncio.Queue[Job], asyncio.Task[None]]
            | None
        ) = None

    # -- runs --------------------------------------------------------------------------

    def run(self, run_id: str) -> Run | None:
        return self.runs.get(run_id)

    def has_finished(self, run_id: str) -> bool:
        return run_id in self.finished

    def start(self, run_id: str, session_pk: int, session_key: str) -> Run:
        self._prune()
        run = self.runs[run_id] = Run(session_pk=session_pk, session_key=session_key)
        return run

    def finish(self, run_id: str) -> Run | None:
        """Forget a run that ended, and remember that it did."""
        self.finished[run_id] = None
        if len(self.finished) > FINISHED_MEMORY:
            self.finished.popitem(last=False)
        return self.runs.pop(run_id, None)

    def only_run_in(self, session_key: str) -> str:
        """The run in flight in a session when there is exactly one, else ""."""
        active = [r for r, run in self.runs.items() if run.session_key == session_key]
        return active[0] if len(active) == 1 else ""

    def lost(self) -> dict[str, Run]:
        """The connection dropped: hand over the runs in flight (their ends will not come)
        and forget the sessions looked up (the next connection may differ)."""
        runs, self.runs = self.runs, {}
        self.session_pks.clear()
        return runs

    def _prune(self) -> None:
        """A run whose end never came (a lost event) must not stay forever."""
        now = time.monotonic()
        for run_id in [
            r for r, run in self.runs.items() if now - run.started > MAX_RUN_SECONDS
        ]:
            del self.runs[run_id]

    # -- sessions looked up ------------------------------------------------------------

    def session_pk(self, key: str) -> int | None:
        pk = self.session_pks.get(key)
        if pk is not None:
            self.session_pks.move_to_end(key)
        return pk

    def remember_session(self, key: str, pk: int) -> None:
        self.session_pks[key] = pk
        if len(self.session_pks) > SESSION_CACHE_SIZE:
            self.session_pks.popitem(last=False)

    # -- the store lane ----------------------------------------------------------------

    def enqueue(self, job: Job) -> None:
        """Run `job` after the ones queued before it, off the event loop's path: the relay
        goes on with deltas instead of waiting for a database thread."""
        loop = asyncio.get_running_loop()
        lane = self._lane
        if lane is None or lane[0] is not loop or lane[2].done():
            queue: asyncio.Queue[Job] = asyncio.Queue()
            task = loop.create_task(
                self._run_lane(queue), name=f"chat-store-{self.gateway_id}"
            )
            lane = self._lane = (loop, queue, task)
        lane[1].put_nowait(job)

    async def drain(self) -> None:
        """Wait until everything queued is stored and pushed (tests, shutdown)."""
        lane = self._lane
        if lane is not None and lane[0] is asyncio.get_running_loop():
            await lane[1].join()

    @staticmethod
    async def _run_lane(queue: asyncio.Queue[Job]) -> None:
        while True:
            job = await queue.get()
            try:
                await job()
            except Exception:  # one bad row must not stop the transcript
                log.exception("chat relay: storing failed")
            finally:
                queue.task_done()
