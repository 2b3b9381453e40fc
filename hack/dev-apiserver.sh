#!/usr/bin/env bash
# The bare plane: a real kube-apiserver + etcd on loopback, nothing else
# (hack/dev-cluster.sh with MESHWARDEN_BARE=1).
#   hack/dev-apiserver.sh up     # last line: export KUBECONFIG=<admin kubeconfig>
#   hack/dev-apiserver.sh down   # stops it and removes its data
set -euo pipefail
MESHWARDEN_BARE=1 exec "$(dirname "${BASH_SOURCE[0]}")/dev-cluster.sh" "$@"
