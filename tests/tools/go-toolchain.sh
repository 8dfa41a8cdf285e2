# Sourced by the build-*.sh scripts: picks a Go toolchain new enough for the module they build.
#   use_go_for_module MODULE@VERSION
# fetches the module's go.mod (go mod download, with the local go: a go of 1.21 or later
# refuses the module itself when it is too old, but still fetches and names its go.mod),
# reads its `go` line (the least it builds with) and `toolchain` line (what it asks
# for; the `go` line when absent), then exports GOTOOLCHAIN and, if needed, PATH:
#   - GOTOOLCHAIN=goX.Y.Z set by the caller and at least the `go` line: kept as it is;
#   - else the `go` on PATH if at least the `go` line (GOTOOLCHAIN=local): a machine with a
#     current Go builds with it, nothing downloaded;
#   - else, with a go of 1.21 or later (which switches toolchains itself): GOTOOLCHAIN=go<ask>,
#     which that go downloads once from the Go module proxy into the module cache;
#   - else (Debian 12's golang-go is Go 1.19, which knows no GOTOOLCHAIN): the same toolchain
#     module fetched with `go mod download` and put first on PATH. It lands where a newer go
#     would put it, so it is shared with the case above.
# Then, for the build itself:
#   go_module_source MODULE@VERSION DEST
# puts a writable copy of the module's source (its zip, as the Go module proxy serves it) at
# DEST, for builds that edit its go.mod or add files; and
#   go_install_in DIR PACKAGE@VERSION LDFLAGS
# runs `go install -trimpath` of a command with GOBIN=DIR. Each says which module failed.
#   put_binary BUILT OUT
# puts a built binary at OUT: a copy beside it first, then a rename, so OUT is never half
# written.
# Needs python3 (reads go mod download's JSON).

_go_semver() {  # "go1.26.8", "1.26", "go1.22rc1" -> "1.26.8", "1.26.0", "1.22.0"
  local v
  v=$(sed -nE 's/^(go)?([0-9]+\.[0-9]+)(\.[0-9]+)?.*/\2\3/p' <<<"$1")
  [[ $v == *.*.* ]] || v=$v.0
  echo "$v"
}

_go_at_least() {  # A >= B, both X.Y.Z
  [[ $(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1) == "$2" ]]
}

_go_download_field() {  # FIELD MODULE@VERSION: go mod download's FIELD, even if it failed
  local info
  info=$(GOTOOLCHAIN=local go mod download -json "$2" 2>/dev/null) || true
  python3 -c 'import json,sys; print(json.loads(sys.stdin.read() or "{}").get(sys.argv[1], ""))' \
    "$1" <<<"$info"
}

use_go_for_module() {
  local gomod need ask local_version dir
  gomod=$(_go_download_field GoMod "$1")
  [[ -n $gomod && -f $gomod ]] || {
    echo "go-toolchain.sh: could not fetch the go.mod of $1 from the Go module proxy:" \
      "$(GOTOOLCHAIN=local go mod download -json "$1" 2>&1)" >&2
    return 1
  }
  need=$(sed -nE 's/^go[[:space:]]+([0-9][^[:space:]]*).*/\1/p' "$gomod" | head -n1)
  ask=$(sed -nE 's/^toolchain[[:space:]]+go([0-9][^[:space:]]*).*/\1/p' "$gomod" | head -n1)
  [[ -n $need ]] || { echo "go-toolchain.sh: no go line in $gomod" >&2; return 1; }
  need=$(_go_semver "$need")
  ask=$(_go_semver "${ask:-$need}")
  _go_at_least "$ask" "$need" || ask=$need
  local_version=$(GOTOOLCHAIN=local go env GOVERSION) || return 1
  local_version=$(_go_semver "$local_version")

  if [[ ${GOTOOLCHAIN:-} =~ ^go[0-9]+\.[0-9]+(\.[0-9]+)?$ ]] &&
      _go_at_least "$local_version" 1.21.0 &&
      _go_at_least "$(_go_semver "$GOTOOLCHAIN")" "$need"; then
    echo "go-toolchain.sh: $GOTOOLCHAIN as set (needs go$need)"
  elif _go_at_least "$local_version" "$need"; then
    export GOTOOLCHAIN=local
    echo "go-toolchain.sh: the local go$local_version (needs go$need)"
  elif _go_at_least "$local_version" 1.21.0; then
    export GOTOOLCHAIN=go$ask
    echo "go-toolchain.sh: go$ask from the Go module proxy (needs go$need, local go$local_version)"
  else
    local toolchain="golang.org/toolchain@v0.0.1-go$ask.$(go env GOOS)-$(go env GOARCH)"
    dir=$(_go_download_field Dir "$toolchain")
    [[ -n $dir && -f $dir/bin/go ]] || {
      echo "go-toolchain.sh: could not fetch $toolchain from the Go module proxy:" \
        "$(go mod download -json "$toolchain" 2>&1)" >&2
      return 1
    }
    # Module zips carry no file modes; a newer go sets these bits itself on first use.
    chmod u+x "$dir"/bin/* "$dir"/pkg/tool/*/*
    export PATH="$dir/bin:$PATH" GOTOOLCHAIN=local
    unset GOROOT
    echo "go-toolchain.sh: go$ask from the Go module proxy, at $dir (needs go$need;" \
      "the local go$local_version predates GOTOOLCHAIN)"
  fi
}

go_module_source() {
  local info dir
  info=$(go mod download -json "$1") || true
  dir=$(python3 -c 'import json,sys; print(json.loads(sys.stdin.read() or "{}").get("Dir", ""))' \
    <<<"$info" 2>/dev/null) || dir=
  [[ -n $dir && -d $dir ]] || {
    echo "go-toolchain.sh: 'go mod download $1' gave no source: $info" >&2
    return 1
  }
  cp -r "$dir" "$2"
  chmod -R u+w "$2"
}

go_install_in() {
  GOBIN="$1" go install -trimpath -ldflags "$3" "$2" || {
    echo "go-toolchain.sh: 'go install $2' failed (see above); is that version on the Go" \
      "module proxy?" >&2
    return 1
  }
}

put_binary() {
  mkdir -p "$(dirname "$2")"
  cp "$1" "$2.tmp"
  mv "$2.tmp" "$2"
}
