"""The run engine behind chat.send, agent and external runs: a run streams its scripted reply
(data.script_for), ends ok, in error or aborted, and updates its session row as it goes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from fleet.gateway.protocol import ErrorShape
from fleet.gateway.testing import data
from fleet.gateway.testing.core import MAX_RUNS_KEPT, Conn, Run, Session, halted, now_ms
from fleet.gateway.testing.events import Events

log = logging.getLogger(__name__)


class Runs(Events):
    """The shared core every method family, the handshake, the HTTP side and the test
    controls build on."""

    def _begin_run(
        self,
        *,
        key: str,
        agent_id: str,
        message: str,
        kind: str,
        conn: Conn | None,
        rid: str | None,
        run_id: str,
    ) -> Run:
        s, created = self._get_or_create(key, agent_id)
        self._ensure_transcript(s)
        seq = s.next_seq
        s.next_seq += 1
        run = Run(
            run_id=run_id,
            session_key=key,
            agent_id=agent_id,
            message=message,
            kind=kind,
            conn=conn,
            request_id=rid,
            user_seq=seq,
            created=created,
            item_id=f"{uuid.uuid4()}:1",
            started_at=now_ms(),
        )
        if len(self._runs) > MAX_RUNS_KEPT:
            self._forget_old_runs()
        self._runs[run_id] = run
        if conn is not None:
            conn.run_sessions.add(key)
        run.task = asyncio.create_task(self._run_main(run))
        return run

    def _forget_old_runs(self) -> None:
        """Finished runs stay for idempotency (5 minutes, like the gateway's dedupe)."""
        horizon = now_ms() - 5 * 60_000
        for run_id in [
            r.run_id
            for r in self._runs.values()
            if r.finished and (r.ended_at or 0) < horizon
        ]:
            del self._runs[run_id]

    async def _run_main(self, run: Run) -> None:
        try:
            await self._run_body(run)
        except asyncio.CancelledError:
            raise
        except Exception:  # pragma: no cover - a bug in the simulator itself
            log.exception("simulated run %s crashed", run.run_id)
        finally:
            run.done.set()

    async def _run_body(self, run: Run) -> None:
        s = self._sessions.get(run.session_key)
        if s is None or run.finished:
            return
        script = data.script_for(run.message, self.reply)
        delay = (
            script.chunk_delay
            if script.chunk_delay is not None
            else self.delta_interval
        )
        v4 = self.protocol >= 4
        if run.created:
            self._emit_changed(s, reason="create")
        user = self._add_message(s, "user", run.message, seq=run.user_seq, run=run)
        self._touch(s)
        self._emit_changed(s, reason="send")
        self._emit_message(s, user)
        run.started_at = now_ms()
        self._mark_running(s, run)
        self._agent_event(
            run,
            "lifecycle",
            {"phase": "start", "startedAt": run.started_at},
            lifecycle=True,
        )
        self._emit_changed(s, phase="start", run_id=run.run_id)
        if v4:
            self._agent_event(
                run,
                "lifecycle",
                {
                    "phase": "model",
                    "provider": s.row.get("modelProvider"),
                    "model": s.row.get("model"),
                },
                lifecycle=True,
            )
        if script.fail:
            await asyncio.sleep(min(delay, 0.05))
            if not halted(run):
                self._finish_error(run, s, data.FAIL_MESSAGE)
            return
        if script.tool:
            await asyncio.sleep(delay)
            if halted(run):
                return
            call_id = f"call_{uuid.uuid4().hex[:24]}"
            args = {"command": "ls -1 ~/notes"}
            self._tool_event(
                run,
                {"phase": "start", "name": "exec", "toolCallId": call_id, "args": args},
            )
            await asyncio.sleep(delay)
            if halted(run):
                return
            self._tool_event(
                run,
                {
                    "phase": "result",
                    "name": "exec",
                    "toolCallId": call_id,
                    "args": args,
                    "meta": "ls -1 ~/notes",
                    "isError": False,
                    "result": {
                        "content": [
                            {
                                "type": "text",
                                "text": "groceries.md\nideas.md\ntodo.md\n",
                            }
                        ],
                        "details": {"exitCode": 0, "durationMs": 12},
                    },
                },
            )
        for piece in data.chunks_of(script.text, script.words_per_chunk):
            await asyncio.sleep(delay)
            if halted(run):
                return
            run.text += piece
            assistant: dict[str, Any] = {"text": run.text, "delta": piece}
            if v4:
                assistant["itemId"] = run.item_id
            self._agent_event(run, "assistant", assistant)
            self._chat_delta(run, piece)
        await asyncio.sleep(0)
        if not halted(run):
            self._finish_ok(run, s)

    def _chat_delta(self, run: Run, piece: str) -> None:
        if self.protocol >= 4:
            self._chat_event(run, "delta", deltaText=piece)
            return
        now = time.monotonic()  # protocol 3 throttles chat deltas to one per 150 ms
        if now - run.last_chat >= 0.15:
            run.last_chat = now
            run.chat_pending = False
            self._chat_event(run, "delta")
        else:
            run.chat_pending = True

    def _usage(self, run: Run) -> tuple[int, int]:
        return 10 + len(run.message.split()), len(data.chunks_of(run.text))

    def _finish_ok(self, run: Run, s: Session) -> None:
        v4 = self.protocol >= 4
        in_tokens, out_tokens = self._usage(run)
        if v4:
            self._agent_event(run, "usage", {"outputTokens": out_tokens})
        usage = {
            "input": in_tokens,
            "output": out_tokens,
            "totalTokens": in_tokens + out_tokens,
            "cacheRead": 0,
            "cacheWrite": 0,
            "cost": {
                "total": round(
                    data.cost_of(str(s.row.get("model") or ""), in_tokens, out_tokens),
                    6,
                )
            },
        }
        reply = self._add_message(s, "assistant", run.text, run=run, usage=usage)
        self._emit_message(s, reply)
        run.ended_at = now_ms()
        if v4:
            self._agent_event(
                run,
                "lifecycle",
                {
                    "phase": "finishing",
                    "stopReason": "stop",
                    "aborted": False,
                    "livenessState": "working",
                    "endedAt": run.ended_at,
                },
                lifecycle=True,
            )
            end: dict[str, Any] = {
                "phase": "end",
                "startedAt": run.started_at,
                "endedAt": run.ended_at,
                "aborted": False,
                "stopReason": "stop",
                "livenessState": "working",
                "executionSettled": True,
                "terminalReply": {"disposition": "visible", "text": run.text},
            }
        else:
            end = {"phase": "end", "endedAt": run.ended_at, "livenessState": "working"}
        self._agent_event(run, "lifecycle", end, lifecycle=True)
        if run.chat_pending:
            self._chat_event(run, "delta")
        final: dict[str, Any] = {"stopReason": "stop"} if v4 else {}
        self._chat_event(run, "final", usage=usage, **final)
        run.status, run.finished = "ok", True
        s.row["inputTokens"] = int(s.row.get("inputTokens") or 0) + in_tokens
        s.row["outputTokens"] = int(s.row.get("outputTokens") or 0) + out_tokens
        s.row["totalTokens"] = s.row["inputTokens"] + s.row["outputTokens"]
        s.row["totalTokensFresh"] = True
        self._book_usage(s, in_tokens, out_tokens)
        s.row["systemSent"] = True
        self._mark_ended(s, run, "done")
        self._emit_changed(s, phase="end", run_id=run.run_id)
        if run.kind == "agent":
            run.final = {
                "runId": run.run_id,
                "status": "ok",
                "summary": "completed",
                "result": {
                    "payloads": [{"text": run.text, "mediaUrl": None}],
                    "meta": {
                        "durationMs": run.ended_at - run.started_at,
                        "agentMeta": {
                            "sessionId": s.row.get("sessionId"),
                            "provider": s.row.get("modelProvider"),
                            "model": s.row.get("model"),
                            "usage": {
                                "input": in_tokens,
                                "output": out_tokens,
                                "total": in_tokens + out_tokens,
                            },
                        },
                        "aborted": False,
                        "stopReason": "stop",
                    },
                },
            }
            self._send_final(run)

    def _finish_error(self, run: Run, s: Session, message: str) -> None:
        run.ended_at = now_ms()
        run.status, run.finished, run.error = "error", True, message
        self._agent_event(
            run,
            "lifecycle",
            {
                "phase": "error",
                "error": message,
                "endedAt": run.ended_at,
                "livenessState": "working",
            },
            lifecycle=True,
        )
        self._chat_event(
            run, "error", message=False, errorMessage=message, errorKind="unknown"
        )
        self._mark_ended(s, run, "failed")
        self._emit_changed(s, phase="error", run_id=run.run_id)
        if run.kind == "agent":
            run.final = {"runId": run.run_id, "status": "error", "summary": message}
            run.final_error = ErrorShape("UNAVAILABLE", message)
            self._send_final(run)

    def _abort_run(self, run: Run, stop_reason: str) -> Callable[[], None] | None:
        """Stop a run now; returns the function that emits what an abort looks like (or
        None if the run had already ended)."""
        if run.finished:
            return None
        run.finished = True
        run.status = "aborted"
        run.ended_at = now_ms()

        def emit() -> None:
            assert run.ended_at is not None
            s = self._sessions.get(run.session_key)
            end: dict[str, Any] = {
                "phase": "end",
                "startedAt": run.started_at,
                "endedAt": run.ended_at,
                "aborted": True,
                "stopReason": "aborted",
                "livenessState": "working",
            }
            self._agent_event(run, "lifecycle", end, lifecycle=True)
            extra: dict[str, Any] = {"stopReason": stop_reason}
            self._chat_event(run, "aborted", message=bool(run.text), **extra)
            if s is not None:
                if run.text:
                    partial = self._add_message(
                        s, "assistant", run.text, run=run, stop_reason="aborted"
                    )
                    self._emit_message(s, partial)
                s.row["abortedLastRun"] = True
                self._mark_ended(s, run, "killed")
                self._emit_changed(s, reason="abort", phase="end", run_id=run.run_id)
            if run.kind == "agent":
                run.final = {
                    "runId": run.run_id,
                    "status": "ok",
                    "summary": "aborted",
                    "result": {
                        "payloads": [{"text": run.text, "mediaUrl": None}]
                        if run.text
                        else [],
                        "meta": {
                            "durationMs": run.ended_at - run.started_at,
                            "aborted": True,
                            "stopReason": "aborted",
                        },
                    },
                }
                self._send_final(run)
            run.done.set()

        return emit

    def _abort_session_runs(
        self, key: str, stop_reason: str
    ) -> list[Callable[[], None]]:
        emits: list[Callable[[], None]] = []
        for run in list(self._runs.values()):
            if run.session_key == key and not run.finished:
                emit = self._abort_run(run, stop_reason)
                if emit is not None:
                    emits.append(emit)
        return emits

    def _kill_runs(self) -> None:
        """A restart: runs in flight end without any event (their sockets are closing)."""
        for run in self._runs.values():
            if run.finished:
                continue
            run.finished, run.status, run.ended_at = True, "aborted", now_ms()
            s = self._sessions.get(run.session_key)
            if s is not None:
                self._mark_ended(s, run, "killed")
            if run.task is not None:
                run.task.cancel()
            run.done.set()

    async def _cancel_run_tasks(self) -> None:
        tasks = [
            r.task
            for r in self._runs.values()
            if r.task is not None and not r.task.done()
        ]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _send_final(self, run: Run) -> None:
        conn = run.conn
        if (
            conn is not None
            and run.request_id is not None
            and conn.number in self._conns
        ):
            self._respond(conn, run.request_id, run.final, run.final_error)

    def _mark_running(self, s: Session, run: Run) -> None:
        ids = [i for i in s.row.get("activeRunIds") or [] if i != run.run_id] + [
            run.run_id
        ]
        s.row.update(
            status="running",
            startedAt=run.started_at,
            endedAt=None,
            runtimeMs=None,
            hasActiveRun=True,
            activeRunIds=ids,
            lastRunId=run.run_id,
            unread=False,
        )
        self._touch(s, run.started_at)

    def _mark_ended(self, s: Session, run: Run, status: str) -> None:
        ids = [i for i in s.row.get("activeRunIds") or [] if i != run.run_id]
        ended = run.ended_at or now_ms()
        s.row.update(
            status="running" if ids else status,
            endedAt=ended,
            runtimeMs=max(0, ended - run.started_at),
            hasActiveRun=bool(ids),
            activeRunIds=ids,
            unread=True,
        )
        self._touch(s, ended)

    def _wait_result(self, run: Run) -> dict[str, Any]:
        out: dict[str, Any] = {
            "runId": run.run_id,
            "status": "error" if run.status == "error" else "ok",
            "startedAt": run.started_at,
            "endedAt": run.ended_at,
        }
        if run.error:
            out["error"] = run.error
        return out
