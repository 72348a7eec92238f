"""Chat streaming latency: what a browser's WebSocket sees through the Control Center, against a
client connected straight to the gateway, for the same runs, in one process tree.

    .venv/bin/python bench/bench_chat.py [--runs 20] [--delta-interval 0.02]
    .venv/bin/python bench/bench_chat.py --gateway ws://127.0.0.1:18789 --token-env OPENCLAW_GATEWAY_TOKEN

Without --gateway it starts the simulator (`manage.py fakegateway`). It always starts
`manage.py serve` (daphne + worker, SQLite, in-memory layer) on free ports, logs in as admin,
opens the chat socket of the main session, and connects a direct operator client to the same
gateway. Each run is sent through the Control Center (POST /chat/<pk>/send/); t0 is the POST.

Reported: time to first token for both (ratio CC/direct), the lag of each delta behind the
direct client (p50/p99), and lost or reordered deltas (the text each side rebuilt)."""

from __future__ import annotations

import argparse
import asyncio
import html
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import websockets

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            try:
                r = await client.get(url, timeout=2)
                if r.status_code == 200 and '"connected"' in r.text:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"{url} did not become ready")


class DirectClient:
    """An operator connection straight to the gateway: records when each delta arrives."""

    def __init__(self, url: str, token: str) -> None:
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlcenter.settings")
        import django

        django.setup()
        from fleet.gateway.client import ConnectOptions, GatewayConnection

        self.seen: dict[str, list[tuple[float, str]]] = {}
        self.conn = GatewayConnection(
            ConnectOptions(url=url, token=token), self.on_event
        )

    async def on_event(self, event: Any) -> None:
        payload = event.payload
        if event.event != "chat" or not isinstance(payload, dict):
            return
        if payload.get("state") != "delta":
            return
        now = time.perf_counter()
        piece = payload.get("deltaText")
        if not isinstance(piece, str):  # protocol 3: cumulative text
            content = (payload.get("message") or {}).get("content") or []
            piece = "".join(b.get("text", "") for b in content if isinstance(b, dict))
        self.seen.setdefault(str(payload.get("runId")), []).append((now, piece))

    async def start(self) -> None:
        await self.conn.connect()
        self.task = asyncio.create_task(self.conn.run())


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--delta-interval", type=float, default=0.02)
    parser.add_argument(
        "--gateway", help="a real gateway's ws:// URL (default: simulator)"
    )
    parser.add_argument("--token-env", default="OPENCLAW_GATEWAY_TOKEN")
    parser.add_argument("--message", default="hello")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument(
        "--split",
        metavar="REDIS_URL",
        help="production layout: daphne and manage.py gatewayworker as two processes "
        "sharing this Redis (default: manage.py serve, one process)",
    )
    args = parser.parse_args()

    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-chat-{uuid.uuid4().hex[:6]}"
    tmp.mkdir(parents=True)
    args.data_dir = tmp
    procs: list[subprocess.Popen[bytes]] = []
    password = secrets.token_urlsafe(12)
    args.env = env = {}
    if args.gateway:
        gw_url, token = args.gateway, os.environ[args.token_env]
    else:
        gw_port = free_port()
        gw_url, token = f"ws://127.0.0.1:{gw_port}", secrets.token_urlsafe(16)
    web_port = free_port()
    env.update(
        {
            **os.environ,
            "CONTROLCENTER_DATA_DIR": str(tmp),
            "CONTROLCENTER_ADMIN_PASSWORD": password,
            "OPENCLAW_GATEWAY_URL": gw_url,
            "OPENCLAW_GATEWAY_TOKEN": token,
            "REDIS_URL": "",
            "DJANGO_DEBUG": "False",  # as deployed: no query log
            "LOG_LEVEL": "WARNING",
        }
    )

    def spawn(*cmd: str, log: str) -> None:
        out = open(tmp / log, "ab")  # noqa: SIM115 - lives as long as the process
        procs.append(
            subprocess.Popen(
                [sys.executable, "manage.py", *cmd],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        )

    try:
        if not args.gateway:
            spawn(
                "fakegateway",
                "--port",
                str(gw_port),
                "--token",
                token,
                "--delta-interval",
                str(args.delta_interval),
                log="gateway.log",
            )
        if args.split:
            env["REDIS_URL"] = args.split
            subprocess.run(
                [sys.executable, "manage.py", "migrate", "-v0"],
                cwd=REPO,
                env=env,
                check=True,
            )
            subprocess.run(
                [
                    sys.executable,
                    "manage.py",
                    "shell",
                    "-c",
                    "from fleet.bootstrap import ensure_admin_account; ensure_admin_account()",
                ],
                cwd=REPO,
                env=env,
                check=True,
            )
            spawn("gatewayworker", log="worker.log")
            out = open(tmp / "web.log", "ab")  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "daphne",
                        "-p",
                        str(web_port),
                        "controlcenter.asgi:application",
                    ],
                    cwd=REPO,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        else:
            spawn("serve", "--port", str(web_port), log="web.log")
        base = f"http://127.0.0.1:{web_port}"
        await wait_http(f"{base}/healthz")
        await run_bench(args, base, password, gw_url, token)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


async def run_bench(
    args: argparse.Namespace, base: str, password: str, gw_url: str, token: str
) -> None:
    async with httpx.AsyncClient(base_url=base, follow_redirects=False) as http:
        login = await http.get("/accounts/login/")
        csrf = http.cookies["csrftoken"]
        m = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login.text)
        r = await http.post(
            "/accounts/login/",
            data={
                "username": "admin",
                "password": password,
                "csrfmiddlewaretoken": m.group(1) if m else csrf,
            },
            headers={"Referer": f"{base}/accounts/login/"},
        )
        assert r.status_code in (302, 303), f"login failed: {r.status_code}"
        pk = await chat_session_pk(http, args.env)
        page = await http.get(f"/chat/{pk}/")
        assert page.status_code == 200, page.status_code
        csrf = http.cookies.get("csrftoken") or csrf
        cookie = "; ".join(f"{k}={v}" for k, v in http.cookies.items())

        direct = DirectClient(gw_url, token)
        await direct.start()
        ws_url = base.replace("http", "ws") + f"/ws/chat/{pk}/"
        async with websockets.connect(
            ws_url, additional_headers={"Cookie": cookie, "Origin": base}
        ) as ws:
            await asyncio.sleep(1.0)  # the socket's history back-fill settles
            while True:  # drain the catch-up frames
                try:
                    await asyncio.wait_for(ws.recv(), 0.3)
                except TimeoutError:
                    break
            ttft_cc, ttft_direct, lags = [], [], []
            lost = reordered = 0
            inbox: list[tuple[float, str]] = []
            arrived = asyncio.Event()

            async def read() -> None:
                # Stamp each frame when it arrives, as a browser would, even while the
                # POST below is still waiting for its response.
                async for frame in ws:
                    inbox.append((time.perf_counter(), str(frame)))
                    arrived.set()

            reader = asyncio.create_task(read())
            post_times: list[float] = []
            by_index: dict[int, list[float]] = {}
            for i in range(args.runs):
                message_id = str(uuid.uuid4())
                dom = run_dom(message_id)
                inbox.clear()
                t0 = time.perf_counter()
                resp = await http.post(
                    f"/chat/{pk}/send/",
                    data={"text": f"{args.message} {i}", "message_id": message_id},
                    headers={"X-CSRFToken": csrf, "HX-Request": "true"},
                )
                assert resp.status_code == 200, resp.status_code
                post_times.append(time.perf_counter() - t0)
                cc: list[tuple[float, str]] = []
                final = f'<article id="{dom}" class="msg assistant state-'
                deadline = time.monotonic() + 30
                while not any(final in f for _, f in inbox):
                    arrived.clear()
                    if time.monotonic() > deadline:
                        raise SystemExit("no final frame")
                    await asyncio.wait_for(arrived.wait(), 30)
                for now, frame in inbox:
                    bubble = re.search(rf'id="{dom}-text">(.*?)</div>', frame, re.S)
                    if bubble:
                        cc.append((now, html.unescape(bubble.group(1))))
                        continue
                    piece = re.fullmatch(
                        rf'<span id="{dom}-text" hx-swap-oob="(?:beforeend|innerHTML)">(.*)</span>',
                        frame,
                        re.S,
                    )
                    if piece:
                        cc.append((now, html.unescape(piece.group(1))))
                await asyncio.sleep(0.05)
                seen = direct.seen.pop(message_id, [])
                if not seen or not cc:
                    lost += 1
                    continue
                ttft_direct.append(seen[0][0] - t0)
                ttft_cc.append(cc[0][0] - t0)
                if [p for _, p in cc[1:]] != [p for _, p in seen[1:]]:
                    if sorted(p for _, p in cc[1:]) == sorted(p for _, p in seen[1:]):
                        reordered += 1
                    else:
                        lost += 1
                for k, ((t_cc, _), (t_d, _)) in enumerate(zip(cc, seen, strict=False)):
                    lags.append(t_cc - t_d)
                    by_index.setdefault(k, []).append(t_cc - t_d)
            reader.cancel()
        direct.task.cancel()

    def ms(x: float) -> str:
        return f"{x * 1000:.2f} ms"

    layout = "daphne + gatewayworker + Redis" if args.split else "manage.py serve"
    print(
        f"gateway: {gw_url} · {layout} · runs: {args.runs} · deltas compared: {len(lags)}"
    )
    print(
        f"TTFT direct  p50 {ms(statistics.median(ttft_direct))}  p99 {ms(pct(ttft_direct, 99))}"
    )
    print(
        f"TTFT via CC  p50 {ms(statistics.median(ttft_cc))}  p99 {ms(pct(ttft_cc, 99))}"
    )
    ratio = statistics.median(ttft_cc) / statistics.median(ttft_direct)
    print(f"TTFT ratio (CC / direct, p50): {ratio:.3f}   target <= 1.10")
    print(
        f"delta lag behind direct: p50 {ms(pct(lags, 50))}  p99 {ms(pct(lags, 99))}  max {ms(max(lags))}"
        "   targets 5 ms / 25 ms"
    )
    print(f"runs with lost deltas: {lost} · reordered: {reordered}")
    print(f"POST /send/ answered in p50 {ms(statistics.median(post_times))}")
    if args.verbose:
        for k in sorted(by_index)[:6]:
            print(f"  delta {k}: lag p50 {ms(statistics.median(by_index[k]))}")


async def chat_session_pk(http: httpx.AsyncClient, env: dict[str, str]) -> int:
    """The main session's row, from whichever database the Control Center uses; on a
    gateway that has none yet (a fresh real one), a new chat with its default agent."""
    code = (
        "from fleet.models import Agent, Session; "
        "s = Session.objects.filter(key__startswith='agent:main:main').first(); "
        "a = Agent.objects.filter(gone_at=None).order_by('-is_default').first(); "
        "print(s.pk if s else '', a.gateway_id if a else '', a.agent_id if a else '')"
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = subprocess.run(
            [sys.executable, "manage.py", "shell", "-v0", "-c", code],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        ).stdout.splitlines()
        session, gateway, agent = ((lines[-1] if lines else "").split(" ") + ["", ""])[
            :3
        ]
        if session.isdigit():
            return int(session)
        if gateway.isdigit() and agent:
            r = await http.post(
                "/chat/new/",
                data={"gateway": gateway, "agent": agent},
                headers={"X-CSRFToken": http.cookies.get("csrftoken") or ""},
            )
            match = re.search(r"/chat/(\d+)/", r.headers.get("location", ""))
            if match:
                return int(match.group(1))
        await asyncio.sleep(0.5)
    raise SystemExit("no session to chat in, and no agent to start one with")


def run_dom(run_id: str) -> str:
    import hashlib

    return "run-" + hashlib.blake2s(run_id.encode(), digest_size=8).hexdigest()


if __name__ == "__main__":
    asyncio.run(main())
