#!/usr/bin/env bash
# Stops the gateway and the fake model server that start.sh started for one RUN_DIR, by the PIDs
# in $RUN_DIR/logs/{gateway,fake-model}.pid, and only while such a process still belongs to that
# RUN_DIR (its environment names $RUN_DIR/state), so a reused PID is never signalled.
# SIGTERM first (a clean shutdown takes 0.3-5 s); after STOP_TIMEOUT seconds (10) SIGKILL, to the
# whole process group when the process leads one (start.sh run with setsid).
#
#   scripts/realgw/stop.sh                  same VERSION / ROOT / RUN_DIR as start.sh
#   scripts/realgw/stop.sh --clean-tmp      also removes the gateway's hard-coded /tmp paths
#                                           (/tmp/openclaw-state-locks-<uid>, /tmp/openclaw); only
#                                           when no other gateway runs on this machine
set -euo pipefail
VERSION="${VERSION:-v4}"
case "$VERSION" in
  v4) ROOT="${ROOT:-/tmp/controlcenter-realgw}" ;;
  v3) ROOT="${ROOT:-/tmp/controlcenter-realgw-v3}" ;;
  *) echo "stop.sh: VERSION must be v4 or v3, not '$VERSION'" >&2; exit 2 ;;
esac
RUN_DIR="${RUN_DIR:-$ROOT/run}"
STOP_TIMEOUT="${STOP_TIMEOUT:-10}"

ours() {   # ours PID: the process runs and was started for this RUN_DIR
  local pid="$1" st
  st="$(ps -o stat= -p "$pid" 2>/dev/null || true)"
  [ -n "$st" ] && [ "${st:0:1}" != Z ] || return 1
  [ -r "/proc/$pid/environ" ] || return 0        # no /proc: trust the PID file
  tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "OPENCLAW_STATE_DIR=$RUN_DIR/state"
}

for name in gateway fake-model; do
  pidfile="$RUN_DIR/logs/$name.pid"
  [ -f "$pidfile" ] || continue
  pid="$(cat "$pidfile")"
  if [ -n "$pid" ] && ours "$pid"; then
    kill -TERM "$pid" 2>/dev/null && echo "sent SIGTERM to $name pid $pid"
    deadline=$((SECONDS + STOP_TIMEOUT))
    while ours "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
    if ours "$pid"; then
      if [ "$(ps -o pgid= -p "$pid" | tr -d ' ')" = "$pid" ]; then
        kill -KILL -- "-$pid" 2>/dev/null || true
      else
        kill -KILL "$pid" 2>/dev/null || true
      fi
      echo "sent SIGKILL to $name pid $pid (no exit within $STOP_TIMEOUT s)"
    fi
  fi
  rm -f "$pidfile"
done

if [ "${1:-}" = "--clean-tmp" ]; then
  rm -rf "/tmp/openclaw-state-locks-$(id -u)"
  rm -rf /tmp/openclaw/session-archive-read-cache
  rmdir /tmp/openclaw 2>/dev/null || true
fi
