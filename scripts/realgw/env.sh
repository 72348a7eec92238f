# shellcheck shell=bash
# Sourced (not run) by start.sh and openclaw.sh: the environment the real OpenClaw gateway and
# its CLI run with. Reads VERSION (v4|v3), ROOT (install, from setup.sh) and RUN_DIR (state,
# config, logs and temp files of one gateway; default $ROOT/run), PORT and FAKE_PORT.
# Nothing leaks into the real $HOME, and every outbound call goes to a dead proxy on loopback.
VERSION="${VERSION:-v4}"
case "$VERSION" in
  v4) ROOT="${ROOT:-/tmp/controlcenter-realgw}"; PORT="${PORT:-18789}"; FAKE_PORT="${FAKE_PORT:-18790}" ;;
  v3) ROOT="${ROOT:-/tmp/controlcenter-realgw-v3}"; PORT="${PORT:-18889}"; FAKE_PORT="${FAKE_PORT:-18890}" ;;
  *) echo "VERSION must be v4 or v3, not '$VERSION'" >&2; exit 2 ;;
esac
RUN_DIR="${RUN_DIR:-$ROOT/run}"
for _n in "$PORT" "$FAKE_PORT"; do
  case "$_n" in '' | *[!0-9]*) echo "PORT and FAKE_PORT must be numbers" >&2; exit 2 ;; esac
done
unset _n
export VERSION ROOT RUN_DIR PORT FAKE_PORT
export PATH="$ROOT/bin:$PATH"                        # node 24 first
export HOME="$RUN_DIR/home"
export OPENCLAW_HOME="$RUN_DIR/home"
export OPENCLAW_STATE_DIR="$RUN_DIR/state"
export OPENCLAW_CONFIG_PATH="$RUN_DIR/state/openclaw.json"
export TMPDIR="$RUN_DIR/tmp"                         # os.tmpdir(): lock files, caches
export NODE_COMPILE_CACHE="$ROOT/cache/node-compile-cache"   # shared by all runs: faster starts
export OPENCLAW_SKIP_CHANNELS=1                      # no messaging transports
export OPENCLAW_DISABLE_BONJOUR=1                    # no mDNS advertising
export OPENCLAW_NO_AUTO_UPDATE=1                     # no update checks (also update.checkOnStart=false)
export OPENCLAW_OFFLINE=1                            # no helper-binary downloads
export DO_NOT_TRACK=1
# Any outbound call the gateway still tries goes to a dead proxy on loopback, never off the machine.
export NODE_USE_ENV_PROXY=1 HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 \
       http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9 \
       NO_PROXY=127.0.0.1,localhost,::1 no_proxy=127.0.0.1,localhost,::1
# The token: OPENCLAW_GATEWAY_TOKEN, else the one start.sh generated into $RUN_DIR/token.
if [ -z "${OPENCLAW_GATEWAY_TOKEN:-}" ] && [ -f "$RUN_DIR/token" ]; then
  OPENCLAW_GATEWAY_TOKEN="$(cat "$RUN_DIR/token")"
fi
export OPENCLAW_GATEWAY_TOKEN="${OPENCLAW_GATEWAY_TOKEN:-}"
