#!/usr/bin/env bash
# Builds the Ory Kratos binary the tests run against, from its Go module (no git, no
# container). Usage: build-kratos.sh OUTPUT_PATH [VERSION]. Takes a few minutes once per
# machine; the caller caches OUTPUT_PATH. Facts behind the steps: shared/reference/kratos.md §8.
set -euo pipefail
out=$(realpath -m -- "$1")
version=${2:-v1.3.1}
here=$(dirname "$(realpath -- "$0")")
export CGO_ENABLED=1
export GONOSUMDB='github.com/ory/*'
work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
cd "$work"  # away from any go.mod or go.work of the caller's directory
# Kratos asks for Go 1.23.2; go-toolchain.sh fetches it if the local go is older.
# shellcheck source=go-toolchain.sh
source "$here/go-toolchain.sh"
use_go_for_module "github.com/ory/kratos@$version"
go_module_source "github.com/ory/kratos@$version" "$work/src"
cd "$work/src"
# go.mod replaces github.com/ory/client-go with ./internal/client-go, which the module zip
# lacks; the binary never imports it, so an empty module satisfies the replace.
mkdir -p internal/client-go
printf 'module github.com/ory/client-go\n\ngo 1.13\n' > internal/client-go/go.mod
mkdir -p "$(dirname "$out")"
go build -trimpath -tags sqlite,json1 \
  -ldflags "-s -w -checklinkname=0 -X github.com/ory/kratos/driver/config.Version=$version" \
  -o "$out.tmp" .
mv "$out.tmp" "$out"
echo "build-kratos.sh: built $out in ${SECONDS}s"
