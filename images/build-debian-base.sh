#!/usr/bin/env bash
# Build a Python base image for images/Dockerfile from Debian packages only, for
# machines that reach a Debian mirror but no container registry:
#
#   mmdebstrap --variant=minbase bookworm + python3 python3-venv python-is-python3
#       ca-certificates passwd (useradd, for the Dockerfile's runtime stage)
#   | docker import  ->  kubetrain/debian-python:3.11-bookworm (or TAG)
#
# apt sources: the Debian archives that the host's own apt configuration uses
# (`apt-get indextargets`), retargeted to bookworm; no mirror is named here.
# The host's locally added CA certificates (/usr/local/share/ca-certificates,
# Debian's place for them) are trusted in the image too, so that pip inside
# `docker build` works behind the same TLS-intercepting proxy as the host.
# Docs (but copyright files), man pages and locales are left out; mmdebstrap
# removes the apt lists and cache itself.
#
# Usage: images/build-debian-base.sh [TAG]   (root; DOCKER_HOST picks the engine)
# Progress goes to stderr.
set -euo pipefail

SUITE=bookworm
TAG="${1:-kubetrain/debian-python:3.11-$SUITE}"
PACKAGES=python3,python3-venv,python-is-python3,ca-certificates,passwd
LOCAL_CA_DIR=/usr/local/share/ca-certificates

log() { printf '[build-debian-base] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (mmdebstrap's root mode)"
if ! command -v mmdebstrap >/dev/null; then
    log "installing mmdebstrap"
    apt-get install -y --no-install-recommends mmdebstrap >&2
fi

# One `deb URI SUITE[-updates|-security] main` line per Debian archive the host uses.
# shellcheck disable=SC2016 # $(FIELD) is apt's format syntax
sources=$(apt-get indextargets --format '$(ORIGIN) $(REPO_URI) $(RELEASE)' 'Identifier: Packages' \
    | awk -v suite="$SUITE" '$1 == "Debian" { r = $3; sub(/^[^-]*/, "", r); print "deb " $2 " " suite r " main" }' \
    | sort -u)
[[ -n "$sources" ]] || die "the host's apt configuration names no Debian archive (or its lists are missing: apt-get update)"
log "apt sources:"$'\n'"$sources"

# merged-/usr the debootstrap way (usr-is-merged): the default pulls usrmerge and all of perl.
hooks=(--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr)
if compgen -G "$LOCAL_CA_DIR/*.crt" >/dev/null; then
    log "adding the host's local CA certificates from $LOCAL_CA_DIR"
    hooks+=(--customize-hook="cp $LOCAL_CA_DIR/*.crt \"\$1$LOCAL_CA_DIR/\" && chroot \"\$1\" update-ca-certificates >/dev/null")
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '%s\n' "$sources" | mmdebstrap --variant=minbase --mode=root --format=tar \
    --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    "${hooks[@]}" \
    "$SUITE" "$tmp/rootfs.tar" - >&2

docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    "$tmp/rootfs.tar" "$TAG" >&2
log "imported $TAG ($(du -h "$tmp/rootfs.tar" | cut -f1) rootfs)"
