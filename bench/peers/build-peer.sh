#!/usr/bin/env bash
# Builds a peer system for the benchmark from its Go module: no git, no container.
# Usage: build-peer.sh heimdall|oathkeeper OUT_PATH [VERSION]. Does nothing if OUT_PATH exists.
# The binary is cached under ~/.cache/kratos-session-bridge/NAME-VERSION/NAME and copied to
# OUT_PATH. `go install ...@version` does not work for either (heimdall: the proxy refuses the
# module's version list; Oathkeeper: its go.mod has a replace directive), so the module is
# downloaded and built as the main module in a writable copy. First build: heimdall ~3 min,
# Oathkeeper ~1-2 min on 2 cores.
set -euo pipefail
name=$1
out=$2
case "$name" in
  heimdall)
    module=github.com/dadrus/heimdall version=${3:-v0.17.2} cgo=0 tags=
    version_var=github.com/dadrus/heimdall/version.Version ;;
  oathkeeper)
    # -checklinkname=0: old ory/x dependencies use go:linkname pulls newer linkers reject.
    module=github.com/ory/oathkeeper version=${3:-v0.40.9} cgo=1 tags=sqlite
    version_var=github.com/ory/oathkeeper/x.Version
    export GONOSUMDB='github.com/ory/*' ;;
  *) echo "usage: build-peer.sh heimdall|oathkeeper OUT_PATH [VERSION]" >&2; exit 2 ;;
esac
[[ -x "$out" ]] && { echo "exists $out"; exit 0; }
cache=${KSB_CACHE:-$HOME/.cache/kratos-session-bridge}/$name-$version/$name
if [[ ! -x "$cache" ]]; then
  export GOTOOLCHAIN=${GOTOOLCHAIN:-local} CGO_ENABLED=$cgo GOFLAGS="-mod=mod -buildvcs=false"
  work=$(mktemp -d)
  trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
  dir=$(go mod download -json "$module@$version" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  cp -r "$dir" "$work/src"
  chmod -R u+w "$work/src"
  cd "$work/src"
  mkdir -p "$(dirname "$cache")"
  go build -trimpath -tags "$tags" \
    -ldflags "-s -w -checklinkname=0 -X $version_var=$version" -o "$cache.tmp" .
  mv "$cache.tmp" "$cache"
  echo "built $cache"
fi
if [[ "$(realpath -m "$out")" != "$(realpath -m "$cache")" ]]; then
  mkdir -p "$(dirname "$out")"
  cp "$cache" "$out.tmp" && mv "$out.tmp" "$out"
fi
echo "ready $out"
