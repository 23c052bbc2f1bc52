#!/usr/bin/env bash
# Build the trainer image of the node test tier from images/Dockerfile itself,
# on a Python base made from Debian packages (images/build-debian-base.sh: no
# container registry is needed), and save it as a tarball that containerd
# imports (`ctr -n k8s.io images import FILE`):
#   image kubetrain/trainer:test-<key12>  ->  $KUBETRAIN_CACHE/images/trainer-<key12>.tar
# key = sha256 over every file that goes into the image (Dockerfile, locks,
# package sources, chart, base script). A cache hit returns at once, without docker.
# (The pod sandbox image comes from tests/node/build-node-assets.sh.)
# KUBETRAIN_ASSETS_NO_BUILD=1: report a cache hit, never build.
#
# Docker is a private dockerd, started here and stopped on exit (failure too):
# data root $KUBETRAIN_CACHE/docker (it keeps the layer cache, so a code-only
# change rebuilds only the top layer), exec root, pidfile and socket in a temp
# folder; no bridge, no iptables, builds use --network host, so the host's
# network is untouched. It runs in a private mount namespace where
# /run/containerd and /etc/docker are empty tmpfs: it starts its own managed
# containerd instead of using a system one, reads no host daemon.json, and
# every mount it makes goes away with it. After a build, older tarballs, tags
# and stale stage images are removed: about 6 GB stay in the data root, plus
# the 6 GB tarball (torch from PyPI brings its CUDA wheels).
#
# Needs root, dockerd and runc (docker.io), util-linux's unshare, and the
# Debian and PyPI package archives. Progress goes to stderr; stdout carries only
# `export NAME=value` lines: KUBETRAIN_TRAINER_IMAGE, KUBETRAIN_TRAINER_IMAGE_TAR.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${KUBETRAIN_CACHE:-$HOME/.cache/kubetrain}"
IMAGES="$CACHE/images"
DATA_ROOT="$CACHE/docker"
BASE_IMAGE=kubetrain/debian-python:3.11-bookworm
INPUTS=(.dockerignore images/Dockerfile images/requirements-cpu.txt images/requirements-cuda.txt
        images/constraints-build.txt images/build-debian-base.sh pyproject.toml README.md trainer helm/kubetrain)

log() { printf '[build-image] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s; }

KEY=$(cd "$REPO" && find "${INPUTS[@]}" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' ! -path '*/.pytest_cache/*' -print0 \
    | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)
IMAGE="kubetrain/trainer:test-$KEY"
TAR="$IMAGES/trainer-$KEY.tar"

emit() {
    printf 'export KUBETRAIN_TRAINER_IMAGE=%q\n' "$IMAGE"
    printf 'export KUBETRAIN_TRAINER_IMAGE_TAR=%q\n' "$TAR"
}
complete() { [[ -s "$TAR" ]]; }

if complete; then
    log "cache hit: $TAR"
    emit
    exit 0
fi
if [[ "${KUBETRAIN_ASSETS_NO_BUILD:-0}" == "1" ]]; then
    log "no image $TAR and KUBETRAIN_ASSETS_NO_BUILD=1: not building"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || die "root is needed to run dockerd"
for cmd in dockerd docker runc unshare; do
    command -v "$cmd" >/dev/null || die "$cmd not found (Debian packages docker.io, runc, util-linux)"
done

mkdir -p "$IMAGES" "$DATA_ROOT"
# One builder at a time per cache (a second caller waits, then takes the cache hit).
exec 9>"$IMAGES/.lock"
flock 9
if complete; then
    log "cache hit: $TAR"
    emit
    exit 0
fi

# ---------------------------------------------------------------- private dockerd
RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/kubetrain-dockerd.XXXXXX")
export DOCKER_HOST="unix://$RUN_DIR/docker.sock" DOCKER_CONFIG="$RUN_DIR/client" DOCKER_BUILDKIT=0
DOCKERD_PID=""

stop_dockerd() {
    local p pids=() mnt
    if [[ -n "$DOCKERD_PID" ]]; then
        kill -TERM "$DOCKERD_PID" 2>/dev/null || true
        for _ in $(seq 1 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$DOCKERD_PID" 2>/dev/null || true
        wait "$DOCKERD_PID" 2>/dev/null || true
        DOCKERD_PID=""
    fi
    # Leftovers of ours: processes (containerd, shims) whose command line names the run folder.
    for p in /proc/[0-9]*; do
        grep -qaF "$RUN_DIR" "$p/cmdline" 2>/dev/null && pids+=("${p#/proc/}")
    done
    if [[ ${#pids[@]} -gt 0 ]]; then
        log "killing leftover processes: ${pids[*]}"
        kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
    # Mounts live in dockerd's namespace and end with it; unmount any that leaked here.
    while read -r mnt; do
        log "unmounting leftover $mnt"
        umount -l "$mnt" || true
    done < <(awk -v a="$DATA_ROOT" -v b="$RUN_DIR" 'index($2, a) == 1 || index($2, b) == 1 { print $2 }' /proc/mounts | sort -r)
    rm -rf "$RUN_DIR"
}
trap stop_dockerd EXIT
trap 'exit 130' INT TERM

log "starting a private dockerd (data root $DATA_ROOT)"
echo '{}' > "$RUN_DIR/daemon.json"
# shellcheck disable=SC2016 # $@ expands in the inner shell
unshare --mount --propagation private sh -c \
    'mkdir -p /run/containerd /etc/docker && mount -t tmpfs -o mode=0711 tmpfs /run/containerd \
     && mount -t tmpfs -o mode=0755 tmpfs /etc/docker && exec "$@"' sh \
    dockerd --data-root "$DATA_ROOT" --exec-root "$RUN_DIR/exec" --pidfile "$RUN_DIR/dockerd.pid" \
        -H "$DOCKER_HOST" --config-file "$RUN_DIR/daemon.json" --log-level warn \
        --bridge=none --iptables=false --ip6tables=false --ip-masq=false \
    >"$RUN_DIR/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 1 120); do
    docker version >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -20 "$RUN_DIR/dockerd.log" >&2; die "dockerd exited"; }
    sleep 0.5
done
docker version >/dev/null 2>&1 || { tail -20 "$RUN_DIR/dockerd.log" >&2; die "dockerd did not answer in 60s"; }

# ---------------------------------------------------------------- trainer image
if [[ ! -s "$TAR" ]]; then
    t0=$(now)
    if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "building the Debian base $BASE_IMAGE"
        "$REPO/images/build-debian-base.sh" "$BASE_IMAGE"
    fi
    t_base=$(( $(now) - t0 ))
    log "building $IMAGE from images/Dockerfile (cold: many minutes; torch and its CUDA wheels come from PyPI)"
    docker build --network host -f "$REPO/images/Dockerfile" --build-arg PYTHON_IMAGE="$BASE_IMAGE" \
        -t "$IMAGE" "$REPO" >&2
    t_build=$(( $(now) - t0 - t_base ))
    log "smoke test: --help and the task imports, as uid 1000 on a read-only root"
    docker run --rm --network none --user 1000:1000 --read-only --tmpfs /tmp "$IMAGE" --help >/dev/null
    docker run --rm --network none --user 1000:1000 --read-only --tmpfs /tmp --entrypoint python "$IMAGE" \
        -c 'import transformers, tokenizers, safetensors, datasets, torch, trainer' >&2
    t1=$(now)
    t_smoke=$(( t1 - t0 - t_base - t_build ))
    docker save -o "$TAR.tmp" "$IMAGE"
    chmod 644 "$TAR.tmp"
    mv -f "$TAR.tmp" "$TAR"
    t_save=$(( $(now) - t1 ))
    log "timings: base ${t_base}s, build ${t_build}s, smoke test ${t_smoke}s, save ${t_save}s"
    log "size: image $(docker image inspect -f '{{.Size}}' "$IMAGE" | numfmt --to=iec), tarball $(du -h "$TAR" | cut -f1)"
    # Older keys go: their tarballs, their tags, and the leftover stage images of
    # older builds (dangling); the layers of the current image stay cached.
    find "$IMAGES" -maxdepth 1 -name 'trainer-*.tar' ! -name "trainer-$KEY.tar" -print -delete >&2
    docker images --format '{{.Repository}}:{{.Tag}}' kubetrain/trainer | grep -vxF "$IMAGE" \
        | xargs -r docker rmi >&2 || true
    docker image prune -f >&2
fi

stop_dockerd
trap - EXIT
log "image ready: $IMAGE ($TAR)"
emit
