"""A simulated OpenClaw gateway for tests, the demo and benchmarks (see server.py)."""

from __future__ import annotations

from fleet.gateway.testing.server import FakeGateway, RpcError

__all__ = ["FakeGateway", "RpcError"]
