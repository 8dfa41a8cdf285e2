#!/usr/bin/env bash
# Builds the Traefik binary the tests run against, from its Go module (no git, no container).
# Usage: build-traefik.sh OUTPUT_PATH [VERSION]. Does nothing if OUTPUT_PATH already runs and
# reports VERSION. About 5.5 minutes on 2 cores with empty Go caches (~350 modules, 2.4 GB of
# module cache, 2.5 GB of build cache), seconds with warm ones; the caller caches OUTPUT_PATH.
# Traefik v3.6.12 needs Go 1.25: go-toolchain.sh fetches it if the local go is older.
#
# `go install github.com/traefik/traefik/v3/cmd/traefik@VERSION` is refused: Traefik's go.mod
# has replace directives, which go install does not allow. So a copy of the module's source
# (from the module cache, which stays read-only) is built as the main module, which applies them.
# cmd/traefik embeds webui/static (the dashboard, built with yarn in upstream releases); the
# module zip carries only a placeholder file there. That satisfies //go:embed, but with the
# API's dashboard on (api: {}), Traefik parses static/index.html at start and logs an ERR
# without it, so the copy gets a one-line index.html: the dashboard page is a stub, the API
# (/api/...) and everything else work as in a release build.
set -euo pipefail
me=${0##*/}
here=$(dirname "$(realpath -- "$0")")
if [[ $# -lt 1 || $# -gt 2 || -z $1 ]]; then
  echo "usage: $me OUTPUT_PATH [VERSION]" >&2
  exit 2
fi
out=$(realpath -m -- "$1")
version=${2:-v3.6.12}
module=github.com/traefik/traefik/v3

bare=${version#v}
if [[ -x $out ]] && got=$("$out" version 2>/dev/null) &&
    grep -Eq "^Version: +${bare//./\\.}\$" <<<"$got"; then
  echo "$me: $out is already Traefik $version"
  exit 0
fi
command -v go >/dev/null || { echo "$me: no 'go' on PATH (any version: go-toolchain.sh fetches Go 1.25 if it is older)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "$me: no 'python3' on PATH (reads go mod download's JSON)" >&2; exit 1; }

export CGO_ENABLED=0 GOWORK=off
work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
cd "$work"  # away from any go.mod or go.work of the caller's directory
# shellcheck source=go-toolchain.sh
source "$here/go-toolchain.sh"
use_go_for_module "$module@$version"

go_module_source "$module@$version" "$work/src"
cd "$work/src"

if [[ ! -f webui/static/index.html ]]; then
  mkdir -p webui/static
  echo '<!DOCTYPE html><title>Traefik</title><p>Dashboard not built (tests/tools/build-traefik.sh).' \
    > webui/static/index.html
fi

# Same -X flags as upstream's Makefile and goreleaser (whose Version has no leading v).
pkg=$module/pkg/version
if ! go build -trimpath -ldflags "-s -w -X $pkg.Version=$bare -X $pkg.Codename=cheddar \
    -X $pkg.BuildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)" -o "$work/traefik" ./cmd/traefik; then
  echo "$me: building $module@$version (./cmd/traefik) failed (see above)" >&2
  exit 1
fi
put_binary "$work/traefik" "$out"
"$out" version
echo "$me: built $out in ${SECONDS}s"
