#!/usr/bin/env bash
# Validate the deployment files without a container engine or a cluster (run by .ci/run and `make validate-deploy`):
#   1. yamllint: every YAML file of the repository (.yamllint)
#   2. deploy/compose.yaml against the Compose Specification JSON schema (vendored in check-jsonschema)
#   3. the kustomize base and each overlay rendered (`kubectl kustomize`, or `kustomize build`), every resource
#      validated against the Kubernetes OpenAPI schemas in strict mode (kubernetes-validate bundles them: offline)
#   4. the shell scripts parse (bash -n; shellcheck too when installed)
# Installs nothing: the tools come from requirements-dev.txt (kubectl is part of the machine image).
# Semantic checks of the same files (probes, replicas, NetworkPolicy reach, registry vs. StatefulSets, ...) are
# tests: tests/deploy/test_manifests.py.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${VENV_BIN:-.venv/bin}
[[ -x $BIN/yamllint ]] || BIN=$(dirname "$(command -v yamllint)")
# Kubernetes versions to validate against: the oldest minor we support and the newest the schemas know.
K8S_VERSIONS=${K8S_VERSIONS:-1.30.0 1.37.0}
OVERLAYS=(deploy/k8s/base deploy/k8s/overlays/dev deploy/k8s/overlays/gpu-production)

step() { printf '[validate-deploy] %s\n' "$*"; }
fail=0

step "yamllint (all YAML files)"
"$BIN/yamllint" --strict . || fail=1

step "compose: deploy/compose.yaml against the Compose Specification schema"
"$BIN/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml || fail=1

render() {
  if command -v kubectl >/dev/null; then
    kubectl kustomize "$1"
  elif command -v kustomize >/dev/null; then
    kustomize build "$1"
  else
    return 127
  fi
}

versions=()
for v in $K8S_VERSIONS; do versions+=(-k "$v"); done
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for dir in "${OVERLAYS[@]}"; do
  name=${dir##*/}
  if render "$dir" > "$out/$name.yaml" 2> "$out/$name.err"; then
    count=$(grep -c '^kind:' "$out/$name.yaml")
    step "kubernetes: $dir renders $count resources; validating against Kubernetes $K8S_VERSIONS (strict)"
    "$BIN/kubernetes-validate" --strict --quiet "${versions[@]}" "$out/$name.yaml" || fail=1
  elif [[ $? -eq 127 ]]; then
    # No kustomize here: validate the complete manifests of the base directly (patches are partial documents).
    step "kubernetes: no kubectl or kustomize to render $dir; validating the base's resource files one by one"
    for file in deploy/k8s/base/*.yaml; do
      [[ $(basename "$file") =~ ^(kustomization|registry)\.yaml$ ]] && continue
      "$BIN/kubernetes-validate" --strict --quiet "${versions[@]}" "$file" || fail=1
    done
    break
  else
    step "kubernetes: $dir does not render:"
    cat "$out/$name.err" >&2
    fail=1
  fi
done

step "shell scripts parse"
for script in deploy/entrypoint.sh scripts/serve.sh scripts/validate_deploy.sh; do
  bash -n "$script" || fail=1
done
if command -v shellcheck >/dev/null; then
  shellcheck deploy/entrypoint.sh scripts/serve.sh scripts/validate_deploy.sh || fail=1
fi

if ((fail)); then
  step "FAILED"
  exit 1
fi
step "all deployment files are valid"
