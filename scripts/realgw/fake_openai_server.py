#!/usr/bin/env python3
"""Tiny fake OpenAI-compatible model server (stdlib only) for exercising the
OpenClaw gateway without a real LLM.

Endpoints (loopback only):
  GET  /v1/models              -> one model, id "fake-model"
  POST /v1/chat/completions    -> fixed reply; SSE chunks when "stream": true
  POST /v1/responses           -> 404 (not implemented; use api "openai-completions")

Every request is appended (truncated) to the log file given by --log so you can
see what the gateway actually sends.

Scripted replies: a user message that contains a directive picks the reply of that run.
  [[fake:echo]] TEXT [[/fake]] -> replies TEXT, streamed in word-sized chunks (without the
                                 closing [[/fake]], TEXT ends at the first blank line: the gateway
                                 appends its own context to the user's message)
  [[fake:long]]       -> a reply of about 2,000 words (throughput, scrolling)
  [[fake:slow]]       -> the normal reply at one chunk per second (abort, timeouts)
  [[fake:fail]]       -> HTTP 500 from the model (the run fails)
  [[fake:exec CMD]]   -> the model calls the gateway's `exec` tool with {"command": CMD} (when the
                         gateway offers `exec`); once the tool's result is in the conversation it
                         replies "Ran it: <first line of the result>" (or "Not run: ..." when
                         the gateway denied it). With tools.exec.mode "ask" (openclaw.json) the
                         gateway asks an approval client first (REAL-GATEWAY-v4.md, "Exec approvals").
Without a directive it replies REPLY (or --reply).

Usage: python3 fake_openai_server.py --port 18790 --log /tmp/fake-model.jsonl [--reply TEXT] [--chunk-delay S]

The Control Center's copy of ../shared/openclaw/fake_openai_server.py (a test fixture), typed;
scripts/realgw/start.sh runs it next to the real gateway.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REPLY = "Hello from the fake model! This reply is streamed in small chunks so you can watch tokens arrive."
MODEL_ID = "fake-model"
CHUNK_DELAY_S = 0.05

DIRECTIVE = re.compile(r"\[\[fake:(echo|long|slow|fail)\]\]")
EXEC_DIRECTIVE = re.compile(r"\[\[fake:exec (.+?)\]\]")
LONG_REPLY = " ".join(f"word{i}" for i in range(2000))

_log_lock = threading.Lock()
_log_path: str | None = None


def log(entry: dict[str, Any]) -> None:
    entry["ts"] = time.time()
    line = json.dumps(entry)
    if len(line) > 4000:
        line = json.dumps(
            {
                k: (
                    v if len(json.dumps(v)) < 1500 else str(v)[:1500] + "...<truncated>"
                )
                for k, v in entry.items()
            }
        )
    with _log_lock:
        print(line, file=sys.stderr, flush=True)
        if _log_path:
            with open(_log_path, "a") as fh:
                fh.write(line + "\n")


def _text_of(message: dict[str, Any]) -> str:
    """The text of a chat message whose content is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def chunks_of(text: str) -> list[str]:
    # split into word-ish pieces keeping the spaces
    out: list[str] = []
    cur = ""
    for ch in text:
        cur += ch
        if ch == " ":
            out.append(cur)
            cur = ""
    if cur:
        out.append(cur)
    return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # silence default logging
        pass

    def _json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        log({"method": "GET", "path": self.path})
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            return self._json(
                200,
                {
                    "object": "list",
                    "data": [
                        {
                            "id": MODEL_ID,
                            "object": "model",
                            "created": 0,
                            "owned_by": "fake",
                        }
                    ],
                },
            )
        return self._json(404, {"error": {"message": "not found", "type": "not_found"}})

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            req = json.loads(raw or b"{}")
        except Exception:
            req = {"_unparsable": raw[:500].decode("utf-8", "replace")}
        summary = {
            k: req.get(k)
            for k in (
                "model",
                "stream",
                "stream_options",
                "max_tokens",
                "max_completion_tokens",
                "temperature",
            )
            if k in req
        }
        msgs = req.get("messages") or []
        summary["n_messages"] = len(msgs)
        summary["roles"] = [m.get("role") for m in msgs if isinstance(m, dict)]
        summary["n_tools"] = len(req.get("tools") or [])
        last_user = next(
            (
                m
                for m in reversed(msgs)
                if isinstance(m, dict) and m.get("role") == "user"
            ),
            None,
        )
        summary["last_user"] = (
            str(last_user.get("content"))[:300] if last_user else None
        )
        log(
            {
                "method": "POST",
                "path": self.path,
                "headers": {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() != "authorization"
                },
                "summary": summary,
            }
        )
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            return self._json(
                404, {"error": {"message": "not found", "type": "not_found"}}
            )

        reply, delay = REPLY, CHUNK_DELAY_S
        for m in msgs:
            text = (
                _text_of(m) if isinstance(m, dict) and m.get("role") == "user" else ""
            )
            found = DIRECTIVE.search(text)
            if not found:
                continue
            kind = found.group(1)
            if kind == "fail":
                return self._json(
                    500,
                    {"error": {"message": "scripted failure", "type": "server_error"}},
                )
            if kind == "echo":  # up to [[/fake]], else up to the first blank line
                rest = text[found.end() :]
                end = rest.find("[[/fake]]")
                rest = rest[:end] if end >= 0 else rest.split("\n\n", 1)[0]
                reply = rest.strip() or REPLY
            elif kind == "long":
                reply = LONG_REPLY
            elif kind == "slow":
                delay = 1.0
        exec_cmd = None
        for m in msgs:
            if isinstance(m, dict) and m.get("role") == "user":
                found = EXEC_DIRECTIVE.search(_text_of(m))
                if found:
                    exec_cmd = found.group(1)
        tool_results = [
            _text_of(m) for m in msgs if isinstance(m, dict) and m.get("role") == "tool"
        ]
        offered = [
            ((t or {}).get("function") or {}).get("name")
            for t in req.get("tools") or []
        ]
        cid = "chatcmpl-" + uuid.uuid4().hex[:12]
        created = int(time.time())
        model = req.get("model") or MODEL_ID
        if exec_cmd and tool_results:
            first = (tool_results[-1].strip().splitlines() or [""])[0][:200]
            reply = (
                f"Not run: {first}" if "denied" in first.lower() else f"Ran it: {first}"
            )
        elif exec_cmd and "exec" in offered and req.get("stream"):
            return self._stream_tool_call(cid, created, model, exec_cmd, req)
        usage = {
            "prompt_tokens": 10,
            "completion_tokens": len(chunks_of(reply)),
            "total_tokens": 10 + len(chunks_of(reply)),
        }
        if not req.get("stream"):
            return self._json(
                200,
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": reply},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                },
            )

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def send(obj: Any) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        base = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
        try:
            send(
                {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                        }
                    ],
                }
            )
            for piece in chunks_of(reply):
                time.sleep(delay)
                send(
                    {
                        **base,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"content": piece},
                                "finish_reason": None,
                            }
                        ],
                    }
                )
            send(
                {
                    **base,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                }
            )
            if (req.get("stream_options") or {}).get("include_usage"):
                send({**base, "choices": [], "usage": usage})
            send("[DONE]")
        except (BrokenPipeError, ConnectionResetError):
            log({"event": "client disconnected mid-stream"})

    def _stream_tool_call(
        self, cid: str, created: int, model: str, command: str, req: dict[str, Any]
    ) -> None:
        """Stream one OpenAI tool call to `exec` (the gateway runs it, or asks for approval)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        base = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }

        def send(obj: Any) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        call = {
            "index": 0,
            "id": "call_" + uuid.uuid4().hex[:8],
            "type": "function",
            "function": {"name": "exec", "arguments": ""},
        }
        arguments = json.dumps({"command": command})
        try:
            first_delta = {"role": "assistant", "content": None, "tool_calls": [call]}
            send(
                {
                    **base,
                    "choices": [
                        {"index": 0, "delta": first_delta, "finish_reason": None}
                    ],
                }
            )
            args_delta = {
                "tool_calls": [{"index": 0, "function": {"arguments": arguments}}]
            }
            send(
                {
                    **base,
                    "choices": [
                        {"index": 0, "delta": args_delta, "finish_reason": None}
                    ],
                }
            )
            send(
                {
                    **base,
                    "choices": [
                        {"index": 0, "delta": {}, "finish_reason": "tool_calls"}
                    ],
                }
            )
            if (req.get("stream_options") or {}).get("include_usage"):
                usage = {
                    "prompt_tokens": 10,
                    "completion_tokens": 5,
                    "total_tokens": 15,
                }
                send({**base, "choices": [], "usage": usage})
            send("[DONE]")
        except (BrokenPipeError, ConnectionResetError):
            log({"event": "client disconnected mid-stream"})


def main() -> None:
    global _log_path, REPLY, CHUNK_DELAY_S
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18790)
    ap.add_argument("--log", default=None)
    ap.add_argument(
        "--reply", default=None, help="the reply when no directive is given"
    )
    ap.add_argument(
        "--chunk-delay", type=float, default=None, help="seconds between chunks"
    )
    a = ap.parse_args()
    _log_path = a.log
    if a.reply:
        REPLY = a.reply
    if a.chunk_delay is not None:
        CHUNK_DELAY_S = a.chunk_delay
    srv = ThreadingHTTPServer((a.host, a.port), Handler)
    print(
        f"fake model server on http://{a.host}:{a.port}/v1", file=sys.stderr, flush=True
    )
    srv.serve_forever()


if __name__ == "__main__":
    main()
