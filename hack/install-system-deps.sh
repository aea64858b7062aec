#!/usr/bin/env bash
# Installs the Debian packages the project needs, only those missing.
# Idempotent; apt's own cache lives outside the repo.
set -euo pipefail
declare -A want=(
  # the agent tests' Redis, and the Redis image (localcluster/tars_localcluster/images.py)
  [redis-server]=redis-server
  [redis-cli]=redis-tools
  # the local cluster's node: runc under containerd (built from its Go module), the CNI
  # bridge plugins, nftables (kube-proxy and our forward filter), iptables (the kubelet's chains)
  [ip]=iproute2
  [runc]=runc
  [nft]=nftables
  [iptables]=iptables
  # `make images` (localcluster/tars_localcluster/images.py): images without Docker
  [buildah]=buildah
  [umoci]=umoci
  [mmdebstrap]=mmdebstrap
  [gcc]=gcc
)
# Go is not here: Debian 12's golang-go (1.19) is too old; localcluster/build.sh checks for >= 1.26.
missing=()
for cmd in "${!want[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${want[$cmd]}")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
[ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
# gcc -static (the pause image) needs the C library's static archive.
[ -e "/usr/lib/$(uname -m)-linux-gnu/libc.a" ] || missing+=(libc6-dev)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "[setup] ERROR: missing packages: ${missing[*]}; install them with: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "[setup] installing Debian packages: ${missing[*]}"
apt-get update -qq
# Packages must not start their own services (our cluster starts its own on other ports).
DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
