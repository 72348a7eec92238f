"""The gateway worker: one live connection per gateway it holds.

`Worker` (supervisor.py) claims gateways through a lease in the database (so two workers
never hold the same one), runs a `GatewayRunner` (runner.py) for each, and takes the web's
calls on a channel of its own (webcalls.py). A runner connects with backoff, maps a refusal
to a state (refusals.py), syncs after every hello-ok (sync.py), routes each event to the
worker's own handlers and the capabilities' (events.py), persisting and then pushing, and
falls back to REST polling while the WebSocket is not ready (fallback.py).

What the commands, the tests and the benchmarks use is re-exported here.
"""

from __future__ import annotations

from fleet.worker.refusals import Backoff, Outcome, refusal_outcome
from fleet.worker.runner import GatewayRunner, runner_config
from fleet.worker.supervisor import Worker, run_worker, worker_owner_id

__all__ = [
    "Backoff",
    "GatewayRunner",
    "Outcome",
    "Worker",
    "refusal_outcome",
    "run_worker",
    "runner_config",
    "worker_owner_id",
]
