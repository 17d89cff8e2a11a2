//! The proxy itself: the client table, the accept loop, and one task per client connection.
//!
//! Why a connection goes through these steps in this order: the cheap checks that need no
//! input from the client (known source address, per-user cap) come first, so an unknown or
//! greedy client costs almost nothing; the head is read under a size and time bound; the
//! allowlist is checked before any DNS query, so a sandbox cannot use the proxy to probe names;
//! and for CONNECT the ClientHello's SNI is checked before the proxy resolves or connects, so
//! a mismatched tunnel never reaches anything.

pub mod head;
pub mod relay;
pub mod resolve;
pub mod sni;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::pattern::{allowed, normalize_host, Pattern};
use crate::protocol::{Command, ConnReport, Reason, Report, Verdict, MAX_COMMAND_LINE};
use head::{classify, parse_head, raw_host, read_head, ReadHead, Request};
use relay::{relay, Upload};
use resolve::{ResolveError, Resolver};

/// Longest list of patterns quoted in a refusal body.
const MAX_LIST_IN_BODY: usize = 2048;
/// Time allowed to write a refusal to the client.
const REFUSAL_WRITE: Duration = Duration::from_secs(5);
/// Time and bytes read and discarded after a refusal, so the close does not reset the
/// connection before the client has read the answer.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// Where reports go: a bounded channel. Connection reports are dropped (and counted) when it
/// is full, so a slow stdout never stalls connections; control reports wait for room.
#[derive(Clone)]
pub struct ReportSink {
    tx: mpsc::Sender<Report>,
    dropped: Arc<AtomicU64>,
}

impl ReportSink {
    /// A sink and the receiver its reports come out of, holding at most `capacity`.
    pub fn channel(capacity: usize) -> (Self, mpsc::Receiver<Report>) {
        let (tx, rx) = mpsc::channel(capacity.max(2));
        (
            Self {
                tx,
                dropped: Arc::new(AtomicU64::new(0)),
            },
            rx,
        )
    }

    /// Send without waiting; if there is no room, count the report as dropped. The count goes
    /// out as a `dropped` report before the next report that fits.
    pub fn report(&self, r: Report) {
        let n = self.dropped.swap(0, Ordering::Relaxed);
        if n > 0 && self.tx.try_send(Report::Dropped { count: n }).is_err() {
            self.dropped.fetch_add(n + 1, Ordering::Relaxed);
            return;
        }
        if self.tx.try_send(r).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Send, waiting for room (ready, ack and error lines must not be lost).
    pub async fn report_reliably(&self, r: Report) {
        let n = self.dropped.swap(0, Ordering::Relaxed);
        if n > 0 {
            let _ = self.tx.send(Report::Dropped { count: n }).await;
        }
        let _ = self.tx.send(r).await;
    }
}

/// Which DNS the proxy uses for names without an override.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dns {
    /// Hickory, configured from `/etc/resolv.conf`.
    System,
    /// None: only the config's `resolve` overrides resolve (tests, closed deployments).
    Off,
}

/// One known sandbox.
struct Client {
    user: Arc<str>,
    allow: Arc<[Pattern]>,
}

struct Shared {
    config: crate::protocol::ProxyConfig,
    table: RwLock<HashMap<IpAddr, Arc<Client>>>,
    conns: Mutex<HashMap<Arc<str>, u32>>,
    resolver: Resolver,
    sink: ReportSink,
}

/// The proxy: cheap to clone, shared by the accept loop and the control loop.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

/// A held per-user connection slot; released on drop.
struct Slot {
    shared: Arc<Shared>,
    user: Arc<str>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut conns = self
            .shared
            .conns
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(n) = conns.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                conns.remove(&self.user);
            }
        }
    }
}

impl Shared {
    fn lookup(&self, ip: IpAddr) -> Option<Arc<Client>> {
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        table.get(&ip).cloned()
    }

    fn acquire(self: &Arc<Self>, user: &Arc<str>) -> Option<Slot> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let n = conns.entry(user.clone()).or_insert(0);
        if *n >= self.config.max_conns_per_user {
            return None;
        }
        *n += 1;
        Some(Slot {
            shared: self.clone(),
            user: user.clone(),
        })
    }
}

impl Proxy {
    /// A proxy with this (validated) configuration, sending its reports to `sink`. Must be
    /// called inside a tokio runtime when `dns` is [`Dns::System`].
    pub fn new(
        config: crate::protocol::ProxyConfig,
        sink: ReportSink,
        dns: Dns,
    ) -> Result<Self, String> {
        config.validate()?;
        let dns = match dns {
            Dns::System => Some(resolve::system_dns(Duration::from_millis(
                config.dns_timeout_ms,
            ))?),
            Dns::Off => None,
        };
        let resolver = Resolver::new(&config, dns);
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                table: RwLock::new(HashMap::new()),
                conns: Mutex::new(HashMap::new()),
                resolver,
                sink,
            }),
        })
    }

    /// Apply one command to the client table. Connections already open are not affected.
    pub fn apply(&self, cmd: &Command) {
        let mut table = self.shared.table.write().unwrap_or_else(|p| p.into_inner());
        match cmd {
            Command::Reset { .. } => table.clear(),
            Command::Set {
                ip, user, allow, ..
            } => {
                table.insert(
                    ip.to_canonical(),
                    Arc::new(Client {
                        user: Arc::from(user.as_str()),
                        allow: Arc::from(allow.as_slice()),
                    }),
                );
            }
            Command::Drop { ip, .. } => {
                table.remove(&ip.to_canonical());
            }
        }
    }

    /// Read commands line by line from `reader` (each at most 256 KiB; longer ones are skipped
    /// without being buffered), apply them in order, and report an `ack` or an `error` for
    /// each. Returns at end of input; the table stays as it is (the daemon may re-attach and
    /// send `reset`).
    pub async fn control<R: AsyncRead + Unpin>(&self, reader: R) {
        let mut r = BufReader::new(reader);
        let mut line: Vec<u8> = Vec::new();
        let mut too_long = false;
        loop {
            let buf = match r.fill_buf().await {
                Ok(b) => b,
                Err(_) => return,
            };
            if buf.is_empty() {
                if !line.is_empty() || too_long {
                    self.command_line(&line, too_long).await;
                }
                return;
            }
            let (take, end) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i, Some(i + 1)),
                None => (buf.len(), None),
            };
            if !too_long {
                if line.len() + take > MAX_COMMAND_LINE {
                    too_long = true;
                    line = Vec::new();
                } else {
                    line.extend_from_slice(&buf[..take]);
                }
            }
            r.consume(end.unwrap_or(take));
            if end.is_some() {
                self.command_line(&line, too_long).await;
                line.clear();
                too_long = false;
            }
        }
    }

    async fn command_line(&self, line: &[u8], too_long: bool) {
        let sink = &self.shared.sink;
        if too_long {
            sink.report_reliably(Report::Error {
                seq: None,
                message: format!("command line longer than {MAX_COMMAND_LINE} bytes; skipped"),
            })
            .await;
            return;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let parsed = std::str::from_utf8(line)
            .map_err(|_| (None, "command line is not UTF-8".to_string()))
            .and_then(Command::parse_line);
        match parsed {
            Ok(cmd) => {
                self.apply(&cmd);
                sink.report_reliably(Report::Ack { seq: cmd.seq() }).await;
            }
            Err((seq, message)) => sink.report_reliably(Report::Error { seq, message }).await,
        }
    }

    /// Accept connections forever, each handled in its own task. Accept errors (e.g. out of
    /// file descriptors) are logged to stderr and retried after 100 ms.
    pub async fn serve(&self, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let shared = self.shared.clone();
                    tokio::spawn(handle(shared, stream, peer));
                }
                Err(e) => {
                    eprintln!("zcbot-egress: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// One client connection, start to end; exactly one `conn` report.
async fn handle(shared: Arc<Shared>, mut stream: TcpStream, peer: SocketAddr) {
    let start = Instant::now();
    let _ = stream.set_nodelay(true);
    let mut rep = ConnReport::new(peer.ip().to_canonical());
    handle_inner(&shared, &mut stream, &mut rep, start).await;
    rep.ms = start.elapsed().as_millis() as u64;
    shared.sink.report(Report::Conn(rep));
}

fn refused(rep: &mut ConnReport, reason: Reason) {
    rep.verdict = Verdict::Refused;
    rep.reason = reason;
}

async fn handle_inner(
    shared: &Arc<Shared>,
    stream: &mut TcpStream,
    rep: &mut ConnReport,
    start: Instant,
) {
    let cfg = &shared.config;
    let Some(client) = shared.lookup(rep.client) else {
        refused(rep, Reason::UnknownClient);
        // No linger for these two: a flood of them must not hold descriptors for a second each.
        answer(
            stream,
            403,
            "zcbot egress: this address is not a known sandbox\n",
        )
        .await;
        return;
    };
    rep.user = Some(client.user.to_string());
    let Some(_slot) = shared.acquire(&client.user) else {
        refused(rep, Reason::TooManyConnections);
        let body = format!(
            "zcbot egress: this sandbox already has {} connections open through the proxy; close some and retry\n",
            cfg.max_conns_per_user
        );
        answer(stream, 429, &body).await;
        return;
    };

    let deadline = start + Duration::from_millis(cfg.header_timeout_ms);
    let read = tokio::time::timeout_at(deadline, read_head(stream, cfg.max_header_bytes)).await;
    let (raw, rest) = match read {
        Err(_) => {
            refused(rep, Reason::BadRequest);
            refuse(
                stream,
                408,
                "zcbot egress: the request head did not arrive in time\n",
            )
            .await;
            return;
        }
        Ok(ReadHead::TooLarge) => {
            refused(rep, Reason::BadRequest);
            let body = format!(
                "zcbot egress: request head larger than {} bytes\n",
                cfg.max_header_bytes
            );
            refuse(stream, 431, &body).await;
            return;
        }
        Ok(ReadHead::Closed) => {
            refused(rep, Reason::BadRequest);
            return;
        }
        Ok(ReadHead::Complete { head, rest }) => (head, rest),
    };
    let head = match parse_head(&raw) {
        Ok(h) => h,
        Err(e) => {
            refused(rep, Reason::BadRequest);
            refuse(stream, e.status, &format!("zcbot egress: {}\n", e.message)).await;
            return;
        }
    };
    rep.set_method(&head.method);
    if let Some(h) = raw_host(&head) {
        rep.set_host(&h);
    }
    let request = match classify(&head) {
        Ok(r) => r,
        Err(e) => {
            let reason = if e.ip_literal {
                Reason::IpLiteral
            } else {
                Reason::BadRequest
            };
            refused(rep, reason);
            let body = if e.ip_literal {
                format!("{}{}\n", e.message, allowed_suffix(&client.allow))
            } else {
                format!("zcbot egress: {}\n", e.message)
            };
            refuse(stream, e.status, &body).await;
            return;
        }
    };
    let (host, port) = match &request {
        Request::Connect { host, port } | Request::Http { host, port, .. } => (host.clone(), *port),
    };
    rep.set_host(&host);
    rep.port = Some(port);
    if !allowed(&client.allow, &host, port) {
        refused(rep, Reason::NotAllowed);
        let body = format!(
            "zcbot egress: {host}:{port} is not on this sandbox's allowlist{}\n",
            allowed_suffix(&client.allow)
        );
        refuse(stream, 403, &body).await;
        return;
    }
    match request {
        Request::Connect { .. } => connect(shared, stream, rep, &host, port, rest, deadline).await,
        Request::Http {
            forward,
            content_length,
            ..
        } => {
            plain(
                shared,
                stream,
                rep,
                &host,
                port,
                forward,
                content_length,
                rest,
            )
            .await
        }
    }
}

/// ` (allowed: a, b, ...)`, bounded.
fn allowed_suffix(list: &[Pattern]) -> String {
    if list.is_empty() {
        return " (allowed: nothing)".to_string();
    }
    let mut s = String::from(" (allowed: ");
    for (i, p) in list.iter().enumerate() {
        let item = p.to_string();
        if s.len() + item.len() > MAX_LIST_IN_BODY {
            s.push_str(&format!("… and {} more", list.len() - i));
            break;
        }
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(&item);
    }
    s.push(')');
    s
}

/// CONNECT: 200, then the ClientHello's SNI must equal the host, then resolve, connect, relay.
async fn connect(
    shared: &Arc<Shared>,
    stream: &mut TcpStream,
    rep: &mut ConnReport,
    host: &str,
    port: u16,
    mut hello: Vec<u8>,
    deadline: Instant,
) {
    let ok = tokio::time::timeout_at(
        deadline,
        stream.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n"),
    )
    .await;
    if !matches!(ok, Ok(Ok(()))) {
        refused(rep, Reason::BadRequest);
        return;
    }
    match tokio::time::timeout_at(deadline, sni::read_first_record(stream, &mut hello)).await {
        Err(_) => return refused(rep, Reason::BadRequest),
        Ok(Err(_)) => return refused(rep, Reason::NoSni),
        Ok(Ok(())) => {}
    }
    let name = match sni::client_hello_sni(&hello) {
        Ok(n) => n,
        Err(_) => return refused(rep, Reason::NoSni),
    };
    match normalize_host(&name) {
        Ok(n) if n == host => {}
        _ => return refused(rep, Reason::SniMismatch),
    }
    let mut server = match shared.resolver.connect(host, port).await {
        Ok(s) => s,
        Err(e) => return refused(rep, e.reason()),
    };
    let _ = server.set_nodelay(true);
    rep.verdict = Verdict::Allowed;
    rep.reason = Reason::Ok;
    let idle = Duration::from_millis(shared.config.idle_timeout_ms);
    if !matches!(
        tokio::time::timeout(idle, server.write_all(&hello)).await,
        Ok(Ok(()))
    ) {
        return;
    }
    rep.up = hello.len() as u64;
    let (mut cr, mut cw) = stream.split();
    let (mut sr, mut sw) = server.split();
    let counts = relay(&mut cr, &mut cw, &mut sr, &mut sw, Upload::Stream, idle).await;
    rep.up += counts.up;
    rep.down = counts.down;
}

/// Plain HTTP: resolve, connect, send the rewritten head and exactly the body, relay the
/// response until the server closes.
#[allow(clippy::too_many_arguments)]
async fn plain(
    shared: &Arc<Shared>,
    stream: &mut TcpStream,
    rep: &mut ConnReport,
    host: &str,
    port: u16,
    forward: Vec<u8>,
    content_length: u64,
    rest: Vec<u8>,
) {
    let mut server = match shared.resolver.connect(host, port).await {
        Ok(s) => s,
        Err(e) => {
            refused(rep, e.reason());
            let (status, body) = match e {
                ResolveError::Blocked(_) => (
                    403,
                    format!(
                        "zcbot egress: {host} resolves to an address this sandbox may not reach\n"
                    ),
                ),
                ResolveError::Failed => (502, format!("zcbot egress: could not resolve {host}\n")),
                ResolveError::Connect => (
                    502,
                    format!("zcbot egress: could not connect to {host}:{port}\n"),
                ),
            };
            refuse(stream, status, &body).await;
            return;
        }
    };
    let _ = server.set_nodelay(true);
    rep.verdict = Verdict::Allowed;
    rep.reason = Reason::Ok;
    let idle = Duration::from_millis(shared.config.idle_timeout_ms);
    // What was read after the head: the start of the body; anything past the body is a
    // pipelined request and is dropped.
    let prefix_len = usize::try_from(content_length)
        .unwrap_or(usize::MAX)
        .min(rest.len());
    let mut first = forward;
    first.extend_from_slice(&rest[..prefix_len]);
    if !matches!(
        tokio::time::timeout(idle, server.write_all(&first)).await,
        Ok(Ok(()))
    ) {
        return;
    }
    rep.up = first.len() as u64;
    let remaining = content_length - prefix_len as u64;
    let (mut cr, mut cw) = stream.split();
    let (mut sr, mut sw) = server.split();
    let counts = relay(
        &mut cr,
        &mut cw,
        &mut sr,
        &mut sw,
        Upload::Exactly(remaining),
        idle,
    )
    .await;
    rep.up += counts.up;
    rep.down = counts.down;
}

fn status_text(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// Answer with `status` and a one-line plain-text body, then close gracefully.
async fn refuse(stream: &mut TcpStream, status: u16, body: &str) {
    if !answer(stream, status, body).await {
        return;
    }
    let _ = tokio::time::timeout(LINGER, async {
        let mut buf = [0u8; 4096];
        let mut total = 0;
        while total < LINGER_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

/// Writes the refusal and shuts the write side; whether that worked.
async fn answer(stream: &mut TcpStream, status: u16, body: &str) -> bool {
    let response = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        status_text(status),
        body.len()
    );
    let wrote = tokio::time::timeout(REFUSAL_WRITE, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
    matches!(wrote, Ok(Ok(())))
}
