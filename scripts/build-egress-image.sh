#!/usr/bin/env bash
# Builds the egress proxy's image (ZCBOT_EGRESS_IMAGE, default zcbot-egress:latest): the static
# proxy binary (crate egress/) in an otherwise empty image. scripts/build-image.sh runs it.
#
# --if-changed: do nothing when the image exists and was built from the same sources (its label
# io.zcbot.inputs records them).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
image=${ZCBOT_EGRESS_IMAGE:-zcbot-egress:latest}
say() { echo "build-egress-image: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

inputs=$(
    cd "$here"
    {
        cat scripts/build-egress-image.sh deploy/egress/Dockerfile Cargo.lock
        find egress -path egress/target -prune -o -type f \( -name '*.rs' -o -name Cargo.toml \) -print |
            LC_ALL=C sort | xargs cat
    } | sha256sum | cut -d' ' -f1
)
if [ "${1:-}" = --if-changed ] &&
    [ "$(docker image inspect -f '{{index .Config.Labels "io.zcbot.inputs"}}' "$image" 2>/dev/null || true)" = "$inputs" ]; then
    say "$image is up to date: not rebuilt"
    exit 0
fi

command -v cargo >/dev/null 2>&1 || die "cargo is needed to build the egress proxy (zcbot-egress)"
triple="$(uname -m)-unknown-linux-gnu"
say "building zcbot-egress (static, $triple)"
(cd "$here" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release \
    -p zcbot-egress --target "$triple" --target-dir target/egress)

context=$(mktemp -d /var/tmp/zcbot-egress-image.XXXXXX)
# shellcheck disable=SC2064
trap "rm -rf '$context'" EXIT
cp "$here/deploy/egress/Dockerfile" "$context/"
cp "$here/target/egress/$triple/release/zcbot-egress" "$context/zcbot-egress"
docker build -q --label "io.zcbot.inputs=$inputs" -t "$image" "$context" >/dev/null 2>"$context/log" || {
    grep -v 'legacy builder\|buildx\|^ \|^$' "$context/log" >&2 || true
    die "docker build failed"
}
say "built $image ($(($(docker image inspect -f '{{.Size}}' "$image") / 1024)) KiB)"
