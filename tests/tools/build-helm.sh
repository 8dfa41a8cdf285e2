#!/usr/bin/env bash
# Builds the Helm binary the chart tests run (helm lint, helm template), from its Go module
# (no git, no container). Usage: build-helm.sh OUTPUT_PATH [VERSION]. Does nothing if
# OUTPUT_PATH already runs and reports VERSION. A plain `go install` of cmd/helm (its go.mod has
# no replace directives); GOFLAGS=-mod=mod as issue 23 found needed; GOBIN is a temporary
# directory, the module and build caches are Go's own, so nothing is written into the repo.
# Built outside a git checkout, Helm would call itself "v4.3" (internal/version's default), so
# the version is set with the same -X flag as upstream's Makefile. The Kubernetes version Helm
# renders for (.Capabilities.KubeVersion) comes from the client-go in the build info, which
# go install records. A few minutes on 2 cores with empty Go caches; the caller caches
# OUTPUT_PATH. Helm v4.3.2 needs Go 1.26: go-toolchain.sh fetches it if the local go is older.
set -euo pipefail
me=${0##*/}
here=$(dirname "$(realpath -- "$0")")
if [[ $# -lt 1 || $# -gt 2 || -z $1 ]]; then
  echo "usage: $me OUTPUT_PATH [VERSION]" >&2
  exit 2
fi
out=$(realpath -m -- "$1")
version=${2:-v4.3.2}
module=helm.sh/helm/v4

if [[ -x $out ]] && got=$("$out" version --template '{{.Version}}' 2>/dev/null) &&
    [[ $got == "$version" ]]; then
  echo "$me: $out is already Helm $version"
  exit 0
fi
command -v go >/dev/null || { echo "$me: no 'go' on PATH (any version: go-toolchain.sh fetches Go 1.26 if it is older)" >&2; exit 1; }

export CGO_ENABLED=0 GOWORK=off GOFLAGS=-mod=mod
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"  # away from any go.mod or go.work of the caller's directory
# shellcheck source=go-toolchain.sh
source "$here/go-toolchain.sh"
use_go_for_module "$module@$version"
go_install_in "$work/bin" "$module/cmd/helm@$version" \
  "-s -w -X $module/internal/version.version=$version"
got=$("$work/bin/helm" version --template '{{.Version}}')
[[ $got == "$version" ]] || { echo "$me: the built helm says it is $got, not $version" >&2; exit 1; }
put_binary "$work/bin/helm" "$out"
echo "$me: built $out ($("$out" version --short)) in ${SECONDS}s"
