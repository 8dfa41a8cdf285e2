#!/usr/bin/env bash
# Builds compose-config (tests/tools/compose-config/main.go): compose-spec's compose-go, the
# loader Docker Compose itself uses, behind a tiny main that prints a Compose file's
# normalized project as JSON. The rehearsal (tests/e2e/test_compose_rehearsal.py) reads the
# compose file through it, so what it starts is what `docker compose` would run.
# Usage: build-compose-config.sh OUTPUT_PATH [VERSION]. Seconds with warm Go caches, about a
# minute without; the caller caches OUTPUT_PATH (a VERSION file beside it says which).
set -euo pipefail
me=${0##*/}
out=$(realpath -m -- "$1")
version=${2:-v2.16.2}
here=$(dirname "$(realpath -- "$0")")
module=github.com/compose-spec/compose-go/v2
if [[ -x $out && $(cat "$out.version" 2>/dev/null) == "$version" ]]; then
  echo "$me: $out is already compose-go $version"
  exit 0
fi
export CGO_ENABLED=0 GOWORK=off
work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
cd "$work"  # away from any go.mod or go.work of the caller's directory
# shellcheck source=go-toolchain.sh
source "$here/go-toolchain.sh"
use_go_for_module "$module@$version"
cp "$here/compose-config/main.go" .
go mod init compose-config >/dev/null 2>&1
go mod edit -go="$(sed -nE 's/^go[[:space:]]+([0-9.]+).*/\1/p' "$(go mod download -json "$module@$version" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')" | head -n1)"
go get "$module@$version"
go mod tidy
mkdir -p "$(dirname "$out")"
go build -trimpath -ldflags "-s -w" -o "$out.tmp" .
mv "$out.tmp" "$out"
echo "$version" > "$out.version"
echo "$me: built $out (compose-go $version) in ${SECONDS}s"
