"""Agent methods: agents.list, agent.identity.get and the model catalog (models.list)."""

from __future__ import annotations

from typing import Any

from fleet.gateway.testing import data
from fleet.gateway.testing.core import READ, Conn, Ctx, invalid, method
from fleet.gateway.testing.runs import Runs
from fleet.gateway.testing.schema import NO_PARAMS, S, Schema


def _models_list_params(protocol: int) -> Schema:
    return Schema({"view": S}) if protocol >= 4 else NO_PARAMS


class AgentMethods(Runs):
    """agents.list, agent.identity.get, models.list."""

    @method("agents.list", READ)
    def _m_agents_list(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        if self.protocol < 4:
            return {
                "defaultId": self._default_agent,
                "mainKey": data.MAIN_KEY,
                "scope": "per-sender",
                "agents": [
                    {
                        "id": a["id"],
                        "name": a["name"],
                        "identity": {"name": a["name"], "emoji": a["emoji"]},
                        "workspace": a["workspace"],
                        "model": {"primary": a["model"]},
                    }
                    for a in self._agents
                ],
            }
        return {
            "defaultId": self._default_agent,
            "ownership": "sole",
            "selectionRequired": False,
            "mainKey": data.MAIN_KEY,
            "scope": "per-sender",
            "agents": [
                {
                    "id": a["id"],
                    "name": a["name"],
                    "identity": {"name": a["name"], "emoji": a["emoji"]},
                    "workspace": a["workspace"],
                    "workspaceGit": False,
                    "agentRuntime": data.AGENT_RUNTIME,
                    "thinkingLevels": data.THINKING_LEVELS,
                    "thinkingOptions": data.THINKING_OPTIONS,
                    "thinkingDefault": "off",
                    "model": {"primary": a["model"]},
                    "defaultPermissionMode": "full",
                }
                for a in self._agents
            ],
        }

    @method("agent.identity.get", READ, params=Schema({"agentId": S, "sessionKey": S}))
    def _m_identity(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        agent_id = p.get("agentId")
        if agent_id is None and p.get("sessionKey"):
            agent_id = self._resolve_key(str(p["sessionKey"]), None)[1]
        agent_id = agent_id or self._default_agent
        agent = next((a for a in self._agents if a["id"] == agent_id), None)
        if agent is None:
            raise invalid(f'unknown agent id "{agent_id}"')
        return {
            "agentId": agent["id"],
            "name": agent["name"],
            "avatar": agent["emoji"],
            "emoji": agent["emoji"],
        }

    @method("models.list", READ, params=_models_list_params)
    def _m_models(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        return {
            "models": [
                {
                    "id": model,
                    "name": model,
                    "provider": provider,
                    "contextWindow": context,
                    "reasoning": False,
                    "input": ["text"],
                }
                for provider, model, context in data.MODELS
            ]
        }
