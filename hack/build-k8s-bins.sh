#!/usr/bin/env bash
# Builds the real cluster components from Go modules into a cache outside the repository,
# and prints the directory that holds them (last line on stdout):
#
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler   tools/k8s-bins (k8s.io/kubernetes)
#   kwok                    sigs.k8s.io/kwok, plus its stage files in kwok-stages/
#   pilot-discovery         istio.io/istio (istiod), plus Istio's Helm charts in istio-charts/
#   gateway-api-crds/       the Gateway API CRDs of sigs.k8s.io/gateway-api (no build; a link)
#   helm3                   helm.sh/helm/v3 (Helm 4 comes from hack/install-tools.sh)
#
# Pins live in tools/versions.env. A second run with unchanged inputs only checks stamps.
# MESHWARDEN_BARE=1 builds only etcd and kube-apiserver (the bare plane).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=../tools/versions.env
. "$ROOT/tools/versions.env"
CACHE="${MESHWARDEN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshwarden}"
OUT="$CACHE/bin/k8s-$K8S_VERSION"
export GOMODCACHE="$CACHE/gomod" GOCACHE="$CACHE/gobuild" GOTOOLCHAIN=local CGO_ENABLED=0
export GOFLAGS="-trimpath -buildvcs=false"
mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9
log() { echo "build-k8s-bins: $*" >&2; }

# built NAME STAMP: true when $OUT/NAME exists and was built from inputs hashing to STAMP.
built() { [ -x "$OUT/$1" ] && [ "$(cat "$OUT/.stamp-$1" 2>/dev/null)" = "$2" ]; }
mark() { echo "$2" > "$OUT/.stamp-$1"; }

cd "$ROOT/tools/k8s-bins"
STAMP=$( (cat go.mod go.sum ./*/main.go; go version) | sha256sum | cut -c1-16)
V=k8s.io/component-base/version
LDV="-s -w -X $V.gitVersion=$K8S_VERSION -X $V.gitMajor=1 -X $V.gitMinor=36 -X $V.gitTreeState=clean -X $V.buildDate=2026-01-01T00:00:00Z"
bins="etcd kube-apiserver"
[ "${MESHWARDEN_BARE:-0}" = 1 ] || bins="$bins kube-controller-manager kube-scheduler"
for b in $bins; do
  if ! built "$b" "$STAMP"; then
    start=$(date +%s)
    log "building $b $K8S_VERSION (first time: several minutes)"
    go build -p 2 -ldflags "$LDV" -o "$OUT/$b" "./$b"
    mark "$b" "$STAMP"
    log "$b built in $(( $(date +%s) - start ))s"
  fi
done
if [ "${MESHWARDEN_BARE:-0}" = 1 ]; then echo "$OUT"; exit 0; fi

# go_install NAME PACKAGE VERSION [LDFLAGS]: builds PACKAGE@VERSION in module mode into $OUT/NAME.
go_install() {
  local name=$1 pkg=$2 ver=$3 ld=${4:-}
  local stamp; stamp=$( (echo "$pkg@$ver $ld"; go version) | sha256sum | cut -c1-16)
  built "$name" "$stamp" && return 0
  local start; start=$(date +%s)
  log "building $name from $pkg@$ver (first time: a few minutes)"
  local gobin; gobin=$(mktemp -d "$OUT/.gobin.XXXXXX")
  GOBIN="$gobin" go install -p 2 -ldflags "-s -w $ld" "$pkg@$ver" >&2
  mv -f "$gobin/$(basename "$pkg")" "$OUT/$name"
  rm -rf "$gobin"
  mark "$name" "$stamp"
  log "$name built in $(( $(date +%s) - start ))s"
}
# module_dir MODULE VERSION: the read-only source of MODULE@VERSION in the module cache.
module_dir() { (cd "$ROOT/tools/k8s-bins" && go mod download -json "$1@$2") | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p'; }

go_install kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"
go_install helm3 helm.sh/helm/v3/cmd/helm "$HELM3_VERSION" \
  "-X helm.sh/helm/v3/internal/version.version=$HELM3_VERSION"
go_install pilot-discovery istio.io/istio/pilot/cmd/pilot-discovery "$ISTIO_MODULE_VERSION" \
  "-X istio.io/istio/pkg/version.buildVersion=$ISTIO_VERSION -X istio.io/istio/pkg/version.buildTag=$ISTIO_VERSION"

# Stage files and charts: links into the module cache, replaced when the pin changes.
link() { if [ "$(readlink "$OUT/$2" 2>/dev/null)" != "$1" ]; then ln -sfn "$1" "$OUT/$2"; fi; }
link "$(module_dir sigs.k8s.io/kwok "$KWOK_VERSION")/kustomize/stage" kwok-stages
link "$(module_dir istio.io/istio "$ISTIO_MODULE_VERSION")/manifests/charts" istio-charts
link "$(module_dir sigs.k8s.io/gateway-api "$GATEWAY_API_VERSION")/config/crd" gateway-api-crds
echo "$OUT"
