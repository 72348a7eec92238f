"""Seeded, realistic content for the gateway simulator: agents, session rows, short
transcripts and the scripted replies of its fake model.

Everything here is plain data; nothing knows about sockets. Rows are built in the shape of
the protocol-4 gateway (2026.9.6); the server trims them for protocol 3."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

SERVER_VERSION = {3: "2026.4.12", 4: "2026.9.6"}
BUILD_ID = "2026.9.6-sim-0000000"
DEFAULT_AGENT = "main"
MAIN_KEY = "main"
OWNER_ID = "gateway-owner"
STATE_DIR = "~/.openclaw"

# (provider, model, context window). The first one is what runs actually "use".
MODELS: tuple[tuple[str, str, int], ...] = (
    ("fake", "fake-model", 128000),
    ("anthropic", "claude-sonnet-4-5", 200000),
    ("openai", "gpt-5-mini", 400000),
    ("ollama", "llama3.3:70b", 131072),
)
DEFAULT_PROVIDER, DEFAULT_MODEL, DEFAULT_CONTEXT = MODELS[0]
# USD per million tokens (input, output), like `models.providers.*.models[].cost` in the
# real gateway's openclaw.json (the harness prices the fake model at 3 and 15).
PRICES: dict[str, tuple[float, float]] = {
    "fake-model": (3.0, 15.0),
    "claude-sonnet-4-5": (3.0, 15.0),
    "gpt-5-mini": (0.25, 2.0),
    "llama3.3:70b": (0.0, 0.0),
}


def cost_of(model: str, input_tokens: int, output_tokens: int) -> float:
    price_in, price_out = PRICES.get(model, (3.0, 15.0))
    return (input_tokens * price_in + output_tokens * price_out) / 1_000_000


REPLY = (
    "Hello from the fake model! This reply is streamed in small chunks "
    "so you can watch tokens arrive."
)
LONG_REPLY = " ".join(f"word{i}" for i in range(2000))
FAIL_MESSAGE = "500 scripted failure (model request failed)"
_DIRECTIVE = re.compile(r"\[\[fake:(echo|long|slow|fail|tool)\]\]")
# `[[fake:exec CMD]]`: the fake model calls `exec` with CMD, and the gateway asks first
_EXEC = re.compile(r"\[\[fake:exec ([^\]]+)\]\]")

# Shared, never-mutated nested values of every row (rows are many; these are not copied).
CREATED_ACTOR: dict[str, Any] = {
    "type": "human",
    "id": OWNER_ID,
    "identity": {"type": "profile", "id": OWNER_ID},
}
OWNER: dict[str, Any] = {"actor": CREATED_ACTOR}
THINKING_LEVELS: list[dict[str, str]] = [{"id": "off", "label": "off"}]
THINKING_OPTIONS: list[str] = ["off"]
AGENT_RUNTIME: dict[str, Any] = {
    "id": "auto",
    "cloudPlacementSupported": False,
    "devicePlacementSupported": False,
    "source": "implicit",
}

# Keys only the protocol-4 gateway puts in a session row.
V4_ONLY_ROW_KEYS = frozenset(
    {
        "agentId",
        "classification",
        "isMain",
        "isBackground",
        "visibility",
        "archived",
        "pinned",
        "unread",
        "createdAt",
        "createdVia",
        "createdActor",
        "owner",
        "lastActivityAt",
        "lastInteractionAt",
        "hasActiveRun",
        "activeRunIds",
        "lastRunId",
        "permissionModePending",
        "thinkingLevels",
        "thinkingOptions",
        "thinkingDefault",
    }
)

_AGENT_NAMES = (
    ("main", "Claw", "🦞"),
    ("research", "Scout", "🔎"),
    ("support", "Helpdesk", "🛟"),
    ("ops", "Pager", "📟"),
    ("writer", "Quill", "✍️"),
    ("coder", "Patch", "🛠️"),
    ("analyst", "Ledger", "📊"),
    ("triage", "Sorter", "🗂️"),
    ("sales", "Pitch", "📈"),
    ("scheduler", "Clock", "⏰"),
    ("finance", "Abacus", "🧮"),
    ("qa", "Probe", "🧪"),
)
_PEOPLE = (
    "Alice Martin",
    "Bob Chen",
    "Carla Souza",
    "Dmitri Volkov",
    "Emma Schulz",
    "Farid Haddad",
    "Grace Okafor",
    "Hiro Tanaka",
    "Ines Duarte",
    "Jonas Berg",
    "Kemi Adeyemi",
    "Lena Novak",
    "Marco Rossi",
    "Nora Lindqvist",
    "Omar Aziz",
    "Priya Raman",
)
_GROUPS = (
    "ops-alerts",
    "release-crew",
    "family",
    "book-club",
    "infra",
    "design-review",
    "support-tier2",
    "weekend-hikes",
)
_TOPICS = (
    "Quarterly report draft",
    "Fix flaky CI job",
    "Trip to Lisbon",
    "Invoice follow-up",
    "Refactor auth module",
    "Weekly digest",
    "Customer escalation",
    "Migrate to Postgres 17",
    "Onboarding checklist",
    "Grant proposal",
    "Incident postmortem",
    "Landing page copy",
    "Budget review",
    "Dependency upgrades",
    "Interview questions",
    "Conference talk outline",
)
_QUESTIONS = (
    "Can you summarise where we are on {topic}?",
    "What are the next three steps for {topic}?",
    "Draft a short update about {topic} for the team.",
    "Any risks I should know about for {topic}?",
)
_ANSWERS = (
    "Here is a short summary of {topic}: the main work is done, two reviews are pending "
    "and the deadline still holds.",
    "Next steps for {topic}: confirm the owner, split the remaining work into tickets, and "
    "schedule a check-in for Friday.",
    "Update on {topic}: progress is steady, nothing is blocked, and I will report back "
    "after the next milestone.",
    "Risks for {topic}: the estimate is tight and one dependency is unowned; I suggest "
    "picking an owner today.",
)
_CHANNELS = ("webchat", "telegram", "slack", "discord", "whatsapp", "signal")


@dataclass(frozen=True, slots=True)
class Script:
    """What the fake model does for one user message."""

    text: str
    chunk_delay: float | None  # None: the simulator's delta_interval
    words_per_chunk: int
    fail: bool
    tool: bool
    exec_command: str | None = None


def script_for(message: str, default_reply: str = REPLY) -> Script:
    """Read the `[[fake:...]]` directives of fake_openai_server.py (plus `tool`)."""
    text, delay, words, fail, tool = default_reply, None, 1, False, False
    for found in _DIRECTIVE.finditer(message):
        kind = found.group(1)
        if kind == "fail":
            fail = True
        elif kind == "tool":
            tool = True
        elif kind == "slow":
            delay = 1.0
        elif kind == "long":
            text, words = LONG_REPLY, 10
        elif kind == "echo":
            rest = message[found.end() :]
            end = rest.find("[[/fake]]")
            rest = rest[:end] if end >= 0 else rest.split("\n\n", 1)[0]
            text = rest.strip() or default_reply
    found_exec = _EXEC.search(message)
    return Script(
        text=text,
        chunk_delay=delay,
        words_per_chunk=words,
        fail=fail,
        tool=tool,
        exec_command=found_exec.group(1).strip() if found_exec else None,
    )


def chunks_of(text: str, words_per_chunk: int = 1) -> list[str]:
    """Word-sized pieces that keep their trailing spaces, like the fake model's SSE chunks."""
    words = re.findall(r"\S+\s*|\s+", text)
    if words_per_chunk <= 1:
        return words
    return [
        "".join(words[i : i + words_per_chunk])
        for i in range(0, len(words), words_per_chunk)
    ]


def seeded_uuid(rng: random.Random) -> str:
    """A version-4 UUID string from `rng` (fast: no uuid.UUID object)."""
    h = f"{rng.getrandbits(128):032x}"
    return (
        f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"
    )


def make_agents(count: int) -> list[dict[str, Any]]:
    """Agent ids: "main" first, then well-known names, then numbered workers."""
    agents: list[dict[str, Any]] = []
    for i in range(max(1, count)):
        if i < len(_AGENT_NAMES):
            agent_id, name, emoji = _AGENT_NAMES[i]
        else:
            agent_id, name, emoji = f"worker-{i:03d}", f"Worker {i}", "🤖"
        provider, model, _ = MODELS[0] if i == 0 else MODELS[i % len(MODELS)]
        agents.append(
            {
                "id": agent_id,
                "name": name,
                "emoji": emoji,
                "workspace": f"{STATE_DIR}/workspace"
                if i == 0
                else f"{STATE_DIR}/workspace-{agent_id}",
                "model": f"{provider}/{model}",
            }
        )
    return agents


def session_row(
    *,
    key: str,
    agent_id: str,
    session_id: str,
    now_ms: int,
    kind: str = "direct",
    classification: str = "custom",
    display_name: str | None = None,
    label: str | None = None,
    channel: str = "webchat",
    chat_type: str = "direct",
    provider: str = DEFAULT_PROVIDER,
    model: str = DEFAULT_MODEL,
    context_tokens: int = DEFAULT_CONTEXT,
    created_at: int | None = None,
    updated_at: int | None = None,
    status: str | None = None,
    started_at: int | None = None,
    ended_at: int | None = None,
    input_tokens: int = 0,
    output_tokens: int = 0,
    derived_title: str | None = None,
    preview: str | None = None,
) -> dict[str, Any]:
    """A session row in the protocol-4 shape (the canonical form the simulator stores)."""
    is_main = key.endswith(f":{MAIN_KEY}") and key.count(":") == 2
    updated = now_ms if updated_at is None else updated_at
    name = display_name or key.split(":", 2)[-1]
    row: dict[str, Any] = {
        "key": key,
        "visibility": "shared",
        "permissionModePending": False,
        "createdVia": "run",
        "createdActor": CREATED_ACTOR,
        "owner": OWNER,
        "createdAt": updated if created_at is None else created_at,
        "kind": kind,
        "classification": "main" if is_main else classification,
        "agentId": agent_id,
        "isMain": is_main,
        "isBackground": classification in ("cron", "subagent"),
        "displayName": name,
        "chatType": chat_type,
        "channel": channel,
        "origin": {
            "label": name,
            "provider": channel,
            "surface": channel,
            "chatType": chat_type,
        },
        "deliveryContext": {"channel": channel},
        "lastChannel": channel,
        "updatedAt": updated,
        "archived": False,
        "pinned": False,
        "unread": False,
        "lastActivityAt": updated,
        "sessionId": session_id,
        "systemSent": input_tokens > 0,
        "abortedLastRun": False,
        "thinkingLevels": THINKING_LEVELS,
        "thinkingOptions": THINKING_OPTIONS,
        "thinkingDefault": "off",
        "inputTokens": input_tokens,
        "outputTokens": output_tokens,
        "totalTokens": input_tokens + output_tokens,
        "totalTokensFresh": input_tokens > 0,
        "estimatedCostUsd": round(cost_of(model, input_tokens, output_tokens), 6),
        "hasActiveRun": False,
        "activeRunIds": [],
        "modelProvider": provider,
        "model": model,
        "contextTokens": context_tokens,
    }
    if label is not None:
        row["label"] = label
    if derived_title is not None:
        row["derivedTitle"] = derived_title
    if preview is not None:
        row["lastMessagePreview"] = preview
    if status is not None:
        row["status"] = status
        row["startedAt"] = started_at if started_at is not None else updated
        row["endedAt"] = ended_at
        row["runtimeMs"] = (
            max(0, ended_at - row["startedAt"]) if ended_at is not None else None
        )
    return row


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """The little a seeded session needs up front (its key and sort position); the full
    row is built on first use by `row_from_spec`, so 10,000 sessions start instantly."""

    index: int
    key: str
    agent_id: str
    updated_at: int
    kind: int  # one of the _KIND_* below
    channel: str


_KIND_MAIN, _KIND_DIRECT, _KIND_GROUP, _KIND_DASHBOARD, _KIND_CRON, _KIND_SUBAGENT = (
    range(6)
)


def make_session_specs(
    count: int, agents: list[dict[str, Any]], seed: int, now_ms: int
) -> list[SessionSpec]:
    """`count` sessions with deterministic keys; the first is agent:<default>:main."""
    rng = random.Random(seed)
    rnd = rng.random
    agent_ids = [a["id"] for a in agents]
    n_agents = len(agent_ids)
    n_channels = len(_CHANNELS)
    specs: list[SessionSpec] = []
    used: set[str] = set()
    for i in range(count):
        if i == 0:
            agent_id, kind, channel = agent_ids[0], _KIND_MAIN, "webchat"
            key = f"agent:{agent_id}:{MAIN_KEY}"
        else:
            agent_id = agent_ids[i % n_agents if rnd() < 0.7 else int(rnd() * n_agents)]
            roll = rnd()
            number = 10**7 + int(rnd() * 9 * 10**8)
            if roll < 0.45:
                kind, channel = _KIND_DIRECT, _CHANNELS[int(rnd() * n_channels)]
                rest = f"{channel}:direct:{number}"
            elif roll < 0.65:
                kind, channel = (
                    _KIND_GROUP,
                    _CHANNELS[1 + int(rnd() * (n_channels - 1))],
                )
                rest = f"{channel}:group:{number}"
            elif roll < 0.85:
                kind, channel = _KIND_DASHBOARD, "webchat"
                rest = f"dashboard:{seeded_uuid(rng)}"
            elif roll < 0.95:
                kind, channel = _KIND_CRON, "cron"
                rest = f"cron:{number:x}"
            else:
                kind, channel = _KIND_SUBAGENT, "webchat"
                rest = f"subagent:{seeded_uuid(rng)}"
            key = f"agent:{agent_id}:{rest}"
            while key in used:
                key = f"{key}-{int(rnd() * 10**6)}"
        used.add(key)
        # Recent sessions are more common than old ones (up to ~30 days back).
        age_ms = int((rnd() ** 3) * 30 * 86_400_000) + int(rnd() * 60_000)
        specs.append(SessionSpec(i, key, agent_id, now_ms - age_ms, kind, channel))
    return specs


def row_from_spec(spec: SessionSpec, seed: int, now_ms: int) -> dict[str, Any]:
    """The full, deterministic row of a seeded session."""
    rng = random.Random(seed * 1_000_003 + spec.index)
    topic = rng.choice(_TOPICS)
    kind, cls, chat = "direct", "custom", "direct"
    if spec.kind == _KIND_MAIN:
        name, cls = MAIN_KEY, "main"
    elif spec.kind == _KIND_DIRECT:
        name, cls = rng.choice(_PEOPLE), "channel"
    elif spec.kind == _KIND_GROUP:
        name, cls, kind, chat = f"#{rng.choice(_GROUPS)}", "channel", "group", "group"
    elif spec.kind == _KIND_DASHBOARD:
        name = rng.choice(_TOPICS)
    elif spec.kind == _KIND_CRON:
        name, cls = f"cron: {topic.lower()}", "cron"
    else:
        name, cls = f"subagent: {topic.lower()}", "subagent"
    provider, model, ctx = MODELS[0] if spec.index < 2 else rng.choice(MODELS)
    in_tokens = rng.randrange(200, 60_000)
    out_tokens = rng.randrange(50, in_tokens // 2 + 100)
    updated = spec.updated_at
    row = session_row(
        key=spec.key,
        agent_id=spec.agent_id,
        session_id=seeded_uuid(rng),
        now_ms=now_ms,
        kind=kind,
        classification=cls,
        display_name=name,
        label=topic if cls == "custom" and rng.random() < 0.6 else None,
        channel=spec.channel,
        chat_type=chat,
        provider=provider,
        model=model,
        context_tokens=ctx,
        created_at=updated - rng.randrange(60_000, 7 * 86_400_000),
        updated_at=updated,
        status="failed" if rng.random() < 0.04 else "done",
        started_at=updated - rng.randrange(800, 120_000),
        ended_at=updated,
        input_tokens=in_tokens,
        output_tokens=out_tokens,
        derived_title=topic,
        preview=rng.choice(_ANSWERS).format(topic=topic.lower())[:120],
    )
    # The counters are the last run's usage (2026.9.6), which this names.
    row["lastRunId"] = seeded_uuid(random.Random(f"{seed}:{spec.key}:run"))
    return row


def seeded_history(
    seed: int, key: str, topic: str, pairs: int
) -> list[tuple[str, str]]:
    """A short, deterministic conversation: (role, text) pairs, oldest first."""
    rng = random.Random(f"{seed}:{key}")
    out: list[tuple[str, str]] = []
    for _ in range(pairs):
        i = rng.randrange(len(_QUESTIONS))
        out.append(("user", _QUESTIONS[i].format(topic=topic.lower())))
        out.append(("assistant", _ANSWERS[i].format(topic=topic.lower())))
    return out
