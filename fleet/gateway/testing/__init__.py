"""The OpenClaw client's test kit: a simulated OpenClaw gateway for tests, the demo and the
benchmarks (see server.py; methods/ holds one module per method family)."""

from __future__ import annotations

from fleet.gateway.testing.core import RpcError
from fleet.gateway.testing.server import FakeGateway

__all__ = ["FakeGateway", "RpcError"]
