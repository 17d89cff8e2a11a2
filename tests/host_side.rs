//! Attacks on the host side, written as a tenant whose agent runs code in the sandbox and calls
//! the file tools: trees that would crash or stall the daemon, pathological paths, a full disk,
//! a planted setuid file, per-uid kernel limits, a supervisor rewritten from inside, and slow or
//! idle HTTP connections. Each asserts what a user of the service would notice, with a positive
//! control wherever the attack could fail for the wrong reason.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{docker_executor, http, Daemon, TestPool};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use zcbot_sandbox::exec::{Executor, ToolCall, ToolResult};
use zcbot_sandbox::UserId;

/// Asserts a 400 `file_limit` whose message names `limit`.
fn refused_for(s: u16, r: &Value, limit: &str) {
    assert_eq!(
        (s, r["error"]["kind"].as_str()),
        (400, Some("file_limit")),
        "{r}"
    );
    let message = r["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(limit), "{limit}: {r}");
}

async fn run(
    ex: &Executor,
    user: &UserId,
    tool: &str,
    args: Value,
) -> zcbot_sandbox::Result<ToolResult> {
    ex.run(
        user,
        ToolCall::parse(tool, args).unwrap(),
        &CancellationToken::new(),
    )
    .await
}

async fn sh(ex: &Executor, user: &UserId, command: &str) -> ToolResult {
    run(
        ex,
        user,
        "shell",
        json!({"command": command, "timeout": 120}),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn deep_and_wide_trees_built_in_the_sandbox_neither_crash_nor_escape_the_file_tools() {
    let mut t = TestPool::new("hdeep");
    let mut d = Daemon::start(&mut t);
    let u = t.user("u");
    // 5000 levels (the old recursive delete overflowed a worker's stack on such a tree) and a
    // folder of 30,000 files, built from inside the sandbox.
    let (s, r) = d
        .tool(
            &u,
            "run_python",
            json!({"timeout": 120, "code": "import os\nos.mkdir('deep'); os.chdir('deep')\nfor i in range(5000):\n    os.mkdir('d'); os.chdir('d')\nopen('bottom', 'w').write('x')\nos.chdir('/workspace'); os.mkdir('wide')\nfor i in range(30000):\n    open(f'wide/f{i:05}', 'w').close()\nprint('built')"}),
        )
        .await;
    assert_eq!((s, r["stdout"].as_str()), (200, Some("built\n")), "{r}");

    // A wide folder: the first 10,000 names in order, and said to be truncated.
    let (s, r) = d.tool(&u, "list_dir", json!({"path": "wide"})).await;
    assert_eq!(s, 200, "{r}");
    let entries = r["data"]["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 10_000);
    assert_eq!(r["data"]["truncated"], true);
    assert_eq!(entries[0]["name"], "f00000");
    assert_eq!(entries[9_999]["name"], "f09999");

    // Paths past the limits are refused by name, before anything is touched.
    let long = format!("{}bottom", "d/".repeat(3000));
    let (s, r) = d
        .tool(&u, "read_file", json!({"path": format!("deep/{long}")}))
        .await;
    refused_for(s, &r, "path length");
    let (s, r) = d
        .tool(
            &u,
            "read_file",
            json!({"path": format!("deep/{}bottom", "d/".repeat(300))}),
        )
        .await;
    refused_for(s, &r, "path depth");
    let started = Instant::now();
    let (s, r) = d
        .tool(
            &u,
            "write_file",
            json!({"path": format!("{}x", "n/".repeat(400_000)), "content": "x"}),
        )
        .await;
    refused_for(s, &r, "path length");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(
        !t.root.join("users").join(u.as_str()).join("n").exists(),
        "it created folders"
    );

    // Deleting the deep tree stops at the depth limit with a clear error; the daemon lives on
    // and the tree is still whole.
    let (s, r) = d.tool(&u, "delete_path", json!({"path": "deep"})).await;
    refused_for(s, &r, "deeper than 256");
    assert!(d.alive(), "the daemon died");
    let (s, _, _) = http(&d.addr, "GET", "/healthz", None).await;
    assert_eq!(s, 200);
    let r = d
        .tool(
            &u,
            "shell",
            json!({"command": "find deep -name bottom | wc -l"}),
        )
        .await
        .1;
    assert_eq!(r["stdout"], "1\n", "{r}");
    // The positive control: a tree within the limits goes, entry by entry.
    let (s, r) = d.tool(&u, "delete_path", json!({"path": "wide"})).await;
    assert_eq!(
        (s, r["data"]["entries"].as_u64()),
        (200, Some(30_001)),
        "{r}"
    );
    // And the sandbox can always remove its own tree.
    let r = d
        .tool(&u, "shell", json!({"command": "rm -rf deep && echo gone"}))
        .await
        .1;
    assert_eq!(r["stdout"], "gone\n", "{r}");
    assert!(d.alive());
}

#[tokio::test]
async fn two_tenants_flooding_the_file_tools_do_not_delay_a_third() {
    let mut t = TestPool::new("hflood");
    t.set("ZCBOT_USER_MAX_CALLS", "8");
    let d = Daemon::start(&mut t);
    let (a, b, c) = (t.user("a"), t.user("b"), t.user("c"));
    for u in [&a, &b] {
        let (s, r) = d
            .tool(u, "shell", json!({"command": "mkdir -p wide && cd wide && seq 1 100000 | xargs touch && echo ok", "timeout": 300}))
            .await;
        assert_eq!((s, r["stdout"].as_str()), (200, Some("ok\n")), "{r}");
    }
    // Warm: the third tenant's `true` is a couple of milliseconds.
    assert_eq!(d.tool(&c, "shell", json!({"command": "true"})).await.0, 200);
    let stop = Instant::now() + Duration::from_secs(15);
    let mut attackers = Vec::new();
    for u in [&a, &a, &a, &a, &b, &b, &b, &b] {
        let (addr, u) = (d.addr.clone(), u.clone());
        attackers.push(tokio::spawn(async move {
            let mut n = 0u32;
            while Instant::now() < stop {
                let (path, body) = match n % 3 {
                    0 => ("list_dir", json!({"path": "wide"})),
                    1 => (
                        "write_file",
                        json!({"path": format!("{}x", "n/".repeat(500_000)), "content": "x"}),
                    ),
                    _ => (
                        "read_file",
                        json!({"path": format!("{}/x", "a/..".repeat(300_000))}),
                    ),
                };
                http(
                    &addr,
                    "POST",
                    &format!("/v1/users/{u}/tools/{path}"),
                    Some(body.to_string()),
                )
                .await;
                n += 1;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (mut calls, mut health) = (Vec::new(), Vec::new());
    while Instant::now() < stop {
        let t0 = Instant::now();
        let (s, r) = d.tool(&c, "shell", json!({"command": "true"})).await;
        assert_eq!(s, 200, "{r}");
        calls.push(t0.elapsed());
        let t0 = Instant::now();
        assert_eq!(http(&d.addr, "GET", "/healthz", None).await.0, 200);
        health.push(t0.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut sent = 0;
    for a in attackers {
        sent += a.await.unwrap();
    }
    calls.sort();
    health.sort();
    let (p50, p90, max) = (
        calls[calls.len() / 2],
        calls[calls.len() * 9 / 10],
        *calls.last().unwrap(),
    );
    let (h50, hmax) = (health[health.len() / 2], *health.last().unwrap());
    println!("third tenant under {sent} attacking file calls: true p50 {p50:?} p90 {p90:?} max {max:?}; /healthz p50 {h50:?} max {hmax:?} (n = {})", calls.len());
    // Generous bounds (a 2-core machine, other tests running beside); before the change the
    // same attack gave: true p50 633 ms, max 1.7 s; /healthz max 1.06 s. The median and the 90th
    // percentile tell a daemon the attack holds up from one that is not held up; one sample
    // among some fifty may still meet a stall of the machine (the engine, another test), so the
    // maximum only has to stay short of what a stalled daemon would show.
    assert!(sent > 50, "the attack did not run ({sent} calls)");
    assert!(p50 < Duration::from_millis(300), "true p50 {p50:?}");
    assert!(p90 < Duration::from_millis(1000), "true p90 {p90:?}");
    assert!(max < Duration::from_secs(5), "true took {max:?}");
    assert!(hmax < Duration::from_millis(800), "/healthz took {hmax:?}");
}

#[tokio::test]
async fn a_tenant_cannot_write_past_its_quota_and_a_failed_write_loses_nothing() {
    let mut t = TestPool::with_quota("hquota", 512);
    t.set("ZCBOT_SANDBOX_DISK", "64MiB");
    let ex = docker_executor(&t).await;
    let (u, v) = (t.user("u"), t.user("v"));
    let w = run(
        &ex,
        &u,
        "write_file",
        json!({"path": "keep.txt", "content": "original"}),
    )
    .await;
    assert!(w.is_ok(), "{w:?}");
    // From inside the sandbox: dd stops at the quota.
    let r = sh(&ex, &u, "dd if=/dev/zero of=big bs=1M count=200 2>&1; sync").await;
    assert!(r.stdout.contains("Disk quota exceeded"), "{r:?}");
    let host = t
        .quota_fs
        .as_ref()
        .unwrap()
        .mount
        .join("users")
        .join(u.as_str());
    // A nested subvolume (its own qgroup, outside the user's limit) cannot be made from inside.
    let nest = "import fcntl, os\nbuf = bytearray(4096); buf[8:14] = b'nested'\nfd = os.open('.', os.O_RDONLY)\nfor req in (0x5000940e, 0x50009418):\n    try:\n        fcntl.ioctl(fd, req, buf); print('created')\n    except OSError as e:\n        print(e.errno)";
    let r = run(&ex, &u, "run_python", json!({ "code": nest }))
        .await
        .unwrap();
    assert_eq!(r.stdout, "1\n1\n", "EPERM for both subvolume ioctls: {r:?}");
    // The positive control: on this very file system, an unprivileged host account without the
    // sandbox's filter can (so the refusal above is the filter's, not the kernel's).
    let open_dir = t.quota_fs.as_ref().unwrap().mount.join("open");
    std::fs::create_dir_all(&open_dir).unwrap();
    std::os::unix::fs::chown(&open_dir, Some(65534), Some(65534)).unwrap();
    let nest_there = nest.replace("os.open('.'", &format!("os.open('{}'", open_dir.display()));
    let (made, out) = as_nobody(&["python3", "-c", &nest_there]);
    assert!(made && out.starts_with("created"), "{out}");
    let size = std::fs::metadata(host.join("big")).unwrap().len();
    // The positive control: the write really ran up to about the quota, then stopped.
    assert!((40 << 20..=72 << 20).contains(&size), "big is {size} bytes");
    // The host's file tools meet the same quota; the file being replaced stays whole.
    let big = "y".repeat(2 << 20);
    let err = run(
        &ex,
        &u,
        "write_file",
        json!({"path": "keep.txt", "content": big}),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), "disk_full", "{err}");
    let r = run(&ex, &u, "read_file", json!({"path": "keep.txt"}))
        .await
        .unwrap();
    assert_eq!(
        serde_json::to_value(&r.data).unwrap()["content"],
        "original"
    );
    let leftovers = sh(&ex, &u, "ls -A | grep -c zcbot-write || true").await;
    assert_eq!(leftovers.stdout.trim(), "0", "a temporary file was left");
    // Another tenant on the same file system is not affected.
    let r = sh(
        &ex,
        &v,
        "dd if=/dev/zero of=ok bs=1M count=32 2>&1 && echo wrote",
    )
    .await;
    assert!(r.stdout.contains("wrote"), "{r:?}");
    // Room made, writes work again.
    run(&ex, &u, "delete_path", json!({"path": "big"}))
        .await
        .unwrap();
    // btrfs frees the space at its next commit.
    let mut ok = false;
    for _ in 0..50 {
        if run(
            &ex,
            &u,
            "write_file",
            json!({"path": "keep.txt", "content": "new"}),
        )
        .await
        .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "the quota never gave the space back");
}

/// Runs `argv` as nobody (uid 65534), the way another host account would.
fn as_nobody(argv: &[&str]) -> (bool, String) {
    // Through a shell: setpriv itself resolves its command before it drops privileges.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["sh", "-c", "\"$@\"", "sh"])
        .args(argv)
        .output()
        .expect("setpriv (util-linux)");
    common::combined(out)
}

#[tokio::test]
async fn a_setuid_file_planted_by_a_tenant_gives_another_host_account_nothing() {
    let t = TestPool::with_quota("hsuid", 256);
    let ex = docker_executor(&t).await;
    let u = t.user("u");
    let r = sh(
        &ex,
        &u,
        "cp /usr/bin/id planted && chmod 4755 planted && echo ok",
    )
    .await;
    assert_eq!(r.stdout, "ok\n", "{r:?}");
    let users = t.quota_fs.as_ref().unwrap().mount.join("users");
    let planted = users.join(u.as_str()).join("planted");
    let meta = std::fs::metadata(&planted).unwrap();
    let sb_uid = meta.uid();
    assert!(
        meta.mode() & 0o4000 != 0 && sb_uid >= 200_000,
        "the plant is setuid to the tenant"
    );

    // The users root is root's alone: another account cannot even reach the file.
    let (ran, out) = as_nobody(&[planted.to_str().unwrap()]);
    assert!(!ran && out.contains("Permission denied"), "{out}");

    // Even if an operator opened the folders up, the mount is nosuid: no tenant privilege.
    std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        planted.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let (ran, out) = as_nobody(&[planted.to_str().unwrap()]);
    assert!(
        ran && out.contains("uid=65534") && !out.contains("euid="),
        "{out}"
    );
    // The positive control: the same file on a file system without nosuid does give the
    // tenant's uid (so the check above can fail).
    let elsewhere = t.root.join("suid-control");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::set_permissions(&t.root, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = elsewhere.join("id");
    assert!(Command::new("cp")
        .arg("-p")
        .arg(&planted)
        .arg(&copy)
        .status()
        .unwrap()
        .success());
    let (_, out) = as_nobody(&[copy.to_str().unwrap()]);
    assert!(out.contains(&format!("euid={sb_uid}")), "{out}");
    std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o700)).unwrap();
}

#[tokio::test]
async fn each_tenant_has_its_own_uid_and_its_own_per_uid_limits() {
    let t = TestPool::new("huid");
    let ex = docker_executor(&t).await;
    let (a, b) = (t.user("a"), t.user("b"));
    let ua = sh(&ex, &a, "id -u").await.stdout;
    let ub = sh(&ex, &b, "id -u").await.stdout;
    assert_ne!(ua, ub, "two tenants share a uid");
    // a takes every inotify instance its uid may have, and holds them; meanwhile b opens one.
    let hold = "import ctypes, os, time\nlibc = ctypes.CDLL(None, use_errno=True)\nfds = []\nwhile True:\n    fd = libc.inotify_init1(0)\n    if fd < 0:\n        break\n    fds.append(fd)\nopen('held', 'w').write(f'{len(fds)} {ctypes.get_errno()}')\ntime.sleep(20)";
    let holder = run(&ex, &a, "run_python", json!({"code": hold, "timeout": 40}));
    let probe = async {
        let held = t.root.join("users").join(a.as_str()).join("held");
        let until = Instant::now() + Duration::from_secs(30);
        while !held.exists() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let held = std::fs::read_to_string(&held).unwrap_or_default();
        let r = run(
            &ex,
            &b,
            "run_python",
            json!({"code": "import ctypes\nprint(ctypes.CDLL(None).inotify_init1(0) >= 0)"}),
        )
        .await
        .unwrap();
        (held, r.stdout)
    };
    let (_, (held, b_got)) = tokio::join!(holder, probe);
    let (n, errno) = held.split_once(' ').unwrap_or(("0", "0"));
    // The positive control: a really hit its uid's limit (EMFILE).
    assert_eq!(errno, "24", "a stopped for another reason: {held}");
    assert!(n.parse::<u32>().unwrap() >= 100, "{held}");
    assert_eq!(b_got, "True\n", "b is starved by a's per-uid limit");
}

#[tokio::test]
async fn a_call_cannot_rewrite_its_supervisor_over_either_transport() {
    for transport in ["exec", "channel"] {
        let mut t = TestPool::new("hmem");
        t.set("ZCBOT_EXEC_TRANSPORT", transport);
        let ex = docker_executor(&t).await;
        let u = t.user("u");
        let code = "import os, subprocess\nchild = subprocess.Popen(['sleep', '9393'])\ndef tryopen(pid):\n    try:\n        open(f'/proc/{pid}/mem', 'r+b').close(); return 'open'\n    except PermissionError:\n        return 'denied'\nprint(tryopen(os.getppid()), tryopen(child.pid), flush=True)\nimport time; time.sleep(30)";
        let r = run(&ex, &u, "run_python", json!({"code": code, "timeout": 2}))
            .await
            .unwrap();
        // The supervisor is not dumpable: its memory is closed to the call; the positive
        // control: the call's own child of the same uid is open to it.
        assert_eq!(r.stdout, "denied open\n", "{transport}: {r:?}");
        assert!(r.timed_out, "{transport}: {r:?}");
        let left = sh(
            &ex,
            &u,
            "ps -u $(id -u) -o args= | grep -c '^sleep 9393' || true",
        )
        .await;
        assert_eq!(
            left.stdout.trim(),
            "0",
            "{transport}: the timeout left the call's processes"
        );
    }
}

#[tokio::test]
async fn a_folder_of_the_old_single_uid_is_migrated_to_the_tenants_own() {
    let t = TestPool::new("hmig");
    let u = t.user("u");
    // What an earlier release left: a folder of uid 1000 with a file and a folder in it.
    let folder = t.root.join("users").join(u.as_str());
    std::fs::create_dir_all(folder.join("sub")).unwrap();
    std::fs::write(folder.join("sub").join("old.txt"), "old").unwrap();
    for p in [
        folder.clone(),
        folder.join("sub"),
        folder.join("sub").join("old.txt"),
    ] {
        std::os::unix::fs::lchown(&p, Some(1000), Some(1000)).unwrap();
    }
    let ex = docker_executor(&t).await;
    let r = sh(
        &ex,
        &u,
        "id -u; echo more >> sub/old.txt && cat sub/old.txt",
    )
    .await;
    let uid: u32 = r.stdout.lines().next().unwrap().parse().unwrap();
    assert!(uid >= 200_000, "{r:?}");
    assert_eq!(
        r.stdout.lines().skip(1).collect::<Vec<_>>(),
        ["oldmore"],
        "{r:?}"
    );
    for p in [
        folder.clone(),
        folder.join("sub"),
        folder.join("sub").join("old.txt"),
    ] {
        assert_eq!(std::fs::metadata(&p).unwrap().uid(), uid, "{p:?}");
    }
}

#[tokio::test]
async fn slow_idle_and_surplus_connections_are_cut_but_a_long_call_is_not() {
    let mut t = TestPool::new("hhttp");
    t.set("ZCBOT_HTTP_HEADER_TIMEOUT", "1s")
        .set("ZCBOT_HTTP_BODY_TIMEOUT", "1s")
        .set("ZCBOT_HTTP_IDLE_TIMEOUT", "2s")
        .set("ZCBOT_HTTP_MAX_CONNECTIONS", "4");
    let d = Daemon::start(&mut t);
    let u = t.user("u");
    let addr = d.addr.clone();
    let connect = || tokio::net::TcpStream::connect(addr.trim_start_matches("http://"));
    // Closed: the server ends the stream (read gives 0) within `within`.
    async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let mut buf = vec![0u8; 4096];
        let until = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(until.into(), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
    // Slow headers: half a request line, then nothing.
    let mut slow = connect().await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let t0 = Instant::now();
    assert!(
        closed_within(&mut slow, Duration::from_secs(5)).await,
        "a slow-header client kept its connection"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t0.elapsed()
    );
    // Idle keep-alive: one request answered, then the connection is closed after the idle time.
    let mut idle = connect().await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let t0 = Instant::now();
    assert!(
        closed_within(&mut idle, Duration::from_secs(6)).await,
        "an idle connection was kept"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(1800),
        "{:?}",
        t0.elapsed()
    );
    // A body declared and never sent: an error once ZCBOT_HTTP_BODY_TIMEOUT passes, not a hang.
    let mut mute = connect().await.unwrap();
    let head = format!(
        "POST /v1/users/{u}/tools/shell HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"comm"
    );
    mute.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), mute.read(&mut answer))
        .await
        .expect("a silent body held the connection")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("bad_body"),
        "{answer}"
    );
    // A call longer than both timeouts is answered on its connection.
    let (s, r) = d
        .tool(&u, "shell", json!({"command": "sleep 3; echo done"}))
        .await;
    assert_eq!((s, r["stdout"].as_str()), (200, Some("done\n")), "{r}");
    // Over the cap: refused at once, not queued.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect().await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = connect().await.unwrap();
    let mut refusal = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), extra.read_to_string(&mut refusal)).await;
    assert!(
        refusal.starts_with("HTTP/1.1 503") && refusal.contains("too_many_connections"),
        "{refusal:?}"
    );
    drop(held);
    // The held connections time out; then requests are served again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (s, _, metrics) = http(&d.addr, "GET", "/metrics", None).await;
    assert_eq!(s, 200);
    assert!(
        metrics.contains("zcbot_http_connections_refused_total 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("zcbot_http_connections_timed_out_total 0"),
        "{metrics}"
    );
}
