//! `zcbot-sandbox smoke`: checks a live sandbox the way RUN.md tells an operator to.
//!
//! Each check is one PASS/FAIL line. Reachability checks are real: the smoke opens TCP listeners
//! on the host (on the sandbox network's gateway address and on the host's primary address),
//! proves from the host that they answer, then proves the sandbox cannot reach them.

use crate::check::{Check, NamedCheck};
use crate::exec::transport::ExecOutput as Captured;
use crate::pool::SandboxPool;
use crate::selfcheck::{describe, escape_checks, Runner, EXEC_TIMEOUT};
use crate::user::UserId;

/// The host's primary address (re-exported: the attack tests listen on it).
pub use crate::selfcheck::primary_address;

fn check(name: &'static str, pass: bool, detail: impl Into<String>) -> NamedCheck {
    NamedCheck::pass_if(name, pass, detail)
}

/// Runs every check against `user`'s sandbox (created for the purpose) and removes it at the end.
/// `report` is called with each check as soon as it is known.
pub async fn run(
    pool: &SandboxPool,
    user: &UserId,
    mut report: impl FnMut(&NamedCheck),
) -> Vec<NamedCheck> {
    let mut checks = Vec::new();
    let mut push = |c: NamedCheck| {
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

    // A users root that does not enforce something is a finding on a real host: the smoke
    // passes only where every tenant boundary of the host side is in force (`Degraded` fails).
    let users = pool.clone();
    match tokio::task::spawn_blocking(move || users.users_root().checks()).await {
        Ok(found) => {
            for (name, c) in found {
                push(NamedCheck::new(name, c));
            }
        }
        Err(e) => push(check("users_root", false, format!("the check failed: {e}"))),
    }

    pool.firewall().refresh().await;
    push(NamedCheck::new(
        "host firewall",
        match (pool.firewall().status(), pool.host_firewall()) {
            (Check::Ok(_), crate::firewall::HostFirewall::Enforced { bridge }) => Check::ok(
                format!("the host drops what enters from {bridge} (IPv4 and IPv6)"),
            ),
            (other, _) => other,
        },
    ));

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
    // The kernel's refusal ("Permission denied"), our seccomp profile's (the netfilter socket:
    // "Operation not permitted"), or gVisor's (no netfilter: "Protocol not supported").
    let refused = tamper.as_ref().is_ok_and(|c| {
        let out = c.out();
        ["denied", "not permitted", "Protocol not supported"]
            .iter()
            .any(|w| out.contains(w))
    });
    push(check(
        "rules locked",
        unchanged && refused,
        if unchanged && refused {
            "the sandbox user's attempts to flush or open the rules were refused".to_owned()
        } else if unchanged {
            format!(
                "the rules held, but the attempts were not refused as expected: {}",
                describe(&tamper)
            )
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
async fn channel_check(pool: &SandboxPool, user: &UserId) -> NamedCheck {
    let ex = crate::exec::docker::DockerExecutor::new(pool.clone());
    let spec = crate::exec::ProcessSpec {
        argv: vec!["sh".into(), "-c".into(), "ps -o sid= -p $$; echo $$".into()],
        program: None,
        timeout: EXEC_TIMEOUT,
        workdir: Vec::new(),
        env: Default::default(),
        tap: None,
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
