#!/usr/bin/env bash
# Set up and run the Control Center on its embedded defaults: the web server, the gateway
# worker and the gateway simulator in one process, SQLite in ./data, the in-memory layer.
# Open http://127.0.0.1:8000/ and log in as "admin" (the password is printed on first run,
# or set CONTROLCENTER_ADMIN_PASSWORD before the first run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python manage.py serve --demo "$@"
