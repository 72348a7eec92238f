"""Exec approvals: resolve, list/get, the 30-day ledger, standing grants (2026.9.6, §7).

Requests come from runs (`[[fake:exec CMD]]`, runs.py) or from `request_approval` (the
demo's agent, tests) and reach only approval clients: operator.approvals (or admin) and
caps ["approvals"] or ["exec-approvals"]."""

from __future__ import annotations

from typing import Any

from fleet.gateway.testing.core import Conn, Ctx, RpcError, invalid, method
from fleet.gateway.testing.runs import APPROVALS, Runs
from fleet.gateway.testing.schema import INT, NE, Field, S, Schema

DECISIONS = ("allow-once", "allow-always", "deny")


class ApprovalMethods(Runs):
    """exec.approval.*, approval.history, exec.approval.grants.*."""

    @method(
        "exec.approval.resolve",
        APPROVALS,
        params=Schema(
            {
                "id": NE,
                "decision": Field("string", enum=DECISIONS),
                "reviewer": S,
                "grantExpiresInDays": INT,
            },
            required=("id", "decision"),
        ),
    )
    def _m_resolve(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        self.expire_approvals()
        record = self._approvals.get(p["id"])
        if record is None:
            raise RpcError(
                "INVALID_REQUEST",
                "unknown or expired approval id",
                details={"id": p["id"]},
            )
        decision = p["decision"]
        if decision not in record["request"]["allowedDecisions"]:
            raise invalid(f"decision {decision} is not allowed for this request")
        resolved_by = str(
            p.get("reviewer")
            or conn.client.get("displayName")
            or conn.client.get("id")
            or "client"
        )
        self.settle_approval(p["id"], decision, resolved_by)
        return {"ok": True}

    @method("exec.approval.list", APPROVALS)
    def _m_list(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        self.expire_approvals()
        return {"approvals": list(self._approvals.values())}

    @method("exec.approval.get", APPROVALS, params=Schema({"id": NE}, required=("id",)))
    def _m_get(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        self.expire_approvals()
        record = self._approvals.get(p["id"])
        if record is None:
            raise invalid("unknown or expired approval id")
        return record

    @method(
        "approval.history",
        APPROVALS,
        params=Schema({"cursor": S, "limit": INT, "kind": S}),
    )
    def _m_history(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        self.expire_approvals()
        items = [
            i
            for i in self._approval_history
            if not p.get("kind") or i["kind"] == p["kind"]
        ]
        start = int(p["cursor"]) if str(p.get("cursor") or "").isdigit() else 0
        limit = max(1, min(int(p.get("limit") or 50), 500))
        page = items[start : start + limit]
        more = start + limit < len(items)
        return {"items": page, "nextCursor": str(start + limit) if more else None}

    @method("exec.approval.grants.list", APPROVALS)
    def _m_grants(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        return {"grants": list(self._approval_grants)}

    @method(
        "exec.approval.grants.revoke",
        APPROVALS,
        params=Schema({"id": NE}, required=("id",)),
    )
    def _m_revoke(self, conn: Conn, p: dict[str, Any], ctx: Ctx) -> Any:
        before = len(self._approval_grants)
        self._approval_grants[:] = [
            g for g in self._approval_grants if g["id"] != p["id"]
        ]
        if len(self._approval_grants) == before:
            raise invalid("unknown grant id")
        return {"ok": True, "revoked": p["id"]}
