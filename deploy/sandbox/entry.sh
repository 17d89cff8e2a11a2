#!/bin/sh
# zcbot-entry: the sandbox container's entry, run by tini as root with only NET_ADMIN.
#
# It installs the egress rules for IPv4 and IPv6 while it still holds NET_ADMIN, verifies them,
# prints one "ready" line that the pool waits for, then idles until the pool removes the container.
# Any rule that fails ends the container with a non-zero status: a sandbox never runs with fewer
# rules than it was asked for.
#
# Arguments (all from the pool's container spec):
#   --egress none|public   none: everything but loopback is dropped.
#                          public: everything is allowed except the blocked ranges.
#   --block CIDR           a range that is always rejected (repeatable, IPv4 or IPv6).
set -eu

log() { echo "zcbot-entry: $*"; }
fail() {
    echo "zcbot-entry: FAILED: $*" >&2
    exit 1
}

egress=none
blocks=""
while [ $# -gt 0 ]; do
    case "$1" in
    --egress)
        [ $# -ge 2 ] || fail "--egress needs a value"
        egress=$2
        shift 2
        ;;
    --block)
        [ $# -ge 2 ] || fail "--block needs a CIDR"
        blocks="$blocks $2"
        shift 2
        ;;
    *) fail "unknown argument: $1" ;;
    esac
done
case "$egress" in none | public) ;; *) fail "--egress must be none or public, not '$egress'" ;; esac

count=0
rule() {
    "$@" || fail "rule did not apply: $*"
    count=$((count + 1))
}

for ipt in iptables ip6tables; do
    command -v "$ipt" >/dev/null || fail "$ipt is not installed in the image"
    rule "$ipt" -w -F OUTPUT
    rule "$ipt" -w -P OUTPUT DROP
    rule "$ipt" -w -A OUTPUT -o lo -j ACCEPT
    for cidr in $blocks; do
        case "$cidr" in
        *:*) [ "$ipt" = ip6tables ] || continue ;;
        *) [ "$ipt" = iptables ] || continue ;;
        esac
        rule "$ipt" -w -A OUTPUT -d "$cidr" -j REJECT
    done
    if [ "$egress" = public ]; then
        rule "$ipt" -w -A OUTPUT -j ACCEPT
    fi
    # Read the rules back: a policy that is not DROP means the kernel did not take them.
    "$ipt" -w -S OUTPUT | grep -qx -- '-P OUTPUT DROP' || fail "$ipt OUTPUT policy is not DROP after setup"
done

log "ready egress=$egress rules=$count"
# Idle as root: the sandbox user cannot signal it, so it cannot stop its own container this way.
exec sleep infinity
