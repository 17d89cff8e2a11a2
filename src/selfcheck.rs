//! The startup self-check (fail closed): before the daemon serves, a short-lived probe sandbox
//! tries the network escapes a tenant would try (and a system call our seccomp profile refuses), and any success (or a probe that cannot run)
//! refuses to start. The production gate lives here, not in the operator's `smoke`, which runs
//! the same escapes among its checks.
//!
//! At the exec layer's level (it runs commands in a sandbox through the pool): the server and the
//! smoke use it; it uses nothing above the executors.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::check::{Check, NamedCheck};
use crate::error::{Error, Result};
use crate::exec::transport::{run_collect, ExecOutput as Captured};
use crate::pool::SandboxPool;
use crate::user::UserId;

/// How long one probe command may run.
pub(crate) const EXEC_TIMEOUT: Duration = Duration::from_secs(20);
/// How much of a probe command's output is kept.
pub(crate) const CAP: usize = 64 * 1024;

fn check(name: &'static str, pass: bool, detail: impl Into<String>) -> NamedCheck {
    NamedCheck::pass_if(name, pass, detail)
}

/// Runs the self-check and turns it into the daemon's gate: `Ok` with what was tried when every
/// escape failed, [`Error::SelfCheck`] naming each failed check otherwise.
pub async fn gate(pool: &SandboxPool) -> Result<Check> {
    let checks = run(pool).await;
    let failures: Vec<String> = checks
        .iter()
        .filter(|c| !c.passed())
        .map(ToString::to_string)
        .collect();
    if !failures.is_empty() {
        return Err(Error::SelfCheck {
            failures: failures.join("; "),
        });
    }
    for c in &checks {
        tracing::info!(check = c.name, detail = %c.check.detail(), "self-check passed");
    }
    Ok(Check::ok(format!(
        "{} escape attempts failed at startup",
        checks.len()
    )))
}

/// The startup self-check (fail closed): a short-lived probe sandbox, under a user id no real
/// user can have, tries the network escapes; it is removed afterwards whatever happened. The
/// daemon refuses to start if any check fails.
pub async fn run(pool: &SandboxPool) -> Vec<NamedCheck> {
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
    // The probe's folder goes too; a tree removal blocks, so not on an async worker.
    let (users, probe) = (pool.clone(), user.clone());
    let _ = tokio::task::spawn_blocking(move || users.users_root().remove_folder(&probe)).await;
    checks
}

/// The network escapes, tried from inside a sandbox against listeners this process opens on the
/// host: the network's gateway, the host's primary address, and the cloud metadata address.
pub(crate) async fn escape_checks(pool: &SandboxPool, sb: &Runner<'_>) -> Vec<NamedCheck> {
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
    if pool.config().seccomp == crate::config::Seccomp::Zcbot {
        out.push(seccomp_check(sb).await);
    }
    out
}

/// Our seccomp profile is in force for a call: `io_uring_setup` (system call 425 on every
/// architecture) fails with EPERM (under runc from the container's profile, under runsc from the
/// supervisor's surface filter). It catches a profile that does not reach the calls.
async fn seccomp_check(sb: &Runner<'_>) -> NamedCheck {
    const NAME: &str = "seccomp profile in force (io_uring_setup refused)";
    let probe = "import ctypes,errno\nlibc=ctypes.CDLL(None,use_errno=True)\nbuf=ctypes.create_string_buffer(120)\nr=libc.syscall(425,1,buf)\nprint(r, errno.errorcode.get(ctypes.get_errno(), ''))";
    // Through the supervisor, as every call runs (under runsc its filter is what refuses).
    let mut argv = crate::exec::transport::supervisor_command(
        "selfcheck-seccomp",
        Duration::from_secs(15),
        Duration::from_millis(500),
    );
    argv.extend(["--", "python3", "-c", probe].map(str::to_owned));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    match sb.user(&argv).await {
        Ok(c) if c.exit_code == Some(0) && c.out() == "-1 EPERM" => {
            check(NAME, true, "io_uring_setup gives EPERM")
        }
        other => check(
            NAME,
            false,
            format!(
                "io_uring_setup was not refused by the profile ({}): is the image's \
                 zcbot-supervise current (scripts/build-image.sh)?",
                describe(&other)
            ),
        ),
    }
}

/// Runs commands in a probe (or smoke) sandbox.
pub(crate) struct Runner<'a> {
    pub(crate) pool: &'a SandboxPool,
    pub(crate) container: &'a str,
    pub(crate) uid: String,
    /// Host rules mode: the host pid of the container's PID 1.
    pub(crate) pid: Option<i32>,
}

impl Runner<'_> {
    /// As the sandbox user, like every tool call.
    pub(crate) async fn user(&self, argv: &[&str]) -> crate::Result<Captured> {
        let engine = self.pool.engine().as_ref();
        run_collect(engine, self.container, &self.uid, argv, EXEC_TIMEOUT, CAP)
            .await?
            .ran(self.container)
    }

    /// Reading the rules needs NET_ADMIN, which only root in the container holds. This exec runs
    /// as root, only lists, and changes nothing; every tool call names the sandbox user.
    pub(crate) async fn root_list_rules(&self) -> crate::Result<Captured> {
        if let Some(pid) = self.pid {
            // Host rules mode: nothing in the container may read them; the daemon can.
            let listed =
                tokio::task::spawn_blocking(move || crate::firewall::list_in_container(pid))
                    .await
                    .unwrap_or_else(|e| Err(crate::firewall::FirewallError::Worker(e.to_string())));
            return Ok(match listed {
                Ok(text) => Captured {
                    exit_code: Some(0),
                    stdout: text.into_bytes(),
                    stderr: Vec::new(),
                },
                Err(e) => Captured {
                    exit_code: Some(1),
                    stdout: Vec::new(),
                    stderr: e.to_string().into_bytes(),
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
async fn unreachable_check(name: &'static str, ip: &str, sb: &Runner<'_>) -> NamedCheck {
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

/// A probe command's outcome, for a check's detail.
pub(crate) fn describe(r: &crate::Result<Captured>) -> String {
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
