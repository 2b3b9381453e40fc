#!/usr/bin/env bash
# Starts (up) or stops (down) a real kube-apiserver + etcd on loopback for trying meshwarden.
#   hack/dev-apiserver.sh up     # last line: export KUBECONFIG=<admin kubeconfig>
#   hack/dev-apiserver.sh down   # stops it and removes its data
# Data and logs live in ${MESHWARDEN_DEV_DIR:-/tmp/meshwarden-dev}.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR="${MESHWARDEN_DEV_DIR:-/tmp/meshwarden-dev}"
cmd="${1:-}"
case "$cmd" in
  up)
    BIN_DIR=$("$ROOT/hack/build-k8s-bins.sh")
    (cd "$ROOT" && cargo build --quiet -p testplane) >&2
    KUBEBUILDER_ASSETS="$BIN_DIR" "$ROOT/target/debug/testplane" up "$DIR"
    ;;
  down)
    if [ -x "$ROOT/target/debug/testplane" ]; then
      "$ROOT/target/debug/testplane" down "$DIR"
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
