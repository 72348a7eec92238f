#!/usr/bin/env bash
# Runs the openclaw CLI installed in ROOT with the environment of the gateway that start.sh runs
# for RUN_DIR (same VERSION / ROOT / RUN_DIR / OPENCLAW_GATEWAY_TOKEN), so it reaches that gateway:
#   scripts/realgw/openclaw.sh gateway call health --json
#   RUN_DIR=/tmp/controlcenter-realgw/run scripts/realgw/openclaw.sh devices approve <requestId>
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=env.sh
. "$HERE/env.sh"
exec "$ROOT/oc/node_modules/.bin/openclaw" "$@"
