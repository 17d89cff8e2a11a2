#!/usr/bin/env bash
# Builds the sandbox image (ZCBOT_SANDBOX_IMAGE, default zcbot-sandbox:latest).
#
# Base image: BASE_IMAGE (default python:3.11-slim) when it is present or can be pulled. Where no
# registry answers (air-gapped host), it makes a local Debian bookworm base once with
# `debootstrap --variant=minbase` + `docker import`, reuses it afterwards, and builds on that.
# It prints which base it used. Docker's layer cache keeps a rebuild cheap.
#
# Environment:
#   BASE_IMAGE            registry base to try first            (python:3.11-slim)
#   ZCBOT_LOCAL_BASE      tag of the local debootstrap base     (zcbot-sandbox-base:bookworm)
#   ZCBOT_SANDBOX_IMAGE   tag to build                          (zcbot-sandbox:latest)
#   ZCBOT_SANDBOX_UID     uid:gid of the sandbox user           (1000:1000)
#   ZCBOT_SANDBOX_REQUIREMENTS  the Python packages to install, a pip requirements file of wheels
#                         (deploy/sandbox/requirements.txt; an empty file: standard library only)
#   ZCBOT_BUILD_CA        CA bundle the image build trusts to reach the package index (the host's:
#                         $PIP_CERT, else $SSL_CERT_FILE, else /etc/ssl/certs/ca-certificates.crt)
#   DEBIAN_MIRROR         mirror for debootstrap                (debootstrap's default)
#   PULL_TIMEOUT          seconds to wait for a pull            (60)
#
# --if-changed: do nothing when the image exists and was built from the same inputs (this
# Dockerfile and entry, the supervisor's sources, the requirements, the uid, the CA bundle, this
# script) on the same base, which labels on the image record; scripts/run.sh starts with it, so a
# start neither rebuilds nor retags an image others may be using.
set -euo pipefail

if_changed=0
case "${1:-}" in
--if-changed) if_changed=1 ;;
"") ;;
*)
    echo "build-image: unknown argument '$1' (the only one is --if-changed)" >&2
    exit 2
    ;;
esac

here=$(cd "$(dirname "$0")/.." && pwd)
base_image=${BASE_IMAGE:-python:3.11-slim}
local_base=${ZCBOT_LOCAL_BASE:-zcbot-sandbox-base:bookworm}
image=${ZCBOT_SANDBOX_IMAGE:-zcbot-sandbox:latest}
uidgid=${ZCBOT_SANDBOX_UID:-1000:1000}
uid=${uidgid%%:*}
gid=${uidgid#*:}
[ "$gid" != "$uidgid" ] || gid=$uid

say() { echo "build-image: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

docker info >/dev/null 2>&1 || die "Docker daemon not reachable (DOCKER_HOST=${DOCKER_HOST:-unix:///var/run/docker.sock}): is dockerd running and may this user use it?"
[[ $uid =~ ^[0-9]+$ && $gid =~ ^[0-9]+$ && $uid -gt 0 ]] || die "ZCBOT_SANDBOX_UID must be UID:GID with a non-zero uid, got '$uidgid'"
requirements=${ZCBOT_SANDBOX_REQUIREMENTS:-$here/deploy/sandbox/requirements.txt}
[ -f "$requirements" ] && [ -r "$requirements" ] || die "ZCBOT_SANDBOX_REQUIREMENTS: cannot read '$requirements' (a pip requirements file)"
build_ca=${ZCBOT_BUILD_CA:-${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}}

# The egress proxy's image (allowlist mode) is built beside this one, each with its own check.
if [ "$if_changed" = 1 ]; then
    "$here/scripts/build-egress-image.sh" --if-changed
else
    "$here/scripts/build-egress-image.sh"
fi

# Everything the image is made of but its base, as one hash (the label io.zcbot.inputs).
inputs=$(
    cd "$here"
    {
        cat scripts/build-image.sh deploy/sandbox/Dockerfile deploy/sandbox/entry.sh Cargo.lock
        find supervisor -path supervisor/target -prune -o -type f \( -name '*.rs' -o -name Cargo.toml \) -print |
            LC_ALL=C sort | xargs cat
        cat "$requirements"
        echo "uid:gid $uid:$gid"
        if [ -f "$build_ca" ]; then cat "$build_ca"; fi
    } | sha256sum | cut -d' ' -f1
)
label() { docker image inspect -f "{{index .Config.Labels \"$2\"}}" "$1" 2>/dev/null || true; }
if [ "$if_changed" = 1 ] && docker image inspect "$image" >/dev/null 2>&1; then
    built_base=$(label "$image" io.zcbot.base)
    if [ "$(label "$image" io.zcbot.inputs)" = "$inputs" ] && [ -n "$built_base" ] &&
        [ "$(docker image inspect -f '{{.Id}}' "$built_base" 2>/dev/null)" = "$(label "$image" io.zcbot.base-id)" ]; then
        say "$image is up to date (same sources, same base $built_base): not rebuilt"
        exit 0
    fi
    say "$image was built from other sources or another base: rebuilding it"
fi

make_local_base() {
    say "making local base $local_base with debootstrap (once; reused afterwards)"
    if ! command -v debootstrap >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] || die "debootstrap is missing: install it (apt-get install debootstrap) or run as root"
        say "installing debootstrap"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    fi
    [ "$(id -u)" = 0 ] || die "debootstrap needs root to make the local base"
    local root
    root=$(mktemp -d /var/tmp/zcbot-base.XXXXXX)
    # shellcheck disable=SC2064
    trap "rm -rf '$root'" EXIT
    # Everything the Dockerfile needs is included here, so the image build needs no network.
    debootstrap --variant=minbase --include=python3,tini,iptables,procps \
        bookworm "$root" ${DEBIAN_MIRROR:+"$DEBIAN_MIRROR"} >"$root.log" 2>&1 ||
        {
            tail -n 20 "$root.log" >&2
            rm -f "$root.log"
            die "debootstrap failed (log above)"
        }
    rm -f "$root.log"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | docker import -c 'CMD ["/bin/sh"]' - "$local_base" >/dev/null
    rm -rf "$root"
    trap - EXIT
}

base=""
if docker image inspect "$base_image" >/dev/null 2>&1; then
    base=$base_image
elif timeout "${PULL_TIMEOUT:-60}" docker pull -q "$base_image" >/dev/null 2>&1; then
    base=$base_image
else
    say "cannot pull $base_image (no registry reachable?): using a local Debian base"
    docker image inspect "$local_base" >/dev/null 2>&1 || make_local_base
    base=$local_base
fi

# The per-call supervisor runs inside the container: a static binary, so it needs nothing from
# the base image's libc.
command -v cargo >/dev/null 2>&1 || die "cargo is needed to build the in-container supervisor (zcbot-supervise)"
triple="$(uname -m)-unknown-linux-gnu"
say "building zcbot-supervise (static, $triple)"
(cd "$here" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release \
    -p zcbot-supervise --target "$triple" --target-dir target/supervisor)

# The build context: the Dockerfile and entry from deploy/sandbox, the supervisor just built, and
# the requirements chosen; assembled apart so that nothing generated lands in the source tree.
context=$(mktemp -d /var/tmp/zcbot-image.XXXXXX)
# shellcheck disable=SC2064
trap "rm -rf '$context' '$context.log'" EXIT
cp "$here/deploy/sandbox/Dockerfile" "$here/deploy/sandbox/entry.sh" "$context/"
cp "$here/target/supervisor/$triple/release/zcbot-supervise" "$context/zcbot-supervise"
cp "$requirements" "$context/requirements.txt"
if [ -f "$build_ca" ]; then cp "$build_ca" "$context/build-ca.pem"; else : >"$context/build-ca.pem"; fi

say "building $image from base $base (sandbox uid:gid $uid:$gid; Python packages from $requirements)"
started=$(date +%s)
# Not -q: pip's progress goes to the log, shown when the build fails.
docker build \
    --build-arg "BASE_IMAGE=$base" \
    --build-arg "SANDBOX_UID=$uid" \
    --build-arg "SANDBOX_GID=$gid" \
    --label "io.zcbot.inputs=$inputs" \
    --label "io.zcbot.base=$base" \
    --label "io.zcbot.base-id=$(docker image inspect -f '{{.Id}}' "$base")" \
    -t "$image" "$context" >"$context.log" 2>&1 || {
    # Without the engine's notice that its legacy builder is deprecated: not why it failed.
    awk '/^DEPRECATED: The legacy builder/ { skip = 1; next } skip && /^ / { next } { skip = 0; print }' \
        "$context.log" | tail -n 40 >&2
    rm -f "$context.log"
    die "docker build failed (the end of its log is above)"
}
rm -f "$context.log"
say "built $image ($(docker image inspect -f '{{.Id}}' "$image"), $(($(docker image inspect -f '{{.Size}}' "$image") / 1048576)) MiB) from base $base in $(($(date +%s) - started)) s"
