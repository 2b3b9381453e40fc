#!/usr/bin/env bash
# Starts (up) or stops (down) a real cluster on loopback for trying meshwarden: etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler, six kwok nodes in three zones, and
# Istio (base + istiod) installed by Helm from its own charts with a real istiod on the host.
#   hack/dev-cluster.sh up     # last line: export KUBECONFIG=<admin kubeconfig>
#   hack/dev-cluster.sh down   # stops it and removes its data
#   MESHWARDEN_BARE=1 hack/dev-cluster.sh up   # the bare plane only (etcd + kube-apiserver)
# Data and logs live in ${MESHWARDEN_DEV_DIR:-/tmp/meshwarden-dev}.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR="${MESHWARDEN_DEV_DIR:-/tmp/meshwarden-dev}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
case "${1:-}" in
  up)
    BIN_DIR=$("$ROOT/hack/build-k8s-bins.sh" | tail -n 1)
    "$ROOT/hack/install-tools.sh" >/dev/null
    (cd "$ROOT" && cargo build --quiet -p testplane) >&2
    flag=--cluster
    [ "${MESHWARDEN_BARE:-0}" = 1 ] && flag=
    KUBEBUILDER_ASSETS="$BIN_DIR" "$TARGET/debug/testplane" up $flag "$DIR"
    ;;
  down)
    if [ -x "$TARGET/debug/testplane" ]; then
      "$TARGET/debug/testplane" down "$DIR"
    elif [ -f "$DIR/pids" ]; then
      xargs kill < "$DIR/pids" 2>/dev/null || true
      rm -rf "$DIR"
    fi
    echo "stopped; removed $DIR" >&2
    ;;
  *)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
