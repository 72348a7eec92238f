"""What the worker does with a gateway's chat traffic: `session.message` is stored (the
durable transcript), `chat` and `agent` events are relayed to the session's group for live
streaming, and a run's end is stored before it is announced. Called by the worker for every
such event, in the order they arrived, inside the worker process.

Each gateway connection has its own `RunTracker` (chat/stream.py): the runs in flight, only
until they end or the connection drops, and the store lane. Deltas cost one channel-layer
send each: no database write, no template. Database work runs on the tracker's store lane
(in order, each write followed by its push), so a transcript write never holds back the
deltas behind it. Its database calls retry through an outage like the worker's others
(fleet/dbretry.py): a run that ends while the database is away is stored when it is back.
What a payload says is read by chat/payloads.py; what is stored, by chat/store.py."""

from __future__ import annotations

from typing import Any

from chat import payloads, store
from chat.models import Message
from chat.stream import Run, RunTracker
from fleet import capabilities
from fleet.dbretry import db
from fleet.groups import apush, session_group


class ChatRelay:
    """The relay of every gateway this worker holds: one `RunTracker` per gateway, made on
    its first event, so two gateways' runs (even with the same run id) never meet."""

    def __init__(self) -> None:
        self.trackers: dict[int, RunTracker] = {}

    def tracker(self, gateway_id: int) -> RunTracker:
        tracker = self.trackers.get(gateway_id)
        if tracker is None:
            tracker = self.trackers[gateway_id] = RunTracker(gateway_id)
        return tracker

    async def _session_pk(self, tracker: RunTracker, key: str) -> int | None:
        pk = tracker.session_pk(key)
        if pk is None:
            pk = await db(store.session_pk_for)(tracker.gateway_id, key)
            if pk is not None:
                tracker.remember_session(key, pk)
        return pk

    async def _run_for(self, tracker: RunTracker, payload: Any) -> Run | None:
        ref = payloads.run_ref(payload)
        if ref is None:
            return None
        run = tracker.run(ref.run_id)
        if run is None:
            if tracker.has_finished(ref.run_id):
                return None
            session_pk = await self._session_pk(tracker, ref.session_key)
            if session_pk is None:
                return None
            run = tracker.start(ref.run_id, session_pk, ref.session_key)
        return run

    # -- events ------------------------------------------------------------------------

    async def on_session_message(self, gateway_id: int, payload: Any) -> None:
        tracker = self.tracker(gateway_id)
        hint = ""
        if isinstance(payload, dict) and isinstance(payload.get("sessionKey"), str):
            # An assistant entry without its run id belongs to the run in flight there.
            hint = tracker.only_run_in(payload["sessionKey"])
        in_flight = set(tracker.runs)

        async def job() -> None:
            stored = await db(store.store_session_message)(gateway_id, payload, hint)
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

        tracker.enqueue(job)

    async def on_chat_event(self, gateway_id: int, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        tracker = self.tracker(gateway_id)
        run = await self._run_for(tracker, payload)
        if run is None:
            return
        end = payloads.run_end(payload)
        if end is not None:
            self._finish(tracker, str(payload["runId"]), end, payload)
            return
        if payload.get("state") == "delta":
            run.add_delta(payload)
        await apush(session_group(run.session_pk), "gateway.chat", payload=payload)

    async def on_agent_event(self, gateway_id: int, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        run = await self._run_for(self.tracker(gateway_id), payload)
        if run is None or not run.add_agent(payload):
            return
        stream = payload.get("stream")
        if isinstance(stream, str) and stream in payloads.FORWARDED_AGENT_STREAMS:
            await apush(session_group(run.session_pk), "gateway.agent", payload=payload)

    async def on_session_tool(self, gateway_id: int, payload: Any) -> None:
        """`session.tool` goes to session subscribers: the tool frames of every run, also
        the ones started elsewhere (whose `agent` tool frames reach only the client that
        started them). The worker's own runs bring each frame twice; the run's seq tells
        them apart."""
        if isinstance(payload, dict):
            await self.on_agent_event(gateway_id, {**payload, "stream": "tool"})

    def _finish(
        self,
        tracker: RunTracker,
        run_id: str,
        end: payloads.RunEnd,
        payload: dict[str, Any],
    ) -> None:
        """Store the run's reply, forget the run, and only then say it is stored."""
        run = tracker.finish(run_id)
        if run is None:
            return
        duration_ms = run.duration_ms()

        async def job() -> None:
            await _store_end(
                run_id,
                run,
                end.state,
                text=end.text or run.text,
                error=end.error,
                model=end.model or run.model,
                usage=end.usage or run.usage or None,
                duration_ms=duration_ms,
                raw=payload,
            )

        tracker.enqueue(job)

    async def on_connection_lost(self, gateway_id: int) -> None:
        """Runs in flight lose their terminal event when the socket drops: store what they
        had as interrupted, tell the pages, and back-fill transcripts on the next view."""
        tracker = self.tracker(gateway_id)
        runs = tracker.lost()

        async def job() -> None:
            for run_id, run in runs.items():
                await _store_end(
                    run_id,
                    run,
                    Message.State.ERROR,
                    text=run.text,
                    error=store.INTERRUPTED,
                    model=run.model,
                    usage=run.usage or None,
                    duration_ms=run.duration_ms(),
                )
            await db(store.forget_history_sync)(gateway_id)

        tracker.enqueue(job)

    # -- the capability: what chat plugs into the worker -------------------------------

    def capability(self) -> capabilities.Capability:
        """Chat's events and its connection-lost step, registered from `ChatConfig.ready`:
        the worker routes them here by its table and never imports chat."""

        async def session_message(link: capabilities.GatewayLink, payload: Any) -> None:
            await self.on_session_message(link.gateway_id, payload)

        async def chat_event(link: capabilities.GatewayLink, payload: Any) -> None:
            await self.on_chat_event(link.gateway_id, payload)

        async def agent_event(link: capabilities.GatewayLink, payload: Any) -> None:
            await self.on_agent_event(link.gateway_id, payload)

        async def session_tool(link: capabilities.GatewayLink, payload: Any) -> None:
            await self.on_session_tool(link.gateway_id, payload)

        async def lost(link: capabilities.GatewayLink) -> None:
            await self.on_connection_lost(link.gateway_id)

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
    stored = await db(store.store_run_end)(
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


# The worker process's relay (registered from ChatConfig.ready). Its state is per gateway,
# in the trackers; these names are what tests and the worker's shutdown use.
RELAY = ChatRelay()


def runs_in_flight(gateway_id: int) -> dict[str, Run]:
    return RELAY.tracker(gateway_id).runs


async def drain(gateway_id: int) -> None:
    """Wait until everything queued for a gateway is stored and pushed (tests, shutdown)."""
    await RELAY.tracker(gateway_id).drain()


async def on_connection_lost(gateway_id: int) -> None:
    await RELAY.on_connection_lost(gateway_id)


def capability() -> capabilities.Capability:
    return RELAY.capability()
