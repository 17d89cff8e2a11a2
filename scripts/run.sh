#!/usr/bin/env bash
# The README's run command: builds the sandbox image (only when missing or its sources changed)
# and the binary, then starts the daemon (`zcbot-sandbox serve`) with the docker backend in the
# foreground. It prints the address and a
# curl line to try; Ctrl-C (SIGINT) or SIGTERM stops it gracefully, keeping sandboxes warm.
# Any arguments are passed to zcbot-sandbox instead (e.g. scripts/run.sh smoke, scripts/run.sh ps).
set -euo pipefail
cd "$(dirname "$0")/.."

docker info >/dev/null 2>&1 || {
    echo "run.sh: Docker daemon not reachable (DOCKER_HOST=${DOCKER_HOST:-unix:///var/run/docker.sock}): is dockerd running?" >&2
    exit 1
}
echo "run.sh: checking the sandbox image ${ZCBOT_SANDBOX_IMAGE:-zcbot-sandbox:latest}; building it, when its sources changed, takes a minute or two" >&2
scripts/build-image.sh --if-changed
echo "run.sh: building zcbot-sandbox (cargo build --release; a few minutes the first time)" >&2
cargo build --release --quiet
bin=target/release/zcbot-sandbox

# Development defaults: folders under the repo instead of /var/lib (override with the variables).
export ZCBOT_USERS_ROOT=${ZCBOT_USERS_ROOT:-$PWD/.run/users}
export ZCBOT_STATE_DIR=${ZCBOT_STATE_DIR:-$PWD/.run/state}
export ZCBOT_SANDBOX_BACKEND=${ZCBOT_SANDBOX_BACKEND:-docker}

if [ $# -gt 0 ]; then
    exec "$bin" "$@"
fi
exec "$bin" serve
