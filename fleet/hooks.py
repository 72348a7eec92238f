"""Plain lists other apps append to from their `AppConfig.ready`, so fleet (the worker, the
base template) runs their code without importing them. Keep this a module of lists: apps
add entries, nobody reorders or replaces them.

- `periodic_steps`: `(interval_seconds, step)` pairs. The worker (`gatewayworker` and
  `serve`) calls each sync `step()` every `interval_seconds` while it runs, in a thread of
  its own (a step may wait on the network, e.g. an alert's webhook), retried through a
  database outage like the worker's other database work. A step must be safe to run in
  two workers at once (claim rows with a conditional UPDATE) and cheap when idle.
- `nav_badges`: `fleet.nav.NavBadge` entries: a link in every page's navigation with a
  live count (alerts, pending approvals); see fleet/nav.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

periodic_steps: list[tuple[float, Callable[[], object]]] = []

nav_badges: list[Any] = []  # fleet.nav.NavBadge (typed there; kept plain here)
