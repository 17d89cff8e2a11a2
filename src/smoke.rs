//! `zcbot-sandbox smoke`: checks a live sandbox the way RUN.md tells an operator to.
//!
//! Each check is one PASS/FAIL line. Reachability checks are real: the smoke opens TCP listeners
//! on the host (on the sandbox network's gateway address and on the host's primary address),
//! proves from the host that they answer, then proves the sandbox cannot reach them.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::exec::transport::{run_collect, ExecOutput as Captured};
use crate::pool::SandboxPool;
use crate::user::UserId;

const EXEC_TIMEOUT: Duration = Duration::from_secs(20);
const CAP: usize = 64 * 1024;

/// The outcome of one check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// A short name.
    pub name: &'static str,
    /// Whether it passed.
    pub pass: bool,
    /// What was seen.
    pub detail: String,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.pass { "PASS" } else { "FAIL" };
        write!(f, "{verdict} {}: {}", self.name, self.detail)
    }
}

fn check(name: &'static str, pass: bool, detail: impl Into<String>) -> Check {
    Check {
        name,
        pass,
        detail: detail.into(),
    }
}

/// Runs every check against `user`'s sandbox (created for the purpose) and removes it at the end.
/// `report` is called with each check as soon as it is known.
pub async fn run(pool: &SandboxPool, user: &UserId, mut report: impl FnMut(&Check)) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut push = |c: Check| {
        report(&c);
        checks.push(c);
    };
    let cfg = pool.config();
    push(check(
        "docker",
        true,
        format!(
            "engine at {} answers, API {}",
            pool.engine().host(),
            pool.engine().api_version()
        ),
    ));
    push(check(
        "image",
        true,
        format!("{} is {}", cfg.image, pool.image_id()),
    ));
    push(check(
        "network",
        true,
        format!(
            "{} is internal with inter-container traffic off (bridge {}, gateway {})",
            pool.network().name,
            pool.network().bridge,
            pool.network().gateway.as_deref().unwrap_or("?")
        ),
    ));

    for (name, detail) in pool.users_root().checks() {
        // A users root that does not enforce something is a finding on a real host: the smoke
        // passes only where every tenant boundary of the host side is in force.
        let pass = detail.starts_with("ok") && !detail.contains("not enforced");
        push(check(name, pass, detail));
    }

    push(match pool.host_firewall() {
        crate::firewall::HostFirewall::Enforced { bridge } => {
            match crate::firewall::check(bridge) {
                Ok(()) => check(
                    "host firewall",
                    true,
                    format!("the host drops what enters from {bridge} (IPv4 and IPv6)"),
                ),
                Err(e) => check("host firewall", false, format!("rules missing: {e}")),
            }
        }
        other => check("host firewall", false, other.to_string()),
    });

    let sandbox = match pool.ensure(user).await {
        Ok(sb) => {
            push(check(
                "ensure",
                true,
                format!("{} running with its egress rules in place", sb.name),
            ));
            sb
        }
        Err(e) => {
            push(check("ensure", false, e.to_string()));
            return checks;
        }
    };
    let sb = Runner {
        pool,
        container: &sandbox.name,
        uid: format!("{}:{}", sandbox.uid, sandbox.gid),
        pid: sandbox.netns.as_ref().map(|(pid, _)| *pid),
    };

    push(match sb.user(&["id", "-u"]).await {
        Ok(c) if c.exit_code == Some(0) && c.out() == sandbox.uid.to_string() => {
            check("non-root", true, format!("commands run as uid {}", c.out()))
        }
        other => check("non-root", false, describe(&other)),
    });

    push(
        match sb
            .user(&[
                "sh",
                "-c",
                "grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status | tr -s '\\t' ' '",
            ])
            .await
        {
            Ok(c)
                if c.out().contains("CapEff: 0000000000000000")
                    && c.out().contains("NoNewPrivs: 1")
                    && c.out().contains("Seccomp: 2") =>
            {
                check("capabilities", true, c.out().replace('\n', ", "))
            }
            other => check("capabilities", false, describe(&other)),
        },
    );

    // Host rules mode: the container has no capability even in its bounding set.
    let mode = pool.rules_mode();
    push(match mode {
        crate::pool::RulesMode::Host => {
            match sb.user(&["grep", "^CapBnd:", "/proc/self/status"]).await {
                Ok(c) if c.out().ends_with("0000000000000000") => {
                    check("container rules", true, mode.to_string())
                }
                other => check(
                    "container rules",
                    false,
                    format!("{mode}, but: {}", describe(&other)),
                ),
            }
        }
        crate::pool::RulesMode::Entry => check("container rules", true, mode.to_string()),
    });

    push(
        match sb
            .user(&["sh", "-c", "touch /zcbot-smoke-probe 2>&1; echo status=$?"])
            .await
        {
            Ok(c) if c.out().contains("Read-only file system") => check(
                "read-only root",
                true,
                "writing to / fails: read-only file system",
            ),
            other => check("read-only root", false, describe(&other)),
        },
    );

    let rules = sb.root_list_rules().await;
    let rules_text = rules.as_ref().map(Captured::out).unwrap_or_default();
    let (v4, v6) = rules_text.split_once("---").unwrap_or((&rules_text, ""));
    let rules_ok = v4.contains("-P OUTPUT DROP")
        && v6.contains("-P OUTPUT DROP")
        && v4.contains("-d 169.254.0.0/16 -j REJECT")
        && v6.contains("-d fe80::/10 -j REJECT");
    push(check(
        "egress rules",
        rules_ok,
        if rules_ok {
            format!(
                "default-deny OUTPUT for IPv4 and IPv6, {} ranges rejected",
                rules_text.matches("-j REJECT").count()
            )
        } else {
            format!("rules not as expected: {}", describe(&rules))
        },
    ));

    let tamper = sb.user(&[
        "sh",
        "-c",
        "/usr/sbin/iptables -P OUTPUT ACCEPT 2>&1; /usr/sbin/iptables -F OUTPUT 2>&1; /usr/sbin/ip6tables -P OUTPUT ACCEPT 2>&1; echo done",
    ])
    .await;
    let after = sb
        .root_list_rules()
        .await
        .map(|c| c.out())
        .unwrap_or_default();
    let unchanged = !rules_text.is_empty() && after == rules_text;
    push(check(
        "rules locked",
        unchanged && tamper.as_ref().is_ok_and(|c| c.out().contains("denied")),
        if unchanged {
            "the sandbox user's attempts to flush or open the rules were refused".to_owned()
        } else {
            format!(
                "rules changed or unreadable after tampering: {}",
                describe(&tamper)
            )
        },
    ));

    for c in escape_checks(pool, &sb).await {
        push(c);
    }

    if cfg.transport == crate::config::Transport::Channel {
        push(channel_check(pool, user).await);
    }

    push(match pool.remove(user).await {
        Ok(_) => match pool.list().await {
            Ok(list) if list.iter().all(|s| s.name != sandbox.name) => {
                check("destroy", true, format!("{} removed", sandbox.name))
            }
            Ok(_) => check("destroy", false, format!("{} still listed", sandbox.name)),
            Err(e) => check("destroy", false, e.to_string()),
        },
        Err(e) => check("destroy", false, e.to_string()),
    });
    checks
}

/// A call over the exec channel (the default transport): it must run as a call does over
/// per-call exec (its own session), and not by falling back.
async fn channel_check(pool: &SandboxPool, user: &UserId) -> Check {
    let ex = crate::exec::docker::DockerExecutor::new(pool.clone());
    let spec = crate::exec::ProcessSpec {
        argv: vec!["sh".into(), "-c".into(), "ps -o sid= -p $$; echo $$".into()],
        program: None,
        timeout: EXEC_TIMEOUT,
        workdir: Vec::new(),
        env: Default::default(),
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    // The first call opens the channel; the second shows what a warm call costs.
    let first = ex.run(user, spec.clone(), &cancel).await;
    let started = std::time::Instant::now();
    let second = ex.run(user, spec, &cancel).await;
    let took = started.elapsed();
    ex.close_channels();
    let stats = ex.stats();
    let (opens, fallbacks) = (stats.opens.get(), stats.fallbacks.get());
    match (first, second) {
        (Ok(_), Ok(out)) => {
            let text = String::from_utf8_lossy(&out.stdout.bytes).into_owned();
            let ids: Vec<&str> = text.split_whitespace().collect();
            let own_session = ids.len() == 2 && ids[0] == ids[1];
            let pass = own_session && opens == 1 && fallbacks == 0;
            check(
                "exec channel",
                pass,
                if pass {
                    format!(
                        "a warm call over the channel ran in its own session in {:.1} ms",
                        took.as_secs_f64() * 1e3
                    )
                } else {
                    format!("session ids {text:?}, channels opened {opens}, fallbacks to per-call exec {fallbacks} (see the daemon's log)")
                },
            )
        }
        (Err(e), _) | (_, Err(e)) => check("exec channel", false, e.to_string()),
    }
}

/// The network escapes, tried from inside a sandbox against listeners this process opens on the
/// host: the network's gateway, the host's primary address, and the cloud metadata address.
async fn escape_checks(pool: &SandboxPool, sb: &Runner<'_>) -> Vec<Check> {
    let mut out = Vec::new();
    for (name, target) in [
        (
            "host via gateway unreachable",
            pool.network().gateway.clone(),
        ),
        (
            "host via primary address unreachable",
            primary_address().map(|a| a.to_string()),
        ),
    ] {
        out.push(match target {
            // No default route (an air-gapped host): no primary address to reach the host by; its
            // addresses are in the blocklist all the same. A missing gateway is a real failure.
            None if name.contains("primary") => check(
                name,
                true,
                "this host has no default route, so no primary address to test",
            ),
            None => check(name, false, "could not determine the address to test"),
            Some(ip) => unreachable_check(name, &ip, sb).await,
        });
    }
    let meta = "import socket\ns=socket.socket()\ns.settimeout(3)\nprint(s.connect_ex(('169.254.169.254', 80)))";
    out.push(match sb.user(&["python3", "-c", meta]).await {
        Ok(c) if c.exit_code == Some(0) && c.out() != "0" => check(
            "metadata address unreachable",
            true,
            format!("169.254.169.254:80 gives '{}'", c.out()),
        ),
        other => check("metadata address unreachable", false, describe(&other)),
    });
    out
}

/// The startup self-check (fail closed): a short-lived probe sandbox, under a user id no real
/// user can have, tries the network escapes; it is removed afterwards whatever happened. The
/// daemon refuses to start if any check fails.
pub async fn self_check(pool: &SandboxPool) -> Vec<Check> {
    let user = UserId::internal("_selfcheck");
    let mut checks = Vec::new();
    match pool.ensure(&user).await {
        Err(e) => checks.push(check("probe sandbox", false, e.to_string())),
        Ok(sandbox) => {
            let sb = Runner {
                pool,
                container: &sandbox.name,
                uid: format!("{}:{}", sandbox.uid, sandbox.gid),
                pid: sandbox.netns.as_ref().map(|(pid, _)| *pid),
            };
            checks.extend(escape_checks(pool, &sb).await);
        }
    }
    if let Err(e) = pool.remove(&user).await {
        checks.push(check("probe removed", false, e.to_string()));
    }
    let _ = pool.users_root().remove_folder(&user);
    checks
}

/// Runs commands in the smoke sandbox.
struct Runner<'a> {
    pool: &'a SandboxPool,
    container: &'a str,
    uid: String,
    /// Host rules mode: the host pid of the container's PID 1.
    pid: Option<i32>,
}

impl Runner<'_> {
    /// As the sandbox user, like every tool call.
    async fn user(&self, argv: &[&str]) -> crate::Result<Captured> {
        let engine = self.pool.engine().as_ref();
        run_collect(engine, self.container, &self.uid, argv, EXEC_TIMEOUT, CAP)
            .await?
            .ran(self.container)
    }

    /// Reading the rules needs NET_ADMIN, which only root in the container holds. This exec runs
    /// as root, only lists, and changes nothing; every tool call names the sandbox user.
    async fn root_list_rules(&self) -> crate::Result<Captured> {
        if let Some(pid) = self.pid {
            // Host rules mode: nothing in the container may read them; the daemon can.
            let listed =
                tokio::task::spawn_blocking(move || crate::firewall::list_in_container(pid))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
            return Ok(match listed {
                Ok(text) => Captured {
                    exit_code: Some(0),
                    stdout: text.into_bytes(),
                    stderr: Vec::new(),
                },
                Err(e) => Captured {
                    exit_code: Some(1),
                    stdout: Vec::new(),
                    stderr: e.into_bytes(),
                },
            });
        }
        let argv = [
            "sh",
            "-c",
            "/usr/sbin/iptables -S OUTPUT && echo --- && /usr/sbin/ip6tables -S OUTPUT",
        ];
        let engine = self.pool.engine().as_ref();
        run_collect(engine, self.container, "0:0", &argv, EXEC_TIMEOUT, CAP)
            .await?
            .ran(self.container)
    }
}

/// Opens a listener on `ip`, shows the host reaches it, then tries it from the sandbox.
async fn unreachable_check(name: &'static str, ip: &str, sb: &Runner<'_>) -> Check {
    let Ok(addr) = ip.parse::<IpAddr>() else {
        return check(name, false, format!("{ip:?} is not an address"));
    };
    let listener = match tokio::net::TcpListener::bind(SocketAddr::new(addr, 0)).await {
        Ok(l) => l,
        Err(e) => return check(name, false, format!("cannot listen on {ip}: {e}")),
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let server = tokio::spawn(async move {
        while let Ok((_sock, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    let host_ok = tokio::net::TcpStream::connect((addr, port)).await.is_ok();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let baseline = accepted.load(Ordering::SeqCst);
    let script = format!(
        "import socket,sys\ns=socket.socket(socket.AF_INET6 if ':' in '{ip}' else socket.AF_INET)\ns.settimeout(3)\nr=s.connect_ex(('{ip}',{port}))\nprint('connect', r)\nsys.exit(0 if r==0 else 1)"
    );
    let attempt = sb.user(&["python3", "-c", &script]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let reached = accepted.load(Ordering::SeqCst) > baseline;
    server.abort();
    match attempt {
        _ if !host_ok => check(
            name,
            false,
            format!("the test listener on {ip}:{port} did not answer the host itself"),
        ),
        Ok(c) if c.exit_code == Some(1) && !reached => check(
            name,
            true,
            format!(
                "{ip}:{port} answers the host, the sandbox gets '{}'",
                c.out()
            ),
        ),
        other => check(
            name,
            false,
            format!("sandbox reached {ip}:{port}? {}", describe(&other)),
        ),
    }
}

/// The IPv4 address of the interface holding the default route (from /proc/net/route).
pub fn primary_address() -> Option<IpAddr> {
    let routes = std::fs::read_to_string("/proc/net/route").ok()?;
    let iface = routes
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[1] == "00000000")?
        .first()?
        .to_string();
    nix::ifaddrs::getifaddrs()
        .ok()?
        .filter(|a| a.interface_name == iface)
        .find_map(|a| a.address?.as_sockaddr_in().map(|s| IpAddr::V4(s.ip())))
}

fn describe(r: &crate::Result<Captured>) -> String {
    match r {
        Ok(c) => format!(
            "exit {:?}, stdout {:?}, stderr {:?}",
            c.exit_code,
            c.out(),
            c.err()
        ),
        Err(e) => e.to_string(),
    }
}
