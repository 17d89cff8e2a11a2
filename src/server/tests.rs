//! The routes on the fake engine, through axum's `oneshot`: auth, validation before any engine
//! work, a call's round trip, readiness, the metrics exposition, and state that does not grow
//! with names.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use dashmap::DashMap;
use parking_lot::Mutex;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::{connections, metrics::Metrics, routes, AppState};
use crate::engine::{FakeEngine, Op};
use crate::exec::docker::DockerExecutor;
use crate::exec::Executor;
use crate::pool::tests::{config, engine, pool_on, TempDir};
use crate::pool::SandboxPool;

const TOKEN: &str = "s3cret-token";

struct Api {
    state: Arc<AppState>,
    pool: SandboxPool,
    fake: FakeEngine,
    _dir: TempDir,
}

/// A daemon's state on the fake engine, per-call exec (the fake answers execs by a handler), the
/// reaper running, with a token.
async fn api() -> Api {
    let dir = TempDir::new();
    let fake = engine();
    // A supervised call: everything after `--` is the call's argv; answer with it.
    fake.on_exec(Arc::new(|spec| {
        let argv: Vec<&str> = spec
            .cmd
            .iter()
            .skip_while(|a| *a != "--")
            .skip(1)
            .map(String::as_str)
            .collect();
        (0, format!("ran {argv:?}").into_bytes(), Vec::new())
    }));
    let pool = pool_on(&fake, config(&dir, &[("ZCBOT_EXEC_TRANSPORT", "exec")])).await;
    let reaper = pool.spawn_reaper();
    let executor = Executor::Docker(DockerExecutor::new(pool.clone()));
    let connections = Arc::new(connections::ConnectionStats::default());
    let metrics = Metrics::new(executor.pool(), executor.transport_stats(), &connections);
    let state = Arc::new(AppState {
        executor,
        token_hash: Some(Sha256::digest(TOKEN.as_bytes()).into()),
        calls: Default::default(),
        per_user: DashMap::new(),
        metrics,
        reaper: Mutex::new(Some(reaper)),
        self_check: None,
        jobs: crate::exec::jobs::Jobs::new(2, 1024, CancellationToken::new()),
        all_calls: CancellationToken::new(),
        connections,
    });
    Api {
        state,
        pool,
        fake,
        _dir: dir,
    }
}

impl Api {
    /// `shell` as alice, with or without the token.
    async fn shell(&self, command: &str, token: bool) -> (StatusCode, Value) {
        let body = serde_json::json!({ "command": command });
        self.send("POST", "/v1/users/alice/tools/shell", Some(body), token)
            .await
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        token: bool,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if token {
            req = req.header("authorization", format!("Bearer {TOKEN}"));
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        let resp = routes::router(self.state.clone())
            .oneshot(req)
            .await
            .unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

#[tokio::test]
async fn every_route_needs_the_token() {
    let api = api().await;
    let (status, body) = api.shell("id", false).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["kind"], "unauthorized");
    assert!(
        api.fake.containers().is_empty(),
        "an unauthenticated call made a sandbox"
    );
    let (status, _) = api.send("GET", "/readyz", None, false).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_call_runs_in_the_users_sandbox_and_answers_its_result() {
    let api = api().await;
    let (status, body) = api.shell("echo hi", true).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["exit_code"], 0);
    assert_eq!(body["stdout"], r#"ran ["sh", "-c", "echo hi"]"#);
    assert_eq!(
        api.fake.containers(),
        vec![(api.pool.container_name(&"alice".parse().unwrap()), true)]
    );
}

#[tokio::test]
async fn bad_input_is_refused_before_any_engine_work() {
    let api = api().await;
    let before = api.fake.calls();
    for (path, body) in [
        (
            "/v1/users/..%2Fetc/tools/shell",
            serde_json::json!({"command": "id"}),
        ),
        (
            "/v1/users/Alice/tools/shell",
            serde_json::json!({"command": "id"}),
        ),
        (
            "/v1/users/alice/tools/shell",
            serde_json::json!({"cmd": "id"}),
        ),
        ("/v1/users/alice/tools/rm_rf", serde_json::json!({})),
        (
            "/v1/users/alice/tools/shell",
            serde_json::json!({"command": "id", "timeout": -1}),
        ),
    ] {
        let (status, reply) = api.send("POST", path, Some(body.clone()), true).await;
        assert!(status.is_client_error(), "{path} {body}: {status} {reply}");
        assert!(reply["error"]["kind"].is_string(), "{reply}");
    }
    assert_eq!(api.fake.calls(), before, "bad input reached the engine");
}

#[tokio::test]
async fn a_vanished_sandbox_is_recreated_and_the_call_runs_once_more() {
    let api = api().await;
    let call = || api.shell("true", true);
    assert_eq!(call().await.0, StatusCode::OK);
    api.fake
        .vanish(&api.pool.container_name(&"alice".parse().unwrap()));
    let (status, body) = call().await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(api.fake.churn().0, 2);
}

#[tokio::test]
async fn removing_sandboxes_of_many_names_keeps_no_state() {
    let api = api().await;
    for i in 0..40 {
        let (status, body) = api
            .send("DELETE", &format!("/v1/users/ghost{i}/sandbox"), None, true)
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(body["error"]["kind"], "no_sandbox");
    }
    assert_eq!(api.pool.slot_count(), 0);
}

#[tokio::test]
async fn readiness_fails_when_the_engine_does_not_answer() {
    let api = api().await;
    let (status, body) = api.send("GET", "/readyz", None, true).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["checks"]["docker"], "ok");
    api.fake.fail(Op::Ping);
    let (status, body) = api.send("GET", "/readyz", None, true).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["checks"]["docker"].as_str().unwrap().contains("ping"),
        "{body}"
    );
}

#[tokio::test]
async fn an_engine_failure_is_a_typed_api_error() {
    let api = api().await;
    api.fake.fail(Op::Create);
    let (status, body) = api.shell("true", true).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["error"]["kind"], "docker");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("create container"),
        "{body}"
    );
}

#[tokio::test]
async fn metrics_show_what_the_pool_transports_and_routes_did() {
    let api = api().await;
    let (status, _) = api.shell("true", true).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = api
        .send("GET", "/v1/users/Bad.User/sandbox", None, true)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let scrape = |accept: &'static str| {
        let state = api.state.clone();
        async move {
            let req = Request::builder()
                .uri("/metrics")
                .header("authorization", format!("Bearer {TOKEN}"))
                .header("accept", accept)
                .body(Body::empty())
                .unwrap();
            let resp = routes::router(state).oneshot(req).await.unwrap();
            let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            (content_type, String::from_utf8(body.to_vec()).unwrap())
        }
    };
    let (content_type, text) = scrape("*/*").await;
    assert_eq!(content_type, super::metrics::PROMETHEUS_TEXT);
    for line in [
        "zcbot_containers{state=\"running\"} 1",
        "zcbot_ensures_total{kind=\"cold\"} 1",
        "zcbot_exec_duration_seconds_count{tool=\"shell\",backend=\"docker\"} 1",
        "zcbot_transport_duration_seconds_count{transport=\"exec\"} 1",
        "zcbot_transport_duration_seconds_count{transport=\"channel\"} 0",
        "zcbot_errors_total{kind=\"invalid_user\"} 1",
        "zcbot_calls_in_flight 0",
        "# TYPE zcbot_reaped_total counter",
    ] {
        assert!(text.contains(line), "{line} missing in:\n{text}");
    }
    let (content_type, text) = scrape("application/openmetrics-text;version=1.0.0").await;
    assert_eq!(content_type, super::metrics::OPENMETRICS);
    assert!(text.contains("# TYPE zcbot_reaped counter\n"), "{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[test]
fn without_a_token_browsers_pages_are_refused_and_local_callers_are_not() {
    use axum::http::HeaderMap;
    let refusal = |pairs: &[(&'static str, &str)]| {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        super::browser_refusal(&h).map(|e| e.kind)
    };
    // What a backend on this machine (curl, httpx) sends: served.
    for host in [
        "127.0.0.1:8787",
        "localhost:8787",
        "[::1]:8787",
        "127.0.0.2",
        "LOCALHOST.",
    ] {
        assert_eq!(refusal(&[("host", host)]), None, "{host}");
    }
    assert_eq!(refusal(&[]), None, "an HTTP/1.0 request without Host");
    assert_eq!(
        refusal(&[
            ("host", "127.0.0.1:8787"),
            ("origin", "http://localhost:3000")
        ]),
        None,
        "a page served from this machine"
    );
    // A page of another site posting to the daemon (a form needs no preflight).
    assert_eq!(
        refusal(&[
            ("host", "127.0.0.1:8787"),
            ("origin", "https://evil.example")
        ])
        .as_deref(),
        Some("cross_origin")
    );
    assert_eq!(
        refusal(&[("host", "127.0.0.1:8787"), ("origin", "null")]).as_deref(),
        Some("cross_origin")
    );
    // A page that rebound its own name to 127.0.0.1: same origin, but its Host is its name.
    for host in [
        "evil.example:8787",
        "127.0.0.1.evil.example",
        "localhost.evil.example",
    ] {
        assert_eq!(
            refusal(&[("host", host)]).as_deref(),
            Some("bad_host"),
            "{host}"
        );
    }
}
