#!/usr/bin/env bash
# Builds the Caddy binary the tests run against, from its Go module (no git, no container).
# Usage: build-caddy.sh OUTPUT_PATH [VERSION]. Does nothing if OUTPUT_PATH already runs and
# reports VERSION. A plain `go install` of cmd/caddy is enough (its go.mod has no replace
# directives); GOBIN is a temporary directory, the module and build caches are Go's own
# (GOMODCACHE, GOCACHE: under $HOME unless set), so nothing is written into the repo.
# Caddy finds its version only when built as a dependency (xcaddy's way); built as the main
# module it says "unknown", so the version is set through caddy.CustomVersion instead.
# About 1.5 minutes on 2 cores with empty Go caches, seconds with warm ones; the caller caches
# OUTPUT_PATH. Caddy v2.11.9 needs Go 1.26: go-toolchain.sh fetches it if the local go is older.
set -euo pipefail
me=${0##*/}
here=$(dirname "$(realpath -- "$0")")
if [[ $# -lt 1 || $# -gt 2 || -z $1 ]]; then
  echo "usage: $me OUTPUT_PATH [VERSION]" >&2
  exit 2
fi
out=$(realpath -m -- "$1")
version=${2:-v2.11.9}

if [[ -x $out ]] && got=$("$out" version 2>/dev/null) && [[ $got == "$version "* || $got == "$version" ]]; then
  echo "$me: $out is already Caddy $version"
  exit 0
fi
command -v go >/dev/null || { echo "$me: no 'go' on PATH (any version: go-toolchain.sh fetches Go 1.26 if it is older)" >&2; exit 1; }

export CGO_ENABLED=0 GOWORK=off
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"  # away from any go.mod or go.work of the caller's directory
# shellcheck source=go-toolchain.sh
source "$here/go-toolchain.sh"
use_go_for_module "github.com/caddyserver/caddy/v2@$version"
go_install_in "$work/bin" "github.com/caddyserver/caddy/v2/cmd/caddy@$version" \
  "-s -w -X github.com/caddyserver/caddy/v2.CustomVersion=$version"
put_binary "$work/bin/caddy" "$out"
echo "$me: built $out ($("$out" version)) in ${SECONDS}s"
