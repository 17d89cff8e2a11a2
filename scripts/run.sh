#!/usr/bin/env bash
# The README's run command: builds the sandbox image and the binary, then runs zcbot-sandbox with
# the docker backend. With no arguments it checks this host with `smoke` and then keeps one demo
# sandbox warm, showing it with `ps`; any arguments are passed to zcbot-sandbox instead
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
"$bin" smoke
"$bin" ensure --user demo
"$bin" ps
echo
echo "run.sh: user 'demo' has a warm sandbox; try: $bin ps, $bin rm --user demo, $bin rm --all"
