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

APPROVALS = "operator.approvals"
APPROVAL_CAPS = frozenset({"approvals", "exec-approvals"})


def _exec_output(command: str) -> str:
    """What the simulated host prints for a command."""
    if command.startswith("uname"):
        return "Linux simulator 6.1.0-sim #1 SMP x86_64 GNU/Linux"
    return f"(ran {command}: exit 0)"


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
        if script.exec_command is not None:
            text = await self._run_exec(run, s, script.exec_command, delay)
            if text is None:
                return
            script = data.Script(
                text=text,
                chunk_delay=script.chunk_delay,
                words_per_chunk=script.words_per_chunk,
                fail=False,
                tool=False,
            )
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

    # -- exec approvals (the methods are in methods/approvals.py) ---------------------------

    def _approval_clients(self) -> list[Conn]:
        """Who receives approval events: operator.approvals (or admin) and the caps."""
        return [
            c
            for c in self._conns.values()
            if c.authed
            and not c.closing
            and c.has_scope(APPROVALS)
            and c.caps & APPROVAL_CAPS
        ]

    def _approval_event(self, event: str, payload: dict[str, Any]) -> None:
        self._broadcast(event, payload, targets=self._approval_clients())

    def request_approval(
        self, command: str, *, run: Run | None = None, agent_id: str = "main"
    ) -> tuple[dict[str, Any], asyncio.Future[str]]:
        """Ask the approval clients about `command`; the future gets the decision
        ("allow-once", "allow-always", "deny", or "expired:<reason>")."""
        created = now_ms()
        approval_id = str(uuid.uuid4())
        risky = any(word in command for word in ("rm ", "sudo", "curl", "|", ">"))
        record: dict[str, Any] = {
            "approvalKind": "exec",
            "id": approval_id,
            "createdAtMs": created,
            "expiresAtMs": created + self.approval_timeout_ms,
            "request": {
                "command": command,
                "commandArgv": command.split(),
                "cwd": "/home/simulator",
                "host": "gateway",
                "resolvedPath": "/usr/bin/" + (command.split() or ["sh"])[0],
                "commandAnalysis": {
                    "riskKinds": ["shell-metachar"] if risky else [],
                    "warningLines": (
                        ["The command uses shell features or privileges."]
                        if risky
                        else []
                    ),
                },
                "security": "allowlist",
                "ask": "always",
                "allowedDecisions": ["allow-once", "allow-always", "deny"],
                "unavailableDecisions": [],
                "agentId": run.agent_id if run else agent_id,
                "sessionKey": run.session_key if run else f"agent:{agent_id}:main",
                "runId": run.run_id if run else None,
                "toolCallId": f"call_{uuid.uuid4().hex[:24]}",
                "turnSourceChannel": "webchat",
            },
        }
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if not self._approval_clients():
            future.set_result("expired:no-approval-route")
            self._approval_ledger(record, "expired", None, "no-approval-route", None)
            return record, future
        self._approvals[approval_id] = record
        self._approval_waiters[approval_id] = future
        self._approval_event("exec.approval.requested", record)
        return record, future

    def _approval_ledger(
        self,
        record: dict[str, Any],
        status: str,
        decision: str | None,
        reason: str | None,
        resolver: str | None,
    ) -> None:
        request = record["request"]
        self._approval_history.insert(
            0,
            {
                "id": record["id"],
                "kind": "exec",
                "status": status,
                "decision": decision,
                "reason": reason,
                "resolvedAtMs": now_ms(),
                "presentation": {
                    "commandText": request["command"],
                    "host": request["host"],
                    "agentId": request["agentId"],
                },
                "source": {
                    "agentId": request["agentId"],
                    "sessionKey": request["sessionKey"],
                },
                "resolver": {"kind": "client", "id": resolver} if resolver else None,
            },
        )

    def settle_approval(
        self, approval_id: str, decision: str, resolved_by: str | None
    ) -> dict[str, Any]:
        record = self._approvals.pop(approval_id)
        future = self._approval_waiters.pop(approval_id, None)
        status = "expired" if decision.startswith("expired") else "resolved"
        plain = "deny" if status == "expired" else decision
        if decision == "allow-always":
            self._approval_grants.append(
                {
                    "id": str(uuid.uuid4()),
                    "kind": "exec",
                    "pattern": record["request"]["resolvedPath"],
                    "agentId": record["request"]["agentId"],
                    "createdAtMs": now_ms(),
                    "createdBy": resolved_by,
                }
            )
        self._approval_ledger(
            record,
            status,
            plain,
            decision.split(":", 1)[1] if status == "expired" else None,
            resolved_by,
        )
        payload = {
            "id": approval_id,
            "decision": plain,
            "resolvedBy": resolved_by,
            "ts": now_ms(),
            "request": record["request"],
        }
        self._approval_event("exec.approval.resolved", payload)
        if future is not None and not future.done():
            future.set_result(decision)
        return payload

    def expire_approvals(self) -> None:
        """Expire what is past its time (also called by the approval methods)."""
        now = now_ms()
        for approval_id, record in list(self._approvals.items()):
            if record["expiresAtMs"] <= now:
                self.settle_approval(approval_id, "expired:timeout", None)

    async def _run_exec(
        self, run: Run, s: Session, command: str, delay: float
    ) -> str | None:
        """The fake model calls `exec`; the gateway asks first and the run waits for the
        decision. Returns the reply to stream, None when the run was stopped."""
        await asyncio.sleep(delay)
        if halted(run):
            return None
        record, future = self.request_approval(command, run=run)
        call_id = record["request"]["toolCallId"]
        args = {"command": command}
        self._tool_event(
            run,
            {"phase": "start", "name": "exec", "toolCallId": call_id, "args": args},
        )
        timeout = max(0.0, (record["expiresAtMs"] - now_ms()) / 1000)
        try:
            decision = await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            self.expire_approvals()
            decision = future.result() if future.done() else "expired:timeout"
        if halted(run):
            return None
        allowed = decision in ("allow-once", "allow-always")
        output = _exec_output(command) if allowed else ""
        self._tool_event(
            run,
            {
                "phase": "result",
                "name": "exec",
                "toolCallId": call_id,
                "args": args,
                "meta": command,
                "isError": not allowed,
                "result": {
                    "content": [{"type": "text", "text": output or "denied"}],
                    "details": {"exitCode": 0 if allowed else None},
                },
            },
        )
        if allowed:
            return f"Ran it: {output}"
        if decision == "expired:no-approval-route":
            return (
                "Not run: Headless runs cannot wait for interactive exec approval: "
                f"{command}"
            )
        reason = "user-denied" if decision == "deny" else decision.split(":", 1)[-1]
        return f"Not run: Exec denied (exec {reason}): {command}"

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
        self._book_usage(s, in_tokens, out_tokens, run.ended_at, run_id=run.run_id)
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
            unread=False,
        )
        s.row.pop("lastRunId", None)  # absent while a run is under way (2026.9.6)
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
