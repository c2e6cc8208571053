#!/usr/bin/env bash
# The deployment checks, as .ci/run runs them (alone: bash .ci/k8s.sh):
#   1. render with `kubectl kustomize`: the base (deploy/k8s), the example overlay
#      (deploy/overlays/example), and the example overlay with each optional component
#      (deploy/k8s/components/*) added;
#   2. validate every render offline against the Kubernetes JSON schemas (kubernetes-validate,
#      strict: unknown fields fail) for Kubernetes $K8S_VERSION;
#   3. check what the deployment promises (.ci/check_manifests.py: no ports, the exec probes,
#      restricted security, secrets as files, selectors, stop budget, KEDA behaviour, ...);
#   4. scan every render and deploy/Dockerfile with checkov, as a platform team's admission scan
#      does; any finding fails. Deliberate exceptions are suppressed in place, each with its
#      reason (checkov.io/skipN annotations, `# checkov:skip=` comments).
# Needs kubectl (with kustomize) and the Python venv of .ci/pyenv.sh (made on first use).
# Renders are kept in $GMAIL_SYNC_K8S_OUT (default: a temporary directory, removed at exit).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
log() { printf 'k8s: %s\n' "$*"; }
die() { printf 'k8s: ERROR: %s\n' "$*" >&2; exit 1; }

# GKE's release channels carry 1.33 and newer at the time of writing; the manifests use nothing
# newer than 1.31 (PDB unhealthyPodEvictionPolicy is GA there).
K8S_VERSION=${K8S_VERSION:-1.33.0}

kubectl=${KUBECTL_BIN:-$(command -v kubectl || true)}
[[ -n $kubectl && -x $kubectl ]] ||
  die "kubectl not found (it renders the manifests with its built-in kustomize): install it (Google Cloud SDK apt repository: apt-get install -y kubectl; or https://kubernetes.io/docs/tasks/tools/) or set KUBECTL_BIN"
venv=$(bash .ci/pyenv.sh)

if [[ -n ${GMAIL_SYNC_K8S_OUT:-} ]]; then
  out=$GMAIL_SYNC_K8S_OUT
  mkdir -p "$out"
else
  out=$(mktemp -d "${TMPDIR:-/tmp}/gmail-sync-k8s.XXXXXX")
  trap 'rm -rf -- "$out"' EXIT
fi

# --- 1. render -------------------------------------------------------------------------------
renders=()
render() { # NAME DIR
  local name=$1 dir=$2
  "$kubectl" kustomize "$dir" >"$out/$name.yaml" || die "kubectl kustomize $dir failed"
  renders+=("$out/$name.yaml")
  log "rendered $name ($(grep -c '^kind:' "$out/$name.yaml") objects)"
}
render base deploy/k8s
render example deploy/overlays/example
# Each component on top of the example overlay, from a throwaway kustomization (kustomize wants
# relative paths to other kustomizations).
for comp in deploy/k8s/components/*/; do
  comp=${comp%/}
  name=example+$(basename "$comp")
  dir=$out/kustomize-$name
  mkdir -p "$dir"
  rel() { realpath --relative-to="$dir" "$root/$1"; }
  cat >"$dir/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $(rel deploy/overlays/example)
components:
  - $(rel "$comp")
EOF
  render "$name" "$dir"
done

# --- 2. schemas ------------------------------------------------------------------------------
# kubernetes-validate bundles the schemas of the built-in APIs only. KEDA's ScaledObject and
# TriggerAuthentication (keda.sh) are custom resources whose schema ships with KEDA's CRDs, which
# cannot be fetched here; they are left out of this step (kubernetes-validate would only warn
# about them) and checked by check_manifests.py instead (target, minimum, HPA behavior), and by
# the API server when applied (`kubectl apply --dry-run=server` against a cluster with KEDA).
"$venv/bin/python" - "$out" "${renders[@]}" <<'EOF'
import sys, yaml
from pathlib import Path
out = Path(sys.argv[1])
for f in map(Path, sys.argv[2:]):
    docs = [d for d in yaml.safe_load_all(f.read_text()) if d]
    core = [d for d in docs if not str(d.get("apiVersion", "")).startswith("keda.sh/")]
    (out / "schema" / f.name).parent.mkdir(exist_ok=True)
    (out / "schema" / f.name).write_text(yaml.safe_dump_all(core, sort_keys=False))
EOF
schema_files=()
for r in "${renders[@]}"; do schema_files+=("$out/schema/$(basename "$r")"); done
"$venv/bin/kubernetes-validate" --kubernetes-version "$K8S_VERSION" --strict --quiet "${schema_files[@]}" ||
  die "the rendered manifests do not validate against the Kubernetes $K8S_VERSION schemas (above)"
log "schemas: every built-in object of ${#renders[@]} renders valid for Kubernetes $K8S_VERSION (strict)"

# --- 3. what the deployment promises ---------------------------------------------------------
"$venv/bin/python" .ci/check_manifests.py README.md "${renders[@]}" ||
  die "the rendered manifests break the deployment's rules (above)"
# ... and the checks catch what they are for: each breakage alone fails them.
"$venv/bin/python" .ci/check_manifests.py README.md --self-test "$out/example.yaml" ||
  die "check_manifests.py's self-test failed"

# --- 4. checkov ------------------------------------------------------------------------------
# Offline: --skip-download (no policy download, no Prismacloud calls); the findings are
# checkov's own, bundled checks. --compact --quiet prints only failures (and the totals).
ckv_args=(--skip-download --compact --quiet --framework kubernetes dockerfile -f deploy/Dockerfile)
for r in "${renders[@]}"; do ckv_args+=(-f "$r"); done
if ! "$venv/bin/checkov" "${ckv_args[@]}" >"$out/checkov.txt" 2>&1; then
  cat "$out/checkov.txt" >&2
  die "checkov reports findings (above): fix them, or suppress a deliberate exception in place with its reason"
fi
grep -E 'scan results|Passed checks' "$out/checkov.txt" | paste -sd' ' | sed 's/^/k8s: checkov: /'
log "ok"
