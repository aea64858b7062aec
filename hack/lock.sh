#!/usr/bin/env bash
# `make lock`: pins every Python dependency, with its hashes, for CPython 3.11 on Linux x86_64
# (the images' Python and ours), from the extras in pyproject.toml:
#   requirements-dev.lock          .[dev]       the dev venv (hack/setup-venv.sh installs it)
#   agent_image/requirements.lock  .[agent]     the agent image (agent_image/Dockerfile)
#   operator/requirements.lock     .[operator]  the operator image (operator/Dockerfile)
#   bench/requirements.lock        .[agent] + bench/requirements.in  the limiter comparison's venv
#                                  (`make bench-limiters`; its contenders stay out of the dev lock)
# The image locks are resolved within the dev lock, so the images run the versions the tests ran;
# the bench lock within the agent lock, so the bench runs the agent the image ships.
# UPGRADE=1 moves every pin to the newest release allowed; otherwise the pins already in a lock are
# kept where pyproject.toml still allows them.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
uv=${UV:-${VENV:?VENV must be set (the Makefile sets it)}/bin/uv}
[ -x "$uv" ] || { echo "[lock] ERROR: $uv is missing; run \`make setup\` (uv comes with .[dev])" >&2; exit 1; }
common=(--quiet --generate-hashes --python-version 3.11 --python-platform x86_64-unknown-linux-gnu
        --custom-compile-command "make lock" --no-emit-package tars-operator)
[ "${UPGRADE:-0}" = 1 ] && common+=(--upgrade)
compile() { # extra output [extra uv args, more input files]
  local extra=$1 out=$2; shift 2
  echo "[lock] $out <- pyproject.toml [$extra] $*"
  "$uv" pip compile "${common[@]}" "$@" --extra "$extra" -o "$out" pyproject.toml
}
compile dev requirements-dev.lock
compile agent agent_image/requirements.lock -c requirements-dev.lock
compile operator operator/requirements.lock -c requirements-dev.lock
compile agent bench/requirements.lock -c agent_image/requirements.lock bench/requirements.in
