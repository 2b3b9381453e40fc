#!/usr/bin/env bash
# Checks the chart's monitoring: the PrometheusRule's alerts and the Grafana dashboard.
#   - renders the chart (helm template) with prometheusRule and grafanaDashboard enabled,
#     with the default values and with every optional feature on
#     (charts/meshwarden/ci/all-features-values.yaml)
#   - promtool check rules on both renders' rule groups
#   - promtool test rules hack/monitoring/alerts.test.yaml on the default render: unit
#     tests of every alert, each shown firing and silent; an alert without both fails
#   - every alert has a runbook_url into docs/operations.md whose anchor is a heading there
#   - the dashboard ConfigMap carries the sidecar's label (and the folder annotation when a
#     folder is set), its JSON parses, panel ids are unique, and every query parses in
#     promtool (as a recording rule)
#   - every metric an alert or a query names is registered in src/telemetry.rs or src/telemetry/ (a live
#     scrape of the operator's /metrics checks the same in tests/monitoring.rs)
#
# promtool comes from Debian's prometheus package, installed with apt-get when missing;
# helm from hack/install-tools.sh.
#
# Usage: hack/check-monitoring.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

CHART=charts/meshwarden
ALL_VALUES=$CHART/ci/all-features-values.yaml
TESTS=hack/monitoring/alerts.test.yaml
DOCS=docs/operations.md

if ! command -v promtool > /dev/null; then
  echo "==> promtool missing: apt-get install prometheus (Debian's package carries promtool)" >&2
  SUDO=
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq > /dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus > /dev/null
fi
BIN=$(bash hack/install-tools.sh | tail -n1)
HELM="$BIN/helm"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

FAILED=()
step() { echo; echo "==> $*"; }
fail() { echo "FAIL: $2"; FAILED+=("$1"); }

# render NAME ARGS...: the chart with the monitoring on, to $WORK/NAME.yaml.
render() {
  local name=$1
  shift
  "$HELM" template meshwarden "$CHART" --namespace meshwarden \
    --set prometheusRule.enabled=true --set grafanaDashboard.enabled=true "$@" > "$WORK/$name.yaml"
}
# rules NAME: the rule groups of the PrometheusRule in $WORK/NAME.yaml (its spec, as a
# Prometheus rule file) to $WORK/NAME-rules/rules.yaml.
rules() {
  mkdir -p "$WORK/$1-rules"
  python3 - "$WORK/$1.yaml" > "$WORK/$1-rules/rules.yaml" <<'EOF'
import sys
# helm separates documents with "---"; the PrometheusRule's spec is indented by two spaces.
for doc in open(sys.argv[1]).read().split("\n---\n"):
    if "\nkind: PrometheusRule\n" in doc:
        spec = doc.split("\nspec:\n", 1)[1]
        print("\n".join(l[2:] for l in spec.splitlines()))
EOF
}

step "helm template (monitoring on: default values, and every optional feature on)"
render default || fail "render" "helm template with the monitoring on"
render all -f "$ALL_VALUES" || fail "render" "helm template -f $ALL_VALUES"
render custom --set grafanaDashboard.labelKey=dashboards --set grafanaDashboard.labelValue=meshwarden \
  --set grafanaDashboard.folder=Istio --set grafanaDashboard.folderAnnotationKey=k8s-sidecar-target-directory \
  --set grafanaDashboard.namespace=monitoring || fail "render" "helm template with a custom dashboard label"
for r in default all; do rules "$r"; done

step "promtool check rules (both renders)"
for r in default all; do
  promtool check rules "$WORK/$r-rules/rules.yaml" || fail "check-rules" "promtool check rules ($r values)"
done

step "promtool test rules $TESTS"
cp "$TESTS" "$WORK/default-rules/"
# promtool reads rule_files relative to the test file.
if (cd "$WORK/default-rules" && promtool test rules "$(basename "$TESTS")"); then :; else
  fail "test-rules" "promtool test rules $TESTS"
fi

step "every alert is unit-tested firing and silent, and links to its runbook"
python3 - "$WORK/default-rules/rules.yaml" "$TESTS" "$DOCS" <<'EOF' || fail "alerts" "alert coverage or runbook links"
import re, sys
rules, tests, docs = (open(p).read() for p in sys.argv[1:])
alerts = re.findall(r"^\s*- alert: (\S+)", rules, re.M)
runbooks = re.findall(r"^\s*runbook_url: \"?([^\"\n]+)\"?", rules, re.M)
# GitHub's anchors: the heading in lower case, punctuation dropped, spaces as hyphens.
anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
           for h in re.findall(r"^#+ (.+)$", docs, re.M)}
bad = []
if len(runbooks) != len(alerts):
    bad.append(f"{len(alerts)} alerts but {len(runbooks)} runbook_url annotations")
for alert, url in zip(alerts, runbooks):
    page, _, anchor = url.partition("#")
    if not page.endswith("/docs/operations.md") or anchor != alert.lower():
        bad.append(f"{alert}: runbook_url {url} is not docs/operations.md#{alert.lower()}")
    elif anchor not in anchors:
        bad.append(f"{alert}: docs/operations.md has no heading for #{anchor}")
# Each eval of an alert expects either no alert ("exp_alerts: []") or some.
evals = re.findall(r"^\s*alertname: (\S+)\n\s*exp_alerts:(.*)$", tests, re.M)
for alert in alerts:
    kinds = {"silent" if e.strip() == "[]" else "firing" for a, e in evals if a == alert}
    for kind in ("firing", "silent"):
        if kind not in kinds:
            bad.append(f"{alert}: no unit test shows it {kind}")
    print(f"  {alert}: {sum(1 for a, _ in evals if a == alert)} evaluations, runbook #{alert.lower()}")
for a, _ in evals:
    if a not in alerts:
        bad.append(f"{a} is tested but not in the PrometheusRule")
for b in bad:
    print("  " + b)
print(f"  {len(alerts)} alerts, {len(evals)} alert evaluations in {sys.argv[2]}")
sys.exit(1 if bad else 0)
EOF

step "the Grafana dashboard ConfigMap: labels, folder, JSON, queries"
python3 - "$WORK" <<'EOF' || fail "dashboard" "the dashboard ConfigMap"
import json, sys
work = sys.argv[1]
def configmap(name):
    for doc in open(f"{work}/{name}.yaml").read().split("\n---\n"):
        if "\nkind: ConfigMap\n" in doc and "-dashboard\n" in doc:
            return doc
    sys.exit(f"{name}: no dashboard ConfigMap rendered")
bad = []
default, custom = configmap("default"), configmap("custom")
if '\n    grafana_dashboard: "1"\n' not in default:
    bad.append('default render: no label grafana_dashboard: "1"')
if "annotations:" in default.split("\ndata:")[0]:
    bad.append("default render: a folder annotation without a folder")
for want in ('\n    dashboards: "meshwarden"\n', '\n    k8s-sidecar-target-directory: "Istio"\n',
             "\n  namespace: monitoring\n"):
    if want not in custom:
        bad.append(f"custom render lacks {want.strip()}")
body = default.split("\n  meshwarden.json: |-\n", 1)[1]
text = "\n".join(l[4:] for l in body.splitlines())
d = json.loads(text)
panels = [p for p in d["panels"] if p["type"] != "row"]
ids = [p["id"] for p in d["panels"]]
if len(ids) != len(set(ids)):
    bad.append(f"panel ids repeat: {ids}")
if d.get("uid") != "meshwarden":
    bad.append("the dashboard's uid is not meshwarden")
rules = ["groups:", "  - name: dashboard", "    rules:"]
n = 0
for p in panels:
    if not p.get("targets"):
        bad.append(f"panel {p['title']} has no query")
    for t in p.get("targets", []):
        n += 1
        if "$" in t["expr"]:
            bad.append(f"panel {p['title']}: a Grafana variable in {t['expr']} (promtool cannot check it)")
        # JSON strings are YAML strings.
        rules += [f"      - record: meshwarden_dashboard:query_{n}", f"        expr: {json.dumps(t['expr'])}"]
open(f"{work}/dashboard-rules.yaml", "w").write("\n".join(rules) + "\n")
open(f"{work}/exprs.txt", "w").write("\n".join(t["expr"] for p in panels for t in p["targets"]) + "\n")
for b in bad:
    print("  " + b)
print(f"  {len(panels)} panels, {n} queries")
sys.exit(1 if bad else 0)
EOF
if [ -f "$WORK/dashboard-rules.yaml" ]; then
  promtool check rules "$WORK/dashboard-rules.yaml" || fail "dashboard-queries" "a dashboard query does not parse"
fi

step "every metric named by an alert or a query is registered in src/telemetry.rs or src/telemetry/"
# The registered families, and the samples Prometheus sees for each (counters: _total;
# the one histogram: _bucket, _sum, _count).
REGISTERED=$(sed -n '/registry.register(/{n;s/^ *"\([a-z_]*\)",$/\1/p}' src/telemetry.rs src/telemetry/*.rs | sort -u)
KNOWN=$(for m in $REGISTERED; do
  echo "meshwarden_$m"
  echo "meshwarden_${m}_total"
  for s in bucket sum count; do echo "meshwarden_${m}_$s"; done
done | sort -u)
USED=$(sed -n 's/^ *expr: //p' "$WORK/default-rules/rules.yaml" | cat - "$WORK/exprs.txt" 2>/dev/null \
  | grep -o 'meshwarden_[a-z_:]*' | sort -u)
echo "  registered: $(echo "$REGISTERED" | wc -l) families; named: $(echo "$USED" | wc -l) metrics"
UNKNOWN=$(comm -23 <(echo "$USED") <(echo "$KNOWN"))
if [ -n "$UNKNOWN" ]; then
  fail "metric-names" "not exported by the operator: $(echo "$UNKNOWN" | tr '\n' ' ')"
fi

echo
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "check-monitoring: ${#FAILED[@]} check(s) failed: ${FAILED[*]}"
  exit 1
fi
echo "check-monitoring: all checks passed"
