//! The daemon: `zcbot-sandbox serve`, the HTTP API over the executor and the pool.
//!
//! Lifespan: validated config -> bind -> executor (docker: connect and negotiate, image,
//! network) -> reconcile -> self-check -> reaper -> serve. Any failing step ends startup with its
//! reason; the daemon never serves half-initialised. On SIGTERM/SIGINT it stops accepting, lets calls in flight finish for
//! `ZCBOT_SHUTDOWN_GRACE`, cancels the rest (their processes killed), stops the reaper, and keeps
//! the containers warm unless told to remove them.
//!
//! Anyone who reaches this API can run code as any user: it listens on loopback or a unix socket
//! (mode 0600) by default, refuses a non-loopback address without `ZCBOT_API_TOKEN`, and with a
//! token checks `Authorization: Bearer` on every request in constant time.

mod bodies;
mod calls;
mod connections;
mod mcp;
pub mod metrics;
mod openapi;
mod routes;
mod sse;
#[cfg(test)]
mod tests;

pub use connections::ConnectionStats;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use dashmap::DashMap;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::check::Check;
use crate::config::{Config, Listen};
use crate::error::Error;
use crate::exec::jobs::Jobs;
use crate::exec::Executor;
use crate::files::Problem;
use crate::pool::reaper::ReaperHandle;
use crate::user::UserId;
use metrics::Metrics;

/// How long, past the kill grace, shutdown waits for calls and their clean-up to finish.
const SETTLE_MARGIN: Duration = Duration::from_secs(10);

/// How the daemon ends.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServeOptions {
    /// Remove every sandbox of the pool on exit (default: keep them warm for the next start).
    pub remove_on_exit: bool,
}

/// Shared by every request.
pub(crate) struct AppState {
    executor: Executor,
    token_hash: Option<[u8; 32]>,
    /// Calls in flight by (user, call id).
    calls: calls::Calls,
    per_user: DashMap<UserId, usize>,
    metrics: Metrics,
    reaper: Mutex<Option<ReaperHandle>>,
    /// The startup self-check's outcome (None: not run).
    self_check: Option<Check>,
    /// Parent of every call's token: cancelling it cancels every call (end of shutdown grace).
    all_calls: CancellationToken,
    /// What the acceptor did (open, refused, timed-out connections).
    connections: Arc<connections::ConnectionStats>,
    /// Background jobs (their tokens are children of `all_calls`).
    jobs: Jobs,
}

/// A started daemon: initialised and bound, not yet serving.
pub struct Server {
    state: Arc<AppState>,
    listener: Listener,
    options: ServeOptions,
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

impl Server {
    /// Runs the lifespan up to serving: bind, executor (for docker: connect, image, network),
    /// reconcile, self-check, reaper. Fails with the reason at the first step that fails.
    pub async fn start(config: Config, options: ServeOptions) -> crate::Result<Self> {
        /// Binds the TCP address; a busy one says what to do.
        async fn bind_tcp(addr: std::net::SocketAddr) -> crate::Result<tokio::net::TcpListener> {
            tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                let e = if e.kind() == std::io::ErrorKind::AddrInUse {
                    std::io::Error::new(
                        e.kind(),
                        format!(
                            "{e}: another process listens there (a daemon already running?); \
                             stop it, or set ZCBOT_LISTEN to a free address"
                        ),
                    )
                } else {
                    e
                };
                Error::io("listen on", addr.to_string(), e)
            })
        }

        /// Removes the socket file a failed startup had bound, unless disarmed.
        struct UnbindOnError(Option<std::path::PathBuf>);

        impl UnbindOnError {
            fn disarm(mut self) {
                self.0 = None;
            }
        }

        impl Drop for UnbindOnError {
            fn drop(&mut self) {
                if let Some(path) = &self.0 {
                    let _ = std::fs::remove_file(path);
                }
            }
        }

        let listen = config.listen.clone();
        let token_hash = config
            .api_token
            .as_ref()
            .map(|t| Sha256::digest(secrecy::ExposeSecret::expose_secret(t).as_bytes()).into());
        // A job keeps the latest ZCBOT_OUTPUT_CAP bytes of each stream, as a call keeps that many.
        let cfg_jobs = (config.user_max_jobs, config.output_cap);
        let all_calls = CancellationToken::new();
        // Bind first: a busy port or a live socket must fail before this daemon adopts another's
        // sandboxes or starts a probe. Connections wait in the backlog until it serves.
        let listener = match &listen {
            Listen::Tcp(addr) => Listener::Tcp(bind_tcp(*addr).await?),
            Listen::Unix(path) => Listener::Unix(bind_unix(path)?, path.clone()),
        };
        // A startup that fails from here on leaves no socket file behind.
        let unbind = UnbindOnError(match &listener {
            Listener::Unix(_, path) => Some(path.clone()),
            Listener::Tcp(_) => None,
        });
        let executor = Executor::from_config(config).await?;
        let mut reaper = None;
        let mut self_check = None;
        if let Some(pool) = executor.pool() {
            let report = pool.reconcile().await?;
            tracing::info!(
                adopted = report.adopted.len(),
                spares = report.spares,
                removed = report.removed.len(),
                foreign = report.foreign.len(),
                "reconciled the sandboxes an earlier run left"
            );
            if pool.config().self_check {
                self_check = Some(crate::selfcheck::gate(pool).await?);
            } else {
                tracing::warn!(
                    "ZCBOT_SELF_CHECK=0: starting without trying the network escapes first"
                );
            }
            reaper = Some(pool.spawn_reaper());
        } else {
            tracing::warn!("backend is host: tool calls run on this host and are NOT isolated (development only)");
        }
        unbind.disarm();
        let connections = Arc::new(connections::ConnectionStats::default());
        let metrics = Metrics::new(executor.pool(), executor.transport_stats(), &connections);
        Ok(Server {
            state: Arc::new(AppState {
                executor,
                token_hash,
                calls: calls::Calls::default(),
                per_user: DashMap::new(),
                metrics,
                reaper: Mutex::new(reaper),
                self_check,
                jobs: Jobs::new(cfg_jobs.0, cfg_jobs.1, all_calls.clone()),
                all_calls,
                connections,
            }),
            listener,
            options,
        })
    }

    /// Where it listens, as a URL-ish string (`http://127.0.0.1:8787` or `unix:/path`).
    pub fn address(&self) -> String {
        match &self.listener {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| format!("http://{a}"))
                .unwrap_or_default(),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    /// Serves until `shutdown` completes, then shuts down gracefully (see the module docs).
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> crate::Result<()> {
        let state = self.state.clone();
        let grace = state.executor_config().shutdown_grace;
        let app = routes::router(state.clone());
        let stop = CancellationToken::new();
        let stopping = stop.clone();
        let all_calls = state.all_calls.clone();
        let all_calls_at_end = state.all_calls.clone();
        let timer = tokio::spawn(async move {
            shutdown.await;
            tracing::info!(grace = %humantime::format_duration(grace), "shutting down: no new connections; calls in flight may finish");
            stopping.cancel();
            tokio::time::sleep(grace).await;
            tracing::info!("shutdown grace over: cancelling the calls still running");
            all_calls.cancel();
        });
        let cfg = state.executor_config();
        // Everything after the signal is bounded: the grace, the kill grace of the calls then
        // cancelled, and a margin for their clean-up.
        let settle = cfg.kill_grace + SETTLE_MARGIN;
        let limits = connections::Limits {
            header_timeout: cfg.http_header_timeout,
            body_timeout: cfg.http_body_timeout,
            idle_timeout: cfg.http_idle_timeout,
            max_connections: cfg.http_max_connections,
            drain: grace + settle,
        };
        let stats = state.connections.clone();
        match self.listener {
            Listener::Tcp(l) => connections::serve(l, app, limits, stats, stop).await,
            Listener::Unix(l, ref path) => {
                connections::serve(l, app, limits, stats, stop).await;
                let _ = std::fs::remove_file(path);
            }
        }
        timer.abort();
        // Calls in flight had their grace (the connections have drained, or the drain gave up);
        // background jobs cannot wait for their end: they are killed now (DESIGN.md).
        all_calls_at_end.cancel();
        // Calls cancelled at the end of the grace stop within the kill grace; make sure they did.
        let drained = tokio::time::timeout(settle, async {
            // `per_user` counts every call slot held: API and MCP calls, transfers, followers.
            while !state.calls.is_empty() || !state.per_user.is_empty() || state.jobs.running() > 0
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                calls = state.calls.len(),
                jobs = state.jobs.running(),
                "calls or jobs still running after the kill grace: closing the channels ends them"
            );
        }
        state.reaper.lock().take();
        if let Some(pool) = state.executor.pool() {
            let n = pool.thaw_all().await;
            if n > 0 {
                tracing::info!(
                    thawed = n,
                    "thawed paused sandboxes so their channels can close"
                );
            }
        }
        state.executor.close_channels();
        state.jobs.tasks().close();
        if tokio::time::timeout(settle, state.jobs.tasks().wait())
            .await
            .is_err()
        {
            tracing::warn!("background jobs still ending at exit");
        }
        // The clean-up of stopped calls and closed channels, and the reaper's last pass.
        let tasks = state.executor.tasks();
        tasks.close();
        if tokio::time::timeout(settle, tasks.wait()).await.is_err() {
            tracing::warn!(
                tasks = tasks.len(),
                "background clean-up still running at exit: the next start's reconcile finishes it"
            );
        }
        if let Some(pool) = state.executor.pool() {
            if self.options.remove_on_exit {
                let n = pool.shutdown_all().await?;
                tracing::info!(removed = n, "removed every sandbox (--remove-on-exit)");
            } else {
                tracing::info!("sandboxes kept warm for the next start");
            }
        }
        Ok(())
    }
}

impl AppState {
    fn executor_config(&self) -> &Config {
        match &self.executor {
            Executor::Host(h) => h.config(),
            Executor::Docker(d) => d.pool().config(),
        }
    }
}

/// Without a token, a daemon on loopback trusts whoever can connect: its own machine. A web page
/// in a browser on that machine can connect too, by a cross-site request (a form's POST needs no
/// preflight) or by rebinding its own name to 127.0.0.1; browsers say so in `Origin` and `Host`.
/// Such requests are refused: an `Origin` that is not a loopback one, a `Host` that is not a
/// loopback name or address. (With a token none of this can happen: a page cannot send it.)
fn browser_refusal(headers: &axum::http::HeaderMap) -> Option<ApiError> {
    let value = |name| headers.get(name).map(|v| v.to_str().unwrap_or("\u{0}"));
    if let Some(origin) = value(axum::http::header::ORIGIN) {
        let host = origin.split_once("://").map_or("", |(_, rest)| rest);
        if !loopback_authority(host) {
            return Some(ApiError::new(
                StatusCode::FORBIDDEN,
                "cross_origin",
                "a request from a web page of another origin (its Origin header) is refused by a \
                 daemon without a token: set ZCBOT_API_TOKEN to serve browsers' backends",
            ));
        }
    }
    if let Some(host) = value(axum::http::header::HOST) {
        if !loopback_authority(host) {
            return Some(ApiError::new(
                StatusCode::FORBIDDEN,
                "bad_host",
                "a daemon without a token answers only loopback names (Host: localhost or \
                 127.0.0.1): set ZCBOT_API_TOKEN to be reached by another name",
            ));
        }
    }
    None
}

/// Whether `host[:port]` names this machine's loopback: `localhost`, `127.0.0.0/8`, `[::1]`.
fn loopback_authority(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let host = host.trim_end_matches('.');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Binds a unix socket with mode 0600. A stale socket file (nobody listening) is replaced; a live
/// one is refused.
fn bind_unix(path: &std::path::Path) -> crate::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::io(
                "listen on",
                path,
                std::io::Error::other("exists and is not a socket"),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::io(
                "listen on",
                path,
                std::io::Error::other("another process is listening there"),
            ));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener =
        tokio::net::UnixListener::bind(path).map_err(|e| Error::io("listen on", path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io("restrict the socket", path, e))?;
    Ok(listener)
}

/// The API's error body: `{ "error": { "kind": "...", "message": "..." } }`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    kind: String,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, kind: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind: kind.to_owned(),
            message: message.into(),
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::InvalidUser { .. } | Error::BadCall { .. } | Error::FileLimit { .. } => {
                StatusCode::BAD_REQUEST
            }
            Error::File(f) => file_status(f.problem),
            // The file tools turn these into results; a transfer answers with it: the daemon ran
            // out of time or file workers, or is shutting down (retry later).
            Error::FileStopped { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::UnknownTool { .. } => StatusCode::NOT_FOUND,
            Error::FileTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UploadBroken { .. } => StatusCode::BAD_REQUEST,
            Error::SessionBusy { .. } => StatusCode::CONFLICT,
            Error::TooManySessions { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::NoSuchSession { .. } => StatusCode::NOT_FOUND,
            Error::SessionsUnavailable { .. } | Error::JobUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::TooManyJobs { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::NoSuchJob { .. } => StatusCode::NOT_FOUND,
            Error::JobIdInUse { .. } => StatusCode::CONFLICT,
            Error::EgressNotSubset { .. } => StatusCode::BAD_REQUEST,
            Error::EgressOff { .. } => StatusCode::CONFLICT,
            Error::PoolFull { .. }
            | Error::ImageMissing { .. }
            | Error::RuntimeMissing { .. }
            | Error::NetworkMismatch { .. }
            | Error::SandboxStart { .. }
            | Error::HostFirewall { .. }
            | Error::EgressProxy { .. }
            | Error::SelfCheck { .. }
            | Error::DiskQuota { .. }
            | Error::CallStart { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::Engine(e) if e.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
            // Removed on purpose while the call ran: the state changed under it (check, then
            // decide); a channel that died otherwise is the daemon's side failing.
            Error::ChannelLost {
                removed_by: Some(_),
                ..
            } => StatusCode::CONFLICT,
            Error::ChannelLost { .. } => StatusCode::BAD_GATEWAY,
            Error::Config { .. } | Error::Engine(_) | Error::Io { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::new(status, e.kind(), e.to_string())
    }
}

/// The status of a file tool's failure, by class.
fn file_status(problem: Problem) -> StatusCode {
    match problem {
        Problem::NotFound => StatusCode::NOT_FOUND,
        Problem::Refused(_) => StatusCode::FORBIDDEN,
        Problem::DiskFull => StatusCode::INSUFFICIENT_STORAGE,
        Problem::Exists | Problem::NotEmpty => StatusCode::CONFLICT,
        Problem::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        Problem::NotAFolder | Problem::IsAFolder | Problem::Nul | Problem::NameTooLong => {
            StatusCode::BAD_REQUEST
        }
    }
}

impl ApiError {
    /// The JSON body.
    pub(crate) fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": { "kind": self.kind, "message": self.message } })
    }

    /// The body of an event stream's `error` event: the JSON body with the status the same error
    /// answers with outside a stream (the stream's own status is already 200).
    pub(crate) fn stream_body(&self) -> serde_json::Value {
        let mut body = self.body();
        body["status"] = self.status.as_u16().into();
        body
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        (self.status, Json(body)).into_response()
    }
}

/// With a token configured, every request needs `Authorization: Bearer <token>`. Hashing both
/// sides first makes the comparison constant-time in content and length.
pub(crate) async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.token_hash.is_none() && matches!(state.executor_config().listen, Listen::Tcp(_)) {
        if let Some(refusal) = browser_refusal(req.headers()) {
            state.metrics.error(refusal.kind.as_str());
            return refusal.into_response();
        }
    }
    if let Some(expected) = &state.token_hash {
        let given = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| Sha256::digest(t.as_bytes()));
        let ok = given.is_some_and(|g| bool::from(g.as_slice().ct_eq(expected.as_slice())));
        if !ok {
            state.metrics.error("unauthorized");
            let mut resp = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong token: send Authorization: Bearer <ZCBOT_API_TOKEN>",
            )
            .into_response();
            // RFC 9110: a 401 names the scheme it wants.
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"zcbot-sandbox\""),
            );
            return resp;
        }
    }
    next.run(req).await
}
