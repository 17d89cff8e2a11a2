//! Host-side enforcement: the host's own netfilter drops what comes from the sandbox network, so
//! isolation does not rest on the rules inside each container alone.
//!
//! From an `--internal` network the host's services answer (traffic to the host goes through the
//! host's INPUT chain, which `--internal` does not filter), and the in-container rules live in a
//! namespace whose root holds NET_ADMIN. So, for IPv4 and IPv6, the daemon owns two chains per
//! sandbox network, for packets entering from the network's bridge:
//! - `ZCBOT-<bridge>`, jumped to from INPUT (traffic to the host itself): a single DROP;
//! - `ZCBOTF-<bridge>`, jumped to from DOCKER-USER, or FORWARD where the engine has no usable
//!   DOCKER-USER (forwarded traffic): a DROP for egress `none`; for `public`, a DROP per blocked
//!   range of that family and then RETURN, so Docker's own rules forward the rest.
//!
//! Installing is idempotent (a restart adds nothing twice); `zcbot-sandbox net down` removes it.

use std::fmt;

use ipnet::IpNet;
use serde::Serialize;

use crate::config::Egress;

/// Whether the host enforces isolation for the sandbox network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum HostFirewall {
    /// Our chains are installed for this bridge.
    Enforced {
        /// The bridge interface the rules match.
        bridge: String,
    },
    /// Not installed: only the in-container rules stand between a sandbox and the host.
    NotEnforced {
        /// Why (e.g. the daemon is not root).
        reason: String,
    },
}

impl fmt::Display for HostFirewall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostFirewall::Enforced { bridge } => write!(f, "enforced on the host for {bridge}"),
            HostFirewall::NotEnforced { reason } => {
                write!(f, "NOT enforced on the host ({reason})")
            }
        }
    }
}

/// The chain for traffic from `bridge` to the host.
pub fn chain_name(bridge: &str) -> String {
    format!("ZCBOT-{bridge}")
}

/// The chain for traffic from `bridge` forwarded elsewhere.
pub fn forward_chain_name(bridge: &str) -> String {
    format!("ZCBOTF-{bridge}")
}

struct Family {
    ipt: iptables::IPTables,
    name: &'static str,
    v6: bool,
}

fn families() -> Result<Vec<Family>, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("the daemon is not root, so it cannot change the host's firewall".into());
    }
    let mut out = Vec::new();
    for (v6, name) in [(false, "iptables"), (true, "ip6tables")] {
        let ipt = iptables::new(v6).map_err(|e| format!("{name} is not usable: {e}"))?;
        out.push(Family { ipt, name, v6 });
    }
    Ok(out)
}

/// Where forwarded traffic is filtered: DOCKER-USER when it exists and is usable, else FORWARD.
fn forward_chain(f: &Family) -> &'static str {
    // (ip6tables-nft may list Docker's chain as "incompatible": then it is not usable.)
    if f.ipt.chain_exists("filter", "DOCKER-USER").unwrap_or(false) {
        "DOCKER-USER"
    } else {
        "FORWARD"
    }
}

fn jumps(f: &Family, bridge: &str) -> Vec<(&'static str, String)> {
    vec![
        ("INPUT", format!("-i {bridge} -j {}", chain_name(bridge))),
        (
            forward_chain(f),
            format!("-i {bridge} -j {}", forward_chain_name(bridge)),
        ),
    ]
}

/// What each of our chains holds for `egress`, for one family.
fn contents(
    bridge: &str,
    v6: bool,
    egress: Egress,
    blocked: &[IpNet],
) -> Vec<(String, Vec<String>)> {
    let forward = match egress {
        Egress::None => vec!["-j DROP".to_owned()],
        Egress::Public => blocked
            .iter()
            .filter(|n| matches!(n, IpNet::V6(_)) == v6)
            .map(|n| format!("-d {n} -j DROP"))
            .chain(std::iter::once("-j RETURN".to_owned()))
            .collect(),
    };
    vec![
        (chain_name(bridge), vec!["-j DROP".to_owned()]),
        (forward_chain_name(bridge), forward),
    ]
}

/// Installs (or repairs) the host rules for `bridge` under `egress`, with `blocked` the ranges
/// a sandbox must never reach. Safe to call on every start.
pub fn install(bridge: &str, egress: Egress, blocked: &[IpNet]) -> Result<(), String> {
    for f in families()? {
        let err = |what: &str, e: Box<dyn std::error::Error>| format!("{} {what}: {e}", f.name);
        for (chain, rules) in contents(bridge, f.v6, egress, blocked) {
            if !f
                .ipt
                .chain_exists("filter", &chain)
                .map_err(|e| err("chain lookup", e))?
            {
                f.ipt
                    .new_chain("filter", &chain)
                    .map_err(|e| err("create chain", e))?;
            }
            f.ipt
                .flush_chain("filter", &chain)
                .map_err(|e| err("flush chain", e))?;
            for rule in rules {
                f.ipt
                    .append("filter", &chain, &rule)
                    .map_err(|e| err("add rule", e))?;
            }
        }
        for (parent, rule) in jumps(&f, bridge) {
            if !f
                .ipt
                .exists("filter", parent, &rule)
                .map_err(|e| err("rule lookup", e))?
            {
                f.ipt
                    .insert("filter", parent, &rule, 1)
                    .map_err(|e| err("add jump", e))?;
            }
        }
    }
    Ok(())
}

/// Checks the rules for `bridge` are all in place.
pub fn check(bridge: &str) -> Result<(), String> {
    for f in families()? {
        for chain in [chain_name(bridge), forward_chain_name(bridge)] {
            if !f.ipt.chain_exists("filter", &chain).unwrap_or(false) {
                return Err(format!("{}: chain {chain} is missing", f.name));
            }
            let rules = f
                .ipt
                .list("filter", &chain)
                .map_err(|e| format!("{}: {e}", f.name))?;
            if !rules.iter().any(|r| r.contains("-j DROP")) {
                return Err(format!("{}: chain {chain} has no DROP", f.name));
            }
        }
        for (parent, rule) in jumps(&f, bridge) {
            if !f.ipt.exists("filter", parent, &rule).unwrap_or(false) {
                return Err(format!("{}: the jump from {parent} is missing", f.name));
            }
        }
    }
    Ok(())
}

/// Removes every rule and chain installed for `bridge`. Removing what is not there is no error.
pub fn remove(bridge: &str) -> Result<(), String> {
    for f in families()? {
        for chain in [chain_name(bridge), forward_chain_name(bridge)] {
            for parent in ["INPUT", "FORWARD", "DOCKER-USER"] {
                let rule = format!("-i {bridge} -j {chain}");
                while f.ipt.exists("filter", parent, &rule).unwrap_or(false) {
                    f.ipt
                        .delete("filter", parent, &rule)
                        .map_err(|e| format!("{}: {e}", f.name))?;
                }
            }
            if f.ipt.chain_exists("filter", &chain).unwrap_or(false) {
                f.ipt
                    .flush_chain("filter", &chain)
                    .map_err(|e| format!("{}: {e}", f.name))?;
                f.ipt
                    .delete_chain("filter", &chain)
                    .map_err(|e| format!("{}: {e}", f.name))?;
            }
        }
    }
    Ok(())
}

/// The container's own rules for one family, as `iptables-restore` input: the same ruleset the
/// entry installs in its fallback mode (deploy/sandbox/entry.sh; tests check both).
pub fn container_ruleset(v6: bool, egress: Egress, blocked: &[IpNet]) -> String {
    let mut out =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT DROP [0:0]\n");
    if !v6 && egress == Egress::None {
        // Docker's embedded DNS (loopback) forwards out of the container: closed with no egress.
        out.push_str("-A OUTPUT -d 127.0.0.11/32 -j REJECT\n");
    }
    out.push_str("-A OUTPUT -o lo -j ACCEPT\n");
    for net in blocked.iter().filter(|n| matches!(n, IpNet::V6(_)) == v6) {
        out.push_str(&format!("-A OUTPUT -d {net} -j REJECT\n"));
    }
    if egress == Egress::Public {
        out.push_str("-A OUTPUT -j ACCEPT\n");
    }
    out.push_str("COMMIT\n");
    out
}

/// The network namespace of host process `pid`, as `net:[inode]` (changes when a container is
/// restarted, which gives it a fresh namespace without rules).
pub fn netns_id(pid: i32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Runs `work` on a dedicated thread that has entered the network namespace of host process
/// `pid`; processes it spawns inherit that namespace. Never a pooled thread: the namespace must
/// not outlive this one job.
fn in_netns<T: Send + 'static>(
    pid: i32,
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .map_err(|e| format!("open the network namespace of pid {pid}: {e}"))?;
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("enter the network namespace of pid {pid}: {e}"))?;
        work()
    })
    .join()
    .map_err(|_| "the namespace thread panicked".to_owned())?
}

fn run_with_input(cmd: &str, args: &[&str], input: &str) -> Result<String, String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{cmd}: {e}"))?;
    let _ = child
        .stdin
        .take()
        .map(|mut s| s.write_all(input.as_bytes()));
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs the container's own rules from the host, inside the network namespace of its PID 1
/// (host pid `pid`), one atomic `iptables-restore` per family, then reads them back. The
/// container itself then needs no capability at all.
pub fn apply_in_container(pid: i32, egress: Egress, blocked: &[IpNet]) -> Result<(), String> {
    let sets = [false, true].map(|v6| (v6, container_ruleset(v6, egress, blocked)));
    in_netns(pid, move || {
        for (v6, rules) in &sets {
            let (restore, list) = if *v6 {
                ("ip6tables-restore", "ip6tables")
            } else {
                ("iptables-restore", "iptables")
            };
            run_with_input(restore, &["-w"], rules)?;
            let have = run_with_input(list, &["-w", "-S", "OUTPUT"], "")?;
            let want = rules.lines().filter(|l| l.starts_with("-A OUTPUT")).count();
            let got = have.lines().filter(|l| l.starts_with("-A OUTPUT")).count();
            if !have.lines().any(|l| l == "-P OUTPUT DROP") || got != want {
                return Err(format!(
                    "{list} in the container holds {got} OUTPUT rules, expected {want}"
                ));
            }
        }
        Ok(())
    })
}

/// The container's OUTPUT rules (IPv4, then `---`, then IPv6), read from the host.
pub fn list_in_container(pid: i32) -> Result<String, String> {
    in_netns(pid, || {
        let v4 = run_with_input("iptables", &["-w", "-S", "OUTPUT"], "")?;
        let v6 = run_with_input("ip6tables", &["-w", "-S", "OUTPUT"], "")?;
        Ok(format!("{}---\n{}", v4, v6))
    })
}
