#!/usr/bin/env bash
# Checks the install artefacts of meshwarden:
#   - the chart's CRD is the same file as crds/meshpolicies.meshwarden.io.yaml
#   - helm lint --strict, with the default values and with every optional feature on
#     (charts/meshwarden/ci/all-features-values.yaml)
#   - the values schema rejects a bad value, and the PodDisruptionBudget follows replicaCount
#   - kube-score on both renders: any CRITICAL or WARNING fails
#   - deploy/install/meshwarden.yaml is exactly a fresh render of the chart
#   - hadolint on the Dockerfile: any finding fails
#   - with --apiserver: deploy/install/meshwarden.yaml and deploy/examples/ apply to a
#     real kube-apiserver (etcd and kube-apiserver on loopback, from
#     hack/build-k8s-bins.sh), the pod template passes the restricted Pod Security
#     admission, and the operator's ServiceAccount gets exactly the expected permissions
#
# Usage: hack/check-chart.sh [--update] [--apiserver]
#   --update     first copy the CRD into the chart and rewrite deploy/install/meshwarden.yaml
#   --apiserver  also run the API server stage (the first build of the binaries takes
#                several minutes; later runs take seconds)
#
# helm, kube-score and hadolint come from hack/install-tools.sh (a cache outside the repo).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

UPDATE=0
APISERVER=0
for arg in "$@"; do
  case "$arg" in
    --update) UPDATE=1 ;;
    --apiserver) APISERVER=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: hack/check-chart.sh [--update] [--apiserver]" >&2; exit 2 ;;
  esac
done

CHART=charts/meshwarden
ALL_VALUES=$CHART/ci/all-features-values.yaml
INSTALL=deploy/install/meshwarden.yaml
NAMESPACE=meshwarden
RELEASE=meshwarden
ROOT_CRD=crds/meshpolicies.meshwarden.io.yaml
CHART_CRD=$CHART/crds/meshpolicies.yaml
KUBE_VERSION=v1.33

BIN=$(bash hack/install-tools.sh | tail -n1)
HELM="$BIN/helm"
KUBE_SCORE="$BIN/kube-score"
HADOLINT="$BIN/hadolint"

WORK=$(mktemp -d)
PIDS=()   # processes this script started (--apiserver), stopped on exit by their ids
# stop PID: SIGTERM, up to 10 s to exit, then SIGKILL.
stop() {
  local pid=$1 _
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local i
  # Newest first: kube-apiserver before the etcd it depends on.
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop "${PIDS[i]}"; done
  rm -rf "$WORK"
}
trap cleanup EXIT

FAILED=()
step() { echo; echo "==> $*"; }
fail() { echo "FAIL: $2"; FAILED+=("$1"); }

# The plain-manifest install: a restricted Namespace, the CRD, then the chart's objects.
render_install() {
  cat <<EOF
# meshwarden $(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$CHART/Chart.yaml"): plain manifests for kubectl users.
# Generated from $CHART by hack/check-chart.sh --update; do not edit by hand.
#   kubectl apply --server-side -f $INSTALL
---
apiVersion: v1
kind: Namespace
metadata:
  name: $NAMESPACE
  labels:
    app.kubernetes.io/name: meshwarden
    app.kubernetes.io/part-of: meshwarden
    # The operator pods meet the restricted Pod Security Standard.
    pod-security.kubernetes.io/enforce: restricted
    pod-security.kubernetes.io/enforce-version: latest
EOF
  "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --include-crds
}

# --- CRD -------------------------------------------------------------------------------
step "CRD: $CHART_CRD matches $ROOT_CRD"
if [ -f "$ROOT_CRD" ]; then
  if [ "$UPDATE" = 1 ]; then
    mkdir -p "$(dirname "$CHART_CRD")"
    cp "$ROOT_CRD" "$CHART_CRD"
    echo "copied $ROOT_CRD to $CHART_CRD"
  elif ! diff -u "$CHART_CRD" "$ROOT_CRD" 2>&1; then
    fail "crd" "$CHART_CRD differs from $ROOT_CRD; run: hack/check-chart.sh --update"
  else
    echo "identical"
  fi
elif [ -f "$CHART_CRD" ]; then
  fail "crd" "$CHART_CRD exists but $ROOT_CRD does not"
else
  echo "skipped: $ROOT_CRD does not exist yet"
fi

# --- helm lint -------------------------------------------------------------------------
step "helm lint --strict (default values)"
"$HELM" lint --strict "$CHART" || fail "lint-default" "helm lint --strict $CHART"

step "helm lint --strict (every optional feature on: $ALL_VALUES)"
"$HELM" lint --strict "$CHART" -f "$ALL_VALUES" || fail "lint-all" "helm lint --strict -f $ALL_VALUES"

# --- render ----------------------------------------------------------------------------
step "helm template (default values, and every optional feature on)"
render_install > "$WORK/install.yaml" || fail "render-default" "helm template with default values"
"$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" -f "$ALL_VALUES" > "$WORK/all.yaml" \
  || fail "render-all" "helm template -f $ALL_VALUES"
for f in install all; do
  echo "$f: $(grep -c '^kind:' "$WORK/$f.yaml") objects: $(grep '^kind:' "$WORK/$f.yaml" | cut -d' ' -f2 | sort | uniq -c | awk '{printf "%s%s×%s", sep, $2, $1; sep=", "}')"
done

step "values schema and conditionals"
if "$HELM" template "$RELEASE" "$CHART" --set logFormat=xml > /dev/null 2>&1; then
  fail "schema" "logFormat=xml was accepted; values.schema.json is not applied"
else
  echo "logFormat=xml rejected by values.schema.json"
fi
if ! "$HELM" template "$RELEASE" "$CHART" --set replicaCount=1 > "$WORK/one.yaml"; then
  fail "pdb" "helm template --set replicaCount=1"
elif grep -q '^kind: PodDisruptionBudget' "$WORK/one.yaml"; then
  fail "pdb" "replicaCount=1 still renders a PodDisruptionBudget"
else
  echo "replicaCount=1 renders no PodDisruptionBudget"
fi

# --- kube-score ------------------------------------------------------------------------
# Tests left out, each for a reason:
KUBE_SCORE_COMMON=(
  score --kubernetes-version "$KUBE_VERSION" --exit-one-on-warning --color never
  --enable-optional-test container-seccomp-profile
  --enable-optional-test container-ports-check
  # No CPU limit by design: CFS throttling would slow reconcile bursts, and the CPU
  # request already guarantees the operator its share. Memory is limited.
  --ignore-container-cpu-limit
  # The root filesystem is read-only and no volume is mounted: the container writes
  # nothing but its stdout/stderr log, which the kubelet rotates. An ephemeral-storage
  # limit would only add a way to be evicted, sized after each node's log rotation.
  --ignore-test container-ephemeral-storage-request-and-limit
)
KUBE_SCORE_DEFAULT_ONLY=(
  # Default values only. The default tag is the pinned release (the appVersion), never
  # a moving tag, so IfNotPresent pulls the same image as Always without depending on
  # the registry at every restart. The all-features render sets Always and is scored
  # with this test on.
  --ignore-test container-image-pull-policy
  # Default values only. The NetworkPolicy is opt-in (networkPolicy.enabled): it needs a
  # network plugin that enforces it and a choice of who scrapes metrics. The
  # all-features render enables it and is scored with this test on.
  --ignore-test pod-networkpolicy
)
step "kube-score (default values)"
"$KUBE_SCORE" "${KUBE_SCORE_COMMON[@]}" "${KUBE_SCORE_DEFAULT_ONLY[@]}" "$WORK/install.yaml" \
  || fail "kube-score-default" "kube-score on the default render"
step "kube-score (every optional feature on)"
"$KUBE_SCORE" "${KUBE_SCORE_COMMON[@]}" "$WORK/all.yaml" \
  || fail "kube-score-all" "kube-score on the all-features render"

# --- plain manifests -------------------------------------------------------------------
step "$INSTALL is a fresh render"
if [ "$UPDATE" = 1 ]; then
  mkdir -p "$(dirname "$INSTALL")"
  cp "$WORK/install.yaml" "$INSTALL"
  echo "wrote $INSTALL"
elif [ ! -f "$INSTALL" ]; then
  fail "install" "$INSTALL is missing; run: hack/check-chart.sh --update"
elif ! diff -u "$INSTALL" "$WORK/install.yaml"; then
  fail "install" "$INSTALL differs from the chart; run: hack/check-chart.sh --update"
else
  echo "up to date"
fi

# --- Dockerfile ------------------------------------------------------------------------
step "hadolint Dockerfile"
if "$HADOLINT" --no-color --failure-threshold style Dockerfile; then
  echo "no findings"
else
  fail "hadolint" "hadolint Dockerfile"
fi

# --- a real API server (opt-in) ---------------------------------------------------------
# sar YES|NO VERB GROUP RESOURCE SUBRESOURCE NAMESPACE [NAME] ("-" = empty): queues a
# SubjectAccessReview for the operator's ServiceAccount with the expected answer.
# sar_run sends all queued reviews in one request and fails on any unexpected answer.
SAR_DOCS=""
SAR_WANT=()
sar() {
  local want=$1 verb=$2 group=${3#-} resource=$4 sub=${5#-} ns=${6#-} name=${7:-}
  SAR_WANT+=("$want")
  SAR_DOCS+="---
apiVersion: authorization.k8s.io/v1
kind: SubjectAccessReview
spec:
  user: system:serviceaccount:$NAMESPACE:$RELEASE
  groups: [system:serviceaccounts, \"system:serviceaccounts:$NAMESPACE\", system:authenticated]
  resourceAttributes: {verb: \"$verb\", group: \"$group\", resource: \"$resource\", subresource: \"$sub\", namespace: \"$ns\", name: \"$name\"}
"
}
sar_run() {
  local out
  if ! out=$(printf '%s' "$SAR_DOCS" | "$KUBECTL" create -o json -f - | python3 -c '
import json, sys
# kubectl prints one JSON object per review, one after the other.
text, pos, reviews = sys.stdin.read(), 0, []
dec = json.JSONDecoder()
while text[pos:].strip():
    obj, end = dec.raw_decode(text, pos + len(text[pos:]) - len(text[pos:].lstrip()))
    reviews.extend(obj.get("items", [obj]))
    pos = end
for r in reviews:
    a = r["spec"]["resourceAttributes"]
    got = "YES" if r["status"].get("allowed") else "NO"
    what = "%s/%s%s" % (a.get("group") or "core", a["resource"], "/" + a["subresource"] if a.get("subresource") else "")
    what += " " + a["name"] if a.get("name") else ""
    print("%-3s %-16s %s in %s" % (got, a["verb"], what, a.get("namespace") or "all namespaces"))
'); then
    fail "rbac" "SubjectAccessReviews could not be created"
    return
  fi
  # kubectl answers in the order of the documents, which is the order of SAR_WANT.
  local want got line i=0
  while IFS= read -r line; do
    got=${line%% *}
    want=${SAR_WANT[i]:-?}
    i=$((i + 1))
    if [ "$got" = "$want" ]; then echo "  ok    $line"; else echo "  WRONG $line (expected $want)"; fail "rbac" "expected $want: ${line#* }"; fi
  done <<< "$out"
  [ "$i" = "${#SAR_WANT[@]}" ] || fail "rbac" "sent ${#SAR_WANT[@]} SubjectAccessReviews, got $i answers"
}

if [ "$APISERVER" = 1 ]; then
  step "API server: install, examples, Pod Security, RBAC, Helm lifecycle"
  KUBECTL="$BIN/kubectl"
  K8S_BIN=$(bash hack/build-k8s-bins.sh | tail -n1) || K8S_BIN=
  if [ ! -x "$K8S_BIN/kube-apiserver" ] || [ ! -x "$K8S_BIN/etcd" ]; then
    fail "apiserver" "hack/build-k8s-bins.sh did not provide kube-apiserver and etcd"
    APISERVER=0
  fi
fi
if [ "$APISERVER" = 1 ]; then
  A="$WORK/apiserver"
  mkdir -p "$A"
  read -r ETCD_PORT PEER_PORT API_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
  TOKEN=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
  echo "$TOKEN,check-admin,check-admin,system:masters" > "$A/tokens.csv"
  openssl genrsa -out "$A/sa.key" 2048 2>/dev/null
  openssl rsa -in "$A/sa.key" -pubout -out "$A/sa.pub" 2>/dev/null
  "$K8S_BIN/etcd" --data-dir="$A/etcd" --unsafe-no-fsync \
    --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls="http://127.0.0.1:$PEER_PORT" --initial-advertise-peer-urls="http://127.0.0.1:$PEER_PORT" \
    --initial-cluster="default=http://127.0.0.1:$PEER_PORT" > "$A/etcd.log" 2>&1 &
  PIDS+=($!)
  "$K8S_BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" \
    --cert-dir="$A/certs" --token-auth-file="$A/tokens.csv" --authorization-mode=RBAC \
    --service-account-issuer="https://127.0.0.1:$API_PORT" \
    --service-account-key-file="$A/sa.pub" --service-account-signing-key-file="$A/sa.key" \
    --service-cluster-ip-range=10.0.0.0/24 --endpoint-reconciler-type=none --profiling=false \
    > "$A/kube-apiserver.log" 2>&1 &
  PIDS+=($!)
  export KUBECONFIG="$A/kubeconfig"
  cat > "$KUBECONFIG" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: check, cluster: {server: "https://127.0.0.1:$API_PORT", insecure-skip-tls-verify: true}}]
users: [{name: check-admin, user: {token: "$TOKEN"}}]
contexts: [{name: check, context: {cluster: check, user: check-admin}}]
current-context: check
EOF
  ready=0
  for _ in $(seq 90); do
    if "$KUBECTL" get --raw /readyz >/dev/null 2>&1; then ready=1; break; fi
    sleep 1
  done
  if [ "$ready" = 0 ]; then
    tail -n 20 "$A/etcd.log" "$A/kube-apiserver.log"
    fail "apiserver" "kube-apiserver did not become ready in 90s"
  else
    echo "kube-apiserver $("$KUBECTL" get --raw /version | python3 -c 'import json,sys; print(json.load(sys.stdin)["gitVersion"])') on 127.0.0.1:$API_PORT"

    HAS_CRD=0
    [ -f "$CHART_CRD" ] && HAS_CRD=1

    # 1. Helm, under release name helm-check (so its cluster-scoped names differ from the
    #    plain install's): install creates the CRD, the examples apply against it, the
    #    documented CRD upgrade command works on the Helm-owned CRD, upgrade changes an
    #    argument, and uninstall removes the release's objects but keeps the CRD and the
    #    MeshPolicies.
    HNS=meshwarden-helm-check
    echo "-- helm install / upgrade / uninstall (release helm-check, namespace $HNS)"
    helm_ok=1
    # istiod's namespace exists before meshwarden is installed (its Role for the mesh config
    # lives there).
    "$KUBECTL" create namespace istio-system > /dev/null || fail "namespace" "create istio-system"
    "$HELM" install helm-check "$CHART" -n "$HNS" --create-namespace > "$A/helm-install.log" || helm_ok=0
    if [ "$helm_ok" = 1 ] && [ "$HAS_CRD" = 1 ]; then
      "$KUBECTL" wait --for=condition=Established crd/meshpolicies.meshwarden.io --timeout=60s \
        || fail "crd-established" "the MeshPolicy CRD did not become Established"
      echo "-- kubectl apply --server-side -f deploy/examples/"
      { "$KUBECTL" apply --server-side -f deploy/examples/ && "$KUBECTL" get meshpolicies; } \
        || fail "examples" "deploy/examples/ do not apply against the CRD"
      echo "-- kubectl apply --server-side --force-conflicts -f $CHART/crds/ (the CRD upgrade step)"
      "$KUBECTL" apply --server-side --force-conflicts -f "$CHART/crds/" \
        || fail "crd-upgrade" "kubectl apply --server-side --force-conflicts -f $CHART/crds/"
    fi
    if [ "$helm_ok" = 1 ] \
      && "$HELM" upgrade helm-check "$CHART" -n "$HNS" --set logFormat=json > "$A/helm-upgrade.log" \
      && "$KUBECTL" -n "$HNS" get deployment helm-check-meshwarden -o jsonpath='{.spec.template.spec.containers[0].args}' \
           | grep -q -- '--log-format=json' \
      && "$HELM" uninstall helm-check -n "$HNS" \
      && [ -z "$("$KUBECTL" get clusterrole helm-check-meshwarden --ignore-not-found -o name)" ]; then
      echo "install, upgrade (--log-format=json) and uninstall done"
      if [ "$HAS_CRD" = 1 ]; then
        if "$KUBECTL" get crd meshpolicies.meshwarden.io > /dev/null \
          && [ "$("$KUBECTL" get meshpolicies -o name | wc -l)" -gt 0 ]; then
          echo "the CRD and the MeshPolicies remain after helm uninstall"
        else
          fail "helm-uninstall" "the CRD or the MeshPolicies are gone after helm uninstall"
        fi
      fi
    else
      cat "$A"/helm-*.log 2>/dev/null | tail -n 20
      fail "helm-lifecycle" "helm install/upgrade/uninstall against the API server"
    fi

    # 2. The plain manifests, over the CRD Helm left behind.
    echo "-- kubectl apply --server-side -f $INSTALL"
    "$KUBECTL" apply --server-side -f "$INSTALL" || fail "apply" "kubectl apply --server-side -f $INSTALL"

    echo "-- Pod Security (namespace $NAMESPACE enforces restricted): server dry-run of the pod template"
    if "$KUBECTL" -n "$NAMESPACE" get deployment "$RELEASE" -o json | python3 -c '
import json, sys
t = json.load(sys.stdin)["spec"]["template"]
print(json.dumps({"apiVersion": "v1", "kind": "Pod",
                  "metadata": {"name": "pod-security-check", "labels": t["metadata"]["labels"]},
                  "spec": t["spec"]}))' > "$A/pod.json" \
      && "$KUBECTL" -n "$NAMESPACE" create --dry-run=server -f "$A/pod.json"; then :
    else
      fail "pod-security" "the operator pod is not admitted under the restricted Pod Security Standard"
    fi

    echo "-- RBAC of system:serviceaccount:$NAMESPACE:$RELEASE (SubjectAccessReviews)"
    for v in get list watch; do sar YES "$v" meshwarden.io meshpolicies - -; done
    for v in get patch update; do sar YES "$v" meshwarden.io meshpolicies status -; done
    # patch: the finalizers of the sections that clean up (gatewayApi) and the annotation
    # meshwarden.io/gateway-parameters; never create, update or delete.
    sar YES patch meshwarden.io meshpolicies - -
    for v in create update delete; do sar NO "$v" meshwarden.io meshpolicies - -; done
    for v in create patch; do sar YES "$v" events.k8s.io events - default; done
    sar NO create - events - default
    for r in deployments statefulsets daemonsets; do
      for v in get list watch patch; do sar YES "$v" apps "$r" - istio-system; done
      for v in create update delete; do sar NO "$v" apps "$r" - istio-system; done
    done
    sar NO patch apps deployments scale istio-system
    for v in get list watch patch; do sar YES "$v" autoscaling horizontalpodautoscalers - istio-system; done
    sar NO create autoscaling horizontalpodautoscalers - istio-system
    for gr in policy/poddisruptionbudgets security.istio.io/peerauthentications; do
      for v in get list watch create patch delete; do sar YES "$v" "${gr%/*}" "${gr#*/}" - istio-system; done
      for v in update deletecollection; do sar NO "$v" "${gr%/*}" "${gr#*/}" - istio-system; done
    done
    for r in namespaces pods limitranges resourcequotas; do
      for v in get list watch; do sar YES "$v" - "$r" - -; done
      sar NO patch - "$r" - -
    done
    # Evictions through the budgets (spread.rebalance: Evict); never a pod delete.
    sar YES create - pods eviction istio-system
    sar NO delete - pods - istio-system
    for r in secrets configmaps serviceaccounts; do sar NO list - "$r" - -; done
    for r in secrets serviceaccounts; do sar NO get - "$r" - istio-system; done
    # istiod's namespace: the gatewayApi class-defaults ConfigMaps meshwarden owns there.
    for v in get create patch delete; do sar YES "$v" - configmaps - istio-system; done
    sar NO update - configmaps - istio-system
    sar NO get - configmaps - default
    # The mesh config: ConfigMaps listed and watched in istiod's namespace only.
    for v in list watch; do sar YES "$v" - configmaps - istio-system; sar NO "$v" - configmaps - default; done
    # Root certificates: the istio-ca-root-cert ConfigMaps by name, in every namespace; no get.
    for v in list watch; do sar YES "$v" - configmaps - - istio-ca-root-cert; sar YES "$v" - configmaps - default istio-ca-root-cert; done
    sar NO get - configmaps - default istio-ca-root-cert
    # No Secret by default, not even a plugged-in CA (certificates.readSecrets grants that).
    sar NO get - secrets - istio-system cacerts
    sar NO list - configmaps - default other-config
    # Gateway API Gateways: listed everywhere; their per-Gateway ConfigMaps and parametersRef
    # written only in gatewayApi.gatewayNamespaces (none by default).
    sar YES list gateway.networking.k8s.io gateways - -
    sar YES watch gateway.networking.k8s.io gateways - -
    sar NO patch gateway.networking.k8s.io gateways - default
    sar NO create - configmaps - default
    for v in list watch; do sar YES "$v" admissionregistration.k8s.io mutatingwebhookconfigurations - -; done
    for v in get create patch; do sar NO "$v" admissionregistration.k8s.io mutatingwebhookconfigurations - -; done
    for v in get list watch create update patch; do sar YES "$v" coordination.k8s.io leases - "$NAMESPACE"; done
    # delete: the presence Leases of instances that are gone (templates/role.yaml).
    sar YES delete coordination.k8s.io leases - "$NAMESPACE"
    sar NO update coordination.k8s.io leases - kube-system
    sar NO escalate rbac.authorization.k8s.io clusterroles - -
    sar NO create networking.istio.io destinationrules - istio-system
    # The report sections: DestinationRules, AuthorizationPolicies and Services read only.
    for v in list watch; do
      sar YES "$v" networking.istio.io destinationrules - -
      sar YES "$v" networking.istio.io virtualservices - -
      sar YES "$v" security.istio.io authorizationpolicies - -
      sar YES "$v" - services - -
    done
    sar NO get - services - default
    sar NO create security.istio.io authorizationpolicies - istio-system
    # The CA Secrets' metadata is off by default (security.caSecretMetadata): no Secret at all.
    for n in cacerts istio-ca-secret; do
      for v in list watch get; do sar NO "$v" - secrets - istio-system "$n"; done
    done
    for v in list watch; do sar NO "$v" - secrets - istio-system other; sar NO "$v" - secrets - default cacerts; done
    sar_run
  fi
elif ! printf '%s\n' "${FAILED[@]}" | grep -qx apiserver; then
  step "API server stage skipped (run with --apiserver)"
fi

echo
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "check-chart: ${#FAILED[@]} check(s) failed: ${FAILED[*]}"
  exit 1
fi
echo "check-chart: all checks passed"
