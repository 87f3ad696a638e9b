#!/usr/bin/env bash
# Installs what the servers and tests need when missing: nats-server and redis-server from
# the distribution's packages, curl (the README's walkthrough and its test use it), python3,
# the Python packages aiosmtpd and moto[server] (the notification tests' SMTP and SNS
# peers), and node with the stock Yjs clients of the co-editing tests (tests/peers).
# Debian/Ubuntu (apt-get); run as root or with sudo.
set -euo pipefail
need=()
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need+=(nats-server)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v python3 >/dev/null 2>&1 || need+=(python3 python3-pip)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ ${#need[@]} -eq 0 ]; then
  echo "nats-server, redis-server, curl and python3 are already installed"
else
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing: ${need[*]}; install them with your distribution's package manager" >&2
    exit 1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
  # The packages may start system services; inkwire does not need them (it starts its own
  # servers in `inkwire dev` and in tests), so leave them as the distribution configured them.
  echo "installed: ${need[*]}"
fi

# The notification tests' protocol peers: aiosmtpd (SMTP) and moto's server (AWS SNS),
# started by the test harness with `python3 -m ...`. Major versions pinned: the tests read
# moto's /moto-api/data.json, whose layout is moto's own.
peers_import="import aiosmtpd, moto.server, flask, flask_cors"
if ! python3 -c "$peers_import" >/dev/null 2>&1; then
  pip_args=(-m pip install --quiet --disable-pip-version-check "aiosmtpd>=1.4,<2" "moto[server]>=5,<6")
  if ! python3 "${pip_args[@]}"; then
    # A distribution's Python may refuse installs outside a virtual environment (PEP 668);
    # these are test-only packages, so install them anyway.
    python3 "${pip_args[@]}" --break-system-packages
  fi
  if ! python3 -c "$peers_import"; then
    echo "aiosmtpd and moto[server] were installed but python3 cannot import them" >&2
    exit 1
  fi
  echo "installed: aiosmtpd, moto[server] (Python)"
else
  echo "aiosmtpd and moto[server] are already installed"
fi

# The co-editing tests' stock Yjs clients (tests/peers: yjs, y-websocket, ws, exactly as
# package-lock.json pins them), run with node. Node 18+ and npm come from the distribution
# when missing.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nodejs npm
  else
    echo "missing: node and npm (the co-editing tests' peers)" >&2
    exit 1
  fi
fi
peers_dir="$(cd "$(dirname "$0")/../tests/peers" && pwd)"
if [ ! -d "$peers_dir/node_modules/y-websocket" ] || [ "$peers_dir/package-lock.json" -nt "$peers_dir/node_modules/.package-lock.json" ]; then
  (cd "$peers_dir" && npm ci --no-audit --no-fund --loglevel=error)
  echo "installed: yjs, y-websocket, ws (tests/peers/node_modules)"
else
  echo "yjs, y-websocket and ws are already installed in tests/peers"
fi
