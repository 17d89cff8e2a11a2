//! The daemon against the real engine: every endpoint, every error status with its bad input,
//! token auth, unix socket, disconnect and API cancel, graceful shutdown, restart adoption, the
//! reaper, metrics. A raw HTTP/1.1 client keeps the tests independent of any HTTP library.

mod common;

use std::time::{Duration, Instant};

use common::{docker, exec_as, http_with as raw, TestPool};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use zcbot_sandbox::config::{Backend, Listen};
use zcbot_sandbox::server::{ServeOptions, Server};

struct Daemon {
    addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<zcbot_sandbox::Result<()>>,
}

impl Daemon {
    async fn start(t: &TestPool) -> Daemon {
        Daemon::start_with(t, ServeOptions::default()).await
    }

    async fn start_with(t: &TestPool, options: ServeOptions) -> Daemon {
        let mut cfg = t.config();
        cfg.backend = Backend::Docker;
        if !matches!(cfg.listen, Listen::Unix(_)) {
            cfg.listen = Listen::Tcp("127.0.0.1:0".parse().unwrap());
        }
        let server = Server::start(cfg, options).await.expect("daemon starts");
        let addr = server.address();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Daemon {
            addr,
            stop: Some(tx),
            task,
        }
    }

    /// SIGTERM, in effect; waits until the daemon has finished shutting down.
    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }

    async fn req(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (status, _, body) =
            raw(&self.addr, method, path, body.map(|b| b.to_string()), &[]).await;
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }
}

/// `promtool check metrics` over `exposition`: it must find nothing to complain about. promtool
/// comes with Debian's `prometheus` package (scripts/test.sh installs it when run as root).
fn promtool_check_metrics(exposition: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => panic!(
            "cannot run promtool ({e}): install it (apt-get install prometheus), or run \
             scripts/test.sh as root, which does"
        ),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}): {}{}\nexposition:\n{exposition}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sleepers(container: &str, needle: &str) -> Vec<String> {
    // No container yet: no sleepers.
    if !common::docker_try(&["inspect", container]).0 {
        return Vec::new();
    }
    let me = common::tenant(container);
    let uid = common::tenant_uid(container);
    let (_, out, _) = exec_as(container, &me, &format!("ps -u {uid} -o args="));
    // Only the processes that are the sleeps, not the shells and supervisor whose command lines
    // mention them.
    out.lines()
        .map(str::trim)
        .filter(|l| l.starts_with(needle))
        .map(str::to_owned)
        .collect()
}

async fn wait_gone(container: &str, needle: &str, within: Duration) -> Vec<String> {
    let until = Instant::now() + within;
    loop {
        let left = sleepers(container, needle);
        if left.is_empty() || Instant::now() > until {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn every_endpoint_answers_as_documented() {
    let t = TestPool::new("sapi");
    let d = Daemon::start(&t).await;
    let user = t.user("u");
    let u = user.as_str();

    let (status, head, body) = raw(
        &d.addr,
        "POST",
        &format!("/v1/users/{u}/tools/shell"),
        Some(json!({"command": "echo hi; id -u", "call_id": "c-1"}).to_string()),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        head.to_lowercase().contains("x-zcbot-call-id: c-1"),
        "{head}"
    );
    let r: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (r["exit_code"].as_i64(), r["stdout"].as_str()),
        (
            Some(0),
            Some(format!("hi\n{}\n", common::tenant_uid(&t.container_name(&user))).as_str())
        )
    );

    let (s, r) = d
        .req(
            "POST",
            &format!("/v1/users/{u}/tools/write_file"),
            Some(json!({"path": "a.txt", "content": "x"})),
        )
        .await;
    assert_eq!((s, r["data"]["bytes_written"].as_i64()), (200, Some(1)));
    let (s, r) = d
        .req(
            "POST",
            &format!("/v1/users/{u}/tools/list_dir"),
            Some(json!({"path": "."})),
        )
        .await;
    assert_eq!(
        (s, r["data"]["entries"][0]["name"].as_str()),
        (200, Some("a.txt"))
    );

    let (s, list) = d.req("GET", "/v1/sandboxes", None).await;
    assert_eq!(s, 200);
    assert_eq!(list[0]["user"], u);
    assert_eq!(list[0]["config_current"], true);
    let (s, one) = d.req("GET", &format!("/v1/users/{u}/sandbox"), None).await;
    assert_eq!((s, one["state"].as_str()), (200, Some("running")));
    let (s, r) = d.req("POST", "/v1/reap", None).await;
    assert_eq!(
        (s, r["reaped"].as_array().map(Vec::len)),
        (200, Some(0)),
        "nothing idle yet"
    );
    let (s, _) = d.req("GET", "/healthz", None).await;
    assert_eq!(s, 200);
    let (s, ready) = d.req("GET", "/readyz", None).await;
    assert_eq!((s, ready["ready"].as_bool()), (200, Some(true)), "{ready}");
    assert_eq!(ready["checks"]["host_firewall"], "ok", "{ready}");

    let (_, _, metrics) = raw(&d.addr, "GET", "/metrics", None, &[]).await;
    assert!(
        metrics.contains("zcbot_containers{state=\"running\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("zcbot_ensures_total{kind=\"cold\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("zcbot_exec_duration_seconds_count{tool=\"shell\",backend=\"docker\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("zcbot_calls_in_flight 0"), "{metrics}");

    // One refused request, so the errors family has a sample too; then the exposition a plain
    // client gets must pass promtool, with a sample in every family.
    let (s, _) = d
        .req(
            "POST",
            "/v1/users/Bad.User/tools/shell",
            Some(json!({"command": "id"})),
        )
        .await;
    assert_eq!(s, 400);
    let (_, head, metrics) = raw(&d.addr, "GET", "/metrics", None, &[]).await;
    assert!(
        head.to_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    promtool_check_metrics(&metrics);
    for family in [
        "zcbot_http_connections_open",
        "zcbot_http_connections_refused_total",
        "zcbot_http_connections_timed_out_total",
        "zcbot_containers",
        "zcbot_ensures_total",
        "zcbot_reaped_total",
        "zcbot_orphans_removed_total",
        "zcbot_sandboxes_recycled_total",
        "zcbot_timeouts_total",
        "zcbot_cancels_total",
        "zcbot_calls_in_flight",
        "zcbot_errors_total",
        "zcbot_exec_duration_seconds",
        "zcbot_channel_opens_total",
        "zcbot_channel_deaths_total",
        "zcbot_channel_fallbacks_total",
        "zcbot_transport_duration_seconds",
    ] {
        assert!(
            metrics
                .lines()
                .any(|l| !l.starts_with('#') && l.starts_with(family)),
            "no sample of {family} in:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("zcbot_errors_total{kind=\"invalid_user\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("zcbot_channel_opens_total 1"), "{metrics}");
    // Prometheus asks for OpenMetrics first, and gets prometheus-client's own encoding.
    let (_, head, openmetrics) = raw(
        &d.addr,
        "GET",
        "/metrics",
        None,
        &[(
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        )],
    )
    .await;
    assert!(
        head.to_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{head}"
    );
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    assert!(
        openmetrics.contains("# TYPE zcbot_ensures counter\n"),
        "{openmetrics}"
    );
    assert!(
        openmetrics.contains("zcbot_ensures_total{kind=\"cold\"} 1"),
        "{openmetrics}"
    );

    let (s, r) = d
        .req("DELETE", &format!("/v1/users/{u}/sandbox"), None)
        .await;
    assert_eq!(s, 200, "{r}");
    assert!(t.containers().is_empty());
    let (s, r) = d.req("GET", &format!("/v1/users/{u}/sandbox"), None).await;
    assert_eq!((s, r["error"]["kind"].as_str()), (404, Some("no_sandbox")));
    d.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_their_status_and_change_nothing() {
    let mut t = TestPool::new("sbad");
    t.set("ZCBOT_MAX_BODY", "4KiB");
    let d = Daemon::start(&t).await;
    let u = t.user("u");
    let tool = |name: &str| format!("/v1/users/{u}/tools/{name}");
    let cases: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        (
            "POST",
            "/v1/users/Bad.User/tools/shell".into(),
            Some(r#"{"command":"id"}"#.into()),
            400,
            "invalid_user",
        ),
        (
            "POST",
            "/v1/users/-rf/tools/shell".into(),
            Some(r#"{"command":"id"}"#.into()),
            400,
            "invalid_user",
        ),
        (
            "POST",
            "/v1/users/%2e%2e/tools/shell".into(),
            Some(r#"{"command":"id"}"#.into()),
            400,
            "invalid_user",
        ),
        (
            "POST",
            tool("shell"),
            Some("{not json".into()),
            400,
            "bad_json",
        ),
        ("POST", tool("shell"), Some("[1,2]".into()), 400, "bad_json"),
        (
            "POST",
            tool("shell"),
            Some(r#"{"command": 5}"#.into()),
            400,
            "bad_call",
        ),
        (
            "POST",
            tool("shell"),
            Some(r#"{"command": "id", "sudo": true}"#.into()),
            400,
            "bad_call",
        ),
        (
            "POST",
            tool("shell"),
            Some(r#"{"command": "id", "call_id": "has space"}"#.into()),
            400,
            "bad_call",
        ),
        (
            "POST",
            tool("shell"),
            Some(r#"{"command": "id", "timeout": 100000}"#.into()),
            400,
            "bad_call",
        ),
        (
            "POST",
            tool("read_file"),
            Some(r#"{"path": "../../etc/passwd"}"#.into()),
            403,
            "path_refused",
        ),
        (
            "POST",
            tool("read_file"),
            Some(r#"{"path": "/etc/passwd"}"#.into()),
            403,
            "path_refused",
        ),
        (
            "POST",
            tool("read_file"),
            Some(r#"{"path": "no-such-file"}"#.into()),
            404,
            "not_found",
        ),
        (
            "POST",
            tool("read_file"),
            Some(r#"{"path": "/workspace"}"#.into()),
            400,
            "file",
        ),
        (
            "POST",
            tool("launch_missiles"),
            Some("{}".into()),
            404,
            "unknown_tool",
        ),
        (
            "DELETE",
            format!("/v1/users/{u}/calls/nope"),
            None,
            404,
            "unknown_call",
        ),
        ("DELETE", "/v1/calls/nope".into(), None, 410, "route_moved"),
        ("GET", "/v1/nowhere".into(), None, 404, "not_found"),
        (
            "POST",
            tool("shell"),
            Some(format!(r#"{{"command": "{}"}}"#, "x".repeat(8192))),
            413,
            "body_too_large",
        ),
    ];
    for (method, path, body, status, kind) in cases {
        let (s, _, text) = raw(&d.addr, method, &path, body, &[]).await;
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path}: not JSON: {text}"));
        assert_eq!(
            (s, v["error"]["kind"].as_str()),
            (status, Some(kind)),
            "{method} {path}: {text}"
        );
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    assert!(
        t.containers().is_empty(),
        "a refused request must not create a sandbox"
    );
    let (_, _, metrics) = raw(&d.addr, "GET", "/metrics", None, &[]).await;
    assert!(
        metrics.contains("zcbot_errors_total{kind=\"invalid_user\"} 3"),
        "{metrics}"
    );
    d.shutdown().await;
}

#[tokio::test]
async fn conflicts_limits_and_a_full_pool() {
    let mut t = TestPool::new("slimit");
    t.set("ZCBOT_USER_MAX_CALLS", "1")
        .set("ZCBOT_SANDBOX_MAX", "1");
    let d = Daemon::start(&t).await;
    let (a, b) = (t.user("a"), t.user("b"));
    let a_path = format!("/v1/users/{a}/tools/shell");
    let slow = raw(
        &d.addr,
        "POST",
        &a_path,
        Some(json!({"command": "sleep 2", "call_id": "slow-1"}).to_string()),
        &[],
    );
    let others = async {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let same_id = d
            .req(
                "POST",
                &format!("/v1/users/{a}/tools/shell"),
                Some(json!({"command": "id", "call_id": "slow-1"})),
            )
            .await;
        let too_many = d
            .req(
                "POST",
                &format!("/v1/users/{a}/tools/shell"),
                Some(json!({"command": "id"})),
            )
            .await;
        // b may use a's id (ids are per user): it meets the full pool, not a conflict.
        let full = d
            .req(
                "POST",
                &format!("/v1/users/{b}/tools/shell"),
                Some(json!({"command": "id", "call_id": "slow-1"})),
            )
            .await;
        (same_id, too_many, full)
    };
    let ((s, _, body), ((s1, r1), (s2, r2), (s3, r3))) = tokio::join!(slow, others);
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        (s1, r1["error"]["kind"].as_str()),
        (409, Some("call_id_in_use")),
        "{r1}"
    );
    assert_eq!(
        (s2, r2["error"]["kind"].as_str()),
        (429, Some("too_many_calls")),
        "{r2}"
    );
    assert_eq!(
        (s3, r3["error"]["kind"].as_str()),
        (503, Some("pool_full")),
        "{r3}"
    );
    assert_eq!(t.containers(), vec![t.container_name(&a)]);
    d.shutdown().await;
}

#[tokio::test]
async fn a_token_guards_every_request() {
    let mut t = TestPool::new("stoken");
    let token = "s3cret-token-0123456789";
    t.set("ZCBOT_API_TOKEN", token);
    let d = Daemon::start(&t).await;
    let u = t.user("u");
    let path = format!("/v1/users/{u}/tools/shell");
    let body = Some(json!({"command": "id"}).to_string());
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong")],
        vec![("Authorization", token)],
    ] {
        let (s, _, text) = raw(&d.addr, "POST", &path, body.clone(), &headers).await;
        assert_eq!(s, 401, "{headers:?}: {text}");
        assert!(text.contains("unauthorized"));
    }
    let (s, _, _) = raw(&d.addr, "GET", "/healthz", None, &[]).await;
    assert_eq!(s, 401, "every request needs the token");
    assert!(t.containers().is_empty());
    let auth = format!("Bearer {token}");
    let (s, _, text) = raw(&d.addr, "POST", &path, body, &[("Authorization", &auth)]).await;
    assert_eq!(s, 200, "{text}");
    d.shutdown().await;
}

#[tokio::test]
async fn serves_on_a_unix_socket_only_its_owner_can_open() {
    let mut t = TestPool::new("sunix");
    std::fs::create_dir_all(&t.root).unwrap();
    let sock = t.root.join("api.sock");
    t.set("ZCBOT_LISTEN", &format!("unix:{}", sock.display()));
    let d = Daemon::start(&t).await;
    assert_eq!(d.addr, format!("unix:{}", sock.display()));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (s, r) = d
        .req(
            "POST",
            &format!("/v1/users/{}/tools/shell", t.user("u")),
            Some(json!({"command": "echo via unix"})),
        )
        .await;
    assert_eq!((s, r["stdout"].as_str()), (200, Some("via unix\n")));
    d.shutdown().await;
    assert!(!sock.exists(), "the socket file is removed on exit");
}

#[tokio::test]
async fn a_client_that_disconnects_takes_its_processes_with_it() {
    let t = TestPool::new("sdisc");
    let d = Daemon::start(&t).await;
    let user = t.user("u");
    let (s, _) = d
        .req(
            "POST",
            &format!("/v1/users/{user}/tools/shell"),
            Some(json!({"command": "true"})),
        )
        .await;
    assert_eq!(s, 200);
    let container = t.container_name(&user);
    let body = json!({"command": "setsid sleep 6001 & sleep 6002"}).to_string();
    let req = format!("POST /v1/users/{user}/tools/shell HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let mut conn = tokio::net::TcpStream::connect(d.addr.trim_start_matches("http://"))
        .await
        .unwrap();
    conn.write_all(req.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        sleepers(&container, "sleep 600").len(),
        2,
        "the call is running"
    );
    drop(conn);
    let left = wait_gone(&container, "sleep 600", Duration::from_secs(5)).await;
    assert!(
        left.is_empty(),
        "left behind after the client went away: {left:?}"
    );
    // The operator sees it: counted with the cancels (the first call, which finished, is not).
    let (_, _, metrics) = raw(&d.addr, "GET", "/metrics", None, &[]).await;
    assert!(metrics.contains("zcbot_cancels_total 1\n"), "{metrics}");
    d.shutdown().await;
}

#[tokio::test]
async fn a_cancel_sent_just_before_its_call_still_stops_it() {
    let t = TestPool::new("searly");
    let d = Daemon::start(&t).await;
    let user = t.user("u");
    let path = format!("/v1/users/{user}/tools/shell");
    let (s, _) = d.req("POST", &path, Some(json!({"command": "true"}))).await;
    assert_eq!(s, 200);
    // What RUN.md shows, with the cancel overtaking the call: it waits for the call.
    let cancel_path = format!("/v1/users/{user}/calls/early");
    let cancel = d.req("DELETE", &cancel_path, None);
    let call = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        d.req(
            "POST",
            &path,
            Some(json!({"command": "sleep 7101", "call_id": "early", "timeout": 60})),
        )
        .await
    };
    let started = Instant::now();
    let ((sc, rc), (s, r)) = tokio::join!(cancel, call);
    assert_eq!((sc, rc["cancelled"].as_str()), (202, Some("early")), "{rc}");
    assert_eq!((s, r["cancelled"].as_bool()), (200, Some(true)), "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the call ran on"
    );
    // A positive control: a cancel for a call that never comes is still a 404, after the wait.
    let started = Instant::now();
    let (s, r) = d
        .req("DELETE", &format!("/v1/users/{user}/calls/never"), None)
        .await;
    assert_eq!(
        (s, r["error"]["kind"].as_str()),
        (404, Some("unknown_call"))
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
    d.shutdown().await;
}

#[tokio::test]
async fn a_call_is_cancelled_by_its_own_user_only() {
    let t = TestPool::new("scancel");
    let d = Daemon::start(&t).await;
    let (a, b) = (t.user("a"), t.user("b"));
    // Two users may use the same call id at once.
    let (path_a, path_b) = (
        format!("/v1/users/{a}/tools/shell"),
        format!("/v1/users/{b}/tools/shell"),
    );
    let call_a = d.req(
        "POST",
        &path_a,
        Some(json!({"command": "sleep 7001", "call_id": "same-id"})),
    );
    let call_b = d.req(
        "POST",
        &path_b,
        Some(
            json!({"command": "sleep 7002; echo b-finished", "call_id": "same-id", "timeout": 60}),
        ),
    );
    let cancels = async {
        // Both calls are running (a positive control for what follows).
        let until = Instant::now() + Duration::from_secs(30);
        while (sleepers(&t.container_name(&a), "sleep 7001").is_empty()
            || sleepers(&t.container_name(&b), "sleep 7002").is_empty())
            && Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // b can neither cancel nor detect a's other calls: the same answer as for no call.
        let (s1, r1) = d
            .req(
                "DELETE",
                &format!("/v1/users/{b}/calls/only-a-has-this"),
                None,
            )
            .await;
        // a cancels its own; b's call of the same id keeps running.
        let (s2, r2) = d
            .req("DELETE", &format!("/v1/users/{a}/calls/same-id"), None)
            .await;
        let a_gone = wait_gone(&t.container_name(&a), "sleep 7001", Duration::from_secs(5)).await;
        let b_alive = sleepers(&t.container_name(&b), "sleep 7002");
        let (s3, _) = d
            .req("DELETE", &format!("/v1/users/{b}/calls/same-id"), None)
            .await;
        (s1, r1, s2, r2, a_gone, b_alive, s3)
    };
    let ((sa, ra), (sb, rb), (s1, r1, s2, r2, a_gone, b_alive, s3)) =
        tokio::join!(call_a, call_b, cancels);
    assert_eq!(
        (s1, r1["error"]["kind"].as_str()),
        (404, Some("unknown_call")),
        "{r1}"
    );
    assert_eq!(
        (s2, r2["cancelled"].as_str()),
        (202, Some("same-id")),
        "{r2}"
    );
    assert!(
        a_gone.is_empty(),
        "a's call survived its cancel: {a_gone:?}"
    );
    assert_eq!(
        b_alive.len(),
        1,
        "a's cancel stopped b's call of the same id"
    );
    assert_eq!(s3, 202);
    for (s, r) in [(sa, &ra), (sb, &rb)] {
        assert_eq!(s, 200, "{r}");
        assert_eq!(
            (r["cancelled"].as_bool(), r["exit_code"].is_null()),
            (Some(true), true),
            "{r}"
        );
    }
    let (_, _, metrics) = raw(&d.addr, "GET", "/metrics", None, &[]).await;
    assert!(metrics.contains("zcbot_cancels_total 2"), "{metrics}");
    d.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_calls_finish_within_the_grace_and_cancels_the_rest() {
    let mut t = TestPool::new("sgrace");
    t.set("ZCBOT_SHUTDOWN_GRACE", "3s");
    let d = Daemon::start(&t).await;
    let user = t.user("u");
    let (s, _) = d
        .req(
            "POST",
            &format!("/v1/users/{user}/tools/shell"),
            Some(json!({"command": "true"})),
        )
        .await;
    assert_eq!(s, 200);
    let addr = d.addr.clone();
    let path = format!("/v1/users/{user}/tools/shell");
    let post = |cmd: &str| {
        raw(
            &addr,
            "POST",
            &path,
            Some(json!({ "command": cmd }).to_string()),
            &[],
        )
    };
    let quick = post("sleep 1.5; echo finished");
    let long = post("sleep 8001");
    let stop = async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let started = Instant::now();
        d.shutdown().await;
        started.elapsed()
    };
    let ((qs, _, q), (ls, _, l), took) = tokio::join!(quick, long, stop);
    let (q, l): (Value, Value) = (
        serde_json::from_str(&q).unwrap(),
        serde_json::from_str(&l).unwrap(),
    );
    assert_eq!(
        (qs, q["stdout"].as_str(), q["cancelled"].as_bool()),
        (200, Some("finished\n"), Some(false)),
        "{q}"
    );
    assert_eq!((ls, l["cancelled"].as_bool()), (200, Some(true)), "{l}");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(7),
        "shutdown took {took:?}"
    );
    assert!(sleepers(&t.container_name(&user), "sleep 8001").is_empty());
    assert!(
        tokio::net::TcpStream::connect(addr.trim_start_matches("http://"))
            .await
            .is_err(),
        "still listening"
    );
    // The sandbox is kept warm for the next start.
    assert_eq!(t.containers(), vec![t.container_name(&user)]);
}

#[tokio::test]
async fn a_restarted_daemon_adopts_its_warm_sandboxes() {
    let t = TestPool::new("srestart");
    let user = t.user("u");
    let d = Daemon::start(&t).await;
    let (s, _) = d
        .req(
            "POST",
            &format!("/v1/users/{user}/tools/shell"),
            Some(json!({"command": "echo one > f"})),
        )
        .await;
    assert_eq!(s, 200);
    let id = docker(&["inspect", "-f", "{{.Id}}", &t.container_name(&user)]);
    d.shutdown().await;

    let d = Daemon::start(&t).await;
    let (s, r) = d
        .req(
            "POST",
            &format!("/v1/users/{user}/tools/shell"),
            Some(json!({"command": "cat f"})),
        )
        .await;
    assert_eq!((s, r["stdout"].as_str()), (200, Some("one\n")));
    assert_eq!(
        docker(&["inspect", "-f", "{{.Id}}", &t.container_name(&user)]),
        id,
        "recreated instead of adopted"
    );
    let (_, _, metrics) = raw(&d.addr, "GET", "/metrics", None, &[]).await;
    assert!(
        metrics.contains("zcbot_ensures_total{kind=\"cold\"} 0"),
        "{metrics}"
    );
    d.shutdown().await;
}

#[tokio::test]
async fn the_reaper_removes_an_idle_sandbox_within_idle_plus_one_period() {
    let mut t = TestPool::new("sreaper");
    t.set("ZCBOT_SANDBOX_IDLE", "2s")
        .set("ZCBOT_SANDBOX_REAP_EVERY", "1s");
    let d = Daemon::start(&t).await;
    let user = t.user("u");
    let (s, _) = d
        .req(
            "POST",
            &format!("/v1/users/{user}/tools/shell"),
            Some(json!({"command": "true"})),
        )
        .await;
    assert_eq!(s, 200);
    let done = Instant::now();
    while !t.containers().is_empty() && done.elapsed() < Duration::from_secs(12) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = done.elapsed();
    assert!(t.containers().is_empty(), "not reaped after {took:?}");
    assert!(
        took >= Duration::from_secs(2),
        "reaped before it was idle: {took:?}"
    );
    // Idle 2 s + one 1 s period, and up to 3 s for the removal itself and for this test's own
    // `docker ps` polls, which hold up the daemon sharing its thread: a reaper that waited
    // for a second period, or never ran, still fails.
    assert!(
        took < Duration::from_secs(6),
        "idle 2s + period 1s, took {took:?}"
    );
    let (_, _, metrics) = raw(&d.addr, "GET", "/metrics", None, &[]).await;
    assert!(metrics.contains("zcbot_reaped_total 1"), "{metrics}");
    d.shutdown().await;
}

#[tokio::test]
async fn startup_fails_with_the_reason_and_never_serves_half_initialised() {
    let mut t = TestPool::new("sfail");
    t.set("ZCBOT_SANDBOX_IMAGE", "zcbot-sandbox:missing");
    let mut cfg = t.config();
    cfg.backend = Backend::Docker;
    cfg.listen = Listen::Tcp("127.0.0.1:0".parse().unwrap());
    let err = Server::start(cfg.clone(), ServeOptions::default())
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), "image_missing", "{err}");
    cfg.image = "zcbot-sandbox:latest".into();
    cfg.docker_host = Some("unix:///nonexistent.sock".into());
    let err = Server::start(cfg, ServeOptions::default())
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), "docker_unreachable", "{err}");
}

#[tokio::test]
async fn a_daemon_on_a_busy_port_fails_fast_and_touches_no_sandbox() {
    let mut t = TestPool::new("sbusy");
    // A sandbox an earlier run left stopped: a start that got as far as its reconcile removes it.
    let user = t.user("u");
    t.pool().await.ensure(&user).await.unwrap();
    let name = t.container_name(&user);
    docker(&["stop", "-t", "0", &name]);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    t.set("ZCBOT_SANDBOX_BACKEND", "docker")
        .set("ZCBOT_LISTEN", &addr);
    let started = Instant::now();
    let env = t.env();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_zcbot-sandbox"))
            .arg("serve")
            .envs(env)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("listen on {addr}"))
            && stderr.contains("Address already in use")
            && stderr.contains("ZCBOT_LISTEN"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("Address already in use").count(),
        1,
        "the cause is printed once: {stderr}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}: {stderr}");
    assert!(!stderr.contains("reconciled"), "{stderr}");
    // Untouched: the stopped sandbox is still there, and no probe sandbox was made.
    assert_eq!(t.containers(), vec![name.clone()]);
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.Status}}", &name]),
        "exited"
    );
    drop(busy);
}

#[tokio::test]
async fn a_call_whose_sandbox_is_removed_says_who_removed_it_and_not_to_just_retry() {
    for transport in ["channel", "exec"] {
        let mut t = TestPool::new("sremoved");
        t.set("ZCBOT_EXEC_TRANSPORT", transport);
        let d = Daemon::start(&t).await;
        let user = t.user("u");
        let container = t.container_name(&user);
        for (how, said) in [
            ("api", "was removed through the API"),
            ("cli", "was removed by an operator (zcbot-sandbox rm)"),
        ] {
            let path = format!("/v1/users/{user}/tools/shell");
            let call = {
                let (addr, path) = (d.addr.clone(), path.clone());
                tokio::spawn(async move {
                    let body = json!({"command": "sleep 7301"}).to_string();
                    raw(&addr, "POST", &path, Some(body), &[]).await
                })
            };
            let until = Instant::now() + Duration::from_secs(30);
            while sleepers(&container, "sleep 7301").is_empty() {
                assert!(Instant::now() < until, "the call never started");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if how == "api" {
                let (s, body) = d
                    .req("DELETE", &format!("/v1/users/{user}/sandbox"), None)
                    .await;
                assert_eq!(s, 200, "{body}");
            } else {
                let out = std::process::Command::new(env!("CARGO_BIN_EXE_zcbot-sandbox"))
                    .args(["rm", "--user", user.as_str()])
                    .envs(t.env())
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{out:?}");
            }
            let (status, _, body) = tokio::time::timeout(Duration::from_secs(30), call)
                .await
                .expect("the call ends with its sandbox")
                .unwrap();
            assert_eq!(status, 409, "{transport} {how}: {body}");
            let body: Value = serde_json::from_str(&body).unwrap();
            let msg = body["error"]["message"].as_str().unwrap_or_default();
            assert_eq!(
                body["error"]["kind"], "sandbox_removed",
                "{transport} {how}: {body}"
            );
            assert!(msg.contains(said), "{transport} {how}: {msg}");
            assert!(
                msg.contains("check before running it again")
                    && !msg.contains("run the call again"),
                "{transport} {how}: {msg}"
            );
        }
        d.shutdown().await;
    }
}

#[tokio::test]
async fn the_binary_serves_stops_on_sigterm_and_restarts_warm() {
    let mut t = TestPool::new("sbin");
    t.set("ZCBOT_SANDBOX_BACKEND", "docker")
        .set("ZCBOT_LISTEN", "127.0.0.1:0")
        .set("ZCBOT_SHUTDOWN_GRACE", "2s");
    let user = t.user("u");
    let start = || common::spawn_daemon(t.env());
    let (mut child, addr) = start();
    let (s, _, body) = raw(
        &addr,
        "POST",
        &format!("/v1/users/{user}/tools/shell"),
        Some(json!({"command": "hostname"}).to_string()),
        &[],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let id = docker(&["inspect", "-f", "{{.Id}}", &t.container_name(&user)]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");

    let (mut child, addr) = start();
    let (s, _, _) = raw(
        &addr,
        "POST",
        &format!("/v1/users/{user}/tools/shell"),
        Some(json!({"command": "true"}).to_string()),
        &[],
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        docker(&["inspect", "-f", "{{.Id}}", &t.container_name(&user)]),
        id
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap()
        .success());
}

#[tokio::test]
async fn a_crashed_daemon_leaves_no_call_and_no_channel_helper_behind() {
    let mut t = TestPool::new("scrash");
    t.set("ZCBOT_SANDBOX_BACKEND", "docker")
        .set("ZCBOT_LISTEN", "127.0.0.1:0");
    let user = t.user("u");
    let (mut child, addr) = common::spawn_daemon(t.env());
    let path = format!("/v1/users/{user}/tools/shell");
    let call = {
        let (addr, path) = (addr.clone(), path.clone());
        tokio::spawn(async move {
            let body = json!({"command": "setsid sleep 7001 & (sleep 7002 &); sleep 7003"});
            raw(&addr, "POST", &path, Some(body.to_string()), &[]).await
        })
    };
    let container = t.container_name(&user);
    let until = Instant::now() + Duration::from_secs(30);
    while sleepers(&container, "sleep 700").len() < 3 {
        assert!(Instant::now() < until, "the call never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The daemon dies without a chance to clean up: its connections to the engine close, the
    // channel's helper sees the end of its input and stops every call.
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = call.await;
    let left = wait_gone(&container, "sleep 700", Duration::from_secs(5)).await;
    assert!(left.is_empty(), "the call outlived the daemon: {left:?}");
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, helpers, _) = exec_as(&container, "0:0", "pgrep -c -x zcbot-supervise");
        if helpers == "0" {
            break;
        }
        assert!(
            Instant::now() < until,
            "the channel's helper outlived the daemon"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn remove_on_exit_removes_every_sandbox_of_the_pool() {
    let t = TestPool::new("srmexit");
    let options = ServeOptions {
        remove_on_exit: true,
    };
    let d = Daemon::start_with(&t, options).await;
    for name in ["a", "b"] {
        let path = format!("/v1/users/{}/tools/shell", t.user(name));
        let (s, _) = d.req("POST", &path, Some(json!({"command": "true"}))).await;
        assert_eq!(s, 200);
    }
    assert_eq!(t.containers().len(), 2);
    d.shutdown().await;
    assert!(
        t.containers().is_empty(),
        "--remove-on-exit left {:?}",
        t.containers()
    );
}
