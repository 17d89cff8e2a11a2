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
//!   range of that family and then RETURN, so Docker's own rules forward the rest; for
//!   `allowlist`, an ACCEPT of TCP to the egress proxy's port and of the proxy's answers on
//!   connections made to it (the network's inter-container DROP would stop both), then DROP.
//!
//! Installing is idempotent (a restart adds nothing twice); `zcbot-sandbox net down` removes it.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde::Serialize;

use crate::check::Check;
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

/// What went wrong with the host's or a container's rules. Readable on its own: the pool keeps
/// its text as the reason the host firewall is not enforced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FirewallError {
    /// Changing or reading the host's netfilter needs root.
    #[error("the daemon is not root, so it cannot change the host's firewall")]
    NotRoot,
    /// The caller chose not to install the rules (a pool on a test engine).
    #[error("not installed: {why}")]
    NotInstalled {
        /// Why not.
        why: &'static str,
    },
    /// The iptables tool of a family is missing or does not work here.
    #[error("{tool} is not usable: {reason} (install iptables, or check that this kernel has netfilter)")]
    ToolUnusable {
        /// `iptables` or `ip6tables`.
        tool: &'static str,
        /// What it said.
        reason: String,
    },
    /// iptables refused one operation on a chain or rule.
    #[error("{tool} could not {op} ({chain}): {reason}")]
    Refused {
        /// `iptables` or `ip6tables`.
        tool: &'static str,
        /// What was being done.
        op: &'static str,
        /// The chain (or parent chain) concerned.
        chain: String,
        /// What iptables said.
        reason: String,
    },
    /// A check found a chain, its DROP or a jump missing: something removed our rules.
    #[error("{tool}: {what} (zcbot-sandbox net up repairs it; a restart of the daemon too)")]
    RulesMissing {
        /// `iptables` or `ip6tables`.
        tool: &'static str,
        /// Which part is missing.
        what: String,
    },
    /// Entering a container's network namespace failed (it stopped, or the daemon lacks the
    /// privilege).
    #[error("could not {op} the network namespace of pid {pid}: {reason}")]
    Namespace {
        /// The container's PID 1 on the host.
        pid: i32,
        /// `open` or `enter`.
        op: &'static str,
        /// The OS error.
        reason: String,
    },
    /// An `iptables-restore` or listing inside a container failed or could not start.
    #[error("{command}: {reason}")]
    Command {
        /// The command line.
        command: String,
        /// Its error output, or why it did not run.
        reason: String,
    },
    /// The rules read back from a container are not those just installed.
    #[error("{tool} in the container holds {got} OUTPUT rules, expected {want}, or its policy is not DROP")]
    Mismatch {
        /// `iptables` or `ip6tables`.
        tool: &'static str,
        /// OUTPUT rules found.
        got: usize,
        /// OUTPUT rules installed.
        want: usize,
    },
    /// The thread doing the work died (a bug): nothing is known about the rules.
    #[error("the firewall worker failed: {0}")]
    Worker(String),
}

struct Family {
    ipt: iptables::IPTables,
    name: &'static str,
    v6: bool,
}

impl Family {
    fn refused(
        &self,
        op: &'static str,
        chain: &str,
    ) -> impl Fn(Box<dyn std::error::Error>) -> FirewallError {
        let (tool, chain) = (self.name, chain.to_owned());
        move |e| FirewallError::Refused {
            tool,
            op,
            chain: chain.clone(),
            reason: e.to_string(),
        }
    }

    fn missing(&self, what: String) -> FirewallError {
        FirewallError::RulesMissing {
            tool: self.name,
            what,
        }
    }
}

fn families() -> Result<Vec<Family>, FirewallError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(FirewallError::NotRoot);
    }
    let mut out = Vec::new();
    for (v6, name) in [(false, "iptables"), (true, "ip6tables")] {
        let ipt = iptables::new(v6).map_err(|e| FirewallError::ToolUnusable {
            tool: name,
            reason: e.to_string(),
        })?;
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
    proxy: Option<SocketAddr>,
) -> Vec<(String, Vec<String>)> {
    let forward = match (egress, proxy) {
        (Egress::Allowlist, Some(p)) if p.is_ipv6() == v6 => vec![
            to_proxy(p),
            format!(
                "-s {} -p tcp -m tcp --sport {} -m conntrack --ctstate ESTABLISHED -j ACCEPT",
                IpNet::from(p.ip()),
                p.port()
            ),
            "-j DROP".to_owned(),
        ],
        (Egress::None | Egress::Allowlist, _) => vec!["-j DROP".to_owned()],
        (Egress::Public, _) => blocked
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

/// The rule that lets TCP to the egress proxy's port through (the host's forward chain and the
/// sandbox's OUTPUT hold the same one).
fn to_proxy(p: SocketAddr) -> String {
    format!(
        "-d {} -p tcp -m tcp --dport {} -j ACCEPT",
        IpNet::from(p.ip()),
        p.port()
    )
}

/// Installs (or repairs) the host rules for `bridge` under `egress`, with `blocked` the ranges
/// a sandbox must never reach and `proxy` the egress proxy's address (allowlist mode; without
/// it, nothing is let through). Safe to call on every start. Blocks (runs iptables).
pub fn install(
    bridge: &str,
    egress: Egress,
    blocked: &[IpNet],
    proxy: Option<SocketAddr>,
) -> Result<(), FirewallError> {
    for f in families()? {
        for (chain, rules) in contents(bridge, f.v6, egress, blocked, proxy) {
            if !f
                .ipt
                .chain_exists("filter", &chain)
                .map_err(f.refused("look up the chain", &chain))?
            {
                f.ipt
                    .new_chain("filter", &chain)
                    .map_err(f.refused("create the chain", &chain))?;
            }
            f.ipt
                .flush_chain("filter", &chain)
                .map_err(f.refused("flush the chain", &chain))?;
            for rule in rules {
                f.ipt
                    .append("filter", &chain, &rule)
                    .map_err(f.refused("add a rule", &chain))?;
            }
        }
        for (parent, rule) in jumps(&f, bridge) {
            if !f
                .ipt
                .exists("filter", parent, &rule)
                .map_err(f.refused("look up the jump", parent))?
            {
                f.ipt
                    .insert("filter", parent, &rule, 1)
                    .map_err(f.refused("add the jump", parent))?;
            }
        }
    }
    Ok(())
}

/// Checks the rules for `bridge` are all in place. Blocks (runs iptables): the daemon calls it
/// through [`FirewallWatch`], off the async workers.
pub fn check(bridge: &str) -> Result<(), FirewallError> {
    for f in families()? {
        for chain in [chain_name(bridge), forward_chain_name(bridge)] {
            if !f.ipt.chain_exists("filter", &chain).unwrap_or(false) {
                return Err(f.missing(format!("chain {chain} is missing")));
            }
            let rules = f
                .ipt
                .list("filter", &chain)
                .map_err(f.refused("list the chain", &chain))?;
            if !rules.iter().any(|r| r.contains("-j DROP")) {
                return Err(f.missing(format!("chain {chain} has no DROP")));
            }
        }
        for (parent, rule) in jumps(&f, bridge) {
            if !f.ipt.exists("filter", parent, &rule).unwrap_or(false) {
                return Err(f.missing(format!("the jump from {parent} is missing")));
            }
        }
    }
    Ok(())
}

/// Removes every rule and chain installed for `bridge`. Removing what is not there is no error.
pub fn remove(bridge: &str) -> Result<(), FirewallError> {
    for f in families()? {
        for chain in [chain_name(bridge), forward_chain_name(bridge)] {
            for parent in ["INPUT", "FORWARD", "DOCKER-USER"] {
                let rule = format!("-i {bridge} -j {chain}");
                while f.ipt.exists("filter", parent, &rule).unwrap_or(false) {
                    f.ipt
                        .delete("filter", parent, &rule)
                        .map_err(f.refused("delete the jump", parent))?;
                }
            }
            if f.ipt.chain_exists("filter", &chain).unwrap_or(false) {
                f.ipt
                    .flush_chain("filter", &chain)
                    .map_err(f.refused("flush the chain", &chain))?;
                f.ipt
                    .delete_chain("filter", &chain)
                    .map_err(f.refused("delete the chain", &chain))?;
            }
        }
    }
    Ok(())
}

/// The last known state of the host rules, so `/readyz` answers from memory instead of starting
/// iptables processes on an async worker per request. Refreshed off the async workers at
/// startup and on every reaper tick; its age says how old the news is.
pub struct FirewallWatch {
    mode: HostFirewall,
    last: parking_lot::Mutex<Observed>,
}

#[derive(Clone)]
struct Observed {
    at: Instant,
    outcome: Result<(), FirewallError>,
}

/// The longest one check of the host rules may take before it counts as failed.
const REFRESH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl FirewallWatch {
    /// Watches the host rules of `mode`; enforced rules are checked once now, on the blocking
    /// pool.
    pub async fn start(mode: HostFirewall) -> Self {
        let watch = FirewallWatch {
            mode,
            last: parking_lot::Mutex::new(Observed {
                at: Instant::now(),
                outcome: Ok(()),
            }),
        };
        watch.refresh().await;
        watch
    }

    /// What the pool decided at startup: enforced on a bridge, or not and why.
    pub fn mode(&self) -> &HostFirewall {
        &self.mode
    }

    /// Checks the rules again, on the blocking pool (nothing to check when not enforced).
    pub async fn refresh(&self) {
        let HostFirewall::Enforced { bridge } = &self.mode else {
            return;
        };
        let bridge = bridge.clone();
        // Bounded: a hung iptables must not stall the reaper whose tick this runs on.
        let outcome = match tokio::time::timeout(
            REFRESH_TIMEOUT,
            tokio::task::spawn_blocking(move || check(&bridge)),
        )
        .await
        {
            Ok(done) => done.unwrap_or_else(|e| Err(FirewallError::Worker(e.to_string()))),
            Err(_) => Err(FirewallError::Worker(format!(
                "iptables did not answer within {}",
                humantime::format_duration(REFRESH_TIMEOUT)
            ))),
        };
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "HOST FIREWALL RULES MISSING: sandboxes may reach the host");
        }
        *self.last.lock() = Observed {
            at: Instant::now(),
            outcome,
        };
    }

    /// The last outcome, from memory: in force, not enforced (by choice or privilege, as the
    /// daemon said at startup), or rules missing.
    pub fn status(&self) -> Check {
        match &self.mode {
            HostFirewall::NotEnforced { reason } => Check::degraded(reason.clone()),
            HostFirewall::Enforced { .. } => {
                let last = self.last.lock().clone();
                match last.outcome {
                    Ok(()) => Check::ok(""),
                    Err(e) => Check::failed(format!(
                        "rules missing: {e} (checked {} ago)",
                        humantime::format_duration(Duration::from_secs(
                            last.at.elapsed().as_secs()
                        ))
                    )),
                }
            }
        }
    }

    /// How long ago the rules were last checked.
    pub fn age(&self) -> Duration {
        self.last.lock().at.elapsed()
    }
}

/// The container's own rules for one family, as `iptables-restore` input: the same ruleset the
/// entry installs in its fallback mode (deploy/sandbox/entry.sh; tests check both). In allowlist
/// mode `proxy` is the one address (and port) a sandbox may reach.
pub fn container_ruleset(
    v6: bool,
    egress: Egress,
    blocked: &[IpNet],
    proxy: Option<SocketAddr>,
) -> String {
    let mut out =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT DROP [0:0]\n");
    if !v6 && egress != Egress::Public {
        // Docker's embedded DNS (loopback) forwards out of the container: closed unless the
        // sandbox may reach addresses itself (the proxy resolves names for an allowlist).
        out.push_str("-A OUTPUT -d 127.0.0.11/32 -j REJECT\n");
    }
    out.push_str("-A OUTPUT -o lo -j ACCEPT\n");
    if let (Egress::Allowlist, Some(p)) = (egress, proxy) {
        if p.is_ipv6() == v6 {
            out.push_str(&format!("-A OUTPUT {}\n", to_proxy(p)));
        }
    }
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
    work: impl FnOnce() -> Result<T, FirewallError> + Send + 'static,
) -> Result<T, FirewallError> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).map_err(|e| {
        FirewallError::Namespace {
            pid,
            op: "open",
            reason: e.to_string(),
        }
    })?;
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
            FirewallError::Namespace {
                pid,
                op: "enter",
                reason: e.to_string(),
            }
        })?;
        work()
    })
    .join()
    .map_err(|_| FirewallError::Worker("the namespace thread panicked".to_owned()))?
}

fn run_with_input(cmd: &str, args: &[&str], input: &str) -> Result<String, FirewallError> {
    let failed = |reason: String| FirewallError::Command {
        command: format!("{cmd} {}", args.join(" ")),
        reason,
    };
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    let _ = child
        .stdin
        .take()
        .map(|mut s| s.write_all(input.as_bytes()));
    let out = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        return Err(failed(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs the container's own rules from the host, inside the network namespace of its PID 1
/// (host pid `pid`), one atomic `iptables-restore` per family, then reads them back. The
/// container itself then needs no capability at all.
pub fn apply_in_container(
    pid: i32,
    egress: Egress,
    blocked: &[IpNet],
    proxy: Option<SocketAddr>,
) -> Result<(), FirewallError> {
    let sets = [false, true].map(|v6| (v6, container_ruleset(v6, egress, blocked, proxy)));
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
                return Err(FirewallError::Mismatch {
                    tool: list,
                    got,
                    want,
                });
            }
        }
        Ok(())
    })
}

/// The container's OUTPUT rules (IPv4, then `---`, then IPv6), read from the host.
pub fn list_in_container(pid: i32) -> Result<String, FirewallError> {
    in_netns(pid, || {
        let v4 = run_with_input("iptables", &["-w", "-S", "OUTPUT"], "")?;
        let v6 = run_with_input("ip6tables", &["-w", "-S", "OUTPUT"], "")?;
        Ok(format!("{}---\n{}", v4, v6))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_watch_not_enforced_reports_why_and_checks_nothing() {
        let watch = FirewallWatch::start(HostFirewall::NotEnforced {
            reason: FirewallError::NotRoot.to_string(),
        })
        .await;
        assert_eq!(
            watch.status(),
            Check::degraded("the daemon is not root, so it cannot change the host's firewall")
        );
    }

    #[tokio::test]
    async fn a_watch_over_rules_that_are_not_there_fails_from_its_cache() {
        // No such bridge has rules (or the tests do not run as root): the first check, made at
        // start, fails, and the status says so without running anything more.
        let watch = FirewallWatch::start(HostFirewall::Enforced {
            bridge: "zcb-unit-none".into(),
        })
        .await;
        let status = watch.status();
        assert!(status.is_failed(), "{status:?}");
        assert!(status.detail().starts_with("rules missing: "), "{status:?}");
        assert!(watch.age() < Duration::from_secs(60));
    }

    #[test]
    fn errors_say_which_tool_and_what() {
        let e = FirewallError::RulesMissing {
            tool: "ip6tables",
            what: "chain ZCBOT-x is missing".into(),
        };
        assert!(e
            .to_string()
            .starts_with("ip6tables: chain ZCBOT-x is missing"));
        let e = FirewallError::Refused {
            tool: "iptables",
            op: "add the jump",
            chain: "INPUT".into(),
            reason: "Bad rule".into(),
        };
        assert_eq!(
            e.to_string(),
            "iptables could not add the jump (INPUT): Bad rule"
        );
    }
}
