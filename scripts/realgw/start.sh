#!/usr/bin/env bash
# Starts the fake OpenAI-compatible model server (fake_openai_server.py, in the background) and
# the real OpenClaw gateway (token auth, loopback only, no channels) for development and tests.
# Run setup.sh first.
#
#   scripts/realgw/start.sh                 foreground: the gateway replaces this shell (exec), so
#                                           whoever started this script holds the gateway's PID
#   scripts/realgw/start.sh --background    detached (setsid), output in $RUN_DIR/logs/gateway.out;
#                                           waits up to WAIT_SECONDS (60; 0: no wait) for /healthz
#   Any further arguments go to `openclaw gateway run`.
#
# Environment (see env.sh): VERSION=v4|v3, ROOT (install), RUN_DIR (state, config, logs, temp
# files; default $ROOT/run), PORT (v4 18789, v3 18889), FAKE_PORT (v4 18790, v3 18890),
# OPENCLAW_GATEWAY_TOKEN (when unset, a random one is generated into $RUN_DIR/token, mode 600;
# the token is never printed, never written into the config and never on a command line), PYTHON.
# The config $RUN_DIR/state/openclaw.json is rendered from openclaw.json (v3: openclaw-v3.json)
# on every start. /healthz answers after 12-17 s (v4) or 6-9 s (v3); for about a second after
# that, connect can still be refused with close 1013 "gateway starting".
# Written outside ROOT regardless: /tmp/openclaw-state-locks-<uid>/ and (v3, and v4 on
# sessions.delete) /tmp/openclaw/. Stop: stop.sh with the same VERSION/ROOT/RUN_DIR.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=env.sh
. "$HERE/env.sh"
PYTHON="${PYTHON:-python3}"
TEMPLATE="$HERE/openclaw.json"
[ "$VERSION" = v3 ] && TEMPLATE="$HERE/openclaw-v3.json"
OPENCLAW="$ROOT/oc/node_modules/.bin/openclaw"
[ -x "$OPENCLAW" ] || { echo "start.sh: openclaw is not installed in $ROOT: run VERSION=$VERSION ROOT=$ROOT $HERE/setup.sh" >&2; exit 1; }

mkdir -p "$HOME" "$OPENCLAW_STATE_DIR" "$TMPDIR" "$RUN_DIR/workspace" "$RUN_DIR/logs" "$NODE_COMPILE_CACHE"
if [ -z "$OPENCLAW_GATEWAY_TOKEN" ]; then
  (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$RUN_DIR/token")
  OPENCLAW_GATEWAY_TOKEN="$(cat "$RUN_DIR/token")"
  export OPENCLAW_GATEWAY_TOKEN
  echo "generated a gateway token into $RUN_DIR/token"
fi

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
healthz() {   # GET /healthz answers 200 (bash only, no curl needed)
  (
    exec 3<>"/dev/tcp/127.0.0.1/$PORT" || exit 1
    printf 'GET /healthz HTTP/1.0\r\nHost: 127.0.0.1:%s\r\n\r\n' "$PORT" >&3
    IFS= read -r -t 5 status <&3 && [[ "$status" == HTTP/1.?" 200"* ]]
  ) 2>/dev/null
}

if [ "${1:-}" = "--background" ]; then
  shift
  setsid "$0" "$@" >"$RUN_DIR/logs/gateway.out" 2>&1 </dev/null &
  pid=$!
  echo "gateway starting (pid $pid, log $RUN_DIR/logs/gateway.out)"
  wait_s="${WAIT_SECONDS:-60}"
  [ "$wait_s" = 0 ] && exit 0
  deadline=$((SECONDS + wait_s))
  until healthz; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "start.sh: the gateway exited; last lines of $RUN_DIR/logs/gateway.out:" >&2
      tail -n 30 "$RUN_DIR/logs/gateway.out" >&2
      exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "start.sh: no /healthz on port $PORT after $wait_s s (still starting? see $RUN_DIR/logs/gateway.out)" >&2
      exit 1
    fi
    sleep 0.5
  done
  echo "gateway up: ws://127.0.0.1:$PORT (fake model on :$FAKE_PORT)"
  exit 0
fi

if listening "$PORT"; then
  echo "start.sh: something already listens on 127.0.0.1:$PORT" >&2
  exit 1
fi
sed -e "s#@RUN_DIR@#$RUN_DIR#g" -e "s#@PORT@#$PORT#g" -e "s#@FAKE_PORT@#$FAKE_PORT#g" \
  "$TEMPLATE" >"$OPENCLAW_CONFIG_PATH"

if listening "$FAKE_PORT"; then
  echo "reusing the fake model server already on 127.0.0.1:$FAKE_PORT"
else
  "$PYTHON" "$HERE/fake_openai_server.py" --port "$FAKE_PORT" --log "$RUN_DIR/logs/fake-model.jsonl" \
    >"$RUN_DIR/logs/fake-model.out" 2>&1 </dev/null &
  echo $! >"$RUN_DIR/logs/fake-model.pid"
  echo "fake model server pid $! on 127.0.0.1:$FAKE_PORT"
fi

echo $$ >"$RUN_DIR/logs/gateway.pid"                # exec keeps this PID for the gateway
echo "starting openclaw $VERSION gateway on ws://127.0.0.1:$PORT (state in $RUN_DIR)"
exec "$OPENCLAW" gateway run --port "$PORT" --bind loopback --auth token --ws-log full "$@"
