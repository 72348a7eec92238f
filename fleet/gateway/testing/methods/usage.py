"""Usage methods: usage.cost, sessions.usage and sessions.usage.timeseries, answered from
the simulator's usage log (every run and background growth, priced per model).

Like the real gateway they are cached per query for 30 s, and a cold cache answers zeros
with `cacheStatus.status: "refreshing"` (the next call after that has the numbers);
sessions.usage* answer but are not listed in hello-ok's features.methods."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from typing import Any

from fleet.gateway.testing.core import READ, Conn, Ctx, dumps, invalid, method
from fleet.gateway.testing.data import cost_of
from fleet.gateway.testing.runs import Runs
from fleet.gateway.testing.schema import INT, NE, Field, S, Schema

_COST = Schema(
    {
        "startDate": S,
        "endDate": S,
        "days": Field("integer", minimum=1),
        "range": S,
        "mode": S,
        "timeZone": S,
        "agentId": S,
        "agentScope": S,
    }
)
_SESSIONS = Schema(
    {
        "key": S,
        "agentId": S,
        "agentScope": S,
        "startDate": S,
        "endDate": S,
        "groupBy": S,
        "limit": INT,
        "mode": S,
        "timeZone": S,
    }
)
_KEY = Schema({"key": NE}, ("key",))
CACHE_SECONDS = 30.0
RANGES = {"7d": 7, "30d": 30, "90d": 90, "1y": 365}


def _day(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).date().isoformat()


def _window(p: dict[str, Any]) -> tuple[str, str]:
    today = datetime.now(UTC).date()
    try:
        if p.get("startDate") or p.get("endDate"):
            start = date.fromisoformat(str(p.get("startDate") or "1970-01-01"))
            end = date.fromisoformat(str(p.get("endDate") or today.isoformat()))
            return start.isoformat(), end.isoformat()
    except ValueError:
        raise invalid("invalid usage params: dates must be YYYY-MM-DD") from None
    days = p.get("days") or RANGES.get(str(p.get("range") or ""), 0)
    if p.get("range") == "all":
        return "1970-01-01", today.isoformat()
    days = int(days or 30)
    return (today - timedelta(days=days - 1)).isoformat(), today.isoformat()


HISTORY_DAYS = 30


class UsageMethods(Runs):
    def _seed_usage_history(self) -> None:
        """The seeded sessions' runs over the last month (deterministic per session key),
        so the first start of `serve --demo` has history to show: the newest is the run
        the row's counters show (its last run's usage), the earlier ones alike in size."""
        if self.__dict__.get("usage_seeded"):
            return
        self.__dict__["usage_seeded"] = True
        now = int(time.time() * 1000)
        day_ms = 86_400_000
        seeded: list[dict[str, Any]] = []
        for s in list(self._sessions.values()):
            if not s.seeded:
                continue
            row = s.row
            ins, outs = (
                int(row.get("inputTokens") or 0),
                int(row.get("outputTokens") or 0),
            )
            if ins <= 0 and outs <= 0:
                continue
            rng = random.Random(s.key)
            model = str(row.get("model") or "")
            last = min(int(row.get("updatedAt") or now), now)
            start = now - HISTORY_DAYS * day_ms
            runs = [(last, ins, outs)]
            for _ in range(rng.randint(2, 11)):
                runs.append(
                    (
                        rng.randint(min(start, last - 1), last - 1),
                        max(1, round(ins * rng.uniform(0.3, 1.5))),
                        max(1, round(outs * rng.uniform(0.3, 1.5))),
                    )
                )
            for ts, p_in, p_out in runs:
                seeded.append(
                    {
                        "ts": ts,
                        "key": s.key,
                        "agentId": s.agent_id,
                        "model": model,
                        "provider": row.get("modelProvider") or "",
                        "channel": row.get("lastChannel") or "",
                        "input": p_in,
                        "output": p_out,
                        "cost": cost_of(model, p_in, p_out),
                    }
                )
        seeded.sort(key=lambda e: e["ts"])
        log: list[dict[str, Any]] = self.__dict__.setdefault("usage_log", [])
        log[:0] = seeded

    def _usage_entries(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        self._seed_usage_history()
        start, end = _window(p)
        agent = p.get("agentId")
        key = p.get("key")
        out = []
        for e in self.__dict__.get("usage_log", []):
            day = _day(e["ts"])
            if day < start or day > end:
                continue
            if agent and e["agentId"] != agent:
                continue
            if key and e["key"] != key:
                continue
            out.append(e)
        return out

    def _cached(self, name: str, p: dict[str, Any], build: Any) -> Any:
        """A cold query answers `build(zero=True)` marked refreshing, then is warm."""
        cache: dict[str, tuple[float, Any]] = self.__dict__.setdefault(
            "usage_cache", {}
        )
        ckey = name + dumps(p)
        now = time.monotonic()
        hit = cache.get(ckey)
        if hit is None:
            cache[ckey] = (now - CACHE_SECONDS, None)  # warm on the next call
            answer = build(True)
            answer["cacheStatus"] = {"status": "refreshing"}
            return answer
        if hit[1] is None or now - hit[0] >= CACHE_SECONDS:
            cache[ckey] = (now, build(False))
        answer = dict(cache[ckey][1])
        answer["cacheStatus"] = {"status": "fresh"}
        return answer

    @method("usage.cost", READ, params=_COST)
    def _m_usage_cost(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        def build(zero: bool) -> dict[str, Any]:
            daily: dict[str, dict[str, Any]] = defaultdict(
                lambda: {
                    "input": 0,
                    "output": 0,
                    "cacheRead": 0,
                    "cacheWrite": 0,
                    "totalTokens": 0,
                    "totalCost": 0.0,
                }
            )
            for e in [] if zero else self._usage_entries(p):
                d = daily[_day(e["ts"])]
                d["input"] += e["input"]
                d["output"] += e["output"]
                d["totalTokens"] += e["input"] + e["output"]
                d["totalCost"] += e["cost"]
            rows = [
                {"date": k, **v, "totalCost": round(v["totalCost"], 6)}
                for k, v in sorted(daily.items())
            ]
            totals = {
                "input": sum(r["input"] for r in rows),
                "output": sum(r["output"] for r in rows),
                "totalTokens": sum(r["totalTokens"] for r in rows),
                "totalCost": round(sum(r["totalCost"] for r in rows), 6),
            }
            return {
                "updatedAt": int(time.time() * 1000),
                "days": len(rows),
                "daily": rows,
                "totals": totals,
            }

        return self._cached("usage.cost", p, build)

    @method("sessions.usage", READ, params=_SESSIONS)
    def _m_sessions_usage(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        def build(zero: bool) -> dict[str, Any]:
            per: dict[str, dict[str, Any]] = {}
            aggregates: dict[str, dict[str, dict[str, Any]]] = {
                "byModel": {},
                "byProvider": {},
                "byAgent": {},
                "byChannel": {},
            }
            for e in [] if zero else self._usage_entries(p):
                s = per.setdefault(
                    e["key"],
                    {
                        "key": e["key"],
                        "agentId": e["agentId"],
                        "model": e["model"],
                        "input": 0,
                        "output": 0,
                        "totalCost": 0.0,
                    },
                )
                s["input"] += e["input"]
                s["output"] += e["output"]
                s["totalCost"] += e["cost"]
                for group, field in (
                    ("byModel", "model"),
                    ("byProvider", "provider"),
                    ("byAgent", "agentId"),
                    ("byChannel", "channel"),
                ):
                    g = aggregates[group].setdefault(
                        e[field], {"input": 0, "output": 0, "totalCost": 0.0}
                    )
                    g["input"] += e["input"]
                    g["output"] += e["output"]
                    g["totalCost"] += e["cost"]
            sessions = sorted(per.values(), key=lambda r: -r["totalCost"])
            limit = p.get("limit")
            if isinstance(limit, int) and limit > 0:
                sessions = sessions[:limit]
            return {
                "sessions": sessions,
                "aggregates": {
                    k: [{"name": n, **v} for n, v in sorted(g.items())]
                    for k, g in aggregates.items()
                },
            }

        return self._cached("sessions.usage", p, build)

    @method("sessions.usage.timeseries", READ, params=_KEY)
    def _m_sessions_usage_timeseries(
        self, conn: Conn, p: dict[str, Any], ctx: Ctx
    ) -> Any:
        total = 0.0
        points = []
        for e in self._usage_entries({"key": p["key"], "range": "all"})[-200:]:
            total += e["cost"]
            points.append(
                {
                    "timestamp": e["ts"],
                    "input": e["input"],
                    "output": e["output"],
                    "totalTokens": e["input"] + e["output"],
                    "cost": round(e["cost"], 6),
                    "cumulativeCost": round(total, 6),
                }
            )
        return {"key": p["key"], "points": points}
