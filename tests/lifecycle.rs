//! Staged idle against the real Docker Engine: an idle sandbox is paused (the engine's cgroup
//! freezer) and the next call resumes it, with its exec channel and its Python sessions intact; a sandbox with a call is never paused; calls racing pauses all run; a restart
//! adopts a paused sandbox; the daemon's reaper pauses on its own and the listing says so.
//! Witness: `docker inspect` through the CLI.

mod common;

use std::time::{Duration, Instant};

use common::{call, docker, docker_executor, http, Daemon, TestPool};
use serde_json::{json, Value};

/// Docker's word for the container's state.
fn state(container: &str) -> String {
    docker(&["inspect", "-f", "{{.State.Status}}", container])
        .trim()
        .to_owned()
}

#[tokio::test]
async fn a_paused_sandbox_resumes_with_its_channel_and_session() {
    let t = TestPool::new("pause");
    let ex = docker_executor(&t).await;
    let pool = ex.pool().unwrap().clone();
    let user = t.user("u");
    let container = t.container_name(&user);
    let r = call(
        &ex,
        &user,
        "run_python",
        json!({"code": "x = 41", "session": "s"}),
    )
    .await;
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    assert_eq!(
        pool.pause_idle(Duration::ZERO).await.unwrap(),
        vec![user.to_string()]
    );
    assert_eq!(state(&container), "paused");
    let started = Instant::now();
    let r = call(
        &ex,
        &user,
        "run_python",
        json!({"code": "x + 1", "session": "s"}),
    )
    .await;
    let took = started.elapsed();
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["value"], "42", "{v}");
    assert_eq!(
        v["session_started"], false,
        "the session did not survive: {v}"
    );
    assert_eq!(state(&container), "running");
    assert_eq!(pool.stats().resumed, 1);
    assert!(took < Duration::from_secs(10), "{took:?}");
    // The exec channel lived through it: still the one opened by the first call.
    let r = call(&ex, &user, "shell", json!({"command": "echo after"})).await;
    assert_eq!(r.stdout, "after\n");
    let stats = ex.transport_stats().unwrap();
    assert_eq!((stats.opens.get(), stats.deaths.get()), (1, 0));
    ex.close_channels();
}

#[tokio::test]
async fn a_busy_sandbox_is_never_paused_and_calls_racing_pauses_all_run() {
    let t = TestPool::new("pausebusy");
    let ex = docker_executor(&t).await;
    let pool = ex.pool().unwrap().clone();
    let user = t.user("u");
    let container = t.container_name(&user);
    assert_eq!(
        call(&ex, &user, "shell", json!({"command": "true"}))
            .await
            .exit_code,
        Some(0)
    );
    // A call in flight: no pause, however long the sandbox has been idle before it.
    let long = call(
        &ex,
        &user,
        "shell",
        json!({"command": "sleep 2; echo done"}),
    );
    let pauser = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let paused = pool.pause_idle(Duration::ZERO).await.unwrap();
        (paused, state(&container))
    };
    let (r, (paused, seen)) = tokio::join!(long, pauser);
    assert_eq!(r.stdout, "done\n", "{r:?}");
    assert!(paused.is_empty(), "paused under a call: {paused:?}");
    assert_eq!(seen, "running");
    // Positive control: idle, it is paused.
    assert_eq!(
        pool.pause_idle(Duration::ZERO).await.unwrap(),
        vec![user.to_string()]
    );
    assert_eq!(state(&container), "paused");

    // Calls and pauses at once: every call runs and answers.
    for i in 0..20 {
        let one = call(&ex, &user, "shell", json!({"command": format!("echo {i}")}));
        let pause = pool.pause_idle(Duration::ZERO);
        let (r, p) = tokio::join!(one, pause);
        p.unwrap();
        assert_eq!(r.stdout, format!("{i}\n"), "{r:?}");
    }
    let r = call(&ex, &user, "shell", json!({"command": "echo last"})).await;
    assert_eq!(r.stdout, "last\n");
    ex.close_channels();
}

#[tokio::test]
async fn a_restart_adopts_a_paused_sandbox() {
    let t = TestPool::new("pauseadopt");
    let user = t.user("u");
    let container = t.container_name(&user);
    {
        let ex = docker_executor(&t).await;
        call(&ex, &user, "shell", json!({"command": "true"})).await;
        ex.close_channels();
        let pool = ex.pool().unwrap();
        assert_eq!(
            pool.pause_idle(Duration::ZERO).await.unwrap(),
            vec![user.to_string()]
        );
    }
    assert_eq!(state(&container), "paused");
    let ex = docker_executor(&t).await;
    let report = ex.pool().unwrap().reconcile().await.unwrap();
    assert_eq!(report.adopted, vec![user.to_string()], "{report:?}");
    assert_eq!(state(&container), "running");
    let r = call(&ex, &user, "shell", json!({"command": "echo back"})).await;
    assert_eq!(r.stdout, "back\n");
    assert_eq!(
        ex.pool().unwrap().stats().ensures_cold,
        0,
        "the adopted sandbox was recreated"
    );
    ex.close_channels();
}

/// The daemon's reaper pauses an idle sandbox on its own; the listing and the metrics say so; the
/// next call over HTTP resumes it.
#[tokio::test]
async fn the_daemon_pauses_idle_sandboxes_and_resumes_them_for_the_next_call() {
    let mut t = TestPool::new("pausedaemon");
    t.set("ZCBOT_SANDBOX_PAUSE_AFTER", "1s")
        .set("ZCBOT_SANDBOX_REAP_EVERY", "1s")
        .set("ZCBOT_SANDBOX_IDLE", "1h");
    let d = Daemon::start(&mut t);
    let user = t.user("u");
    let container = t.container_name(&user);
    let (status, r) = d.tool(&user, "shell", json!({"command": "echo one"})).await;
    assert_eq!((status, r["stdout"].as_str()), (200, Some("one\n")), "{r}");
    let until = Instant::now() + Duration::from_secs(20);
    while state(&container) != "paused" && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        state(&container),
        "paused",
        "the reaper did not pause the idle sandbox"
    );
    let (_, _, list) = http(&d.addr, "GET", "/v1/sandboxes", None).await;
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list[0]["state"], "paused", "{list}");
    let (status, r) = d.tool(&user, "shell", json!({"command": "echo two"})).await;
    assert_eq!((status, r["stdout"].as_str()), (200, Some("two\n")), "{r}");
    let (_, _, metrics) = http(&d.addr, "GET", "/metrics", None).await;
    assert!(
        metrics.contains("zcbot_sandboxes_resumed_total 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("zcbot_sandboxes_paused_total 0"),
        "{metrics}"
    );

    // A graceful stop with the sandbox paused keeps it, thawed, for the next start (its frozen
    // channel helper would otherwise not exit, and the sandbox be recycled).
    let until = Instant::now() + Duration::from_secs(20);
    while state(&container) != "paused" && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(state(&container), "paused");
    drop(d); // SIGTERM, then waits for the exit
    assert_eq!(
        state(&container),
        "running",
        "the paused sandbox did not survive the stop"
    );
    let d = Daemon::start(&mut t);
    let (status, r) = d
        .tool(&user, "shell", json!({"command": "echo three"}))
        .await;
    assert_eq!(
        (status, r["stdout"].as_str()),
        (200, Some("three\n")),
        "{r}"
    );
    let (_, _, metrics) = http(&d.addr, "GET", "/metrics", None).await;
    assert!(
        metrics.contains("zcbot_ensures_total{kind=\"cold\"} 0"),
        "recreated: {metrics}"
    );
}
