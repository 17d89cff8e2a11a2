#!/bin/sh
# zcbot-entry: the sandbox container's entry, run by tini as root with only NET_ADMIN.
#
# It installs the egress rules for IPv4 and IPv6 while it still holds NET_ADMIN, verifies them,
# prints one "ready" line that the pool waits for, then idles until the pool removes the container.
# Any rule that fails ends the container with a non-zero status: a sandbox never runs with fewer
# rules than it was asked for.
#
# Arguments (all from the pool's container spec):
#   --egress none|public|allowlist
#                          none: everything but loopback is dropped.
#                          public: everything is allowed except the blocked ranges.
#                          allowlist: as none, but TCP to the egress proxy (--proxy) is allowed.
#   --proxy IPV4:PORT      the egress proxy (allowlist).
#   --block CIDR           a range that is always rejected (repeatable, IPv4 or IPv6).
set -eu

log() { echo "zcbot-entry: $*"; }
fail() {
    echo "zcbot-entry: FAILED: $*" >&2
    exit 1
}

egress=none
blocks=""
by_host=no
proxy=""
while [ $# -gt 0 ]; do
    case "$1" in
    --egress)
        [ $# -ge 2 ] || fail "--egress needs a value"
        egress=$2
        shift 2
        ;;
    --proxy)
        [ $# -ge 2 ] || fail "--proxy needs IPV4:PORT"
        proxy=$2
        shift 2
        ;;
    --rules-by-host)
        by_host=yes
        shift
        ;;
    --block)
        [ $# -ge 2 ] || fail "--block needs a CIDR"
        blocks="$blocks $2"
        shift 2
        ;;
    *) fail "unknown argument: $1" ;;
    esac
done
case "$egress" in none | public | allowlist) ;; *) fail "--egress must be none, public or allowlist, not '$egress'" ;; esac
if [ "$egress" = allowlist ]; then
    case "$proxy" in
    *.*.*.*:*) ;;
    *) fail "--egress allowlist needs --proxy IPV4:PORT, got '$proxy'" ;;
    esac
fi

if [ "$by_host" = yes ]; then
    # The daemon installs the rules from the host, inside this container's network namespace;
    # this container holds no capability to do it itself (or to undo it).
    log "idle; egress=$egress rules are installed by the host"
    exec sleep infinity
fi

# Each family's filter table is replaced in one atomic iptables-restore transaction: there is no
# moment with half the rules, and it costs one process per family instead of one per rule.
count=0
ruleset() {
    family=$1
    echo '*filter'
    echo ':INPUT ACCEPT [0:0]'
    echo ':FORWARD ACCEPT [0:0]'
    echo ':OUTPUT DROP [0:0]'
    # Docker's embedded DNS listens on 127.0.0.11 (loopback) and forwards out of the container:
    # with no egress it would resolve other users' sandboxes and carry data out in queries.
    if [ "$family" = 4 ] && [ "$egress" != public ]; then
        echo '-A OUTPUT -d 127.0.0.11/32 -j REJECT'
    fi
    echo '-A OUTPUT -o lo -j ACCEPT'
    if [ "$family" = 4 ] && [ "$egress" = allowlist ]; then
        echo "-A OUTPUT -d ${proxy%:*}/32 -p tcp -m tcp --dport ${proxy##*:} -j ACCEPT"
    fi
    for cidr in $blocks; do
        case "$cidr" in
        *:*) [ "$family" = 6 ] || continue ;;
        *) [ "$family" = 4 ] || continue ;;
        esac
        echo "-A OUTPUT -d $cidr -j REJECT"
    done
    if [ "$egress" = public ]; then
        echo '-A OUTPUT -j ACCEPT'
    fi
    echo 'COMMIT'
}

for family in 4 6; do
    if [ "$family" = 4 ]; then ipt=iptables; else ipt=ip6tables; fi
    command -v "$ipt-restore" >/dev/null || fail "$ipt-restore is not installed in the image"
    rules=$(ruleset "$family")
    printf '%s\n' "$rules" | "$ipt-restore" -w || fail "$ipt-restore refused the rules:
$rules"
    # Read the rules back: what the kernel holds must be what was asked for.
    want=$(printf '%s\n' "$rules" | grep -c '^-A OUTPUT')
    have=$("$ipt" -w -S OUTPUT | grep -c '^-A OUTPUT') || true
    "$ipt" -w -S OUTPUT | grep -qx -- '-P OUTPUT DROP' || fail "$ipt OUTPUT policy is not DROP after setup"
    [ "$have" = "$want" ] || fail "$ipt holds $have OUTPUT rules, expected $want"
    count=$((count + want))
done

log "ready egress=$egress rules=$count"
# Idle as root: the sandbox user cannot signal it, so it cannot stop its own container this way.
exec sleep infinity
