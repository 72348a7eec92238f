#!/usr/bin/env bash
# Set up and run the whole test suite: lint and types, then every test on SQLite and on
# PostgreSQL, with Redis, headless Chromium and the real OpenClaw gateway. Under CI=true
# nothing may be skipped: missing services and tools are started or installed first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --dev
if [ "${CI:-}" = "true" ]; then
  scripts/ensure-services.sh
  scripts/realgw/setup.sh
  VERSION=v3 scripts/realgw/setup.sh   # the protocol 3 gateway's tests run under CI too
fi
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy .
echo "== import direction (import-linter contracts in pyproject.toml)"
.venv/bin/lint-imports --no-cache
echo "== tests on SQLite"
.venv/bin/pytest -p no:cacheprovider "$@"
echo "== tests on PostgreSQL"
DATABASE_URL="${TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}" \
  .venv/bin/pytest -p no:cacheprovider "$@"
