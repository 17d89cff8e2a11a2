#!/usr/bin/env bash
# The README's run command: builds the sandbox image and the binary, then starts the daemon
# (`zcbot-sandbox serve`) with the docker backend in the foreground. It prints the address and a
# curl line to try; Ctrl-C (SIGINT) or SIGTERM stops it gracefully, keeping sandboxes warm.
# Any arguments are passed to zcbot-sandbox instead (e.g. scripts/run.sh smoke, scripts/run.sh ps).
set -euo pipefail
cd "$(dirname "$0")/.."

docker info >/dev/null 2>&1 || {
    echo "run.sh: Docker daemon not reachable (DOCKER_HOST=${DOCKER_HOST:-unix:///var/run/docker.sock}): is dockerd running?" >&2
    exit 1
}
scripts/build-image.sh
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
