#!/usr/bin/env bash
# Creates the project's virtualenv outside the repo (in the cache) and installs
# the pinned dev dependencies (requirements-dev.lock, or $LOCK, e.g. the limiter
# comparison's bench/requirements.lock; every file checked against its hash),
# then the project itself, editable, without dependencies. Reinstalls
# only when pyproject.toml, the lock or the checkout's location changed; packages
# that the lock no longer names are removed then.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:?VENV must be set (the Makefile sets it)}
lock=${LOCK:-$root/requirements-dev.lock}
key=$(printf '%s\n%s\n%s\n' "$root" "$(sha256sum "$root/pyproject.toml")" "$(sha256sum "$lock")" \
  | sha256sum | cut -c1-16)
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.tars-installed" 2>/dev/null)" = "$key" ]; then
  exit 0
fi
echo "[setup] installing the Python environment into $venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q --require-hashes -r "$lock"
"${pip[@]}" install -q --no-deps -e "$root"
# What an earlier lock brought and this one does not name (pip, setuptools and the project stay).
stale=$("$venv/bin/python" - "$lock" <<'EOF'
import re
import sys
from importlib import metadata

def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()

pinned = {norm(m.group(1)) for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", open(sys.argv[1]).read(), re.M)}
keep = pinned | {"pip", "setuptools", "wheel", "tars-operator"}
installed = {norm(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]}
print(" ".join(sorted(installed - keep)))
EOF
)
if [ -n "$stale" ]; then
  echo "[setup] removing packages the lock no longer names: $stale"
  # shellcheck disable=SC2086 # one word per package
  "${pip[@]}" uninstall -q -y $stale
fi
echo "$key" > "$venv/.tars-installed"
