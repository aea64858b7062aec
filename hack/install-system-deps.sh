#!/usr/bin/env bash
# Installs the Debian packages the project needs, only those missing.
# Idempotent; apt's own cache lives outside the repo.
set -euo pipefail
declare -A want=(
  [redis-server]=redis-server
  [redis-cli]=redis-tools
  [prometheus]=prometheus
  [ip]=iproute2
)
# Go is not here: Debian 12's golang-go (1.19) is too old; localcluster/build.sh checks for >= 1.26.
missing=()
for cmd in "${!want[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${want[$cmd]}")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "[setup] ERROR: missing packages: ${missing[*]}; install them with: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "[setup] installing Debian packages: ${missing[*]}"
apt-get update -qq
# Packages must not start their own services (our cluster starts its own on other ports).
DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
