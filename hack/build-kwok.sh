#!/usr/bin/env bash
# Builds kwok (sigs.k8s.io/kwok, the simulated nodes and pods of Kubernetes' own scalability
# tests) into the cache for bench/operator_scale.py, and copies its Stage configs beside it
# (kwok refuses to start without them). Cached by version: a second run does nothing.
# Only the scale benchmark needs it; it is not part of `make test` or CI.
#
#   hack/build-kwok.sh          build (or reuse) $TARS_CACHE/bin/kwok
set -euo pipefail

KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
CACHE=${TARS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tars-operator}
BIN="$CACHE/bin"
STAGES="$CACHE/kwok-stages-$KWOK_VERSION"
STAMP="$BIN/.kwok.version"
MODULE=sigs.k8s.io/kwok

log() { printf '[build-kwok] %s\n' "$*" >&2; }
die() { printf '[build-kwok] ERROR: %s\n' "$*" >&2; exit 1; }

if [ -x "$BIN/kwok" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$KWOK_VERSION" ] && [ -d "$STAGES" ]; then
  log "kwok $KWOK_VERSION already built: $BIN/kwok"
  exit 0
fi
command -v go >/dev/null || die "go is not on PATH; install Go >= 1.26 (the machine image ships it)"
mkdir -p "$BIN"
export CGO_ENABLED=0
log "kwok $KWOK_VERSION: go install $MODULE/cmd/kwok@$KWOK_VERSION (first time: ~2-4 min on 2 cores)"
GOBIN="$BIN" go install -trimpath -ldflags "-s -w -X $MODULE/pkg/consts.Version=$KWOK_VERSION" \
  "$MODULE/cmd/kwok@$KWOK_VERSION" \
  || die "building kwok $KWOK_VERSION failed (see the go output above); is the Go module proxy reachable?"

# The Stage configs ship in the module, not in the binary.
moddir=$(go mod download -json "$MODULE@$KWOK_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])') \
  || die "could not locate $MODULE@$KWOK_VERSION in the module cache"
rm -rf "$STAGES" && mkdir -p "$STAGES"
for stage in node/fast node/heartbeat-with-lease pod/general; do
  [ -d "$moddir/kustomize/stage/$stage" ] || die "$moddir/kustomize/stage/$stage is missing: kwok $KWOK_VERSION's layout changed"
  mkdir -p "$STAGES/$stage"
  # The Stage objects only: kwok warns about the kustomization.yaml beside them.
  find "$moddir/kustomize/stage/$stage" -maxdepth 1 -name '*.yaml' ! -name kustomization.yaml \
    -exec cp {} "$STAGES/$stage/" \;
done
echo "$KWOK_VERSION" > "$STAMP"
log "kwok $KWOK_VERSION: $("$BIN/kwok" --version 2>&1 | head -1); stages in $STAGES"
