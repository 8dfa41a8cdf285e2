#!/usr/bin/env bash
# Builds ghz, the gRPC load generator bench/peers.py drives the bridge's Envoy gRPC check
# with, from its Go module (no git, no container). Usage: build-ghz.sh OUTPUT_PATH [VERSION].
# Does nothing if OUTPUT_PATH already runs and reports VERSION. A plain `go install` of
# cmd/ghz (its go.mod has no replace directives); GOBIN is a temporary directory, the module
# and build caches are Go's own, so nothing is written into the repo. The version is set
# through main.version, as ghz's own release builds set it. Only the benchmark needs it.
set -euo pipefail
me=${0##*/}
here=$(dirname "$(realpath -- "$0")")
if [[ $# -lt 1 || $# -gt 2 || -z $1 ]]; then
  echo "usage: $me OUTPUT_PATH [VERSION]" >&2
  exit 2
fi
out=$(realpath -m -- "$1")
version=${2:-v0.120.0}

if [[ -x $out ]] && got=$("$out" --version 2>&1) && [[ $got == "${version#v}" || $got == "$version" ]]; then
  echo "$me: $out is already ghz $version"
  exit 0
fi
command -v go >/dev/null || { echo "$me: no 'go' on PATH" >&2; exit 1; }

export CGO_ENABLED=0 GOWORK=off
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"  # away from any go.mod or go.work of the caller's directory
# shellcheck source=../../tests/tools/go-toolchain.sh
source "$here/../../tests/tools/go-toolchain.sh"
use_go_for_module "github.com/bojand/ghz@$version"
go_install_in "$work/bin" "github.com/bojand/ghz/cmd/ghz@$version" \
  "-s -w -X main.version=${version#v}"
put_binary "$work/bin/ghz" "$out"
echo "$me: built $out ($("$out" --version 2>&1)) in ${SECONDS}s"
