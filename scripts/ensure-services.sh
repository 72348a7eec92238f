#!/usr/bin/env bash
# Makes sure the services the test suite needs are up on this machine, starting only what is
# down (idempotent): PostgreSQL (the Debian cluster "main", on 127.0.0.1:5432), Redis (127.0.0.1:6379,
# no persistence) and Debian's Chromium for the browser tests (installed with apt-get when
# /usr/bin/chromium is missing). Exits non-zero, saying what failed, when something cannot be
# started or installed. Needs root (or sudo) only to install Chromium.
#
#   scripts/ensure-services.sh
set -euo pipefail

PG_HOST=127.0.0.1
REDIS_PORT="${REDIS_PORT:-6379}"
CHROMIUM=/usr/bin/chromium

fail() { echo "ensure-services: $*" >&2; exit 1; }
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else fail "need root to run: $*"
  fi
}
wait_for() {   # wait_for SECONDS COMMAND...: until COMMAND succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.5
  done
}

# PostgreSQL
if pg_isready -q -h "$PG_HOST" 2>/dev/null; then
  echo "PostgreSQL: up"
else
  command -v pg_ctlcluster >/dev/null || fail "PostgreSQL is not installed (apt-get install postgresql)"
  [ -d /etc/postgresql ] || fail "no PostgreSQL cluster configured under /etc/postgresql"
  pg_version="$(ls /etc/postgresql | sort -V | tail -n 1)"
  [ -n "$pg_version" ] || fail "no PostgreSQL cluster configured under /etc/postgresql"
  echo "PostgreSQL: starting cluster $pg_version/main"
  pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start \
    || fail "could not start PostgreSQL $pg_version/main (see /var/log/postgresql/)"
  wait_for 30 pg_isready -q -h "$PG_HOST" || fail "PostgreSQL $pg_version/main started but does not answer on $PG_HOST"
  echo "PostgreSQL: up"
fi

# Redis
if [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null || true)" = PONG ]; then
  echo "Redis: up"
else
  command -v redis-server >/dev/null || fail "Redis is not installed (apt-get install redis-server)"
  echo "Redis: starting"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    >/dev/null || fail "could not start redis-server"
  redis_up() { [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }
  wait_for 10 redis_up || fail "redis-server started but does not answer PING on 127.0.0.1:$REDIS_PORT"
  echo "Redis: up"
fi

# Chromium (Debian's; Playwright's own browser downloads are not used)
if [ -x "$CHROMIUM" ]; then
  echo "Chromium: $("$CHROMIUM" --version 2>/dev/null || echo installed)"
else
  echo "Chromium: installing with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -q || fail "apt-get update failed"
  as_root apt-get install -y -q chromium || fail "apt-get install chromium failed"
  [ -x "$CHROMIUM" ] || fail "chromium installed, but $CHROMIUM is missing"
  echo "Chromium: $("$CHROMIUM" --version 2>/dev/null || echo installed)"
fi
