#!/usr/bin/env bash
# Builds the local cluster's upstream parts from the Go module proxy into a cache
# outside the repo: Kubernetes (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet, kube-proxy), etcd, helm, containerd 2 (with
# containerd-shim-runc-v2 and ctr), CoreDNS, Prometheus (with promtool) and
# prometheus-operator (with prometheus-config-reloader). Idempotent: a binary set
# that is already built for the pinned version (versions.env) is reused.
#
#   build.sh                    build (or reuse) everything
#   build.sh containerd coredns only these: kubernetes etcd helm containerd
#                               coredns prometheus prometheus-operator
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
KUBE_BINARIES="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy"

build_kubernetes() {
  local v=$KUBERNETES_VERSION
  local b all_built=1
  for b in $KUBE_BINARIES; do stamp_ok "$b" "$v" || all_built=0; done
  if [ $all_built = 1 ]; then
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
  log "kubernetes $v: building $KUBE_BINARIES (first time: ~13 min on 2 cores)"
  local pkgs=()
  for b in $KUBE_BINARIES; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  # One command: the packages the binaries share compile once.
  (cd "$mod" && go build -trimpath -ldflags "$ldflags" -o "$BIN/" "${pkgs[@]}") \
    || die "building kubernetes $v failed (see the go output above)"
  for b in $KUBE_BINARIES; do stamp "$b" "$v"; done
  log "kubernetes $v: $("$BIN/kube-apiserver" --version)"
}

# build_simple NAME STAMP MODULE PACKAGE LDFLAGS [VERSION]: a main package from a module
# without replace lines of its own, built inside a small wrapper module; VERSION defaults to
# STAMP (a STAMP with more than the version rebuilds when the recipe changes).
build_simple() {
  local name=$1 v=$2 module=$3 package=$4 version=${6:-$2}
  if stamp_ok "$name" "$v"; then log "$name $v already built"; return; fi
  local mod="$WORK/$name-$version"
  mkdir -p "$mod"
  printf 'module tars.dev/localcluster/%s-build\n\ngo 1.26\n\nrequire %s %s\n' "$name" "$module" "$version" > "$mod/go.mod"
  log "$name $v: building"
  (cd "$mod" && go build -trimpath -ldflags "-s -w $5" -o "$BIN/$name" "$package") \
    || die "building $name $v failed (see the go output above)"
  stamp "$name" "$v"
}


# go_wrapper DIR MODULE VERSION [MODULE VERSION]...: a wrapper module that requires
# the given modules. `go build` in it takes their requirements but not their replace
# lines (which make `go install MODULE@VERSION` refuse some of them).
go_wrapper() {
  local dir=$1; shift
  mkdir -p "$dir"
  {
    printf 'module tars.dev/localcluster/%s-build\n\ngo 1.26\n\n' "$(basename "$dir")"
    while [ $# -ge 2 ]; do printf 'require %s %s\n' "$1" "$2"; shift 2; done
  } > "$dir/go.mod"
}

# module_revision MODULE VERSION: the commit the module proxy reports for a version,
# or "unknown" (the proxy does not always say); it only feeds --version output.
module_revision() {
  local rev
  rev=$(go mod download -json "$1@$2" 2>/dev/null \
    | python3 -c 'import json,sys; print(json.load(sys.stdin).get("Origin", {}).get("Hash", ""))' 2>/dev/null) || rev=""
  echo "${rev:-unknown}"
}

# The ldflags for the version package most Prometheus-ecosystem binaries share.
prometheus_version_ldflags() { # VERSION REVISION
  local p=github.com/prometheus/common/version
  echo "-X $p.Version=$1 -X $p.Revision=$2 -X $p.Branch=HEAD -X $p.BuildUser=tars-localcluster -X $p.BuildDate=$(date -u +%Y%m%d-%H:%M:%S)"
}

all_stamped() { # version name...
  local v=$1 b; shift
  for b in "$@"; do stamp_ok "$b" "$v" || return 1; done
}

build_containerd() {
  local v=$CONTAINERD_VERSION m=github.com/containerd/containerd/v2
  if all_stamped "$v" containerd containerd-shim-runc-v2 ctr; then log "containerd $v already built"; return; fi
  local mod="$WORK/containerd-$v"
  go_wrapper "$mod" "$m" "$v"
  local ldflags="-s -w -X $m/version.Version=$v -X $m/version.Revision=$(cd "$mod" && module_revision "$m" "$v") -X $m/version.Package=$m"
  # The tags of containerd's own static release build (Makefile: STATIC=1); the shim
  # adds no_grpc (it speaks ttrpc only).
  local tags=urfave_cli_no_docs,osusergo,netgo,static_build
  log "containerd $v: building (first time: ~2 min)"
  (cd "$mod" && go build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$BIN/" "$m/cmd/containerd" "$m/cmd/ctr" \
    && go build -trimpath -tags "$tags,no_grpc" -ldflags "$ldflags" -o "$BIN/containerd-shim-runc-v2" "$m/cmd/containerd-shim-runc-v2") \
    || die "building containerd $v failed (see the go output above); CONTAINERD_VERSION in versions.env must be a github.com/containerd/containerd/v2 release"
  for b in containerd containerd-shim-runc-v2 ctr; do stamp "$b" "$v"; done
  log "containerd $v: $("$BIN/containerd" --version)"
}

build_coredns() {
  local v=$COREDNS_VERSION m=github.com/coredns/coredns
  if stamp_ok coredns "$v"; then log "coredns $v already built"; return; fi
  local mod="$WORK/coredns-$v"
  go_wrapper "$mod" "$m" "$v"
  # The version itself is a constant in coremain; only the commit is linked in.
  local ldflags="-s -w -X $m/coremain.GitCommit=$(cd "$mod" && module_revision "$m" "$v")"
  log "coredns $v: building (first time: ~4 min)"
  (cd "$mod" && go build -trimpath -ldflags "$ldflags" -o "$BIN/coredns" "$m") \
    || die "building coredns $v failed (see the go output above); COREDNS_VERSION in versions.env must be a github.com/coredns/coredns release"
  stamp coredns "$v"
  log "coredns $v: $("$BIN/coredns" -version | tr '\n' ' ')"
}

build_prometheus() {
  local v=$PROMETHEUS_VERSION m=github.com/prometheus/prometheus
  if all_stamped "$v" prometheus promtool; then log "prometheus $v already built"; return; fi
  # Prometheus 3.x.y is published as the Go module version v0.3xx.y (3.16.0 -> v0.316.0).
  local major minor patch
  IFS=. read -r major minor patch <<<"${v#v}"
  [ -n "$patch" ] && [ "$major" -ge 3 ] 2>/dev/null \
    || die "PROMETHEUS_VERSION=$v in versions.env is not a Prometheus 3.x.y release (e.g. v3.16.0)"
  local modv="v0.$((major * 100 + minor)).$patch"
  local mod="$WORK/prometheus-$v"
  go_wrapper "$mod" "$m" "$modv"
  local ldflags
  ldflags="-s -w $(prometheus_version_ldflags "${v#v}" "$(cd "$mod" && module_revision "$m" "$modv")")"
  # netgo as in the release build; builtinassets is left out: the module carries no
  # compiled web UI, so the UI pages are missing but the HTTP API (/api/v1, /-/ready) is complete.
  log "prometheus $v: building (first time: ~9 min; module $m@$modv)"
  (cd "$mod" && go build -trimpath -tags netgo -ldflags "$ldflags" -o "$BIN/" "$m/cmd/prometheus" "$m/cmd/promtool") \
    || die "building prometheus $v ($m@$modv) failed (see the go output above)"
  for b in prometheus promtool; do stamp "$b" "$v"; done
  log "prometheus $v: $("$BIN/prometheus" --version | head -1)"
}

build_prometheus_operator() {
  local v=$PROMETHEUS_OPERATOR_VERSION m=github.com/prometheus-operator/prometheus-operator
  if all_stamped "$v" prometheus-operator prometheus-config-reloader; then log "prometheus-operator $v already built"; return; fi
  local mod="$WORK/prometheus-operator-$v"
  # The module replaces its own pkg/apis/monitoring and pkg/client with local paths
  # (so `go install` refuses it); the wrapper takes them at the same release instead.
  go_wrapper "$mod" "$m" "$v" "$m/pkg/apis/monitoring" "$v" "$m/pkg/client" "$v"
  local ldflags
  ldflags="-s -w $(prometheus_version_ldflags "${v#v}" "$(cd "$mod" && module_revision "$m" "$v")")"
  log "prometheus-operator $v: building (first time: ~4 min)"
  (cd "$mod" && go build -trimpath -ldflags "$ldflags" -o "$BIN/prometheus-operator" "$m/cmd/operator" \
    && go build -trimpath -ldflags "$ldflags" -o "$BIN/prometheus-config-reloader" "$m/cmd/prometheus-config-reloader") \
    || die "building prometheus-operator $v failed (see the go output above); PROMETHEUS_OPERATOR_VERSION in versions.env must be a release whose pkg/apis/monitoring and pkg/client submodules the module proxy serves at the same version"
  for b in prometheus-operator prometheus-config-reloader; do stamp "$b" "$v"; done
  log "prometheus-operator $v: $("$BIN/prometheus-operator" --version 2>&1 | head -1)"
}

# helm's Makefile sets the Kubernetes version `helm template` assumes without a cluster from the
# client-go it is built with; without it that default is v1.20.0, and charts requiring a newer
# Kubernetes (ours) cannot be rendered as GitOps tools do.
build_helm() {
  local v=$HELM_VERSION gomod client_go
  gomod=$(cd "$WORK" && go mod download -json "helm.sh/helm/v3@$v" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])') \
    || die "could not download helm.sh/helm/v3@$v from the Go module proxy"
  client_go=$(sed -nE 's#^[[:space:]]*k8s\.io/client-go v0\.([0-9]+)\..*#\1#p' "$gomod" | head -1)
  [ -n "$client_go" ] || die "helm $v: no k8s.io/client-go requirement in its go.mod"
  local flags="-X helm.sh/helm/v3/internal/version.version=$v"
  for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    flags+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$client_go"
  done
  build_simple helm "$v+kube1.$client_go" helm.sh/helm/v3 helm.sh/helm/v3/cmd/helm "$flags" "$v"
}

COMPONENTS="kubernetes etcd helm containerd coredns prometheus prometheus-operator"
for c in "$@"; do
  case " $COMPONENTS " in *" $c "*) ;; *) die "unknown component '$c'; choose from: $COMPONENTS" ;; esac
done
for c in ${*:-$COMPONENTS}; do
  case $c in
    kubernetes) build_kubernetes ;;
    etcd) build_simple etcd "$ETCD_VERSION" go.etcd.io/etcd/server/v3 go.etcd.io/etcd/server/v3 "" ;;
    helm) build_helm ;;
    containerd) build_containerd ;;
    coredns) build_coredns ;;
    prometheus) build_prometheus ;;
    prometheus-operator) build_prometheus_operator ;;
  esac
done
log "binaries ready in $BIN"
