# Sourced by build-assets.sh and tests/node/build-node-assets.sh.

# use_go_cache CACHE: Go's module and build caches live under the test cache, so rebuilds are cached too.
use_go_cache() {
    export GOPATH="$1/go"
    export GOMODCACHE="$GOPATH/pkg/mod"
    export GOCACHE="$1/go/build-cache"
    export GOFLAGS="${GOFLAGS:-} -mod=mod -modcacherw"
    export CGO_ENABLED=0
    export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
}

# k8s.io/kubernetes is built
# through a wrapper module whose go.mod replaces each staging module (`=> ./staging/...`)
# by its v0.<minor>.<patch> release, since the module proxy serves no staging folders.

# write_k8s_wrapper_module DIR MODULE K8S_VERSION "mod=version ..."
#   The last argument overrides single replacements (releases the proxy does not serve).
write_k8s_wrapper_module() {
    local dir="$1" module="$2" version="$3" overrides="${4:-}" gomod staging mod target o
    mkdir -p "$dir"
    gomod=$(cd "$dir" && GOFLAGS=-modcacherw go mod download -json "k8s.io/kubernetes@v$version" \
        | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')
    [[ -s "$gomod" ]] || { echo "could not download k8s.io/kubernetes@v$version" >&2; return 1; }
    staging=$(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\1#p' "$gomod" | sort -u)
    [[ -n "$staging" ]] || { echo "no staging replace directives found in $gomod" >&2; return 1; }
    {
        echo "module $module"
        echo
        echo "go 1.22.0"
        echo
        echo "require k8s.io/kubernetes v$version"
        echo
        echo "replace ("
        for mod in $staging; do
            target="v0.${version#*.}"
            for o in $overrides; do
                [[ "${o%%=*}" == "$mod" ]] && target="${o#*=}"
            done
            echo "	$mod => $mod $target"
        done
        echo ")"
    } > "$dir/go.mod"
    echo "$(echo "$staging" | wc -l) staging modules replaced by v0.${version#*.} in $dir/go.mod" >&2
}

# build_k8s_commands DIR OUT K8S_VERSION NAME...: build k8s.io/kubernetes/cmd/NAME in the wrapper
# module at DIR into OUT/NAME (atomically), for each NAME not built yet. The caller defines `log`.
build_k8s_commands() {
    local dir="$1" out="$2" version="$3" b
    shift 3
    for b in "$@"; do
        [[ -x "$out/$b" ]] && continue
        log "building $b v$version (cold: minutes)"
        (cd "$dir" && go build -trimpath -ldflags "$(k8s_version_ldflags "$version")" \
            -o "$out/.$b.tmp" "k8s.io/kubernetes/cmd/$b")
        mv -f "$out/.$b.tmp" "$out/$b"
    done
}

# k8s_version_ldflags K8S_VERSION: what `kubectl version` and /version report.
k8s_version_ldflags() {
    local v="$1" f="-s -w"
    f+=" -X k8s.io/component-base/version.gitVersion=v$v"
    f+=" -X k8s.io/component-base/version.gitMajor=${v%%.*}"
    f+=" -X k8s.io/component-base/version.gitMinor=$(echo "$v" | cut -d. -f2)"
    f+=" -X k8s.io/component-base/version.gitTreeState=clean"
    f+=" -X k8s.io/client-go/pkg/version.gitVersion=v$v"
    printf '%s' "$f"
}
