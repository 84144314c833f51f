#!/usr/bin/env bash
# scripts/k8s-check.sh - offline checks of the Helm chart and the kustomize manifests (make k8s-check).
#
#   scripts/k8s-check.sh                  every check below; exits non-zero on the first failure
#   scripts/k8s-check.sh --write-readme   regenerate the values tables of helm/aimesh/README.md
#   scripts/k8s-check.sh --write-base     regenerate k8s/base/aimesh.yaml from the chart
#
# 1. `helm lint --strict` with values.yaml, every values-<env>.yaml and helm/tests/everything-on.yaml;
# 2. every helm/tests/bad-*.yaml must be refused by `helm lint` with the message its
#    `# expect:` line names (a wrong type, an unknown key);
# 3. `helm template` of every environment and `kubectl kustomize` of every overlay, validated by
#    kubernetes-validate --strict against each supported Kubernetes version (KUBE_VERSIONS);
#    a kind without a bundled schema fails unless it is in NO_SCHEMA_OK;
# 4. the same renders audited: every container hardened (runAsNonRoot, readOnlyRootFilesystem,
#    capabilities drop ALL, seccomp RuntimeDefault, allowPrivilegeEscalation false) with memory
#    requests and limits; every Deployment with liveness and readiness probes and a PDB;
# 5. helm/aimesh/README.md and k8s/base/aimesh.yaml are what the chart generates.
# The tools come from scripts/k8s-tools.sh (installed into .dev/k8s on first use).

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$REPO"
CHART=helm/aimesh
ENVS=(dev staging prod)
# Rendered like the environments: every optional part switched on.
EXTRA_VALUES=(helm/tests/everything-on.yaml)
OVERLAYS=(dev prod)
# The oldest and newest Kubernetes minor versions the chart supports (Chart.yaml kubeVersion
# says >=1.30), plus one between.
KUBE_VERSIONS=(1.30.0 1.33.0 1.35.0)
# Custom resources that kubernetes-validate has no schema for.
NO_SCHEMA_OK='kind ServiceMonitor with api version monitoring.coreos.com/v1'

eval "$(scripts/k8s-tools.sh env)"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

say() { printf 'k8s-check: %s\n' "$*"; }
fail() {
    printf 'k8s-check: FAILED: %s\n' "$*" >&2
    exit 1
}
py() { "$K8S_PYTHON" scripts/k8s_check.py "$@"; }

render_base() {
    "$HELM" template aimesh "$CHART" -f k8s/base/values.yaml | py base
}

case ${1:-} in
    --write-readme) py readme; say "wrote $CHART/README.md"; exit 0 ;;
    --write-base) render_base >k8s/base/aimesh.yaml; say "wrote k8s/base/aimesh.yaml"; exit 0 ;;
    "") ;;
    *) sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2; exit 2 ;;
esac

# validate NAME FILE: strict schema validation for every supported version.
validate() {
    local name=$1 file=$2 version out
    for version in "${KUBE_VERSIONS[@]}"; do
        if ! out=$("$KUBE_VALIDATE" --strict --quiet -k "$version" "$file" 2>&1); then
            printf '%s\n' "$out" | grep -v '^INFO' >&2 || true
            fail "$name does not validate against Kubernetes $version"
        fi
        if printf '%s\n' "$out" | grep -F "Couldn't find schema" | grep -vqF "$NO_SCHEMA_OK"; then
            printf '%s\n' "$out" | grep -F "Couldn't find schema" >&2
            fail "$name: a kind without a schema for Kubernetes $version"
        fi
    done
}

passed=0
failed=0
ok() { passed=$((passed + 1)); say "ok: $*"; }

# 1. lint every values file.
for values in "$CHART/values.yaml" "${ENVS[@]/#/$CHART/values-}" "${EXTRA_VALUES[@]}"; do
    values=${values%.yaml}.yaml
    "$HELM" lint --strict "$CHART" -f "$values" >"$TMP/lint.log" 2>&1 || { cat "$TMP/lint.log" >&2; fail "helm lint --strict -f $values"; }
    ok "helm lint --strict -f $values"
done

# 2. broken values files are refused, for the reason they were broken.
bad=0
for values in helm/tests/bad-*.yaml; do
    expect=$(sed -n 's/^# expect: //p' "$values")
    [[ -n $expect ]] || fail "$values has no '# expect:' line"
    if "$HELM" lint --strict "$CHART" -f "$values" >"$TMP/lint.log" 2>&1; then
        fail "helm lint accepted $values"
    fi
    grep -qF -- "$expect" "$TMP/lint.log" || { cat "$TMP/lint.log" >&2; fail "helm lint refused $values, but not with: $expect"; }
    ok "helm lint refuses $values ($expect)"
    bad=$((bad + 1))
done
((bad >= 2)) || fail "expected at least two helm/tests/bad-*.yaml files"

# 3 and 4. render, validate, audit: each environment of the chart, each overlay.
for values in "${ENVS[@]/#/$CHART/values-}" "${EXTRA_VALUES[@]}"; do
    values=${values%.yaml}.yaml
    name=$(basename "$values" .yaml)
    for version in "${KUBE_VERSIONS[@]}"; do
        # --kube-version also checks Chart.yaml's kubeVersion accepts each supported version.
        "$HELM" template aimesh "$CHART" -n aimesh -f "$values" --kube-version "$version" \
            >"$TMP/helm-$name-$version.yaml" 2>"$TMP/err.log" || { cat "$TMP/err.log" >&2; fail "helm template -f $values ($version)"; }
    done
    file="$TMP/helm-$name-${KUBE_VERSIONS[0]}.yaml"
    validate "helm template -f $values" "$file"
    py audit "helm $name" <"$file" || fail "helm -f $values: audit"
    ok "helm -f $values: valid for Kubernetes ${KUBE_VERSIONS[*]}, hardened"
done
for overlay in "${OVERLAYS[@]}"; do
    file="$TMP/kustomize-$overlay.yaml"
    "$KUBECTL" kustomize "k8s/overlays/$overlay" >"$file" 2>"$TMP/err.log" || { cat "$TMP/err.log" >&2; fail "kubectl kustomize k8s/overlays/$overlay"; }
    validate "kubectl kustomize k8s/overlays/$overlay" "$file"
    py audit "kustomize $overlay" <"$file" || fail "kustomize $overlay: audit"
    ok "kustomize $overlay: valid for Kubernetes ${KUBE_VERSIONS[*]}, hardened"
done

# The audit itself refuses what it should.
if py audit "unhardened fixture" <helm/tests/unhardened-manifest.yaml >"$TMP/audit.log" 2>&1; then
    fail "the audit accepted helm/tests/unhardened-manifest.yaml"
fi
for problem in "runAsNonRoot is not true" "readOnlyRootFilesystem is not true" "capabilities.drop lacks ALL" \
    "seccompProfile is not RuntimeDefault" "allowPrivilegeEscalation is not false" "no livenessProbe" \
    "no readinessProbe" "no memory request and limit" "no PodDisruptionBudget"; do
    grep -qF -- "$problem" "$TMP/audit.log" || { cat "$TMP/audit.log" >&2; fail "the audit missed: $problem"; }
done
ok "the audit refuses helm/tests/unhardened-manifest.yaml for each missing piece"

# A settings change changes the pods' checksum annotation, so it rolls them.
checksums() { "$HELM" template aimesh "$CHART" "$@" | grep 'checksum/config' | sort; }
if [[ $(checksums) == "$(checksums --set config.log.filter=debug)" ]]; then
    fail "changing config.log.filter left every pod's checksum/config annotation as it was"
fi
ok "a settings change rolls the pods (checksum/config)"

# 5. generated files are up to date.
py readme --check || fail "$CHART/README.md"
ok "$CHART/README.md documents every value"
render_base >"$TMP/base.yaml"
if ! diff -u k8s/base/aimesh.yaml "$TMP/base.yaml" >"$TMP/base.diff"; then
    head -n 40 "$TMP/base.diff" >&2
    fail "k8s/base/aimesh.yaml differs from the chart's render; run scripts/k8s-check.sh --write-base"
fi
ok "k8s/base/aimesh.yaml is the chart's render"

# The closing line test runners print, so CI logs count these checks.
echo "k8s-check: $passed passed, $failed failed"
