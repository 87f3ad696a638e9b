#!/usr/bin/env bash
# Installs nats-server and redis-server from the distribution's packages when missing.
# Debian/Ubuntu (apt-get); run as root or with sudo.
set -euo pipefail
need=()
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need+=(nats-server)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if [ ${#need[@]} -eq 0 ]; then
  echo "nats-server and redis-server are already installed"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "missing: ${need[*]}; install them with your distribution's package manager" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
# The packages may start system services; inkwire does not need them (it starts its own
# servers in `inkwire dev` and in tests), so leave them as the distribution configured them.
echo "installed: ${need[*]}"
