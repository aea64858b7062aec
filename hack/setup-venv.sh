#!/usr/bin/env bash
# Creates the project's virtualenv outside the repo (in the cache) and installs
# the project editable with its dev tools. Reinstalls only when pyproject.toml
# or the checkout's location changed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:?VENV must be set (the Makefile sets it)}
key=$(printf '%s\n%s\n' "$root" "$(sha256sum "$root/pyproject.toml")" | sha256sum | cut -c1-16)
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.tars-installed" 2>/dev/null)" = "$key" ]; then
  exit 0
fi
echo "[setup] installing the Python environment into $venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e "$root[dev]"
echo "$key" > "$venv/.tars-installed"
