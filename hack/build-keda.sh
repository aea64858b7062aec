#!/usr/bin/env bash
# Builds KEDA's operator and metrics adapter (the external-metrics API server) from the
# Go module proxy into the cache the local cluster uses, for the KEDA benchmark only
# (bench/keda_vs_operator.py, `make bench-keda`); nothing else needs it. Idempotent: a
# binary already built for KEDA_VERSION is reused.
#
#   hack/build-keda.sh          build (or reuse) keda-operator and keda-adapter
#   hack/build-keda.sh --print-module-dir
#                               print the module's directory in the Go module cache
#                               (its config/crd/bases and config/rbac feed the install)
#
# KEDA's go.mod carries replace lines, so `go install` refuses it; a wrapper module that
# requires it takes its requirements without them (as localcluster/build.sh does for
# Kubernetes). First build: ~12 min for the operator and ~2 min for the adapter on 2 cores.
set -euo pipefail
KEDA_VERSION=${KEDA_VERSION:-v2.21.0}
MODULE=github.com/kedacore/keda/v2
CACHE=${TARS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tars-operator}
BIN="$CACHE/bin"
WORK="$CACHE/build/keda-$KEDA_VERSION"
export GOFLAGS=-mod=mod CGO_ENABLED=0

log() { printf '[build-keda] %s\n' "$*" >&2; }
die() { printf '[build-keda] ERROR: %s\n' "$*" >&2; exit 1; }

command -v go >/dev/null || die "go is not on PATH; install Go >= 1.26 (the machine image ships it)"
mkdir -p "$BIN" "$WORK"

wrapper() {
  if [ ! -f "$WORK/go.mod" ]; then
    printf 'module tars.dev/bench/keda-build\n\ngo 1.26\n\nrequire %s %s\n' "$MODULE" "$KEDA_VERSION" > "$WORK/go.mod"
  fi
  log "resolving $MODULE@$KEDA_VERSION and its requirements (first time: several hundred MB of modules)"
  (cd "$WORK" && go get "$MODULE/cmd/operator@$KEDA_VERSION" "$MODULE/cmd/adapter@$KEDA_VERSION") \
    || die "could not fetch $MODULE@$KEDA_VERSION from the Go module proxy ($(go env GOPROXY))"
}

if [ "${1:-}" = --print-module-dir ]; then
  dir=$(cd "$WORK" 2>/dev/null && go list -m -f '{{.Dir}}' "$MODULE" 2>/dev/null) || dir=""
  if [ -z "$dir" ]; then wrapper; dir=$(cd "$WORK" && go list -m -f '{{.Dir}}' "$MODULE"); fi
  echo "$dir"
  exit 0
fi
[ $# -eq 0 ] || die "unknown argument '$1' (usage: build-keda.sh [--print-module-dir])"

built() { [ -x "$BIN/$1" ] && [ "$(cat "$BIN/.$1.version" 2>/dev/null)" = "$KEDA_VERSION" ]; }
if built keda-operator && built keda-adapter; then
  log "keda $KEDA_VERSION already built in $BIN"
  exit 0
fi

wrapper
revision=$(cd "$WORK" && go mod download -json "$MODULE@$KEDA_VERSION" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin).get("Origin", {}).get("Hash", "") or "unknown")')
ldflags="-s -w -X $MODULE/version.Version=$KEDA_VERSION -X $MODULE/version.GitCommit=$revision"
out="$WORK/out"
mkdir -p "$out"
for name in adapter operator; do
  built "keda-$name" && { log "keda-$name $KEDA_VERSION already built"; continue; }
  log "building keda-$name $KEDA_VERSION (started $(date -u +%H:%M:%S); operator ~12 min, adapter ~2 min on 2 cores)"
  start=$(date +%s)
  (cd "$WORK" && go build -trimpath -ldflags "$ldflags" -o "$out/keda-$name" "$MODULE/cmd/$name") \
    || die "building keda-$name $KEDA_VERSION failed (see the go output above)"
  mv "$out/keda-$name" "$BIN/keda-$name"
  echo "$KEDA_VERSION" > "$BIN/.keda-$name.version"
  log "keda-$name built in $(( $(date +%s) - start )) s"
done
log "keda $KEDA_VERSION ready in $BIN"
