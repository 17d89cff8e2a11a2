#!/usr/bin/env bash
# Registers gVisor's runsc with the local Docker Engine as the runtime "runsc" (what
# ZCBOT_SANDBOX_RUNTIME=runsc asks for), without restarting dockerd: it merges the runtime into
# /etc/docker/daemon.json and sends dockerd SIGHUP, which reloads the runtimes.
#
#   --platform=ptrace   the KVM platform hangs in VMs without nested virtualisation.
#   --network=host      gVisor's own network stack (netstack) fails here; "host" means the
#                       container's network namespace (Docker's, per container), so the pool's
#                       egress rules installed in that namespace from the host still apply.
#   --oci-seccomp       apply the container's seccomp profile inside gVisor too (runsc ignores
#                       it otherwise). Debian's runsc binds it to the container's first process
#                       only; every call's supervisor stacks the main refusals itself.
#
# Installs Debian's runsc package first when the binary is missing (as root). Idempotent.
# Environment: DOCKER_DAEMON_JSON (default /etc/docker/daemon.json), RUNSC (default: from PATH).
set -euo pipefail

say() { echo "register-runsc: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

conf=${DOCKER_DAEMON_JSON:-/etc/docker/daemon.json}
[ "$(id -u)" = 0 ] || die "must run as root (it edits $conf and signals dockerd)"

runsc=${RUNSC:-$(command -v runsc || true)}
if [ -z "$runsc" ]; then
    say "installing Debian's runsc package"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq runsc >/dev/null
    runsc=$(command -v runsc) || die "runsc is still missing after installing the package"
fi

mkdir -p "$(dirname "$conf")"
[ -s "$conf" ] || echo '{}' >"$conf"
changed=$(python3 - "$conf" "$runsc" <<'PY'
import json, os, sys
path, binary = sys.argv[1], sys.argv[2]
with open(path) as f:
    conf = json.load(f)
want = {"path": binary, "runtimeArgs": ["--platform=ptrace", "--network=host", "--oci-seccomp"]}
runtimes = conf.setdefault("runtimes", {})
if runtimes.get("runsc") == want:
    print("no")
else:
    runtimes["runsc"] = want
    tmp = path + ".zcbot-tmp"
    with open(tmp, "w") as f:
        json.dump(conf, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    print("yes")
PY
)

pid=$(pidof dockerd || true)
[ -n "$pid" ] || die "dockerd is not running; it reads $conf when it starts"
if [ "$changed" = yes ]; then
    say "registered runsc ($runsc) in $conf; reloading dockerd (SIGHUP)"
    kill -HUP $pid
fi
for _ in $(seq 1 50); do
    if docker info --format '{{range $name, $_ := .Runtimes}}{{$name}} {{end}}' 2>/dev/null |
        tr ' ' '\n' | grep -qx runsc; then
        say "runsc is registered with the engine"
        exit 0
    fi
    sleep 0.2
done
die "dockerd did not list runsc after the reload: see its log (journalctl -u docker) and $conf"
