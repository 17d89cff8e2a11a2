#!/usr/bin/env bash
# The README's run command: builds the sandbox image and the binary, then runs zcbot-sandbox with
# the docker backend. With no arguments it checks this host with `smoke`, keeps one demo sandbox
# warm, runs a command in it and shows the pool with `ps`; any arguments are passed to
# zcbot-sandbox instead
# (e.g. scripts/run.sh ps --json).
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

if [ $# -gt 0 ]; then
    exec "$bin" "$@"
fi
export ZCBOT_SANDBOX_BACKEND=${ZCBOT_SANDBOX_BACKEND:-docker}
"$bin" smoke
"$bin" ensure --user demo
"$bin" exec --user demo -- sh -c 'id; pwd; echo hello from the sandbox'
"$bin" ps
echo
echo "run.sh: user 'demo' has a warm sandbox. Try:"
echo "  ZCBOT_SANDBOX_BACKEND=docker ZCBOT_USERS_ROOT=$ZCBOT_USERS_ROOT ZCBOT_STATE_DIR=$ZCBOT_STATE_DIR \\"
echo "    $bin exec --user demo -- python3 -c 'print(6*7)'"
echo "  $bin ps    $bin rm --user demo    $bin rm --all"
