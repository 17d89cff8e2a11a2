//! Accepting connections with the limits a reverse proxy operator expects: at most
//! `ZCBOT_HTTP_MAX_CONNECTIONS` open (one more is refused at once with a 503, never queued), a
//! request's headers within `ZCBOT_HTTP_HEADER_TIMEOUT` of the connection opening or of the
//! request's first byte, and a kept-alive connection closed after `ZCBOT_HTTP_IDLE_TIMEOUT`
//! without a request. A request in flight (a long tool call) is never cut by these timers.
//!
//! hyper's own header timer starts only when it polls for a head and cannot tell "idle between
//! requests" from "slow headers", so each connection carries a small clock of its own, fed by its
//! reads and by the service, and watched by a task that drops the connection when a limit passes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The connection limits (from the config).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) header_timeout: Duration,
    pub(crate) body_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_connections: usize,
    /// How long, once accepting stops, the open connections may take to finish.
    pub(crate) drain: Duration,
}

/// What the acceptor did, for `/metrics`. Cheap handles: clones count into the same figures.
#[derive(Debug, Clone, Default)]
pub struct ConnectionStats {
    /// Connections open now.
    pub open: Gauge,
    /// Connections refused because `ZCBOT_HTTP_MAX_CONNECTIONS` were open.
    pub refused: Counter,
    /// Connections closed for sending headers too slowly or sitting idle too long.
    pub timed_out: Counter,
}

impl ConnectionStats {
    /// Adds the acceptor's families to the daemon's registry (counters without `_total`: the
    /// encoder appends it).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "zcbot_http_connections_open",
            "HTTP connections open now",
            self.open.clone(),
        );
        registry.register(
            "zcbot_http_connections_refused",
            "Connections refused at ZCBOT_HTTP_MAX_CONNECTIONS",
            self.refused.clone(),
        );
        registry.register(
            "zcbot_http_connections_timed_out",
            "Connections closed for slow headers or idleness",
            self.timed_out.clone(),
        );
    }
}

/// A listener the acceptor can serve: TCP or a unix socket.
pub(crate) trait Listener: Send {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;
    /// Writes `bytes` if the socket takes them now (never waits), for the refusal.
    fn try_write(io: &Self::Io, bytes: &[u8]);
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> io::Result<Self::Io> {
        tokio::net::TcpListener::accept(self).await.map(|(s, _)| s)
    }
    fn try_write(io: &Self::Io, bytes: &[u8]) {
        let _ = io.try_write(bytes);
    }
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> io::Result<Self::Io> {
        tokio::net::UnixListener::accept(self).await.map(|(s, _)| s)
    }
    fn try_write(io: &Self::Io, bytes: &[u8]) {
        let _ = io.try_write(bytes);
    }
}

/// One connection's clock.
struct Clock {
    state: Mutex<Phase>,
}

#[derive(Clone, Copy)]
enum Phase {
    /// Waiting for a request's headers since then (the connection opened, or a request's first
    /// byte arrived after an idle spell).
    Reading(Instant),
    /// Requests are being served (how many).
    Busy(u32),
    /// The last response was produced then; nothing arrived since.
    Idle(Instant),
}

impl Clock {
    fn read_some(&self) {
        let mut st = self.state.lock();
        if let Phase::Idle(_) = *st {
            *st = Phase::Reading(Instant::now());
        }
    }

    fn wrote_some(&self) {
        let mut st = self.state.lock();
        if let Phase::Idle(_) = *st {
            *st = Phase::Idle(Instant::now());
        }
    }

    fn begin(&self) {
        let mut st = self.state.lock();
        *st = match *st {
            Phase::Busy(n) => Phase::Busy(n + 1),
            _ => Phase::Busy(1),
        };
    }

    fn end(&self) {
        let mut st = self.state.lock();
        *st = match *st {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle(Instant::now()),
        };
    }

    /// Why the connection must close now, if it must.
    fn expired(&self, limits: &Limits) -> Option<&'static str> {
        match *self.state.lock() {
            Phase::Reading(since) if since.elapsed() >= limits.header_timeout => {
                Some("the request's headers did not arrive within ZCBOT_HTTP_HEADER_TIMEOUT")
            }
            Phase::Idle(since) if since.elapsed() >= limits.idle_timeout => {
                Some("idle for ZCBOT_HTTP_IDLE_TIMEOUT")
            }
            _ => None,
        }
    }
}

/// The connection's socket, telling the clock when bytes arrive.
struct Tracked<T> {
    inner: T,
    clock: Arc<Clock>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.read_some();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            // A response still going out to a slow reader is not idleness.
            self.clock.wrote_some();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Ends a request's busy spell however the service future ends (done or dropped).
struct BusyGuard(Arc<Clock>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A request body that must arrive whole within a deadline: a client that declares a body and
/// sends it slowly (or never) gets an error instead of holding its connection and the handler.
/// With `pace` (an upload) the deadline is for each piece instead: the body may go on as long as
/// it never pauses for longer.
struct TimedBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    within: Duration,
    pace: bool,
    /// Whether the handler asked for the body yet: an upload's first pause counts from then (with
    /// `Expect: 100-continue` the client sends nothing before, and the handler may first wait
    /// for a file worker).
    asked: bool,
}

impl TimedBody {
    fn new(inner: Incoming, within: Duration, pace: bool) -> Self {
        TimedBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(within)),
            within,
            pace,
            asked: false,
        }
    }

    /// An upload's next pause may last `within` from now.
    fn rearm(&mut self) {
        let next = tokio::time::Instant::now() + self.within;
        self.deadline.as_mut().reset(next);
    }
}

impl http_body::Body for TimedBody {
    type Data = axum::body::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if self.pace && !self.asked {
            self.asked = true;
            self.rearm();
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if self.pace {
                    self.rearm();
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) if self.pace => Poll::Ready(Some(Err(
                    "the upload paused for longer than ZCBOT_HTTP_BODY_TIMEOUT".into(),
                ))),
                Poll::Ready(()) => Poll::Ready(Some(Err(
                    "the request body did not arrive within ZCBOT_HTTP_BODY_TIMEOUT".into(),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

const REFUSAL_BODY: &str = r#"{"error":{"kind":"too_many_connections","message":"the daemon has ZCBOT_HTTP_MAX_CONNECTIONS connections open; retry later"}}"#;

/// Serves `app` on `listener` until `stop` is cancelled, then stops accepting and waits for the
/// open connections to finish their requests (idle ones close at once).
pub(crate) async fn serve<L: Listener>(
    listener: L,
    app: Router,
    limits: Limits,
    stats: Arc<ConnectionStats>,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = tokio_util::task::TaskTracker::new();
    let refusal = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{REFUSAL_BODY}",
        REFUSAL_BODY.len()
    );
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => break,
        };
        let io = match accepted {
            Ok(io) => io,
            Err(e) => {
                // Out of descriptors, say: the open connections keep working; try again shortly.
                tracing::warn!(error = %e, "could not accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            L::try_write(&io, refusal.as_bytes());
            stats.refused.inc();
            continue;
        };
        let clock = Arc::new(Clock {
            state: Mutex::new(Phase::Reading(Instant::now())),
        });
        let io = TokioIo::new(Tracked {
            inner: io,
            clock: clock.clone(),
        });
        let svc_clock = clock.clone();
        let app = app.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            svc_clock.begin();
            let busy = BusyGuard(svc_clock.clone());
            let app = app.clone();
            let body_timeout = limits.body_timeout;
            async move {
                let _busy = busy;
                // PUT is the upload route: its body may be large and take long as long as it
                // keeps coming (the route bounds the whole by ZCBOT_TRANSFER_TIMEOUT).
                let pace = req.method() == hyper::Method::PUT;
                let req =
                    req.map(|body| axum::body::Body::new(TimedBody::new(body, body_timeout, pace)));
                app.oneshot(req).await
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            // Our clock does it, without cutting a kept-alive connection short.
            .header_read_timeout(None)
            .serve_connection(io, service);
        let conn = graceful.watch(conn);
        let stats = stats.clone();
        stats.open.inc();
        connections.spawn(async move {
            let _permit = permit;
            let watchdog = async {
                let tick = limits
                    .header_timeout
                    .min(limits.idle_timeout)
                    .min(Duration::from_secs(1))
                    / 4;
                loop {
                    tokio::time::sleep(tick.max(Duration::from_millis(10))).await;
                    if let Some(why) = clock.expired(&limits) {
                        return why;
                    }
                }
            };
            tokio::select! {
                r = conn => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                why = watchdog => {
                    stats.timed_out.inc();
                    tracing::debug!(reason = why, "closing a connection");
                }
            }
            stats.open.dec();
        });
    }
    // Idle connections close now; busy ones when their request is answered, within the bound.
    connections.close();
    let drained = tokio::time::timeout(limits.drain, async {
        graceful.shutdown().await;
        connections.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "connections still open after the shutdown bound: they end with the process"
        );
    }
}
