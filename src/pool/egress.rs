//! The pool's egress proxy, in `allowlist` mode: one hardened container per pool, on the internal
//! sandbox network and on one outbound network ([`Config::egress_network`]), running our static
//! proxy (crate `zcbot-egress`). It is the sandboxes' only way out: their own rules and the
//! host's let a sandbox reach the proxy's port and nothing else.
//!
//! The daemon talks to the proxy over the container's attached stdin and stdout (the engine's
//! attach API: no host path, no port, and it works under every runtime). It sends which source
//! address is which user with which allowlist, and waits for each command's acknowledgement;
//! the proxy sends one report per client connection (user, host, port, verdict, bytes), which
//! the daemon logs and counts. The proxy knows nothing it was not told since it (re)started: an
//! unknown address is refused. Each (re)attach is a new *generation*: a sandbox registers again
//! (at its next lease) when the generation it registered in is not the current one.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, EndpointSettings, HostConfig, HostConfigLogConfig};
use dashmap::DashMap;
use futures_util::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Pattern};
use crate::engine::{Chunk, Created, Engine, Input, SharedEngine, State};
use crate::error::{Error, Result};
use crate::pool::spec::{config_hash, LABEL_CONFIG_HASH, LABEL_MANAGED_BY, LABEL_POOL, MANAGED_BY};
use crate::user::UserId;
use zcbot_egress::protocol::{Command, ConnReport, ProxyConfig, Report, StaticAddr, Verdict};

/// The port the proxy listens on, on every network it joins.
pub const PROXY_PORT: u16 = 3128;
/// Label marking a pool's egress proxy container, with the pool's id (not [`LABEL_POOL`]: the
/// pool's reconcile must not take it for a sandbox).
pub const LABEL_EGRESS: &str = "io.zcbot.egress";
/// How long a command may wait for the proxy's acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest report line read from the proxy; longer ones are skipped.
const MAX_LINE: usize = 64 * 1024;

/// The proxy container's name for pool `pool_id`.
pub fn proxy_name(pool_id: &str) -> String {
    format!("zcbot-egress-{pool_id}")
}

/// What one user did through the proxy since the daemon started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Traffic {
    /// Connections let through.
    pub allowed: u64,
    /// Connections refused.
    pub refused: u64,
    /// Bytes from the sandbox to the outside.
    pub up: u64,
    /// Bytes from the outside to the sandbox.
    pub down: u64,
}

type VerdictLabels = [(&'static str, &'static str); 2];
type DirectionLabels = [(&'static str, &'static str); 1];

/// The proxy's metric families.
#[derive(Debug, Default)]
struct EgressMetrics {
    connections: Family<VerdictLabels, Counter>,
    bytes: Family<DirectionLabels, Counter>,
}

/// The pool's handle on its egress proxy.
#[derive(Clone)]
pub struct EgressProxy {
    inner: Arc<ProxyInner>,
}

struct ProxyInner {
    engine: SharedEngine,
    name: String,
    sandbox_network: String,
    /// The proxy's address on the sandbox network: what sandboxes are given and let reach.
    addr: SocketAddr,
    /// The daemon's handle (clears the proxy's table on attach), not a CLI command's.
    owner: bool,
    link: tokio::sync::Mutex<Option<Input>>,
    pending: parking_lot::Mutex<
        HashMap<u64, tokio::sync::oneshot::Sender<std::result::Result<(), String>>>,
    >,
    seq: AtomicU64,
    generation: AtomicU64,
    traffic: DashMap<String, Traffic>,
    metrics: EgressMetrics,
    stop: CancellationToken,
}

/// The proxy's whole configuration, as the JSON its container reads from `ZCBOT_EGRESS_CONFIG`.
/// The host's own addresses are in `blocked` already ([`super::spec::blocklist`] adds those no
/// range covers), so `host_addrs` stays empty: the addresses of the host's interfaces come and
/// go with every container (link-local ones), and would change the proxy's spec hash.
fn proxy_config(config: &Config, blocked: &[ipnet::IpNet]) -> String {
    let proxy = ProxyConfig {
        listen: SocketAddr::from(([0, 0, 0, 0], PROXY_PORT)),
        resolve: config
            .egress_resolve
            .iter()
            .map(|(name, ip)| StaticAddr {
                name: name.clone(),
                ip: *ip,
            })
            .collect(),
        blocked: blocked.to_vec(),
        host_addrs: Vec::new(),
        max_conns_per_user: config.egress_user_connections,
        ..ProxyConfig::default()
    };
    serde_json::to_string(&proxy).unwrap_or_default()
}

impl EgressProxy {
    /// The daemon's start: makes sure the pool's outbound network and its proxy container exist
    /// and run (adopting a running one made with the same spec), attaches to it and clears its
    /// client table. With `owner` false (a CLI command beside a running daemon), it only
    /// attaches to the running proxy: it never makes, replaces or clears it, which would take
    /// the daemon's proxy away from every tenant.
    pub async fn start(
        config: &Config,
        engine: SharedEngine,
        seccomp: Option<String>,
        blocked: &[ipnet::IpNet],
        owner: bool,
    ) -> Result<Self> {
        let name = proxy_name(&config.pool_id);
        if !owner {
            let ip = engine
                .inspect(&name)
                .await?
                .filter(|c| c.state == State::Running)
                .and_then(|c| c.addresses.get(&config.network_name()).copied())
                .ok_or_else(|| Error::EgressProxy {
                    reason: format!(
                        "{name} is not running: start the daemon (zcbot-sandbox serve), which \
                         makes it"
                    ),
                })?;
            let proxy = EgressProxy::new(engine, name, config.network_name(), ip, false);
            let ended = proxy.attach().await?;
            tokio::spawn(proxy.clone().watch(ended));
            return Ok(proxy);
        }
        ensure_outbound(engine.as_ref(), &config.egress_network, &config.pool_id).await?;
        let image_id = engine
            .image_id(&config.egress_image)
            .await?
            .ok_or_else(|| Error::ImageMissing {
                image: config.egress_image.clone(),
            })?;
        let mut body = proxy_body(config, &image_id, seccomp, blocked);
        let hash = config_hash(&body);
        if let Some(labels) = body.labels.as_mut() {
            labels.insert(LABEL_CONFIG_HASH.to_owned(), hash.clone());
        }
        let found = engine.inspect(&name).await?;
        let adopt = found
            .as_ref()
            .is_some_and(|c| c.labels.get(LABEL_CONFIG_HASH) == Some(&hash));
        if found.is_some() && !adopt {
            tracing::info!(container = %name, "egress proxy made with another spec: replacing it");
            engine.remove(&name).await?;
        }
        if !adopt {
            if let Created::NameTaken = engine.create(&name, &body).await? {
                return Err(Error::EgressProxy {
                    reason: format!("another process created {name} at the same time"),
                });
            }
            engine
                .connect_network(&config.egress_network, &name)
                .await?;
        }
        let running = engine
            .inspect(&name)
            .await?
            .is_some_and(|c| c.state == State::Running);
        if !running {
            engine.start(&name).await?;
        }
        let container = engine
            .inspect(&name)
            .await?
            .ok_or_else(|| Error::EgressProxy {
                reason: format!("{name} vanished while starting"),
            })?;
        let sandbox_network = config.network_name();
        let ip = container
            .addresses
            .get(&sandbox_network)
            .copied()
            .ok_or_else(|| Error::EgressProxy {
                reason: format!("{name} has no address on {sandbox_network}"),
            })?;
        let proxy = EgressProxy::new(engine, name, sandbox_network, ip, true);
        let ended = proxy.attach().await?;
        tokio::spawn(proxy.clone().watch(ended));
        tracing::info!(container = %proxy.inner.name, address = %proxy.inner.addr, network = %config.egress_network, "egress proxy ready");
        Ok(proxy)
    }

    fn new(
        engine: SharedEngine,
        name: String,
        sandbox_network: String,
        ip: IpAddr,
        owner: bool,
    ) -> Self {
        // Each process attached to the proxy numbers its commands from its own random base:
        // acknowledgements go to every attached process, and each must know its own.
        let base = u64::from_str_radix(&crate::text::random_id()[..8], 16).unwrap_or(0) << 32;
        EgressProxy {
            inner: Arc::new(ProxyInner {
                engine,
                name,
                sandbox_network,
                addr: SocketAddr::new(ip, PROXY_PORT),
                owner,
                link: tokio::sync::Mutex::new(None),
                pending: parking_lot::Mutex::new(HashMap::new()),
                seq: AtomicU64::new(base),
                generation: AtomicU64::new(0),
                traffic: DashMap::new(),
                metrics: EgressMetrics::default(),
                stop: CancellationToken::new(),
            }),
        }
    }

    /// Where sandboxes reach the proxy.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The proxy container's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The current generation: a registration made in another one is void.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::SeqCst)
    }

    /// What `user` did through the proxy since the daemon started.
    pub fn traffic(&self, user: &str) -> Traffic {
        self.inner.traffic.get(user).map(|t| *t).unwrap_or_default()
    }

    /// Tells the proxy that connections from `ip` are `user`'s, under `allow`; returns once the
    /// proxy applied it, with the generation it holds for.
    pub async fn register(&self, ip: IpAddr, user: &str, allow: &[Pattern]) -> Result<u64> {
        let generation = self.generation();
        self.command(|seq| Command::Set {
            seq,
            ip,
            user: user.to_owned(),
            allow: allow.to_vec(),
        })
        .await?;
        Ok(generation)
    }

    /// Tells the proxy to forget `ip` (its sandbox is gone). Best effort: a stale entry is
    /// overwritten by the next sandbox given that address, before it runs anything.
    pub async fn forget(&self, ip: IpAddr) {
        if let Err(e) = self.command(|seq| Command::Drop { seq, ip }).await {
            tracing::debug!(error = %e, %ip, "could not tell the egress proxy to forget an address");
        }
    }

    /// Stops the watcher and the reader and lets go of the attach connection (the container
    /// keeps running, to be adopted by the next start). The pool calls it when it is dropped.
    pub fn close(&self) {
        self.inner.stop.cancel();
        if let Ok(mut link) = self.inner.link.try_lock() {
            *link = None;
        }
    }

    /// Registers the proxy's metric families.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "zcbot_egress_connections",
            "Connections through the egress proxy, by verdict and reason",
            self.inner.metrics.connections.clone(),
        );
        registry.register(
            "zcbot_egress_bytes",
            "Bytes relayed by the egress proxy, up (sandbox to outside) and down",
            self.inner.metrics.bytes.clone(),
        );
    }

    async fn command(&self, command: impl FnOnce(u64) -> Command) -> Result<()> {
        let seq = self.inner.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let mut line = serde_json::to_string(&command(seq)).map_err(|e| Error::EgressProxy {
            reason: format!("a command could not be encoded: {e}"),
        })?;
        line.push('\n');
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner.pending.lock().insert(seq, tx);
        let sent = {
            let mut link = self.inner.link.lock().await;
            match link.as_mut() {
                Some(input) => tokio::time::timeout(ACK_TIMEOUT, async {
                    input.write_all(line.as_bytes()).await?;
                    input.flush().await
                })
                .await
                .map_err(|_| "the write did not finish in time".to_owned())
                .and_then(|r| r.map_err(|e| e.to_string())),
                None => Err("the daemon is not attached to it (it is restarting)".to_owned()),
            }
        };
        let outcome = match sent {
            Err(e) => Err(e),
            Ok(()) => match tokio::time::timeout(ACK_TIMEOUT, rx).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err("it went away before answering".to_owned()),
                Err(_) => Err(format!(
                    "it did not answer within {}",
                    humantime::format_duration(ACK_TIMEOUT)
                )),
            },
        };
        self.inner.pending.lock().remove(&seq);
        outcome.map_err(|reason| Error::EgressProxy {
            reason: format!("{}: {reason}", self.inner.name),
        })
    }

    /// Attaches to the proxy, starts reading its reports, and clears its table (a new
    /// generation). The token is cancelled when the stream ends.
    async fn attach(&self) -> Result<CancellationToken> {
        let attached = self
            .inner
            .engine
            .attach(&self.inner.name)
            .await?
            .ok_or_else(|| Error::EgressProxy {
                reason: format!("{} is not running", self.inner.name),
            })?;
        *self.inner.link.lock().await = Some(attached.input);
        let ended = CancellationToken::new();
        tokio::spawn(self.clone().read(attached.output, ended.clone()));
        if self.inner.owner {
            self.command(|seq| Command::Reset { seq }).await?;
        }
        // Only now: a registration made before the reset was acknowledged carries the previous
        // generation, and is made again.
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
        Ok(ended)
    }

    /// Re-attaches each time the stream ends, until the pool closes.
    async fn watch(self, mut ended: CancellationToken) {
        loop {
            tokio::select! {
                _ = ended.cancelled() => {}
                _ = self.inner.stop.cancelled() => return,
            }
            *self.inner.link.lock().await = None;
            self.inner.generation.fetch_add(1, Ordering::SeqCst);
            for (_, tx) in self.inner.pending.lock().drain() {
                let _ = tx.send(Err("its stream ended".to_owned()));
            }
            tracing::warn!(container = %self.inner.name, "lost the egress proxy's stream: reconnecting");
            let mut wait = Duration::from_millis(200);
            ended = loop {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.inner.stop.cancelled() => return,
                }
                match self.revive().await {
                    Ok(ended) => break ended,
                    Err(e) => {
                        tracing::error!(container = %self.inner.name, error = %e, "EGRESS PROXY DOWN: sandboxes have no way out until it is back");
                        wait = (wait * 2).min(Duration::from_secs(10));
                    }
                }
            };
        }
    }

    /// Starts the proxy if it stopped and attaches again. A proxy that was removed is not
    /// recreated here: its address would change under the sandboxes that were given it; the
    /// daemon's next start makes a new one (and the sandboxes with it).
    async fn revive(&self) -> Result<CancellationToken> {
        let engine = &self.inner.engine;
        let found = engine.inspect(&self.inner.name).await?;
        let Some(c) = found else {
            return Err(Error::EgressProxy {
                reason: format!(
                    "{} was removed: restart the daemon to make it again",
                    self.inner.name
                ),
            });
        };
        if c.state != State::Running {
            if !self.inner.owner {
                return Err(Error::EgressProxy {
                    reason: format!("{} stopped: the daemon starts it again", self.inner.name),
                });
            }
            engine.start(&self.inner.name).await?;
        }
        let now = engine.inspect(&self.inner.name).await?;
        let ip = now.and_then(|c| c.addresses.get(&self.inner.sandbox_network).copied());
        if ip != Some(self.inner.addr.ip()) {
            return Err(Error::EgressProxy {
                reason: format!(
                    "{} came back at {ip:?}, not {}: restart the daemon",
                    self.inner.name,
                    self.inner.addr.ip()
                ),
            });
        }
        self.attach().await
    }

    /// Reads the proxy's reports until its stream ends.
    async fn read(self, mut output: crate::engine::Output, ended: CancellationToken) {
        let mut pending: Vec<u8> = Vec::new();
        let mut skipping = false;
        loop {
            // The pool's end ends the reading too (and with it the attach connection).
            let item = tokio::select! {
                item = output.next() => item,
                _ = self.inner.stop.cancelled() => None,
            };
            let Some(item) = item else { break };
            let bytes = match item {
                Ok(Chunk::Stdout(b)) => b,
                Ok(Chunk::Stderr(b)) => {
                    let text: String = String::from_utf8_lossy(&b).chars().take(512).collect();
                    tracing::warn!(container = %self.inner.name, "egress proxy: {}", text.trim_end());
                    continue;
                }
                Err(_) => break,
            };
            pending.extend_from_slice(&bytes);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                if std::mem::take(&mut skipping) {
                    continue;
                }
                self.report(&line);
            }
            if pending.len() > MAX_LINE {
                pending.clear();
                skipping = true;
            }
        }
        ended.cancel();
    }

    fn report(&self, line: &[u8]) {
        let report: Report = match serde_json::from_slice(line) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(container = %self.inner.name, error = %e, "unreadable line from the egress proxy");
                return;
            }
        };
        let (seq, answer) = match report {
            Report::Ack { seq } => (seq, Ok(())),
            Report::Error {
                seq: Some(seq),
                message,
            } => (seq, Err(message)),
            Report::Error { seq: None, message } => {
                tracing::warn!(container = %self.inner.name, %message, "egress proxy error");
                return;
            }
            Report::Conn(conn) => return self.connection(conn),
            Report::Dropped { count } => {
                tracing::warn!(container = %self.inner.name, count, "the egress proxy dropped connection reports (its output was not read fast enough)");
                return;
            }
            Report::Ready { .. } => {
                tracing::debug!(container = %self.inner.name, "egress proxy listening");
                return;
            }
        };
        if let Some(tx) = self.inner.pending.lock().remove(&seq) {
            let _ = tx.send(answer);
        }
    }

    fn connection(&self, r: ConnReport) {
        let allowed = r.verdict == Verdict::Allowed;
        // Label values from fixed sets: a report cannot grow the series without bound.
        let reason = r.reason.as_str();
        let verdict = if allowed { "allowed" } else { "refused" };
        let m = &self.inner.metrics;
        m.connections
            .get_or_create(&[("verdict", verdict), ("reason", reason)])
            .inc();
        m.bytes.get_or_create(&[("direction", "up")]).inc_by(r.up);
        m.bytes
            .get_or_create(&[("direction", "down")])
            .inc_by(r.down);
        let user = r.user.unwrap_or_default();
        if !user.is_empty() {
            let mut t = self.inner.traffic.entry(user.clone()).or_default();
            if allowed {
                t.allowed += 1;
            } else {
                t.refused += 1;
            }
            t.up += r.up;
            t.down += r.down;
        }
        tracing::info!(
            target: "zcbot_sandbox::egress",
            user = %user,
            client = %r.client,
            host = r.host.as_deref().unwrap_or(""),
            port = r.port.unwrap_or(0),
            verdict,
            reason,
            up = r.up,
            down = r.down,
            ms = r.ms,
            "egress connection"
        );
    }
}

/// The proxy container: the same hardening as a sandbox (read-only root, no capability,
/// no-new-privileges, the pool's seccomp profile and runtime, bounded memory and pids), as
/// `nobody`, with stdin open for the daemon's commands.
fn proxy_body(
    config: &Config,
    image_id: &str,
    seccomp: Option<String>,
    blocked: &[ipnet::IpNet],
) -> ContainerCreateBody {
    let host_config = HostConfig {
        readonly_rootfs: Some(true),
        cap_drop: Some(vec!["ALL".to_owned()]),
        security_opt: Some(crate::pool::spec::security_opt(seccomp.as_deref())),
        runtime: Some(config.runtime.as_str().to_owned()),
        pids_limit: Some(256),
        memory: Some(256 << 20),
        memory_swap: Some(256 << 20),
        nano_cpus: Some(1_000_000_000),
        network_mode: Some(config.network_name()),
        ipc_mode: Some("private".to_owned()),
        privileged: Some(false),
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".to_owned()),
            config: Some(HashMap::from([
                ("max-size".to_owned(), "10m".to_owned()),
                ("max-file".to_owned(), "2".to_owned()),
            ])),
        }),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(image_id.to_owned()),
        user: Some("65534:65534".to_owned()),
        env: Some(vec![format!(
            "ZCBOT_EGRESS_CONFIG={}",
            proxy_config(config, blocked)
        )]),
        open_stdin: Some(true),
        stdin_once: Some(false),
        attach_stdin: Some(true),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        labels: Some(HashMap::from([
            (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
            (LABEL_EGRESS.to_owned(), config.pool_id.clone()),
        ])),
        host_config: Some(host_config),
        networking_config: Some(bollard::models::NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                config.network_name(),
                EndpointSettings::default(),
            )])),
        }),
        ..Default::default()
    }
}

/// Makes sure the outbound network exists: an existing one must be a bridge with a way out; a
/// missing one is created as such, labelled as the pool's (so `down` removes it).
async fn ensure_outbound(engine: &dyn Engine, name: &str, pool_id: &str) -> Result<()> {
    let mismatch = |reason: &str| Error::NetworkMismatch {
        name: name.to_owned(),
        reason: format!("{reason} (ZCBOT_EGRESS_NETWORK names the egress proxy's way out)"),
    };
    if let Some(n) = engine.networks_named(name).await?.into_iter().next() {
        if n.driver != "bridge" {
            return Err(mismatch(&format!("uses driver {:?}, not bridge", n.driver)));
        }
        if n.internal {
            return Err(mismatch("is internal: the proxy would have no way out"));
        }
        return Ok(());
    }
    let spec = crate::engine::NetworkSpec {
        name: name.to_owned(),
        internal: false,
        options: HashMap::from([(
            "com.docker.network.bridge.name".to_owned(),
            crate::pool::network::bridge_name(name),
        )]),
        labels: HashMap::from([
            (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
            (LABEL_POOL.to_owned(), pool_id.to_owned()),
        ]),
    };
    // A racing creator's network is as good as ours.
    engine.create_network(&spec).await?;
    Ok(())
}

/// The per-user egress lists the backend set (`PUT /v1/users/{user}/egress`), one JSON file per
/// user under `<state_dir>/<pool_id>/egress/`, beside the activity record, so a list survives
/// reaps and restarts; held in memory, read once at open. The *epoch* changes with every set:
/// sandboxes registered under an older one register again at their next lease.
#[derive(Clone)]
pub struct Policies {
    /// Held across a write and its update in memory, so disk and memory agree.
    writing: Arc<parking_lot::Mutex<()>>,
    dir: PathBuf,
    lists: Arc<DashMap<UserId, Vec<Pattern>>>,
    epoch: Arc<AtomicU64>,
}

impl Policies {
    /// Opens (creating) the folder and reads every list in it. An unreadable one counts as an
    /// empty list, with an error in the log: a narrowed user never falls back to the pool's.
    pub fn open(state_dir: &Path, pool_id: &str) -> Result<Self> {
        let dir = state_dir.join(pool_id).join("egress");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create state folder", &dir, e))?;
        let lists = DashMap::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io("read state folder", &dir, e))? {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(user) = UserId::parse(&name) else {
                continue;
            };
            let read = std::fs::read(entry.path())
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    serde_json::from_slice::<Vec<Pattern>>(&b).map_err(|e| e.to_string())
                });
            match read {
                Ok(list) => {
                    lists.insert(user, list);
                }
                Err(e) => {
                    tracing::error!(user = %name, error = %e, "unreadable egress list: the user may reach nothing until its list is set again (PUT or DELETE /v1/users/{user}/egress)");
                    lists.insert(user, Vec::new());
                }
            }
        }
        Ok(Policies {
            writing: Arc::default(),
            dir,
            lists: Arc::new(lists),
            epoch: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The user's own list, if the backend narrowed it.
    pub fn get(&self, user: &UserId) -> Option<Vec<Pattern>> {
        self.lists.get(user).map(|l| l.clone())
    }

    /// The number of changes so far.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Sets (or, with `None`, removes) the user's list. Blocks (writes a file).
    pub fn set(&self, user: &UserId, allow: Option<&[Pattern]>) -> Result<()> {
        let _writing = self.writing.lock();
        let path = self.dir.join(user.as_str());
        match allow {
            Some(list) => {
                // A name of its own per write: two PUTs at once must not write one file.
                let tmp = self.dir.join(format!(
                    ".{}.{}.tmp",
                    user.as_str(),
                    crate::text::random_id()
                ));
                let body = serde_json::to_vec(list).map_err(|e| {
                    Error::io("encode egress list", &path, std::io::Error::other(e))
                })?;
                std::fs::write(&tmp, body).map_err(|e| Error::io("write egress list", &tmp, e))?;
                std::fs::rename(&tmp, &path)
                    .map_err(|e| Error::io("write egress list", &path, e))?;
                self.lists.insert(user.clone(), list.to_vec());
            }
            None => {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io("remove egress list", &path, e)),
                }
                self.lists.remove(user);
            }
        }
        self.epoch.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// The address of the pool's running egress proxy on the sandbox network (`net up` in allowlist
/// mode lets exactly that through).
pub async fn running_proxy(config: &Config) -> Result<SocketAddr> {
    let engine = crate::engine::DockerEngine::connect(config).await?;
    let name = proxy_name(&config.pool_id);
    engine
        .inspect(&name)
        .await?
        .filter(|c| c.state == State::Running)
        .and_then(|c| c.addresses.get(&config.network_name()).copied())
        .map(|ip| SocketAddr::new(ip, PROXY_PORT))
        .ok_or_else(|| Error::EgressProxy {
            reason: format!("{name} is not running: start the daemon, which makes it"),
        })
}
