#!/usr/bin/env bash
# The README's test command: builds (or refreshes) the sandbox image, checks formatting and lints,
# then runs the whole suite against the real Docker Engine. Docker-backed tests fail, never skip,
# when the engine is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! docker info >/dev/null 2>&1; then
    echo "test.sh: Docker daemon not reachable (DOCKER_HOST=${DOCKER_HOST:-unix:///var/run/docker.sock})." >&2
    echo "test.sh: the integration tests need a real engine: start dockerd and run this again." >&2
    exit 1
fi

# The quota tests make their own btrfs file systems on loop devices (mkfs.btrfs, btrfs quota).
if ! command -v mkfs.btrfs >/dev/null 2>&1 || ! command -v btrfs >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        echo "test.sh: installing btrfs-progs (the quota tests make btrfs file systems)" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq btrfs-progs >/dev/null
    else
        echo "test.sh: btrfs-progs is missing: install it (apt-get install btrfs-progs) or run as root" >&2
        exit 1
    fi
fi

# tests/server.rs checks the /metrics exposition with promtool (Debian's prometheus package).
if ! command -v promtool >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        echo "test.sh: installing prometheus for promtool (the metrics exposition is checked with it)" >&2
        apt-get update -qq >/dev/null
        # Only promtool is wanted: leave out the recommended exporters.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    else
        echo "test.sh: promtool is missing: install it (apt-get install prometheus) or run as root" >&2
        exit 1
    fi
fi

scripts/build-image.sh

echo "test.sh: cargo fmt --check" >&2
cargo fmt --all -- --check
echo "test.sh: cargo clippy" >&2
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "test.sh: cargo test" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
# Every target but the benchmark (a harness=false bench would run in full here; clippy above
# still compiles it).
cargo test --workspace --lib --bins --tests --examples "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for a run (cargo prints one per test binary, examples last with 0).
summarize() { awk '/^test result:/ {p += $4; f += $6} END {printf "%d passed, %d failed", p, f}' "$1"; }
summary=$(summarize "$log")
if [ "$status" != 0 ]; then
    echo "tests: $summary"
    exit "$status"
fi

# The attack suite, the executor tests, Python sessions, live output and background jobs once
# more under gVisor (ZCBOT_SANDBOX_RUNTIME=runsc), when the engine has it registered (scripts/register-runsc.sh; .ci/run does it on CI's machine).
runsc_summary="not run"
if docker info --format '{{range $name, $_ := .Runtimes}}{{$name}} {{end}}' 2>/dev/null |
    tr ' ' '\n' | grep -qx runsc; then
    echo "test.sh: the attack suite, the executor, session, live-output and job tests under runsc (gVisor)" >&2
    runsc_log=$(mktemp)
    trap 'rm -f "$log" "$runsc_log"' EXIT
    set +e
    ZCBOT_SANDBOX_RUNTIME=runsc cargo test --test attacks --test exec --test sessions --test live "$@" 2>&1 | tee "$runsc_log"
    status=${PIPESTATUS[0]}
    set -e
    runsc_summary=$(summarize "$runsc_log")
    if [ "$status" != 0 ]; then
        echo "tests: $summary; under runsc: $runsc_summary"
        exit "$status"
    fi
else
    echo "test.sh: RUNSC IS NOT REGISTERED with this engine: the attack suite and the executor tests ran under runc only." >&2
    echo "test.sh: register it with: sudo scripts/register-runsc.sh (installs Debian's runsc, edits /etc/docker/daemon.json, reloads dockerd)" >&2
    if [ "${CI:-}" = true ]; then
        echo "tests: $summary; under runsc: not run (CI must run both runtimes)"
        exit 1
    fi
fi

# The attack suite once more in each other egress mode: `public` (a network with a way out) and
# `allowlist` (the internal network and the pool's egress proxy); the run above used `none`.
egress_summary=""
for mode in public allowlist; do
    echo "test.sh: the attack suite under ZCBOT_SANDBOX_EGRESS=$mode" >&2
    egress_log=$(mktemp)
    set +e
    ZCBOT_SANDBOX_EGRESS=$mode ZCBOT_EGRESS_ALLOW=$([ "$mode" = allowlist ] && echo example.org) \
        cargo test --test attacks "$@" 2>&1 | tee "$egress_log"
    status=${PIPESTATUS[0]}
    set -e
    egress_summary="$egress_summary; egress $mode: $(summarize "$egress_log")"
    rm -f "$egress_log"
    if [ "$status" != 0 ]; then
        echo "tests: $summary; under runsc: $runsc_summary$egress_summary"
        exit "$status"
    fi
done

# The tests written in Python (tests/python): the Python client against a real daemon, the API
# under schemathesis against its OpenAPI document, and the MCP endpoint through the official MCP
# client. scripts/test-python.sh installs the client and the pinned tools into target/python-venv.
echo "test.sh: the Python tests (client, OpenAPI fuzzer, MCP)" >&2
cargo build --quiet --bin zcbot-sandbox
py_log=$(mktemp)
trap 'rm -f "$log" "${runsc_log:-}" "$py_log"' EXIT
set +e
scripts/test-python.sh 2>&1 | tee "$py_log"
status=${PIPESTATUS[0]}
set -e
# pytest's last line: "=== 40 passed, 1 failed in 99.1s ===".
py_summary=$(grep -E '(passed|failed|error).* in [0-9.]+s' "$py_log" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ in [0-9.]*s.*$//')
if [ "$status" != 0 ]; then
    echo "tests: $summary; under runsc: $runsc_summary$egress_summary; Python: ${py_summary:-did not run}"
    exit "$status"
fi

# The tests clean up after themselves; say so loudly if any of their containers survived.
# Test pools have ids starting with 't', so their containers are named zcbot-sandbox-t<id>.<user>.
left=$(docker ps -a --filter label=io.zcbot.managed-by=zcbot-sandbox --format '{{.Names}}' |
    grep -E '^zcbot-sandbox-t[a-z0-9-]*\.' || true)
if [ -n "$left" ]; then
    echo "test.sh: test containers were left behind:" >&2
    echo "$left" >&2
    echo "tests: $summary; under runsc: $runsc_summary$egress_summary; Python: $py_summary; but containers were left behind"
    exit 1
fi
echo "tests: $summary; under runsc: $runsc_summary$egress_summary; Python: $py_summary"
