//! Host-side enforcement against the real host netfilter and engine.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use common::{exec_as, TestPool};
use zcbot_sandbox::firewall::{self, HostFirewall};
use zcbot_sandbox::pool::network::bridge_name;

fn rules(cmd: &str) -> String {
    let out = Command::new(cmd).args(["-w", "-S"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cli(t: &TestPool, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_zcbot-sandbox"))
        .args(args)
        .envs(t.env())
        .output()
        .unwrap();
    common::combined(out)
}

#[tokio::test]
async fn the_host_rules_are_installed_once_per_start_and_removed_by_net_down() {
    let t = TestPool::new("fwidem");
    let bridge = bridge_name(&t.network);
    let (chain, fchain) = (
        firewall::chain_name(&bridge),
        firewall::forward_chain_name(&bridge),
    );
    for _ in 0..2 {
        let pool = t.pool().await;
        let enforced = HostFirewall::Enforced {
            bridge: bridge.clone(),
        };
        assert_eq!(pool.host_firewall(), &enforced);
    }
    let count = |text: &str, line: String| text.lines().filter(|l| *l == line).count();
    let v4 = rules("iptables");
    assert_eq!(
        count(&v4, format!("-A INPUT -i {bridge} -j {chain}")),
        1,
        "{v4}"
    );
    assert_eq!(
        count(&v4, format!("-A DOCKER-USER -i {bridge} -j {fchain}")),
        1,
        "{v4}"
    );
    assert_eq!(count(&v4, format!("-A {chain} -j DROP")), 1, "{v4}");
    assert_eq!(count(&v4, format!("-A {fchain} -j DROP")), 1, "{v4}");
    let v6 = rules("ip6tables");
    assert_eq!(
        count(&v6, format!("-A INPUT -i {bridge} -j {chain}")),
        1,
        "{v6}"
    );
    assert_eq!(
        count(&v6, format!("-A FORWARD -i {bridge} -j {fchain}")),
        1,
        "{v6}"
    );
    assert!(firewall::check(&bridge).is_ok());

    let (ok, out) = cli(&t, &["net", "down"]);
    assert!(ok, "{out}");
    // (Docker's own rules name the bridge too; ours are the ones with our chains.)
    for c in [&chain, &fchain] {
        assert!(
            !rules("iptables").contains(c.as_str()) && !rules("ip6tables").contains(c.as_str())
        );
    }
    let (ok, out) = cli(&t, &["net", "status"]);
    assert!(!ok && out.contains("missing"), "{out}");
    let (ok, out) = cli(&t, &["net", "up"]);
    assert!(ok && firewall::check(&bridge).is_ok(), "{out}");
}

#[tokio::test]
async fn the_host_stays_unreachable_even_when_the_in_container_rules_are_gone() {
    let t = TestPool::new("fwdepth");
    let pool = t.pool().await;
    let user = t.user("u");
    let sb = pool.ensure(&user).await.unwrap();
    let gw: IpAddr = pool.network().gateway.clone().unwrap().parse().unwrap();
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(gw, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move { while listener.accept().await.is_ok() {} });

    // Suppose the container's own rules were lost: open them wide from the host.
    let (ok, _, err) = common::netns_exec(&sb.name, "iptables -P OUTPUT ACCEPT && iptables -F OUTPUT && ip6tables -P OUTPUT ACCEPT && ip6tables -F OUTPUT");
    assert!(ok, "{err}");
    let probe = format!("python3 -c \"import socket; s=socket.socket(); s.settimeout(3); print(s.connect_ex(('{gw}', {port})))\"");
    let (_, blocked, _) = exec_as(&sb.name, &common::tenant(&sb.name), &probe);
    assert_ne!(
        blocked, "0",
        "the host answered with only the host rules in place"
    );

    // Without the host rules the same attempt gets through: they are what stopped it.
    firewall::remove(&bridge_name(&t.network)).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, open, _) = exec_as(&sb.name, &common::tenant(&sb.name), &probe);
    assert_eq!(
        open, "0",
        "control: with neither rule set the host should answer"
    );
    server.abort();
}

#[tokio::test]
async fn an_unprivileged_daemon_says_so_and_can_be_told_to_refuse() {
    let t = TestPool::new("fwunpriv");
    // Folders the unprivileged process may write; the docker group lets it reach the engine.
    let gid = common::unprivileged(&t);
    let run = |require: &str| {
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                &format!("--regid={gid}"),
                "--clear-groups",
                env!("CARGO_BIN_EXE_zcbot-sandbox"),
                "ps",
            ])
            .envs(t.env())
            .env("ZCBOT_REQUIRE_HOST_FIREWALL", require)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, out) = run("0");
    assert!(ok, "{out}");
    assert!(
        out.contains("NOT enforced") && out.contains("not root"),
        "{out}"
    );
    let (ok, out) = run("1");
    assert!(!ok, "{out}");
    assert!(
        out.contains("host firewall") && out.contains("ZCBOT_REQUIRE_HOST_FIREWALL"),
        "{out}"
    );
}

#[tokio::test]
async fn the_daemon_refuses_to_start_when_its_self_check_escapes() {
    let mut t = TestPool::new("fwself");
    // A sandbox that escapes: its entry reports ready without installing any rule, and the
    // daemon runs unprivileged, so the host firewall is not there either.
    let image = common::build_test_image(
        &mut t,
        "RUN printf '#!/bin/sh\\necho \"zcbot-entry: ready egress=none rules=0\"\\nexec sleep infinity\\n' > /usr/local/sbin/zcbot-entry\n",
    );
    let gid = common::unprivileged(&t);
    t.set("ZCBOT_SANDBOX_IMAGE", &image)
        .set("ZCBOT_SANDBOX_BACKEND", "docker")
        .set("ZCBOT_SANDBOX_UID", &format!("65534:{gid}"))
        .set("ZCBOT_LISTEN", "127.0.0.1:0");
    let out = tokio::task::spawn_blocking({
        let env = t.env();
        move || {
            Command::new("setpriv")
                .args([
                    "--reuid=65534",
                    &format!("--regid={gid}"),
                    "--clear-groups",
                    env!("CARGO_BIN_EXE_zcbot-sandbox"),
                    "serve",
                ])
                .envs(env)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the daemon started with an escaping sandbox: {stdout}"
    );
    assert!(
        !stdout.contains("listening"),
        "it listened before failing: {stdout}"
    );
    assert!(
        stderr.contains("self-check failed") && stderr.contains("host via gateway"),
        "{stderr}"
    );
    assert!(
        t.containers().is_empty(),
        "the probe sandbox was left behind: {:?}",
        t.containers()
    );
}

#[tokio::test]
async fn public_egress_opens_only_public_addresses_on_its_own_network() {
    let mut t = TestPool::new("fwpublic");
    let public_net = format!("{}-public", t.network);
    t.set("ZCBOT_SANDBOX_EGRESS", "public");
    let bridge = bridge_name(&public_net);
    let pool = t.pool().await;
    assert_eq!(pool.network().name, public_net);
    let inspect = |f: &str| common::docker(&["network", "inspect", "-f", f, &public_net]);
    assert_eq!(inspect("{{.Internal}}"), "false");
    assert_eq!(
        inspect("{{index .Options \"com.docker.network.bridge.enable_icc\"}}"),
        "false"
    );
    let user = t.user("u");
    let sb = pool.ensure(&user).await.unwrap();

    // Inside: the blocklist is rejected, then everything else is accepted.
    let (_, v4, _) = common::netns_exec(&sb.name, "iptables -S OUTPUT");
    assert_eq!(v4.lines().last(), Some("-A OUTPUT -j ACCEPT"), "{v4}");
    for range in [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "100.64.0.0/10",
        "127.0.0.0/8",
    ] {
        assert!(
            v4.contains(&format!("-d {range} -j REJECT")),
            "{range} not rejected: {v4}"
        );
    }
    let (_, v6, _) = common::netns_exec(&sb.name, "ip6tables -S OUTPUT");
    assert!(
        v6.contains("-d fc00::/7 -j REJECT") && v6.contains("-d fe80::/10 -j REJECT"),
        "{v6}"
    );

    // On the host: INPUT from the bridge dropped; forwarded traffic to blocked ranges dropped.
    let fchain = firewall::forward_chain_name(&bridge);
    let host = rules("iptables");
    for line in [
        format!("-A {fchain} -d 169.254.0.0/16 -j DROP"),
        format!("-A {fchain} -d 10.0.0.0/8 -j DROP"),
        format!("-A {fchain} -j RETURN"),
        format!("-A {} -j DROP", firewall::chain_name(&bridge)),
    ] {
        assert!(host.lines().any(|l| l == line), "{line} missing:\n{host}");
    }

    // The host stays unreachable. (No test sends traffic to a public address: nothing of ours
    // is there.)
    let gw = pool.network().gateway.clone().unwrap();
    let listener = tokio::net::TcpListener::bind((gw.parse::<IpAddr>().unwrap(), 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let probe = format!("python3 -c \"import socket; s=socket.socket(); s.settimeout(3); print(s.connect_ex(('{gw}', {port})))\"");
    let (_, got, _) = exec_as(&sb.name, &common::tenant(&sb.name), &probe);
    assert_ne!(got, "0", "the host answered a public-egress sandbox");
    drop(listener);

    // Back to none: the container is recreated on the internal network.
    t.set("ZCBOT_SANDBOX_EGRESS", "none");
    let again = t.pool().await.ensure(&user).await.unwrap();
    assert_ne!(again.container_id, sb.container_id);
    assert_eq!(
        common::docker(&["inspect", "-f", "{{.HostConfig.NetworkMode}}", &again.name]),
        t.network
    );
}

#[tokio::test]
async fn the_entry_and_the_host_install_the_same_rules() {
    // Two implementations of one ruleset (entry.sh for the fallback, firewall.rs from the host):
    // they must never drift apart.
    for egress in ["none", "public", "allowlist"] {
        let mut outputs = Vec::new();
        for mode in ["entry", "host"] {
            let mut t = TestPool::new("fwsame");
            t.set("ZCBOT_CONTAINER_RULES", mode)
                .set("ZCBOT_SANDBOX_EGRESS", egress);
            if egress == "allowlist" {
                t.set("ZCBOT_EGRESS_ALLOW", "example.org");
            }
            let pool = t.pool().await;
            let sb = pool.ensure(&t.user("u")).await.unwrap();
            let (ok, mut rules, err) = common::netns_exec(
                &sb.name,
                "iptables -S OUTPUT; echo ---; ip6tables -S OUTPUT",
            );
            assert!(ok, "{err}");
            // Each pool has its own proxy, at its own address.
            if let Some(proxy) = pool.egress_proxy() {
                let ip = format!("{}/32", proxy.addr().ip());
                assert!(rules.contains(&ip), "no rule names the proxy {ip}: {rules}");
                rules = rules.replace(&ip, "PROXY");
            }
            outputs.push(rules);
        }
        assert_eq!(
            outputs[0], outputs[1],
            "egress {egress}: entry and host rules differ"
        );
        assert!(outputs[0].contains("-P OUTPUT DROP"));
    }
}

/// `/readyz` answers from the firewall watch's cache (no iptables per request), and the reaper's
/// tick refreshes it: rules removed behind the daemon's back make it 503 with the reason within a
/// period, and repaired rules make it ready again.
#[tokio::test]
async fn readiness_fails_once_the_reaper_tick_sees_the_host_rules_gone_and_recovers() {
    use zcbot_sandbox::config::{Backend, Listen};
    use zcbot_sandbox::server::{ServeOptions, Server};
    let mut t = TestPool::new("fwready");
    t.set("ZCBOT_SANDBOX_REAP_EVERY", "1s")
        .set("ZCBOT_SELF_CHECK", "0");
    let mut cfg = t.config();
    cfg.backend = Backend::Docker;
    cfg.listen = Listen::Tcp("127.0.0.1:0".parse().unwrap());
    let server = Server::start(cfg, ServeOptions::default()).await.unwrap();
    let addr = server.address();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    let ready = || async {
        let (status, _, body) = common::http_with(&addr, "GET", "/readyz", None, &[]).await;
        (
            status,
            serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        )
    };
    let wait_for = |want: u16| async move {
        let started = std::time::Instant::now();
        loop {
            let (status, body) = ready().await;
            if status == want || started.elapsed() > Duration::from_secs(20) {
                return (status, body);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (status, body) = ready().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["checks"]["host_firewall"], "ok", "{body}");
    assert_eq!(body["states"]["host_firewall"], "ok", "{body}");
    // Disabled by choice: reported, not failing.
    assert_eq!(body["states"]["self_check"], "degraded", "{body}");

    let bridge = bridge_name(&t.network);
    firewall::remove(&bridge).unwrap();
    let (status, body) = wait_for(503).await;
    assert_eq!(status, 503, "rules gone and still ready: {body}");
    assert_eq!(body["ready"], false, "{body}");
    assert_eq!(body["states"]["host_firewall"], "failed", "{body}");
    let text = body["checks"]["host_firewall"].as_str().unwrap();
    assert!(
        text.starts_with("rules missing: ") && text.contains("net up"),
        "{body}"
    );

    let (ok, out) = cli(&t, &["net", "up"]);
    assert!(ok, "{out}");
    let (status, body) = wait_for(200).await;
    assert_eq!(status, 200, "rules back and not ready: {body}");
    let _ = tx.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn down_removes_the_pools_sandboxes_network_and_host_chains_and_nothing_else() {
    let t = TestPool::new("fwdown");
    let pool = t.pool().await;
    for name in ["a", "b"] {
        pool.ensure(&t.user(name)).await.unwrap();
    }
    drop(pool);
    // The pool's network says whose it is, as its containers do.
    let label = |network: &str| {
        common::docker(&[
            "network",
            "inspect",
            "-f",
            "{{index .Labels \"io.zcbot.pool\"}}",
            network,
        ])
    };
    assert_eq!(label(&t.network), t.pool_id);
    assert_eq!(t.containers().len(), 2);
    let bridge = bridge_name(&t.network);
    let chain = firewall::chain_name(&bridge);
    assert!(rules("iptables").contains(&chain));

    let (ok, out) = cli(&t, &["down"]);
    assert!(ok, "{out}");
    assert!(out.contains("removed 2 sandbox(es)"), "{out}");
    assert!(t.containers().is_empty(), "{out}");
    assert!(
        !common::docker_try(&["network", "inspect", &t.network]).0,
        "the network was left: {out}"
    );
    for cmd in ["iptables", "ip6tables"] {
        assert!(!rules(cmd).contains(chain.as_str()), "{cmd}: {out}");
    }
    // Again: nothing left to do, and it says so.
    let (ok, out) = cli(&t, &["down"]);
    assert!(ok && out.contains("removed 0 sandbox(es)"), "{out}");

    // Control: a network of that name made by another pool stays, with its chains.
    let other = TestPool::new("fwdown2");
    drop(other.pool().await);
    let out = Command::new(env!("CARGO_BIN_EXE_zcbot-sandbox"))
        .arg("down")
        .envs(t.env())
        .env("ZCBOT_SANDBOX_NETWORK", &other.network)
        .output()
        .unwrap();
    let (ok, out) = common::combined(out);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("made by pool {}", other.pool_id)),
        "{out}"
    );
    assert_eq!(label(&other.network), other.pool_id);
    assert!(
        firewall::check(&bridge_name(&other.network)).is_ok(),
        "{out}"
    );
}
