#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler, etcd and helm
# from the Go module proxy into a cache outside the repo. Idempotent: a binary
# set that is already built for the pinned versions is reused.
#
# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces every staging
# module (k8s.io/api, ...) with ./staging/... at v0.0.0. The known recipe
# (golang/go#35878) is a wrapper module whose replace lines point each staging
# module at its published v0.<minor>.<patch>; we generate that list from the
# release's own go.mod, because it changes between releases.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

CACHE=${TARS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tars-operator}
BIN="$CACHE/bin"
WORK="$CACHE/build"
mkdir -p "$BIN" "$WORK"
export GOFLAGS=-mod=mod CGO_ENABLED=0

log() { printf '[build] %s\n' "$*" >&2; }
die() { printf '[build] ERROR: %s\n' "$*" >&2; exit 1; }

command -v go >/dev/null || die "go is not on PATH; install Go >= 1.26 (the machine image ships it)."
go_minor=$(go env GOVERSION | sed -nE 's/^go1\.([0-9]+).*/\1/p')
[ "${go_minor:-0}" -ge 26 ] || die "$(go env GOVERSION) is too old: Kubernetes $KUBERNETES_VERSION needs Go >= 1.26"

stamp_ok() { # name version
  [ -x "$BIN/$1" ] && [ "$(cat "$BIN/.$1.version" 2>/dev/null)" = "$2" ]
}
stamp() { echo "$2" > "$BIN/.$1.version"; }

build_kubernetes() {
  local v=$KUBERNETES_VERSION
  if stamp_ok kube-apiserver "$v" && stamp_ok kube-controller-manager "$v" && stamp_ok kube-scheduler "$v"; then
    log "kubernetes $v already built"; return
  fi
  local minor=${v#v1.}; minor=${minor%%.*}
  local staging_version="v0.${v#v1.}"
  local mod="$WORK/kubernetes-$v"
  mkdir -p "$mod"
  log "kubernetes $v: resolving the release's go.mod (first time: ~1 GB of modules)"
  local gomod
  gomod=$(cd "$mod" && go mod download -json "k8s.io/kubernetes@$v" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])') \
    || die "could not download k8s.io/kubernetes@$v from the Go module proxy (is GOPROXY reachable?)"
  {
    echo "module tars.dev/localcluster/kubernetes-build"
    echo
    grep -m1 '^go ' "$gomod"
    echo
    echo "require k8s.io/kubernetes $v"
    echo
    # "k8s.io/api => ./staging/src/k8s.io/api" -> "replace k8s.io/api => k8s.io/api v0.37.2"
    sed -nE "s#^[[:space:]]*(k8s\.io/[^[:space:]]+)[[:space:]]+=>[[:space:]]+\./staging/.*#replace \1 => \1 $staging_version#p" "$gomod"
  } > "$mod/go.mod"
  local pkg=k8s.io/component-base/version cpkg=k8s.io/client-go/pkg/version
  local ldflags="-s -w"
  for p in $pkg $cpkg; do
    ldflags+=" -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  done
  log "kubernetes $v: building kube-apiserver, kube-controller-manager, kube-scheduler (first time: 10-20 min on 2 cores)"
  (cd "$mod" && go build -trimpath -ldflags "$ldflags" -o "$BIN/" \
      k8s.io/kubernetes/cmd/kube-apiserver \
      k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler) || die "building kubernetes $v failed (see the go output above)"
  for b in kube-apiserver kube-controller-manager kube-scheduler; do stamp "$b" "$v"; done
  log "kubernetes $v: $("$BIN/kube-apiserver" --version)"
}

# build_simple NAME VERSION MODULE PACKAGE: a main package from a module without
# replace lines of its own, built inside a small wrapper module.
build_simple() {
  local name=$1 v=$2 module=$3 package=$4
  if stamp_ok "$name" "$v"; then log "$name $v already built"; return; fi
  local mod="$WORK/$name-$v"
  mkdir -p "$mod"
  printf 'module tars.dev/localcluster/%s-build\n\ngo 1.26\n\nrequire %s %s\n' "$name" "$module" "$v" > "$mod/go.mod"
  log "$name $v: building"
  (cd "$mod" && go build -trimpath -ldflags "-s -w $5" -o "$BIN/$name" "$package") \
    || die "building $name $v failed (see the go output above)"
  stamp "$name" "$v"
}

build_kubernetes
build_simple etcd "$ETCD_VERSION" go.etcd.io/etcd/server/v3 go.etcd.io/etcd/server/v3 ""
build_simple helm "$HELM_VERSION" helm.sh/helm/v3 helm.sh/helm/v3/cmd/helm \
  "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
log "binaries ready in $BIN"
