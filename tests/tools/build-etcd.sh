#!/usr/bin/env bash
# Builds etcd, the store kube-apiserver needs, from the go.etcd.io/etcd/server/v3 Go module
# (no git, no container). Usage: build-etcd.sh OUTPUT_PATH [VERSION]. Under a minute of
# CPU once per machine; the caller caches OUTPUT_PATH.
# The server module's go.mod replaces its sibling modules with ../api, ../client/pkg,
# ../client/v3 and ../pkg, which its module zip lacks: the copy drops those replaces and
# requires the same modules at the same release from the Go module proxy.
set -euo pipefail
out=$(realpath -m -- "$1")
version=${2:-v3.7.3}
here=$(dirname "$(realpath -- "$0")")
export CGO_ENABLED=0
work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
cd "$work"  # away from any go.mod or go.work of the caller's directory
# shellcheck source=go-toolchain.sh
source "$here/go-toolchain.sh"
use_go_for_module "go.etcd.io/etcd/server/v3@$version"
go_module_source "go.etcd.io/etcd/server/v3@$version" "$work/src"
cd "$work/src"
args=()
while read -r name; do
  args+=("-dropreplace=$name" "-require=$name@$version")
done < <(go mod edit -json | python3 -c '
import json, sys
for r in json.load(sys.stdin).get("Replace") or []:
    if r["New"]["Path"].startswith("../"):
        print(r["Old"]["Path"])')
[ ${#args[@]} -eq 0 ] || go mod edit "${args[@]}"
mkdir -p "$(dirname "$out")"
GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" -o "$out.tmp" .
mv "$out.tmp" "$out"
echo "build-etcd.sh: built $out in ${SECONDS}s"
