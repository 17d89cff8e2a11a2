//! The persistent exec channel under abuse, against the real Docker Engine: its helper killed from
//! inside the sandbox, a flood next to a small call, 64 calls at once, a hostile helper writing
//! malformed frames, the container removed under a live channel. Witnesses: `ps` through the
//! docker CLI, and the executor's transport counters.

mod common;

use std::time::{Duration, Instant};

use common::{exec_as, TestPool};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use zcbot_sandbox::exec::metrics::TransportStats;
use zcbot_sandbox::exec::{Executor, ToolCall, ToolResult};
use zcbot_sandbox::{Error, UserId};

async fn channel_executor(t: &TestPool) -> Executor {
    let mut cfg = t.config();
    cfg.backend = zcbot_sandbox::config::Backend::Docker;
    assert_eq!(cfg.transport, zcbot_sandbox::config::Transport::Channel);
    Executor::from_config(cfg).await.expect("docker executor")
}

async fn try_sh(
    ex: &Executor,
    user: &UserId,
    command: &str,
    timeout: u64,
) -> Result<ToolResult, Error> {
    let call = ToolCall::parse("shell", json!({ "command": command, "timeout": timeout })).unwrap();
    ex.run(user, call, &CancellationToken::new()).await
}

async fn sh(ex: &Executor, user: &UserId, command: &str) -> ToolResult {
    try_sh(ex, user, command, 60).await.unwrap()
}

fn stats(ex: &Executor) -> (u64, u64, u64, u64) {
    let s: &TransportStats = ex.transport_stats().unwrap();
    (
        s.opens.get(),
        s.deaths.get(),
        s.fallbacks.get(),
        s.channel.count(),
    )
}

/// The sandbox user's processes whose command line contains `needle`, waiting up to `within` for
/// none to be left.
async fn left(container: &str, needle: &str, within: Duration) -> Vec<String> {
    let until = Instant::now() + within;
    loop {
        let (_, out, _) = exec_as(container, "0:0", "ps -eo pid=,ppid=,comm=,args=");
        let found: Vec<String> = out
            .lines()
            .filter(|l| l.contains(needle) && !l.contains("ps -eo"))
            .map(str::to_owned)
            .collect();
        if found.is_empty() || Instant::now() > until {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn calls_share_one_channel_and_keep_their_own_session() {
    let t = TestPool::new("chone");
    let ex = channel_executor(&t).await;
    let user = t.user("u");
    let a = sh(&ex, &user, "ps -o sid= -p $$; echo $$").await;
    let b = sh(&ex, &user, "ps -o sid= -p $$; echo $$").await;
    // Each call leads its own session (sid == its pid): a kill of one never reaches another.
    for r in [&a, &b] {
        let v: Vec<&str> = r.stdout.split_whitespace().collect();
        assert_eq!(v.len(), 2, "{r:?}");
        assert_eq!(v[0], v[1], "the call is not its own session leader: {r:?}");
    }
    let (opens, deaths, fallbacks, served) = stats(&ex);
    assert_eq!((opens, deaths, fallbacks, served), (1, 0, 0, 2));
    // The helper is the sandbox uid, not dumpable (no ptrace, no /proc/PID/fd for the user).
    let container = t.container_name(&user);
    let (_, out, _) = exec_as(
        &container,
        &common::tenant(&container),
        "p=$(pgrep -x zcbot-supervise); ps -o user= -p $p; ls /proc/$p/fd 2>&1 | head -1",
    );
    let mut lines = out.lines();
    assert_eq!(
        lines.next().map(str::trim),
        Some(common::tenant_uid(&container).as_str()),
        "{out}"
    );
    // Linux says EACCES; gVisor's kernel EINVAL. Either way nothing is listed.
    let listing = lines.next().unwrap_or("");
    assert!(
        listing.contains("Permission denied") || listing.contains("Invalid argument"),
        "the sandbox user can open the helper's descriptors: {out}"
    );
}

#[tokio::test]
async fn killing_the_helper_mid_call_fails_the_call_clearly_and_leaves_nothing() {
    let t = TestPool::new("chkill");
    let ex = channel_executor(&t).await;
    let user = t.user("u");
    let container = t.container_name(&user);
    assert_eq!(sh(&ex, &user, "echo warm").await.stdout, "warm\n");
    let victim = try_sh(
        &ex,
        &user,
        "setsid sleep 6001 & (sleep 6002 &); sleep 6003; echo never",
        60,
    );
    let killer = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        // From inside the sandbox, as its user: the helper's comm is exactly zcbot-supervise
        // (per-call supervisors are zcbot-call).
        exec_as(
            &container,
            &common::tenant(&container),
            "pkill -9 -x zcbot-supervise; echo $?",
        )
    };
    let started = Instant::now();
    let (v, (_, killed, _)) = tokio::join!(victim, killer);
    assert_eq!(killed, "0", "no helper to kill");
    let err = v.expect_err("a call whose channel died mid-run must fail");
    assert_eq!(err.kind(), "channel_lost", "{err}");
    assert!(
        err.to_string().contains("run the call again"),
        "the error says what to do: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    let leftovers = left(&container, "sleep 600", Duration::from_secs(3)).await;
    assert!(
        leftovers.is_empty(),
        "the call's processes survived: {leftovers:?}"
    );
    // The next call opens a new channel.
    assert_eq!(sh(&ex, &user, "echo again").await.stdout, "again\n");
    let (opens, deaths, fallbacks, _) = stats(&ex);
    assert_eq!((opens, deaths, fallbacks), (2, 1, 0));
}

#[tokio::test]
async fn a_flood_never_holds_back_a_small_call_of_the_same_user() {
    let mut t = TestPool::new("chflood");
    t.set("ZCBOT_OUTPUT_CAP", "256KiB");
    let ex = channel_executor(&t).await;
    let user = t.user("u");
    assert_eq!(sh(&ex, &user, "echo warm").await.stdout, "warm\n");
    let flood = sh(
        &ex,
        &user,
        "echo FIRST; yes flood | head -c 3000000000; echo; echo LAST",
    );
    let small = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut slowest = Duration::ZERO;
        for i in 0..10 {
            let started = Instant::now();
            let r = sh(&ex, &user, &format!("echo small {i}")).await;
            slowest = slowest.max(started.elapsed());
            assert_eq!(r.stdout, format!("small {i}\n"));
        }
        (slowest, Instant::now())
    };
    let (f, (slowest, small_done)) = tokio::join!(flood, small);
    let flood_done = Instant::now();
    assert!(
        small_done < flood_done,
        "the small calls should finish while the flood still runs"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "a small call waited {slowest:?} behind the flood"
    );
    assert_eq!(f.exit_code, Some(0), "{:?}", f.stderr);
    assert!(f.truncated.stdout);
    assert!(f.stdout.starts_with("FIRST\nflood\n"), "head kept");
    assert!(f.stdout.ends_with("flood\n\nLAST\n"), "tail kept");
    assert!(f.stdout.len() < 256 * 1024 + 100, "{}", f.stdout.len());
    let marker = f
        .stdout
        .find("bytes omitted")
        .expect("the count of what was dropped");
    assert!(
        f.stdout[marker.saturating_sub(30)..marker].contains("29"),
        "about 3e9 bytes were left out: {}",
        &f.stdout[marker.saturating_sub(30)..marker + 20]
    );
}

#[tokio::test]
async fn sixty_four_concurrent_calls_of_one_user_run_in_parallel_over_one_channel() {
    let t = TestPool::new("ch64");
    let ex = channel_executor(&t).await;
    let user = t.user("u");
    assert_eq!(sh(&ex, &user, "echo warm").await.stdout, "warm\n");
    let started = Instant::now();
    let calls = (0..64).map(|i| {
        let ex = &ex;
        let user = &user;
        async move { (i, sh(ex, user, &format!("sleep 1; echo call {i}")).await) }
    });
    let results = futures_util::future::join_all(calls).await;
    let took = started.elapsed();
    for (i, r) in &results {
        assert_eq!(r.exit_code, Some(0), "call {i}: {r:?}");
        assert_eq!(r.stdout, format!("call {i}\n"));
    }
    assert!(
        took < Duration::from_secs(15),
        "64 one-second calls took {took:?}: they did not run in parallel"
    );
    let (opens, deaths, fallbacks, served) = stats(&ex);
    assert_eq!((opens, deaths, fallbacks, served), (1, 0, 0, 65));
}

/// A helper replaced by the sandbox (here: by the image, for users with a marker file in their
/// workspace) that greets correctly (protocol version 3), then writes garbage. Only that user's channel dies; their
/// calls still run (by per-call exec), nothing of the hostile helper is left, and another user's
/// channel in the same pool is untouched.
#[tokio::test]
async fn malformed_frames_from_a_hostile_helper_kill_only_that_channel() {
    let mut t = TestPool::new("chhostile");
    let image = common::build_test_image(
        &mut t,
        r#"RUN mkdir -p /usr/local/lib/zcbot && mv /usr/local/bin/zcbot-supervise /usr/local/lib/zcbot/ && \
    printf '%s\n' '#!/bin/sh' \
    'if [ "$1" = --serve ] && [ -e /workspace/.hostile ]; then' \
    'printf "\000\000\000\021\020\000\000\000\000\000\000\000\000\000\000\000\003\000\000\000\001"' \
    'head -c 20 >/dev/null' \
    'printf "\377\377\377\377garbage"' \
    'while :; do sleep 1; done' \
    'fi' \
    'exec /usr/local/lib/zcbot/zcbot-supervise "$@"' > /usr/local/bin/zcbot-supervise && \
    chmod 0755 /usr/local/bin/zcbot-supervise"#,
    );
    t.set("ZCBOT_SANDBOX_IMAGE", &image);
    let ex = channel_executor(&t).await;
    let (bad, good) = (t.user("bad"), t.user("good"));
    assert_eq!(sh(&ex, &good, "echo hello").await.stdout, "hello\n");
    let mark = ToolCall::parse("write_file", json!({"path": ".hostile", "content": ""})).unwrap();
    ex.run(&bad, mark, &CancellationToken::new()).await.unwrap();

    let (b, g) = tokio::join!(
        sh(&ex, &bad, "echo still served"),
        sh(&ex, &good, "sleep 1; echo unaffected")
    );
    assert_eq!(b.stdout, "still served\n", "{b:?}");
    assert_eq!(g.stdout, "unaffected\n", "{g:?}");
    // Two channels of the bad user died (the first and its one retry), then per-call exec.
    let (opens, deaths, fallbacks, _) = stats(&ex);
    assert_eq!((opens, deaths, fallbacks), (3, 2, 1));
    assert_eq!(sh(&ex, &bad, "echo again").await.stdout, "again\n");
    assert_eq!(
        stats(&ex).2,
        2,
        "backing off: per-call exec without a new channel"
    );
    // The good user's channel is the one it always had.
    assert_eq!(sh(&ex, &good, "echo fine").await.stdout, "fine\n");
    assert_eq!(stats(&ex).0, 3);
    let container = t.container_name(&bad);
    let leftovers = left(&container, "--serve", Duration::from_secs(5)).await;
    assert!(
        leftovers.is_empty(),
        "the hostile helper survived: {leftovers:?}"
    );
    // (Its loop's `sleep 1`; the entry's own `sleep infinity` is the container's idle.)
    let leftovers = left(&container, "sleep 1", Duration::from_secs(3)).await;
    assert!(leftovers.is_empty(), "its children survived: {leftovers:?}");
}

#[tokio::test]
async fn a_container_removed_under_a_live_channel_fails_the_call_and_the_next_one_works() {
    let t = TestPool::new("chrm");
    let ex = channel_executor(&t).await;
    let user = t.user("u");
    let first = ex.pool().unwrap().ensure(&user).await.unwrap();
    assert_eq!(sh(&ex, &user, "echo warm").await.stdout, "warm\n");
    let victim = try_sh(&ex, &user, "sleep 30; echo never", 60);
    let remover = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        common::docker(&["rm", "-f", &first.name]);
    };
    let started = Instant::now();
    let (v, ()) = tokio::join!(victim, remover);
    let err = v.expect_err("the call's container is gone");
    // Removed from outside the pool: said so, not "run the call again".
    assert_eq!(err.kind(), "sandbox_removed", "{err}");
    assert!(err.to_string().contains("docker rm"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the call hung for {:?}",
        started.elapsed()
    );
    let r = sh(&ex, &user, "echo works").await;
    assert_eq!(r.stdout, "works\n");
    let now = ex.pool().unwrap().ensure(&user).await.unwrap();
    assert_ne!(now.container_id, first.container_id);
}
