//! The pool against the real Docker Engine.

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use common::{docker, docker_try, exec_as, TestPool};
use zcbot_sandbox::{Error, SandboxPool, UserId};

fn inspect(container: &str, format: &str) -> String {
    docker(&["inspect", "-f", format, container])
}

#[tokio::test]
async fn ensure_creates_a_hardened_container_and_reuses_it() {
    let t = TestPool::new("harden");
    let pool = t.pool().await;
    let user = t.user("alice");
    let sb = pool.ensure(&user).await.unwrap();
    let name = t.container_name(&user);
    assert_eq!(sb.name, name);

    // The container as Docker has it.
    let c = &name;
    assert_eq!(inspect(c, "{{.State.Running}}"), "true");
    assert_eq!(inspect(c, "{{.HostConfig.ReadonlyRootfs}}"), "true");
    assert_eq!(inspect(c, "{{.HostConfig.CapDrop}}"), "[ALL]");
    // Root daemon: the rules come from the host, so not even NET_ADMIN is added.
    assert_eq!(inspect(c, "{{.HostConfig.CapAdd}}"), "[]");
    // no-new-privileges, and our seccomp profile inline (Docker shows it as given).
    let opts = inspect(c, "{{json .HostConfig.SecurityOpt}}");
    let opts: Vec<String> = serde_json::from_str(&opts).unwrap();
    assert_eq!(opts.len(), 2, "{opts:?}");
    assert_eq!(opts[0], "no-new-privileges:true");
    let profile: serde_json::Value =
        serde_json::from_str(opts[1].strip_prefix("seccomp=").unwrap()).unwrap();
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
    assert_eq!(inspect(c, "{{.HostConfig.Runtime}}"), "runc");
    assert_eq!(inspect(c, "{{.HostConfig.Privileged}}"), "false");
    assert_eq!(inspect(c, "{{.HostConfig.PidsLimit}}"), "256");
    assert_eq!(
        inspect(c, "{{.HostConfig.Memory}}"),
        (512u64 << 20).to_string()
    );
    assert_eq!(
        inspect(c, "{{.HostConfig.MemorySwap}}"),
        (512u64 << 20).to_string()
    );
    assert_eq!(inspect(c, "{{.HostConfig.NanoCpus}}"), "1000000000");
    assert_eq!(inspect(c, "{{.HostConfig.PidMode}}"), "");
    assert_eq!(inspect(c, "{{.HostConfig.IpcMode}}"), "private");
    assert_eq!(inspect(c, "{{.HostConfig.UsernsMode}}"), "");
    assert_eq!(inspect(c, "{{.HostConfig.NetworkMode}}"), t.network);
    let nets = inspect(
        c,
        "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
    );
    assert_eq!(
        nets.trim(),
        t.network,
        "attached to the sandbox network only"
    );
    let mounts = inspect(c, "{{range .Mounts}}{{.Source}}->{{.Destination}} {{end}}");
    assert_eq!(
        mounts.trim(),
        format!("{}->/workspace", pool.workspace(&user).display()),
        "only the user's folder is mounted, no docker socket"
    );
    assert_eq!(
        inspect(c, "{{index .Config.Labels \"io.zcbot.user\"}}"),
        user.as_str()
    );
    assert_eq!(
        inspect(c, "{{index .Config.Labels \"io.zcbot.pool\"}}"),
        t.pool_id
    );
    assert_eq!(
        inspect(c, "{{index .Config.Labels \"io.zcbot.config-hash\"}}"),
        sb.config_hash
    );

    // The user's folder exists on the host, belongs to the tenant's own uid, and is the
    // tenant's alone; the users root is root's alone.
    let meta = std::fs::metadata(pool.workspace(&user)).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (sb.uid, sb.gid));
    assert!((200_000..=299_999).contains(&sb.uid), "{}", sb.uid);
    assert_eq!(
        inspect(c, "{{index .Config.Labels \"io.zcbot.uid\"}}"),
        format!("{}:{}", sb.uid, sb.gid)
    );
    assert_eq!(meta.mode() & 0o777, 0o700);
    let root = std::fs::metadata(pool.workspace(&user).parent().unwrap()).unwrap();
    assert_eq!(root.mode() & 0o777, 0o700);

    // A second ensure reuses the running container without asking Docker.
    let before = pool.stats();
    let again = pool.ensure(&user).await.unwrap();
    assert_eq!(again.container_id, sb.container_id);
    assert_eq!(pool.stats().ensures_warm, before.ensures_warm + 1);
    assert_eq!(pool.stats().ensures_cold, before.ensures_cold);
    assert_eq!(t.containers(), vec![name]);
}

#[tokio::test]
async fn the_sandbox_user_is_unprivileged_and_the_root_is_read_only() {
    let t = TestPool::new("inside");
    let pool = t.pool().await;
    let user = t.user("bob");
    let sb = pool.ensure(&user).await.unwrap();
    let c = &sb.name;

    let me = common::tenant(c);
    let uid: u32 = common::tenant_uid(c).parse().unwrap();
    assert!(
        (200_000..=299_999).contains(&uid),
        "a uid of the tenant range: {me}"
    );
    let (_, id, _) = exec_as(c, &me, "id -u; id -g");
    assert_eq!(id, format!("{uid}\n{uid}"));
    let (_, status, _) = exec_as(
        c,
        &me,
        "grep -E '^(CapEff|CapPrm|NoNewPrivs)' /proc/self/status",
    );
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    assert!(status.contains("CapPrm:\t0000000000000000"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");

    for path in ["/etc/evil", "/usr/bin/evil", "/evil"] {
        let (ok, _, err) = exec_as(c, &me, &format!("echo x > {path}"));
        assert!(!ok, "wrote {path}");
        assert!(
            err.contains("Read-only") || err.contains("Permission denied"),
            "{err}"
        );
    }
    // Even root in the container cannot write the root file system.
    let (ok, _, err) = exec_as(c, "0:0", "touch /etc/evil");
    assert!(!ok && err.contains("Read-only"), "{err}");

    // /tmp is a size-capped tmpfs; /workspace is the user's host folder.
    let (_, df, _) = exec_as(c, &me, "df -k /tmp | tail -1");
    let size_kb: u64 = df.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(size_kb, 64 * 1024, "{df}");
    let (ok, _, err) = exec_as(c, &me, "echo hello > /workspace/note.txt");
    assert!(ok, "{err}");
    let host = pool.workspace(&user).join("note.txt");
    assert_eq!(std::fs::read_to_string(&host).unwrap(), "hello\n");
    assert_eq!(std::fs::metadata(&host).unwrap().uid(), uid);

    // The sandbox user cannot touch the egress rules.
    let (ok, _, err) = exec_as(c, &me, "/usr/sbin/iptables -P OUTPUT ACCEPT");
    assert!(!ok, "the sandbox user changed the firewall: {err}");
    let (_, rules, _) = common::netns_exec(c, "iptables -S OUTPUT; ip6tables -S OUTPUT");
    assert_eq!(rules.matches("-P OUTPUT DROP").count(), 2, "{rules}");
    // Run as root here, the pool installs the rules from the host: the container holds no
    // capability at all, not even in its bounding set.
    assert_eq!(inspect(c, "{{.HostConfig.CapAdd}}"), "[]");
    let (_, bounding, _) = exec_as(c, "0:0", "grep CapBnd /proc/self/status");
    assert_eq!(bounding, "CapBnd:\t0000000000000000");
}

#[tokio::test]
async fn concurrent_ensures_of_one_user_create_exactly_one_container() {
    let t = TestPool::new("single");
    let pool = t.pool().await;
    let user = t.user("carol");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let pool = pool.clone();
            let user = user.clone();
            tokio::spawn(async move { pool.ensure(&user).await.unwrap().container_id })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "all callers got the same container");
    assert_eq!(t.containers(), vec![t.container_name(&user)]);
    assert_eq!(pool.stats().ensures_cold, 1);
}

#[tokio::test]
async fn a_stopped_container_is_started_with_fresh_rules() {
    // The entry installs the rules here (an unprivileged daemon's mode): on every start of the
    // container, and the pool must wait for this run's ready line.
    let mut t = TestPool::new("stopped");
    t.set("ZCBOT_CONTAINER_RULES", "entry");
    let user = t.user("dave");
    let first = t.pool().await.ensure(&user).await.unwrap();
    assert_eq!(
        inspect(&first.name, "{{.HostConfig.CapAdd}}"),
        "[NET_ADMIN]"
    );
    docker(&["stop", "-t", "0", &first.name]);

    // A new owner process finds it stopped and starts the same container.
    let pool = t.pool().await;
    let again = pool.ensure(&user).await.unwrap();
    assert_eq!(again.container_id, first.container_id);
    // ensure returned only after this run's entry reported ready, not on the previous run's line.
    let log = docker_try(&["logs", &again.name]);
    let ready_lines = format!("{}\n{}", log.1, log.2)
        .matches("zcbot-entry: ready")
        .count();
    assert_eq!(
        ready_lines, 2,
        "ensure returned before the restarted entry was ready"
    );
    assert_eq!(inspect(&again.name, "{{.State.Running}}"), "true");
    // The restart gave it a new network namespace: the rules must be there again, not assumed
    // from the previous run's ready line.
    let (_, rules, _) = common::netns_exec(&again.name, "iptables -S OUTPUT");
    assert!(
        rules.contains("-P OUTPUT DROP") && rules.contains("169.254.0.0/16"),
        "{rules}"
    );
}

#[tokio::test]
async fn a_changed_config_recreates_the_container() {
    let mut t = TestPool::new("stale");
    let user = t.user("erin");
    let first = t.pool().await.ensure(&user).await.unwrap();

    t.set("ZCBOT_SANDBOX_MEMORY", "256MiB");
    let pool = t.pool().await;
    let second = pool.ensure(&user).await.unwrap();
    assert_ne!(second.container_id, first.container_id);
    assert_ne!(second.config_hash, first.config_hash);
    assert_eq!(
        inspect(&second.name, "{{.HostConfig.Memory}}"),
        (256u64 << 20).to_string()
    );
    assert_eq!(
        t.containers(),
        vec![t.container_name(&user)],
        "the stale one is gone"
    );
}

#[tokio::test]
async fn reconcile_adopts_current_removes_stopped_and_stale_and_leaves_foreign_alone() {
    let mut t = TestPool::new("recon");
    let (keep, stopped, stale) = (t.user("keep"), t.user("stopped"), t.user("stale"));
    {
        let pool = t.pool().await;
        for u in [&keep, &stopped] {
            pool.ensure(u).await.unwrap();
        }
    }
    let kept_id = inspect(&t.container_name(&keep), "{{.Id}}");
    docker(&["stop", "-t", "0", &t.container_name(&stopped)]);
    {
        // A container made under another config (different pids limit) is stale afterwards.
        t.set("ZCBOT_SANDBOX_PIDS", "99");
        t.pool().await.ensure(&stale).await.unwrap();
        t.vars.remove("ZCBOT_SANDBOX_PIDS");
    }
    // A container with our name prefix but none of our labels.
    let foreign = format!("zcbot-sandbox-{}", common::unique("foreign"));
    t.extra_containers.push(foreign.clone());
    docker(&["create", "--name", &foreign, "zcbot-sandbox:latest"]);

    let pool = t.pool().await;
    let report = pool.reconcile().await.unwrap();
    assert_eq!(report.adopted, vec![keep.to_string()]);
    let mut removed: Vec<&str> = report.removed.iter().map(|(n, _)| n.as_str()).collect();
    removed.sort();
    let mut expected = vec![t.container_name(&stale), t.container_name(&stopped)];
    expected.sort();
    assert_eq!(removed, expected);
    assert!(report.foreign.contains(&foreign), "{:?}", report.foreign);

    assert_eq!(t.containers(), vec![t.container_name(&keep)]);
    assert_eq!(
        inspect(&foreign, "{{.Name}}"),
        format!("/{foreign}"),
        "foreign left alone"
    );
    // The adopted container is served warm, with no Docker call.
    let sb = pool.ensure(&keep).await.unwrap();
    assert_eq!(sb.container_id, kept_id);
    assert_eq!(pool.stats().ensures_cold, 0);
    assert_eq!(pool.stats().orphans_removed, 2);
}

#[tokio::test]
async fn idle_reap_removes_only_idle_containers_and_never_one_with_a_call_running() {
    let t = TestPool::new("reap");
    let pool = t.pool().await;
    let (idle, busy, fresh) = (t.user("idle"), t.user("busy"), t.user("fresh"));
    pool.ensure(&idle).await.unwrap();
    let lease = pool.lease(&busy).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pool.ensure(&fresh).await.unwrap();

    let reaped = pool.reap_idle(Duration::from_secs(1)).await.unwrap();
    assert_eq!(reaped, vec![idle.to_string()]);
    let mut expected = vec![t.container_name(&busy), t.container_name(&fresh)];
    expected.sort();
    assert_eq!(t.containers(), expected);

    // Once its call ends, the busy one is just active, not idle. (`fresh` may have been idle
    // for a second by now, after a slow removal above.)
    drop(lease);
    let reaped = pool.reap_idle(Duration::from_secs(1)).await.unwrap();
    assert!(!reaped.contains(&busy.to_string()), "{reaped:?}");
    // A reaped user comes back on demand.
    let back = pool.ensure(&idle).await.unwrap();
    assert_eq!(inspect(&back.name, "{{.State.Running}}"), "true");
}

#[tokio::test]
async fn last_activity_survives_a_restart_of_the_owning_process() {
    let t = TestPool::new("durable");
    let (old, recent) = (t.user("old"), t.user("recent"));
    {
        let pool = t.pool().await;
        pool.ensure(&old).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        pool.ensure(&recent).await.unwrap();
    }
    let recent_at = Instant::now();
    // A new process adopts both; the record says which was active 2.5 s before the other.
    let pool = t.pool().await;
    let report = pool.reconcile().await.unwrap();
    assert_eq!(report.adopted.len(), 2);
    // Idle longer than `recent` has been by 1 s (however long the new process took to start),
    // shorter than `old` has been by 1.5 s.
    let idle = recent_at.elapsed() + Duration::from_secs(1);
    let reaped = pool.reap_idle(idle).await.unwrap();
    assert_eq!(reaped, vec![old.to_string()]);
    assert_eq!(t.containers(), vec![t.container_name(&recent)]);
}

#[tokio::test]
async fn at_capacity_the_least_recently_used_idle_sandbox_is_evicted_else_pool_full() {
    let mut t = TestPool::new("full");
    t.set("ZCBOT_SANDBOX_MAX", "2");
    let pool = t.pool().await;
    let (a, b, c) = (t.user("a"), t.user("b"), t.user("c"));
    let lease_a = pool.lease(&a).await.unwrap();
    let lease_b = pool.lease(&b).await.unwrap();

    let err = pool.ensure(&c).await.unwrap_err();
    assert!(matches!(err, Error::PoolFull { max: 2 }), "{err}");
    assert!(err.to_string().contains("ZCBOT_SANDBOX_MAX"));
    assert_eq!(t.containers().len(), 2, "a full pool changes nothing");

    // b ends its call first, then a: b is the least recently used idle one.
    drop(lease_b);
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(lease_a);
    pool.ensure(&c).await.unwrap();
    let mut expected = vec![t.container_name(&a), t.container_name(&c)];
    expected.sort();
    assert_eq!(t.containers(), expected);
}

#[tokio::test]
async fn shutdown_all_removes_this_pools_containers_and_no_other_pools() {
    let mine = TestPool::new("shutmine");
    let other = TestPool::new("shutother");
    let pool = mine.pool().await;
    let other_pool = other.pool().await;
    pool.ensure(&mine.user("x")).await.unwrap();
    pool.ensure(&mine.user("y")).await.unwrap();
    other_pool.ensure(&other.user("z")).await.unwrap();

    assert_eq!(pool.shutdown_all().await.unwrap(), 2);
    assert!(mine.containers().is_empty());
    assert_eq!(
        other.containers().len(),
        1,
        "another pool's container is untouched"
    );
}

#[tokio::test]
async fn a_sandbox_cannot_reach_another_users_sandbox() {
    let t = TestPool::new("icc");
    let pool = t.pool().await;
    let (a, b) = (
        pool.ensure(&t.user("a")).await.unwrap(),
        pool.ensure(&t.user("b")).await.unwrap(),
    );
    let b_ip = inspect(
        &b.name,
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
    );
    assert!(!b_ip.is_empty());
    // b listens on its own address; it can reach itself, so the listener is real.
    docker(&[
        "exec",
        "-d",
        "-u",
        &common::tenant(&b.name),
        &b.name,
        "python3",
        "-m",
        "http.server",
        "--bind",
        "0.0.0.0",
        "8080",
    ]);
    let probe = |ip: &str| {
        format!("python3 -c \"import socket; s=socket.socket(); s.settimeout(3); print(s.connect_ex(('{ip}', 8080)))\"")
    };
    let mut self_reach = String::new();
    for _ in 0..50 {
        self_reach = exec_as(&b.name, &common::tenant(&b.name), &probe(&b_ip)).1;
        if self_reach == "0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(self_reach, "0", "b's own listener answers b");
    let (_, from_a, _) = exec_as(&a.name, &common::tenant(&a.name), &probe(&b_ip));
    assert_ne!(from_a, "0", "a reached b's sandbox at {b_ip}");
}

#[tokio::test]
async fn smoke_passes_every_check_and_removes_its_sandbox() {
    // On a users root prepared as RUN.md says (the smoke fails where quotas are not enforced).
    let t = TestPool::with_quota("smoke", 256);
    let user = t.user("smoke");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zcbot-sandbox"))
        .args(["smoke", "--user", user.as_str()])
        .envs(t.env())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "smoke failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let checks: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("PASS") || l.starts_with("FAIL"))
        .collect();
    assert!(checks.len() >= 12, "{stdout}");
    assert!(checks.iter().all(|l| l.starts_with("PASS")), "{stdout}");
    for name in [
        "non-root",
        "read-only root",
        "egress rules",
        "rules locked",
        "host via gateway unreachable",
        "host via primary address unreachable",
        "destroy",
        "users_root",
        "disk_quota",
        "tenant_uids",
    ] {
        assert!(
            stdout.contains(&format!("PASS {name}:")),
            "missing {name}:\n{stdout}"
        );
    }
    assert!(t.containers().is_empty(), "smoke left its sandbox behind");
}

#[tokio::test]
async fn a_failing_entry_fails_ensure_with_its_log_and_leaves_nothing() {
    let mut t = TestPool::new("entryfail");
    // The entry installs the rules in this mode; its failure must fail ensure.
    t.set("ZCBOT_CONTAINER_RULES", "entry");
    let image = common::build_test_image(
        &mut t,
        "RUN printf '#!/bin/sh\\necho \"zcbot-entry: FAILED: rule did not apply: iptables -A OUTPUT\" >&2\\nexit 3\\n' > /usr/local/sbin/zcbot-entry\n",
    );
    t.set("ZCBOT_SANDBOX_IMAGE", &image);

    let pool = t.pool().await;
    let err = pool.ensure(&t.user("f")).await.unwrap_err();
    let msg = err.to_string();
    assert_eq!(err.kind(), "sandbox_start", "{msg}");
    assert!(
        msg.contains("status 3") && msg.contains("rule did not apply"),
        "{msg}"
    );
    assert!(
        t.containers().is_empty(),
        "the failed container was left behind"
    );
}

#[tokio::test]
async fn bad_user_ids_are_refused_before_any_docker_call() {
    // The CLI is pointed at a socket that does not exist: a Docker call would fail differently.
    for bad in [
        "../etc",
        "a/b",
        "",
        "-rf",
        ".hidden",
        "UPPER",
        "x".repeat(64).as_str(),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_zcbot-sandbox"))
            .arg("ensure")
            .arg(format!("--user={bad}"))
            .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
            .env("ZCBOT_USERS_ROOT", "/nonexistent/users")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains("invalid user id"), "{bad:?}: {stderr}");
        assert!(
            !stderr.contains("Docker"),
            "{bad:?} reached Docker: {stderr}"
        );
    }
    assert!(!std::path::Path::new("/nonexistent").exists());
    assert!(UserId::parse("..").is_err());
}

#[tokio::test]
async fn cli_commands_log_warnings_only_unless_rust_log_says_otherwise() {
    let t = TestPool::new("quiet");
    let ps = |rust_log: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_zcbot-sandbox"));
        cmd.arg("ps").envs(t.env()).env_remove("RUST_LOG");
        if let Some(filter) = rust_log {
            cmd.env("RUST_LOG", filter);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let quiet = ps(None);
    assert!(!quiet.contains(" INFO "), "{quiet}");
    // Control: the same command at info says what it did ("sandbox pool ready", ...).
    let chatty = ps(Some("zcbot_sandbox=info"));
    assert!(chatty.contains(" INFO "), "{chatty}");
}

#[test]
fn rm_without_a_target_names_both_targets() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zcbot-sandbox"))
        .arg("rm")
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--user") && stderr.contains("--all"),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_unreachable_daemon_is_named_with_the_fix() {
    let t = TestPool::new("down");
    let mut cfg = t.config();
    cfg.docker_host = Some("unix:///nonexistent/docker.sock".into());
    let err = SandboxPool::connect(cfg).await.err().unwrap();
    let msg = err.to_string();
    assert_eq!(err.kind(), "docker_unreachable", "{msg}");
    assert!(
        msg.contains("unix:///nonexistent/docker.sock") && msg.contains("is dockerd running"),
        "{msg}"
    );
    // As the CLI prints it: the cause once. A socket nobody listens on says so (the client's
    // own text hides the errno).
    let dead = t.root.join("dead.sock");
    std::fs::create_dir_all(&t.root).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
    for (host, cause) in [
        (
            "unix:///nonexistent/docker.sock".to_owned(),
            "Socket not found",
        ),
        (format!("unix://{}", dead.display()), "Connection refused"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_zcbot-sandbox"))
            .arg("ps")
            .envs(t.env())
            .env("DOCKER_HOST", &host)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert_eq!(stderr.matches(cause).count(), 1, "{host}: {stderr}");
        assert_eq!(
            stderr.matches("not reachable").count(),
            1,
            "{host}: {stderr}"
        );
    }
}

#[tokio::test]
async fn a_hung_daemon_gives_a_timeout_not_a_hang() {
    let t = TestPool::new("hung");
    let sock = t.root.join("hung.sock");
    std::fs::create_dir_all(&t.root).unwrap();
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    // Accepts connections and never answers.
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let mut cfg = t.config();
    cfg.docker_host = Some(format!("unix://{}", sock.display()));
    cfg.docker_timeout = Duration::from_secs(1);
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), SandboxPool::connect(cfg))
        .await
        .expect("connect hung past its deadline")
        .err()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(err.kind(), "docker_timeout", "{err}");
    assert!(err.to_string().contains("ZCBOT_DOCKER_TIMEOUT"), "{err}");
    server.abort();
}

#[tokio::test]
async fn a_missing_image_says_how_to_build_it() {
    let mut t = TestPool::new("noimage");
    t.set("ZCBOT_SANDBOX_IMAGE", "zcbot-sandbox:does-not-exist");
    let err = SandboxPool::connect(t.config()).await.err().unwrap();
    assert_eq!(err.kind(), "image_missing");
    assert!(err.to_string().contains("scripts/build-image.sh"), "{err}");
}

#[tokio::test]
async fn an_existing_network_with_other_settings_is_refused() {
    let t = TestPool::new("netbad");
    // Same name, but not internal and with inter-container traffic on.
    docker(&["network", "create", &t.network]);
    let err = SandboxPool::connect(t.config()).await.err().unwrap();
    assert_eq!(err.kind(), "network_mismatch", "{err}");
    assert!(err.to_string().contains("not internal"), "{err}");
    let (ok, _, _) = docker_try(&["network", "inspect", &t.network]);
    assert!(ok, "the operator's network is left as it was");
}

#[tokio::test]
async fn concurrent_network_creation_converges_on_one_network() {
    let t = TestPool::new("netrace");
    let cfg = t.config();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let cfg = cfg.clone();
            tokio::spawn(async move {
                SandboxPool::connect(cfg)
                    .await
                    .map(|p| p.network().id.clone())
            })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap().unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every pool uses the same network");
    let listed = docker(&[
        "network",
        "ls",
        "--filter",
        &format!("name={}", t.network),
        "--format",
        "{{.Name}}",
    ]);
    assert_eq!(
        listed.lines().filter(|l| *l == t.network).count(),
        1,
        "{listed}"
    );
    assert_eq!(inspect(&t.network, "{{.Internal}}"), "true");
    assert_eq!(
        inspect(
            &t.network,
            "{{index .Options \"com.docker.network.bridge.enable_icc\"}}"
        ),
        "false"
    );
}

#[tokio::test]
async fn a_symlink_in_place_of_the_user_folder_is_refused() {
    let t = TestPool::new("wslink");
    let pool = t.pool().await;
    let user = t.user("link");
    std::os::unix::fs::symlink("/etc", pool.workspace(&user)).unwrap();
    let err = pool.ensure(&user).await.unwrap_err();
    assert_eq!(err.kind(), "io", "{err}");
    assert!(err.to_string().contains("symlink"), "{err}");
    assert!(t.containers().is_empty());
}
