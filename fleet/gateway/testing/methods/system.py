"""System methods: health, status, system-presence."""

from __future__ import annotations

from typing import Any

from fleet.gateway.testing import data
from fleet.gateway.testing.core import EVENT_LOOP, READ, Conn, Ctx, method
from fleet.gateway.testing.runs import Runs
from fleet.gateway.testing.schema import BOOL, Schema


class SystemMethods(Runs):
    """health, status, system-presence."""

    @method("health", None, params=Schema({"probe": BOOL}))
    def _m_health(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        return self._health_summary()

    @method("status", READ)
    def _m_status(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        rows = self._sorted_sessions()
        counts = self._counts_by_agent()
        running = sum(1 for r in self._runs.values() if not r.finished)
        status: dict[str, Any] = {
            "runtimeVersion": self.version,
            "heartbeat": {
                "defaultAgentId": self._default_agent,
                "agents": [
                    {
                        "agentId": a["id"],
                        "enabled": False,
                        "every": "disabled",
                        "everyMs": None,
                    }
                    for a in self._agents
                ],
            },
            "channelSummary": [],
            "queuedSystemEvents": [],
            "tasks": {
                "total": len(self._runs),
                "active": running,
                "terminal": len(self._runs) - running,
                "failures": sum(1 for r in self._runs.values() if r.status == "error"),
            },
            "taskAudit": {"total": 0, "warnings": 0, "errors": 0},
            "sessions": {
                "paths": [self._sessions_path(a["id"]) for a in self._agents],
                "count": len(rows),
                "defaults": {
                    "model": data.DEFAULT_MODEL,
                    "contextTokens": data.DEFAULT_CONTEXT,
                },
                "recent": [self._recent(s) for s in rows[:10]],
                "byAgent": [
                    {
                        "agentId": a["id"],
                        "path": self._sessions_path(a["id"]),
                        "count": counts.get(a["id"], 0),
                        "recent": [],
                    }
                    for a in self._agents
                ],
            },
        }
        if self.protocol >= 4:
            status.update(
                hostDesktop={"enabled": False, "state": "disabled"},
                modelRuntime={"degraded": False, "pendingAgents": []},
                eventLoop=EVENT_LOOP,
            )
        return status

    @method("system-presence", READ)
    def _m_presence(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        return self._presence_list()
