#!/usr/bin/env bash
# Builds kube-apiserver, the Kubernetes API server the chart's manifests are checked by
# (server-side dry-run), from the k8s.io/kubernetes Go module (no git, no container).
# Usage: build-kube-apiserver.sh OUTPUT_PATH [VERSION]. About 11 min of CPU once per
# machine; the caller caches OUTPUT_PATH.
# The module zip has no staging/ folder, yet its go.mod replaces each k8s.io/<name> with
# ./staging/src/k8s.io/<name> (and go.work names them too): the copy drops go.work and
# each such replace and requires k8s.io/<name> at the matching v0.X.Y release instead,
# which is the same source published as its own module.
set -euo pipefail
out=$(realpath -m -- "$1")
version=${2:-v1.37.2}
staging_version=v0.${version#v1.}  # v1.37.2 -> v0.37.2
here=$(dirname "$(realpath -- "$0")")
export CGO_ENABLED=0
work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
cd "$work"  # away from any go.mod or go.work of the caller's directory
# shellcheck source=go-toolchain.sh
source "$here/go-toolchain.sh"
use_go_for_module "k8s.io/kubernetes@$version"
go_module_source "k8s.io/kubernetes@$version" "$work/src"
cd "$work/src"
rm -f go.work go.work.sum
args=()
while read -r name; do
  args+=("-dropreplace=$name" "-require=$name@$staging_version")
done < <(go mod edit -json | python3 -c '
import json, sys
for r in json.load(sys.stdin).get("Replace") or []:
    if r["New"]["Path"].startswith("./staging/"):
        print(r["Old"]["Path"])')
[ ${#args[@]} -gt 0 ] || { echo "build-kube-apiserver.sh: no ./staging replaces in go.mod" >&2; exit 1; }
go mod edit "${args[@]}"
mkdir -p "$(dirname "$out")"
minor=${version#v1.}; minor=${minor%%.*}
GOFLAGS=-mod=mod go build -trimpath -o "$out.tmp" -ldflags "-s -w \
  -X k8s.io/component-base/version.gitVersion=$version \
  -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
  -X k8s.io/component-base/version.gitTreeState=clean" ./cmd/kube-apiserver
mv "$out.tmp" "$out"
echo "build-kube-apiserver.sh: built $out in ${SECONDS}s"
