#!/usr/bin/env bash
# The test command: installs what the suite needs, then runs it.
#   - Debian packages: redis-server, redis-tools, openssl, nginx (and Go + a C compiler
#     if missing)
#   - Python deps: a virtualenv in .venv with the package and its test extras
#   - Kratos: built once per machine from its Go module into ~/.cache (see tests/tools)
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k whoami`.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
# Sentinel and Cluster sets: redis-cli creates the cluster, openssl makes the TLS files.
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v openssl >/dev/null || missing+=(openssl)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v gcc >/dev/null || missing+=(gcc libc6-dev)
if ! command -v go >/dev/null; then
  missing+=(golang-go)
  # Debian's Go is older than Kratos needs; the Go module proxy serves the right toolchain.
  export GOTOOLCHAIN=go1.23.2
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

kratos_bin="${KRATOS_BIN:-$HOME/.cache/kratos-session-bridge/kratos-v1.3.1/kratos}"
if [ ! -x "$kratos_bin" ]; then
  echo "building Kratos v1.3.1 from its Go module (once per machine, a few minutes)"
  bash tests/tools/build-kratos.sh "$kratos_bin" v1.3.1
fi
export KRATOS_BIN="$kratos_bin"

.venv/bin/ruff check bridge tests bench compose
.venv/bin/python -m pytest "$@"
