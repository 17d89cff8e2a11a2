#!/usr/bin/env bash
# The tests written in Python (tests/python) against real daemons with the Docker backend: the
# Python client (clients/python), the API against its OpenAPI document (schemathesis), and the MCP
# endpoint through the official MCP client. Makes a venv (target/python-venv, reused), installs the
# client and the pinned test tools into it, and runs pytest with
# ZCBOT_SANDBOX_BIN=target/debug/zcbot-sandbox (build it first: cargo build). The tests start their
# own daemons on pools, networks and folders of their own, and remove them at the end. Extra
# arguments go to pytest (e.g. -k stream, -x, -v).
set -euo pipefail
cd "$(dirname "$0")/.."

bin="${ZCBOT_SANDBOX_BIN:-$PWD/target/debug/zcbot-sandbox}"
if [ ! -x "$bin" ]; then
    echo "test-python.sh: $bin is missing: run \`cargo build\` first (or set ZCBOT_SANDBOX_BIN)." >&2
    exit 1
fi
if ! docker info >/dev/null 2>&1; then
    echo "test-python.sh: Docker daemon not reachable (DOCKER_HOST=${DOCKER_HOST:-unix:///var/run/docker.sock})." >&2
    echo "test-python.sh: the tests need a real engine: start dockerd and run this again." >&2
    exit 1
fi
image="${ZCBOT_SANDBOX_IMAGE:-zcbot-sandbox:latest}"
if ! docker image inspect "$image" >/dev/null 2>&1; then
    echo "test-python.sh: image $image is missing: run scripts/build-image.sh first." >&2
    exit 1
fi

python="${PYTHON:-python3}"
venv=target/python-venv
mkdir -p target
# Runs side by side share the venv: one at a time makes or updates it.
exec 9>"$venv.lock"
flock 9
if [ ! -x "$venv/bin/python" ]; then
    echo "test-python.sh: making $venv" >&2
    "$python" -m venv "$venv"
fi
echo "test-python.sh: installing clients/python and the test tools into $venv" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check ./clients/python \
    -r tests/python/requirements.txt
flock -u 9
exec 9>&-

export ZCBOT_SANDBOX_BIN="$bin"
# -p no:cacheprovider: no .pytest_cache left in the source tree.
exec "$venv/bin/python" -m pytest -p no:cacheprovider tests/python "$@"
