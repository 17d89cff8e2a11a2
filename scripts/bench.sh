#!/usr/bin/env bash
# The benchmark: builds the image, then runs benches/sandbox.rs, which prints every scenario next
# to its baseline (measured in the same run) and writes the figures as JSON under bench/results/.
# Sizes: ZCBOT_BENCH_EXEC_N (300), ZCBOT_BENCH_COLD_N (20), ZCBOT_BENCH_SCALE (200),
# ZCBOT_BENCH_RUNTIME_MEM_N (20). The runtime column (runc vs runsc) needs gVisor registered with
# the engine (scripts/register-runsc.sh, as root); without it that scenario says SKIPPED.
set -euo pipefail
cd "$(dirname "$0")/.."
docker info >/dev/null 2>&1 || {
    echo "bench.sh: Docker daemon not reachable: is dockerd running?" >&2
    exit 1
}
scripts/build-image.sh
docker info --format '{{json .Runtimes}}' | grep -q '"runsc"' ||
    echo "bench.sh: the engine has no runtime runsc: the runc vs runsc column will be SKIPPED (scripts/register-runsc.sh registers it)" >&2
mkdir -p bench/results
export ZCBOT_BENCH_JSON=${ZCBOT_BENCH_JSON:-$PWD/bench/results/$(date -u +%Y%m%dT%H%M%SZ).json}
exec cargo bench --quiet --bench sandbox
