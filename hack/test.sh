#!/usr/bin/env bash
# Runs every test: builds the real kube-apiserver/etcd (cached outside the repo), installs the
# chart tools, then the Rust unit and integration tests, the chart checks and the monitoring
# checks (promtool on the alerts and the dashboard).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
start=$(date +%s)
export KUBEBUILDER_ASSETS
KUBEBUILDER_ASSETS=$(hack/build-k8s-bins.sh)
TOOLS=$(hack/install-tools.sh | tail -n 1)
export PATH="$TOOLS:$PATH"
echo "==> tools ready after $(( $(date +%s) - start ))s" >&2
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# The alerts and the dashboard in promtool; installs Prometheus, which tests/image_run.rs runs.
hack/check-monitoring.sh
# The image, built with buildah from the release binary (tests/image.rs checks its contract,
# tests/image_run.rs runs it on the full cluster).
MESHWARDEN_IMAGE=$(hack/image.sh | tail -n 1 | cut -d' ' -f1)
export MESHWARDEN_IMAGE
cargo test --workspace --locked
# The chart's checks, with its API server stage: the manifests apply, the pod passes the
# restricted Pod Security admission, and the ServiceAccount has exactly the permissions the
# script expects (20-30 s with the binaries built above).
hack/check-chart.sh --apiserver
echo "==> all tests passed in $(( $(date +%s) - start ))s" >&2
