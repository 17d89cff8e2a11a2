//! `SandboxPool`: one long-lived, hardened container per user on the internal network.
//!
//! State per user is a `Slot`: a tokio mutex (the *gate*) that makes bringing a container up or
//! down single-flight per user, and a small parking_lot mutex with the live container, the calls
//! in flight and the last activity, held only for a few instructions and never across `.await`.
//! Different users never wait on each other.
//!
//! A call takes a [`Lease`]: it counts as "in flight" from the moment the lease is taken until it
//! is dropped, and the reaper and the capacity eviction only ever remove a container under its
//! gate with no lease out. A warm lease costs no Docker round trip at all.

pub mod activity;
pub mod claims;
mod deaths;
pub mod down;
pub mod egress;
pub mod metrics;
pub mod mounts;
pub mod network;
pub mod reaper;
pub mod removals;
mod spares;
pub mod spec;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use futures_util::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Pattern, RulesSetting};
use crate::engine::{Created, DockerEngine, Filter, Listed, SharedEngine, State};
use crate::error::{Error, Result};
use crate::firewall::{FirewallWatch, HostFirewall};
use crate::text::tail;
use crate::user::UserId;
use crate::users_root::{UserFolder, UsersRoot};
use activity::ActivityLog;
use metrics::PoolMetrics;
pub use metrics::PoolStats;
use network::SandboxNetwork;
pub use removals::Remover;
pub use spares::{SpareWarmer, WarmSpare};
pub use spec::RulesMode;
use spec::{SpecTemplate, LABEL_CONFIG_HASH, LABEL_CREATED_AT, LABEL_MANAGED_BY, LABEL_POOL};

/// How much of a failed container's log an error carries.
const LOG_TAIL_BYTES: usize = 4096;
/// Activity is written to disk at most this often per user.
const PERSIST_EVERY: Duration = Duration::from_secs(1);

/// A running sandbox container of one user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sandbox {
    /// Whose sandbox it is.
    pub user: String,
    /// Docker's container id.
    pub container_id: String,
    /// The container's name, `zcbot-sandbox-<user>`.
    pub name: String,
    /// The config hash it was created with.
    pub config_hash: String,
    /// The host uid the tenant runs as (every exec names it; it owns the user's folder).
    pub uid: u32,
    /// Its gid.
    pub gid: u32,
    /// Host rules mode: the host pid of its PID 1 and the network namespace its rules were
    /// installed in.
    #[serde(skip)]
    pub netns: Option<(i32, String)>,
}

/// A container whose rules are in place.
struct Ready {
    /// Docker's id.
    id: String,
    /// The host pid of its PID 1.
    pid: i32,
    /// Host rules mode: the network namespace its rules were installed in (see [`Sandbox`]).
    netns: Option<(i32, String)>,
}

impl Ready {
    fn sandbox(self, user: &UserId, name: &str, hash: &str, folder: &UserFolder) -> Sandbox {
        Sandbox {
            user: user.to_string(),
            container_id: self.id,
            name: name.to_owned(),
            config_hash: hash.to_owned(),
            uid: folder.uid,
            gid: folder.gid,
            netns: self.netns,
        }
    }
}

/// Per-user state. See the module docs for the locking rules.
struct Slot {
    gate: Arc<tokio::sync::Mutex<()>>,
    /// Held from reading the user's list to recording the registration, so two registrations
    /// of one sandbox cannot land in the other order around a list change.
    registering: tokio::sync::Mutex<()>,
    state: parking_lot::Mutex<SlotState>,
}

struct SlotState {
    live: Option<Sandbox>,
    /// The live sandbox is paused, or being paused: no lease is handed out warm; the next one
    /// resumes it under the gate.
    paused: bool,
    starting: bool,
    in_flight: usize,
    last_active: SystemTime,
    persisted: Option<SystemTime>,
    /// Allowlist mode: the container, proxy generation and policy epoch the live sandbox was
    /// registered with the egress proxy under.
    egress: Option<(String, u64, u64)>,
}

impl SlotState {
    /// Sets the live sandbox. Whatever it is, its registration with the egress proxy is not
    /// known yet: a container started again under its id may have another address.
    fn set_live(&mut self, sandbox: Option<Sandbox>) {
        self.live = sandbox;
        self.egress = None;
    }

    /// Takes the live sandbox (it is gone or going), with its registration.
    fn take_live(&mut self) -> Option<Sandbox> {
        self.egress = None;
        self.live.take()
    }
}

impl Slot {
    fn new(last_active: SystemTime) -> Self {
        Slot {
            gate: Arc::new(tokio::sync::Mutex::new(())),
            registering: tokio::sync::Mutex::new(()),
            state: parking_lot::Mutex::new(SlotState {
                live: None,
                paused: false,
                starting: false,
                in_flight: 0,
                last_active,
                persisted: None,
                egress: None,
            }),
        }
    }
}

/// The pool. Cheap to clone: every clone is the same pool.
#[derive(Clone)]
pub struct SandboxPool {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    engine: SharedEngine,
    network: SandboxNetwork,
    firewall: FirewallWatch,
    template: SpecTemplate,
    activity: ActivityLog,
    users: Arc<UsersRoot>,
    slots: DashMap<UserId, Arc<Slot>>,
    admission: parking_lot::Mutex<()>,
    counters: PoolMetrics,
    tasks: TaskTracker,
    deaths: deaths::DeathWatch,
    spares: spares::Spares,
    /// Who removed which container, for the call its removal ends.
    removals: removals::RemovalLog,
    /// Allowlist mode: the pool's egress proxy, and the per-user lists.
    egress: Option<egress::EgressProxy>,
    policies: egress::Policies,
    /// What [`SandboxPool::sandbox_env`] answers, made once.
    sandbox_env: Vec<(String, String)>,
}

/// A call's hold on a user's running sandbox. While it lives, the container is never reaped or
/// evicted; dropping it records the user's activity.
pub struct Lease {
    pool: SandboxPool,
    slot: Arc<Slot>,
    user: UserId,
    sandbox: Sandbox,
    /// Answered from memory, with no bring-up, resume or wait on another's.
    warm: bool,
}

impl Lease {
    /// The sandbox this lease holds.
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// The user whose sandbox it is.
    pub fn user(&self) -> &UserId {
        &self.user
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let persist = {
            let mut st = self.slot.state.lock();
            st.in_flight = st.in_flight.saturating_sub(1);
            touch(&mut st)
        };
        self.pool.persist(&self.user, persist);
    }
}

/// Marks activity now; returns the time to write to disk when the throttle allows.
fn touch(st: &mut SlotState) -> Option<SystemTime> {
    let now = SystemTime::now();
    st.last_active = now;
    let due = st.persisted.is_none_or(|p| {
        now.duration_since(p)
            .map_or(true, |since| since >= PERSIST_EVERY)
    });
    if due {
        st.persisted = Some(now);
        Some(now)
    } else {
        None
    }
}

/// What [`SandboxPool::admit`] takes out of service to make room.
enum Victim {
    /// An idle user's sandbox: the user, its gate (held), the container's name.
    User(UserId, tokio::sync::OwnedMutexGuard<()>, String),
    /// A ready spare.
    Spare(spares::Spare),
}

/// Resets a slot's `starting` flag however bring-up ends (error, cancel, panic).
struct StartingGuard<'a>(&'a Slot);

impl Drop for Inner {
    fn drop(&mut self) {
        // The proxy's watcher and reader hold handles of their own: without this, a pool that
        // is gone would keep them, and its attach connection, for the life of the process.
        if let Some(proxy) = &self.egress {
            proxy.close();
        }
    }
}

impl Drop for StartingGuard<'_> {
    fn drop(&mut self) {
        self.0.state.lock().starting = false;
    }
}

impl SandboxPool {
    /// Connects to Docker (negotiating the API version), then opens the pool on it with the
    /// host firewall installed (see [`SandboxPool::open`]).
    pub async fn connect(config: Config) -> Result<Self> {
        let engine = DockerEngine::connect(&config).await?;
        Self::open(config, Arc::new(engine), true).await
    }

    /// Like [`SandboxPool::connect`], for a command run beside the daemon (the CLI): in allowlist
    /// mode it uses the daemon's running egress proxy and never makes, replaces or clears it.
    pub async fn connect_guest(config: Config) -> Result<Self> {
        let engine = DockerEngine::connect(&config).await?;
        Self::open_as(config, Arc::new(engine), true, false).await
    }

    /// Opens the pool on `engine`: checks the image, ensures the network, installs the host
    /// firewall when `host_firewall` (tests on a fake engine do not), and prepares the users and
    /// state folders. Does not touch existing containers: call [`SandboxPool::reconcile`] for
    /// that.
    pub async fn open(config: Config, engine: SharedEngine, host_firewall: bool) -> Result<Self> {
        Self::open_as(config, engine, host_firewall, true).await
    }

    /// [`SandboxPool::open`], as the daemon (`owner`: it runs the egress proxy) or as a guest
    /// beside it (see [`SandboxPool::connect_guest`]).
    async fn open_as(
        config: Config,
        engine: SharedEngine,
        host_firewall: bool,
        owner: bool,
    ) -> Result<Self> {
        let real_host = host_firewall;
        let image_id =
            engine
                .image_id(&config.image)
                .await?
                .ok_or_else(|| Error::ImageMissing {
                    image: config.image.clone(),
                })?;
        let runtime = config.runtime.as_str();
        let registered = engine.runtimes().await?;
        if !registered.names.iter().any(|r| r == runtime) {
            return Err(Error::RuntimeMissing {
                runtime,
                registered: registered.names,
            });
        }
        if registered.default.as_deref().is_some_and(|d| d != runtime) {
            // An operator who made runsc the engine's default (as an older RUN.md advised) gets
            // what ZCBOT_SANDBOX_RUNTIME says, which is runc unless set: say so loudly.
            tracing::warn!(
                engine_default = registered.default.as_deref().unwrap_or(""),
                runtime,
                "the sandboxes run under ZCBOT_SANDBOX_RUNTIME={runtime}, not the engine's default runtime; set ZCBOT_SANDBOX_RUNTIME to choose"
            );
        }
        let network = network::ensure_network(
            engine.as_ref(),
            &config.network_name(),
            config.egress != crate::config::Egress::Public,
            &config.pool_id,
        )
        .await?;
        let blocked = spec::blocklist(&config, &spec::host_addresses());
        let rules = match (config.container_rules, nix::unistd::geteuid().is_root()) {
            (RulesSetting::Entry, _) | (RulesSetting::Auto, false) => RulesMode::Entry,
            (RulesSetting::Auto, true) | (RulesSetting::Host, true) => RulesMode::Host,
            (RulesSetting::Host, false) => {
                return Err(Error::Config {
                    var: "ZCBOT_CONTAINER_RULES",
                    value: "host".into(),
                    reason: "installing the containers' rules from the host needs a root daemon"
                        .into(),
                })
            }
        };
        if rules == RulesMode::Entry && config.runtime == crate::config::Runtime::Runsc {
            // gVisor gives the sandbox no netfilter: an entry could never install its rules.
            return Err(Error::Config {
                var: "ZCBOT_CONTAINER_RULES",
                value: "entry".into(),
                reason: "under ZCBOT_SANDBOX_RUNTIME=runsc the rules must come from the host \
                         (gVisor has no netfilter inside): run the daemon as root"
                    .into(),
            });
        }
        let seccomp = SpecTemplate::seccomp_profile(&config, rules);
        let egress = match config.egress {
            crate::config::Egress::Allowlist => Some(
                egress::EgressProxy::start(
                    &config,
                    engine.clone(),
                    seccomp.clone(),
                    &blocked,
                    owner,
                )
                .await?,
            ),
            _ => None,
        };
        let proxy = egress.as_ref().map(egress::EgressProxy::addr);
        let sandbox_env = proxy.map(proxy_env).unwrap_or_default();
        let installed = if host_firewall {
            crate::firewall::install(&network.bridge, config.egress, &blocked, proxy)
        } else {
            Err(crate::firewall::FirewallError::NotInstalled {
                why: "the pool runs on a test engine",
            })
        };
        let host_firewall = match installed {
            Ok(()) => HostFirewall::Enforced {
                bridge: network.bridge.clone(),
            },
            // The network's inter-container DROP would stop every sandbox's way to the proxy:
            // only our host rule lets that one port through.
            Err(e) if egress.is_some() && real_host => {
                return Err(Error::HostFirewall {
                    reason: format!(
                        "{e}; ZCBOT_SANDBOX_EGRESS=allowlist needs it: the host rule is what \
                         lets sandboxes reach the egress proxy"
                    ),
                })
            }
            Err(e) if config.require_host_firewall => {
                return Err(Error::HostFirewall {
                    reason: e.to_string(),
                })
            }
            Err(e) => {
                tracing::warn!(reason = %e, "HOST FIREWALL NOT ENFORCED: only the rules inside each container keep sandboxes off the host; set ZCBOT_REQUIRE_HOST_FIREWALL=1 to refuse to start like this");
                HostFirewall::NotEnforced {
                    reason: e.to_string(),
                }
            }
        };
        let firewall = FirewallWatch::start(host_firewall).await;
        let users = {
            let config = config.clone();
            blocking(move || UsersRoot::open(&config)).await?
        };
        let activity = ActivityLog::open(&config.state_dir, &config.pool_id)?;
        let removals = removals::RemovalLog::open(&config.state_dir, &config.pool_id)?;
        tracing::info!(
            engine = %engine.host(),
            api = %engine.api_version(),
            image = %config.image,
            image_id = %image_id,
            runtime,
            seccomp = ?config.seccomp,
            network = %network.name,
            bridge = %network.bridge,
            "sandbox pool ready"
        );
        let deaths = deaths::DeathWatch::start(engine.clone(), config.pool_id.clone());
        let template = SpecTemplate {
            seccomp,
            image_id,
            blocked,
            rules,
            proxy,
        };
        let policies = egress::Policies::open(&config.state_dir, &config.pool_id)?;
        let spares = spares::Spares::open(&config, template.spare_hash(&config), real_host)?;
        Ok(SandboxPool {
            inner: Arc::new(Inner {
                deaths,
                spares,
                removals,
                template,
                egress,
                policies,
                sandbox_env,
                config,
                engine,
                network,
                firewall,
                activity,
                users: Arc::new(users),
                slots: DashMap::new(),
                admission: parking_lot::Mutex::new(()),
                counters: PoolMetrics::default(),
                tasks: TaskTracker::new(),
            }),
        })
    }

    /// The pool's configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The pool's network.
    pub fn network(&self) -> &SandboxNetwork {
        &self.inner.network
    }

    /// Whether the host enforces isolation for the sandbox network (see [`crate::firewall`]).
    pub fn host_firewall(&self) -> &HostFirewall {
        self.inner.firewall.mode()
    }

    /// The host rules' last known state (checked at startup and on every reaper tick).
    pub fn firewall(&self) -> &FirewallWatch {
        &self.inner.firewall
    }

    /// The engine the pool uses (the executors run their execs through it).
    pub fn engine(&self) -> &SharedEngine {
        &self.inner.engine
    }

    /// Every background task of the pool and of the executors on it (the reaper, the clean-up
    /// after a dropped call, a dead channel's clean-up): shutdown closes it and waits for them.
    pub fn tasks(&self) -> &TaskTracker {
        &self.inner.tasks
    }

    /// The image id every new container runs.
    pub fn image_id(&self) -> &str {
        &self.inner.template.image_id
    }

    /// What the pool has done since it started.
    pub fn stats(&self) -> PoolStats {
        self.inner.counters.snapshot()
    }

    /// The host folder of `user`, bind-mounted at `/workspace`.
    pub fn workspace(&self, user: &UserId) -> PathBuf {
        self.inner.users.folder_path(user)
    }

    /// The users root: its quota, owners and checks.
    pub fn users_root(&self) -> &UsersRoot {
        &self.inner.users
    }

    /// The container name of `user` in this pool.
    pub fn container_name(&self, user: &UserId) -> String {
        spec::container_name(&self.inner.config.pool_id, user)
    }

    /// Makes sure `user` has a running sandbox with its rules in place and returns it; records
    /// activity. See [`SandboxPool::lease`] for the guarantees.
    pub async fn ensure(&self, user: &UserId) -> Result<Sandbox> {
        Ok(self.lease(user).await?.sandbox.clone())
    }

    /// Like [`SandboxPool::ensure`], but holds the sandbox until the lease is dropped, so it is
    /// never reaped or evicted under a running call.
    ///
    /// Reuses the running container (no Docker call); otherwise, single-flight per user: starts a
    /// stopped container, recreates one whose config hash is stale, creates a missing one, and
    /// waits until its entry reports the egress rules in place. At `ZCBOT_SANDBOX_MAX` it evicts the
    /// least recently used idle sandbox, or fails with [`Error::PoolFull`].
    pub async fn lease(&self, user: &UserId) -> Result<Lease> {
        let slot = self.slot(user);
        let lease = match self.try_warm(&slot, user) {
            Some(lease) => lease,
            None => {
                let leased = self.lease_cold(user, &slot).await;
                if leased.is_err() {
                    // Nothing of a refused or failed bring-up stays in memory (any request may
                    // name any user).
                    drop(slot);
                    self.prune_slot(user);
                }
                let mut lease = leased?;
                lease.warm = false;
                lease
            }
        };
        self.register_egress(&lease).await?;
        Ok(lease)
    }

    /// Allowlist mode: makes sure the egress proxy knows the lease's sandbox as its user, under
    /// the user's current list, before anything runs in it. Costs nothing once registered (in
    /// this proxy generation, under this policy epoch); otherwise one inspect and one command.
    async fn register_egress(&self, lease: &Lease) -> Result<()> {
        let Some(proxy) = &self.inner.egress else {
            return Ok(());
        };
        let id = &lease.sandbox.container_id;
        let cached = |want: (u64, u64)| {
            lease
                .slot
                .state
                .lock()
                .egress
                .as_ref()
                .is_some_and(|(c, g, e)| c == id && (*g, *e) == want)
        };
        let want = (proxy.generation(), self.inner.policies.epoch());
        if lease.warm && cached(want) {
            return Ok(());
        }
        let _registering = lease.slot.registering.lock().await;
        let want = (proxy.generation(), self.inner.policies.epoch());
        // A lease that was not warm (a start, a restart, a resume, a claimed spare, a wait on
        // another's bring-up) registers again: a container started again under the same id may
        // have another address. (Any change of the live sandbox also clears the record.)
        if lease.warm && cached(want) {
            return Ok(());
        }
        let network = self.inner.network.name.clone();
        let ip = self
            .inner
            .engine
            .inspect(id)
            .await?
            .and_then(|c| c.addresses.get(&network).copied())
            .ok_or_else(|| Error::EgressProxy {
                reason: format!("sandbox {} has no address on {network}", lease.sandbox.name),
            })?;
        let allow = self.egress_allow(&lease.user);
        let generation = proxy.register(ip, lease.user.as_str(), &allow).await?;
        lease.slot.state.lock().egress = Some((id.clone(), generation, want.1));
        Ok(())
    }

    /// The hosts `user` may reach (allowlist mode): its own list if the backend narrowed it, else
    /// the pool's.
    pub fn egress_allow(&self, user: &UserId) -> Vec<Pattern> {
        let pool = &self.inner.config.egress_allow;
        match self.inner.policies.get(user) {
            // A list stored under an older, wider pool list keeps only what today's allows.
            Some(own) => own.into_iter().filter(|p| self.within_pool(p)).collect(),
            None => pool.clone(),
        }
    }

    /// Narrows `user`'s list to `allow` (every pattern within the pool's list), or gives it the
    /// pool's again (`None`). Kept in the state folder; the user's next call runs under it.
    pub async fn set_egress(&self, user: &UserId, allow: Option<Vec<Pattern>>) -> Result<()> {
        let config = &self.inner.config;
        if config.egress != crate::config::Egress::Allowlist {
            return Err(Error::EgressOff {
                mode: config.egress.as_str(),
            });
        }
        if let Some(list) = &allow {
            if let Some(outside) = list.iter().find(|p| !self.within_pool(p)) {
                return Err(Error::EgressNotSubset {
                    pattern: outside.to_string(),
                    pool: config
                        .egress_allow
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                });
            }
        }
        let policies = self.inner.policies.clone();
        let user = user.clone();
        blocking(move || policies.set(&user, allow.as_deref())).await
    }

    /// Whether `user`'s list was narrowed by the backend.
    pub fn egress_narrowed(&self, user: &UserId) -> bool {
        self.inner.policies.get(user).is_some()
    }

    /// The pool's egress proxy (allowlist mode).
    pub fn egress_proxy(&self) -> Option<&egress::EgressProxy> {
        self.inner.egress.as_ref()
    }

    /// The environment every process in a sandbox starts with beyond the base: the proxy's
    /// address in allowlist mode, else none.
    pub fn sandbox_env(&self) -> &[(String, String)] {
        &self.inner.sandbox_env
    }

    /// Whether the pool's list allows everything `p` does.
    fn within_pool(&self, p: &Pattern) -> bool {
        self.inner.config.egress_allow.iter().any(|q| q.covers(p))
    }

    async fn lease_cold(&self, user: &UserId, slot: &Arc<Slot>) -> Result<Lease> {
        let gate = slot.gate.clone().lock_owned().await;
        self.resume(user, slot).await?;
        if let Some(lease) = self.try_warm(slot, user) {
            return Ok(lease);
        }
        // A claimed spare is already the slot's live sandbox (the claim's task put it there, so
        // a caller that goes away loses nothing); the gate comes back either way.
        let (claimed, _gate) = self.try_claim(user, slot, gate).await;
        let sandbox = match claimed {
            Some(sandbox) => sandbox,
            None => {
                let victim = self.admit(user, slot)?;
                let _starting = StartingGuard(slot);
                match victim {
                    Some(Victim::User(victim_user, _victim_gate, name)) => {
                        tracing::info!(user = %victim_user, container = %name, "evicting least recently used idle sandbox: pool is at ZCBOT_SANDBOX_MAX");
                        self.remove_container(&name).await?;
                        self.inner.activity.forget(&victim_user);
                        self.inner.counters.reaped.inc();
                    }
                    Some(Victim::Spare(spare)) => {
                        tracing::info!(user = %user, "removing a warm spare: pool is at ZCBOT_SANDBOX_MAX");
                        self.discard_spare(spare).await;
                    }
                    None => {}
                }
                let sandbox = self.bring_up(user).await?;
                if !user.is_internal() {
                    self.inner.counters.ensures_cold.inc();
                }
                let mut st = slot.state.lock();
                st.set_live(Some(sandbox.clone()));
                st.paused = false;
                sandbox
            }
        };
        let persist = {
            let mut st = slot.state.lock();
            st.in_flight += 1;
            touch(&mut st)
        };
        self.persist(user, persist);
        Ok(Lease {
            pool: self.clone(),
            slot: slot.clone(),
            user: user.clone(),
            sandbox,
            warm: true,
        })
    }

    /// Forgets what the pool believes about `user`'s container (the executor calls this when the
    /// container vanished behind the pool's back), so the next lease inspects Docker again.
    pub fn invalidate(&self, user: &UserId, container_id: &str) {
        if let Some(slot) = self.inner.slots.get(user) {
            let mut st = slot.state.lock();
            if st
                .live
                .as_ref()
                .is_some_and(|s| s.container_id == container_id)
            {
                st.set_live(None);
            }
        }
    }

    /// Removes `user`'s sandbox now, whether or not calls are in flight, on request (the API).
    /// Returns whether a container was removed.
    pub async fn remove(&self, user: &UserId) -> Result<bool> {
        self.remove_by(user, Remover::Request).await
    }

    /// [`SandboxPool::remove`], saying who removes it: a call it ends says so.
    pub async fn remove_by(&self, user: &UserId, by: Remover) -> Result<bool> {
        let slot = self.slot(user);
        let _gate = slot.gate.lock().await;
        let known = slot.state.lock().take_live().map(|s| s.container_id);
        let name = self.container_name(user);
        let id = match known {
            Some(id) => Some(id),
            // Another process's sandbox, say: one look tells which container the note is for.
            None => self.inner.engine.inspect(&name).await?.map(|c| c.id),
        };
        if let Some(id) = &id {
            self.inner.removals.record(id, by);
        }
        let removed = self.remove_container(&name).await;
        if removed.is_ok() {
            self.inner.activity.forget(user);
        }
        drop(_gate);
        drop(slot);
        self.prune_slot(user);
        removed
    }

    /// Removes the container `container_id` of `user` if it is still there, forgetting it if it is
    /// the live one: for a sandbox whose leftovers could not be cleaned up in place. By id, so a
    /// container that replaced it meanwhile is left alone.
    pub async fn recycle(&self, user: &UserId, container_id: &str) -> Result<bool> {
        self.invalidate(user, container_id);
        let removed = self.remove_container(container_id).await?;
        if removed {
            self.inner.counters.recycled.inc();
        }
        Ok(removed)
    }

    /// Thaws every sandbox this pool paused (for shutdown: a frozen exec channel helper cannot
    /// exit when its channel closes, and would be taken for one that will not stop). Returns how
    /// many were thawed.
    pub async fn thaw_all(&self) -> usize {
        let slots: Vec<(UserId, Arc<Slot>)> = self
            .inner
            .slots
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        let mut thawed = 0;
        for (user, slot) in slots {
            let _gate = slot.gate.lock().await;
            let paused = {
                let st = slot.state.lock();
                st.paused && st.live.is_some()
            };
            if !paused {
                continue;
            }
            match self.resume(&user, &slot).await {
                Ok(()) => thawed += 1,
                Err(e) => {
                    tracing::warn!(user = %user, error = %e, "could not thaw a paused sandbox")
                }
            }
        }
        thawed
    }

    /// Removes every container of this pool (known to this process or not). Returns how many.
    pub async fn shutdown_all(&self) -> Result<usize> {
        let listed = self.list_ours().await?;
        for slot in self.inner.slots.iter() {
            slot.state.lock().set_live(None);
        }
        for c in &listed {
            self.inner.removals.record(&c.id, Remover::Everything);
        }
        let names: Vec<String> = listed.iter().map(|c| c.name.clone()).collect();
        let results: Vec<Result<bool>> = futures_util::stream::iter(names)
            .map(|name| async move { self.remove_container(&name).await })
            .buffer_unordered(16)
            .collect()
            .await;
        let mut removed = 0;
        for r in results {
            removed += usize::from(r?);
        }
        for c in &listed {
            if let Some(user) = self.owner_of(c) {
                self.inner.activity.forget(&user);
            }
        }
        self.inner.spares.forget_ready();
        self.sweep_slots().await;
        Ok(removed)
    }

    /// Forgets `user`'s slot when nothing holds it and it has no sandbox, so the map holds only
    /// users with a sandbox or a call (any request may name any user).
    fn prune_slot(&self, user: &UserId) {
        self.inner
            .slots
            .remove_if(user, |_, slot| slot_unused(slot));
    }

    /// Forgets every unused slot (the reaper's tick).
    pub(crate) fn prune_slots(&self) {
        self.inner.slots.retain(|_, slot| !slot_unused(slot));
        let live: std::collections::HashSet<String> = self
            .inner
            .slots
            .iter()
            .filter_map(|slot| {
                let st = slot.state.lock();
                st.live.as_ref().map(|sb| sb.container_id.clone())
            })
            .collect();
        let bound = 2 * self.inner.config.max_containers + 64;
        self.inner.deaths.retain(bound, |id| live.contains(id));
    }

    /// The ids of the pool's containers as they die (the engine's `die` events), from now on.
    pub fn deaths(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.inner.deaths.subscribe()
    }

    /// Who removed container `container_id` (its words), if one of this pool's removals did,
    /// in this process or another; told once.
    pub fn removed_by(&self, container_id: &str) -> Option<String> {
        self.inner.removals.take(container_id)
    }

    /// Whether one of this pool's removals of container `container_id` is under way or done
    /// (without telling who: [`SandboxPool::removed_by`] does, once).
    pub fn removal_noted(&self, container_id: &str) -> bool {
        self.inner.removals.noted(container_id)
    }

    /// A token cancelled when the container `container_id` dies (the engine's `die` event), from
    /// now on: a call in it ends at once instead of at its timeout.
    pub fn death_of(&self, container_id: &str) -> CancellationToken {
        self.inner.deaths.of(container_id)
    }

    /// How many users the pool keeps state for.
    pub fn slot_count(&self) -> usize {
        self.inner.slots.len()
    }

    fn slot(&self, user: &UserId) -> Arc<Slot> {
        if let Some(slot) = self.inner.slots.get(user) {
            return slot.clone();
        }
        self.inner
            .slots
            .entry(user.clone())
            .or_insert_with(|| Arc::new(Slot::new(SystemTime::now())))
            .clone()
    }

    /// Thaws `user`'s sandbox if it is paused (its gate held by the caller). One the engine no
    /// longer has is forgotten, for the bring-up to replace.
    async fn resume(&self, user: &UserId, slot: &Slot) -> Result<()> {
        let paused = {
            let st = slot.state.lock();
            st.live
                .as_ref()
                .filter(|_| st.paused)
                .map(|s| (s.container_id.clone(), s.name.clone()))
        };
        let Some((id, name)) = paused else {
            return Ok(());
        };
        let thawed = self.inner.engine.unpause(&id).await;
        let mut st = slot.state.lock();
        st.paused = false;
        let there = match thawed {
            Ok(there) => there,
            Err(e) => {
                // Forgotten: the next lease's bring-up looks at the container afresh (and thaws
                // it if it is still paused) instead of every lease failing here.
                st.set_live(None);
                return Err(e.into());
            }
        };
        if there {
            self.inner.counters.resumed.inc();
            tracing::info!(user = %user, container = %name, "resumed a paused sandbox");
        } else {
            st.set_live(None);
        }
        Ok(())
    }

    fn try_warm(&self, slot: &Arc<Slot>, user: &UserId) -> Option<Lease> {
        let (sandbox, persist) = {
            let mut st = slot.state.lock();
            if st.paused {
                return None;
            }
            let sandbox = st.live.clone()?;
            st.in_flight += 1;
            (sandbox, touch(&mut st))
        };
        self.persist(user, persist);
        self.inner.counters.ensures_warm.inc();
        Some(Lease {
            pool: self.clone(),
            slot: slot.clone(),
            user: user.clone(),
            sandbox,
            warm: true,
        })
    }

    fn persist(&self, user: &UserId, at: Option<SystemTime>) {
        if let Some(at) = at {
            if let Err(e) = self.inner.activity.record(user, at) {
                tracing::warn!(user = %user, error = %e, "could not record activity");
            }
        }
    }

    /// Takes a place in the pool for `user` (marking its slot `starting`). At capacity, takes a
    /// ready spare (a user who cannot claim one, or found a container of its own, needs its
    /// place), else the least recently used idle sandbox whose gate is free, out of service and
    /// returns it for removal; with neither, the pool is full.
    fn admit(&self, user: &UserId, slot: &Slot) -> Result<Option<Victim>> {
        let _admission = self.inner.admission.lock();
        let max = self.inner.config.max_containers;
        // Spares ready or being made hold their places (a new user claims one before this).
        let mut occupied = self.inner.spares.held();
        // Paused sandboxes go first, then the least recently used.
        let mut idle: Vec<((bool, SystemTime), UserId, Arc<Slot>)> = Vec::new();
        for entry in self.inner.slots.iter() {
            if entry.key() == user {
                continue;
            }
            let st = entry.value().state.lock();
            if st.live.is_some() || st.starting {
                occupied += 1;
                if st.live.is_some() && !st.starting && st.in_flight == 0 {
                    idle.push((
                        (!st.paused, st.last_active),
                        entry.key().clone(),
                        entry.value().clone(),
                    ));
                }
            }
        }
        let mut victim = None;
        if occupied >= max {
            if let Some(spare) = self.inner.spares.take_ready() {
                slot.state.lock().starting = true;
                return Ok(Some(Victim::Spare(spare)));
            }
            idle.sort_by_key(|(key, _, _)| *key);
            for (_, victim_user, victim_slot) in idle {
                let Ok(gate) = victim_slot.gate.clone().try_lock_owned() else {
                    continue;
                };
                let mut st = victim_slot.state.lock();
                if st.in_flight == 0 && !st.starting {
                    if let Some(sb) = st.take_live() {
                        st.paused = false;
                        victim = Some(Victim::User(victim_user, gate, sb.name));
                        break;
                    }
                }
            }
            if victim.is_none() {
                return Err(Error::PoolFull { max });
            }
        }
        slot.state.lock().starting = true;
        Ok(victim)
    }

    /// Places held by users' sandboxes (live or starting; admission lock held).
    fn occupied_by_users(&self) -> usize {
        self.inner
            .slots
            .iter()
            .filter(|e| {
                let st = e.value().state.lock();
                st.live.is_some() || st.starting
            })
            .count()
    }

    /// Brings `user`'s container to running with its rules in place, whatever state Docker has it
    /// in. Idempotent, so a bring-up cancelled half-way is finished by the next one.
    async fn bring_up(&self, user: &UserId) -> Result<Sandbox> {
        let folder = self.prepare_workspace(user).await?;
        let (mut body, hash) = self.inner.template.build(&self.inner.config, user, &folder);
        let name = self.container_name(user);
        let engine = &self.inner.engine;
        for _attempt in 0..4 {
            let Some(found) = engine.inspect(&name).await? else {
                let labels = body.labels.get_or_insert_with(HashMap::new);
                labels.insert(LABEL_CONFIG_HASH.to_owned(), hash.clone());
                labels.insert(
                    LABEL_CREATED_AT.to_owned(),
                    humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                );
                match engine.create(&name, &body).await? {
                    Created::Created(_) => {}
                    // Created by someone else between our inspect and create: look again.
                    Created::NameTaken => continue,
                }
                return self.start_and_wait(user, &name, &hash, &folder).await;
            };
            let labels = &found.labels;
            let ours = labels.get(LABEL_MANAGED_BY).map(String::as_str) == Some(spec::MANAGED_BY)
                && labels.get(LABEL_POOL) == Some(&self.inner.config.pool_id);
            if !ours {
                return Err(Error::SandboxStart {
                    user: user.to_string(),
                    container: name.clone(),
                    reason: "a container of that name exists that this pool did not create; \
                             remove it or set another ZCBOT_POOL_ID"
                        .to_owned(),
                    log: String::new(),
                });
            }
            let status = found.state;
            if labels.contains_key(spec::LABEL_SPARE) {
                // A spare claimed for this user that the pool lost track of: kept if it is
                // current and still shows the user's folder, else replaced.
                let claimed = self.inner.spares.claims.user_of(&found.id).as_ref() == Some(user)
                    && labels.get(LABEL_CONFIG_HASH) == Some(&self.inner.spares.hash)
                    && matches!(status, State::Running | State::Paused);
                if claimed {
                    let kept = self
                        .resume_claimed(user, &name, &folder, &found.id, status)
                        .await?;
                    if let Some(sandbox) = kept {
                        return Ok(sandbox);
                    }
                }
                tracing::info!(user = %user, container = %name, "a claimed spare that cannot be kept: recreating");
                self.remove_container(&name).await?;
                continue;
            }
            if labels.get(LABEL_CONFIG_HASH) != Some(&hash) {
                tracing::info!(user = %user, container = %name, "config changed: recreating sandbox");
                self.remove_container(&name).await?;
                continue;
            }
            match status {
                State::Running => return self.wait_ready(user, &name, &hash, &folder).await,
                // Paused (by a pool that lost track of it, or another process of this pool):
                // thawed, not replaced, so what runs in it is kept.
                State::Paused => {
                    if engine.unpause(&found.id).await? {
                        return self.wait_ready(user, &name, &hash, &folder).await;
                    }
                }
                State::Created | State::Exited => {
                    return self.start_and_wait(user, &name, &hash, &folder).await
                }
                _ => {
                    tracing::info!(user = %user, container = %name, state = ?status, "sandbox in an unusable state: recreating");
                    self.remove_container(&name).await?;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        Err(Error::SandboxStart {
            user: user.to_string(),
            container: name,
            reason: "it kept changing under the pool (created or removed by another process)"
                .to_owned(),
            log: String::new(),
        })
    }

    async fn start_and_wait(
        &self,
        user: &UserId,
        name: &str,
        hash: &str,
        folder: &UserFolder,
    ) -> Result<Sandbox> {
        // Gone meanwhile: wait_ready finds it not running and says so.
        self.inner.engine.start(name).await?;
        self.wait_ready(user, name, hash, folder).await
    }

    /// Waits until the entry of the container's *current* run reports its rules in place: only a
    /// ready line stamped after the previous run ended counts, because a restarted container's
    /// log still holds the ready line of its previous run (whose network namespace, and rules,
    /// are gone). If the entry fails or the deadline passes, the container is removed and the error
    /// carries the log's tail.
    async fn wait_ready(
        &self,
        user: &UserId,
        name: &str,
        hash: &str,
        folder: &UserFolder,
    ) -> Result<Sandbox> {
        let ready = self.wait_rules(user.as_str(), name).await?;
        Ok(ready.sandbox(user, name, hash, folder))
    }

    /// [`SandboxPool::wait_ready`] for any container of the pool (`who` names it in errors: a
    /// user, or a spare).
    async fn wait_rules(&self, who: &str, name: &str) -> Result<Ready> {
        let engine = &self.inner.engine;
        let timeout = self.inner.config.start_timeout;
        let mut log = String::new();
        let started = self.inspect_run(name).await?;
        if self.inner.template.rules == RulesMode::Host {
            if let Some(run) = started {
                return self
                    .install_rules_from_host(who, name, run.0, run.1.pid)
                    .await;
            }
        }
        let outcome = match &started {
            None => {
                log = self.log_tail(name).await;
                Ok(Ok(false))
            }
            Some((_, run)) => {
                // A second early: the engine's `since` has whole seconds.
                let since = run.started_at - Duration::from_secs(1);
                let mut stream = engine.follow_log(name, since);
                tokio::time::timeout(timeout, async {
                    let mut pending = String::new();
                    while let Some(item) = stream.next().await {
                        pending.push_str(&String::from_utf8_lossy(&item?));
                        while let Some(end) = pending.find('\n') {
                            let line: String = pending.drain(..=end).collect();
                            let (stamp, text) = line.split_once(' ').unwrap_or(("", &line));
                            // The current run's lines come after the previous run ended.
                            // (Not "after StartedAt": the engine records StartedAt once the
                            // start returns, and a quick entry's first line can beat it.)
                            let current = humantime::parse_rfc3339_weak(stamp)
                                .is_ok_and(|t| run.previous_end.is_none_or(|end| t > end));
                            if current && text.starts_with(spec::READY_MARKER) {
                                return Ok(true);
                            }
                            log.push_str(text);
                            if log.len() > 2 * LOG_TAIL_BYTES {
                                log = tail(&log, LOG_TAIL_BYTES);
                            }
                        }
                        // A line longer than the tail is cut: the entry's lines are short.
                        if pending.len() > 2 * LOG_TAIL_BYTES {
                            pending = tail(&pending, LOG_TAIL_BYTES);
                        }
                    }
                    Ok::<bool, Error>(false)
                })
                .await
            }
        };
        let reason = match outcome {
            Ok(Ok(true)) => match self.inspect_run(name).await? {
                Some((id, run)) => {
                    return Ok(Ready {
                        id,
                        pid: run.pid,
                        netns: None,
                    })
                }
                None => "it stopped right after applying its rules".to_owned(),
            },
            Ok(Ok(false)) => self.exit_reason(name).await,
            Ok(Err(e)) => return Err(e),
            Err(_) => format!(
                "its entry did not report the egress rules in place within {} (ZCBOT_SANDBOX_START_TIMEOUT)",
                humantime::format_duration(timeout)
            ),
        };
        Err(self
            .fail_start(who, name, reason, tail(&log, LOG_TAIL_BYTES))
            .await)
    }

    /// A sandbox that did not come up: removed, so nothing half-started is left behind; what went
    /// wrong (and the log's tail) goes into the error instead.
    async fn fail_start(&self, who: &str, name: &str, reason: String, log: String) -> Error {
        if let Err(e) = self.remove_container(name).await {
            tracing::warn!(container = %name, error = %e, "could not remove a failed sandbox");
        }
        Error::SandboxStart {
            user: who.to_owned(),
            container: name.to_owned(),
            reason,
            log,
        }
    }

    /// Host rules mode: installs the container's rules inside its network namespace (atomic,
    /// idempotent: also right for an adopted or restarted container) and records the namespace,
    /// so every call can check in microseconds that it is still the one with the rules.
    async fn install_rules_from_host(
        &self,
        who: &str,
        name: &str,
        container_id: String,
        pid: i32,
    ) -> Result<Ready> {
        let egress = self.inner.config.egress;
        let blocked = self.inner.template.blocked.clone();
        let proxy = self.inner.template.proxy;
        let netns = crate::firewall::netns_id(pid);
        let applied = tokio::task::spawn_blocking(move || {
            crate::firewall::apply_in_container(pid, egress, &blocked, proxy)
        })
        .await
        .unwrap_or_else(|e| Err(crate::firewall::FirewallError::Worker(e.to_string())));
        match (applied, netns) {
            (Ok(()), Some(ns)) if crate::firewall::netns_id(pid).as_ref() == Some(&ns) => {
                Ok(Ready {
                    id: container_id,
                    pid,
                    netns: Some((pid, ns)),
                })
            }
            (result, _) => {
                let reason = match result {
                    Err(e) => format!("its egress rules could not be installed from the host: {e}"),
                    Ok(()) => "it restarted while its rules were being installed".to_owned(),
                };
                Err(self.fail_start(who, name, reason, String::new()).await)
            }
        }
    }

    /// Whether `sandbox` still runs in the network namespace its rules were installed in (host
    /// rules mode; always true in entry mode, where the entry re-applies them on every start).
    pub fn rules_intact(&self, sandbox: &Sandbox) -> bool {
        match &sandbox.netns {
            None => true,
            Some((pid, ns)) => crate::firewall::netns_id(*pid).as_ref() == Some(ns),
        }
    }

    /// How the containers' own rules are installed.
    pub fn rules_mode(&self) -> RulesMode {
        self.inner.template.rules
    }

    /// The last lines of a container's log (empty if they cannot be read).
    async fn log_tail(&self, name: &str) -> String {
        self.inner
            .engine
            .log_tail(name, 40, LOG_TAIL_BYTES)
            .await
            .unwrap_or_default()
    }

    /// The container's id and current run; None if it is not running.
    async fn inspect_run(&self, name: &str) -> Result<Option<(String, crate::engine::Run)>> {
        Ok(self
            .inner
            .engine
            .inspect(name)
            .await?
            .and_then(|c| Some((c.id, c.run?))))
    }

    /// Why a container that should be running is not, in words for the error.
    async fn exit_reason(&self, name: &str) -> String {
        match self.inner.engine.inspect(name).await.ok().flatten() {
            Some(c) => format!(
                "its entry exited with status {} before the egress rules were in place{}",
                c.exit_code.unwrap_or(-1),
                c.error.map(|e| format!(" ({e})")).unwrap_or_default()
            ),
            None => "it vanished while starting".to_owned(),
        }
    }

    /// Makes the user's host folder ready (created with its quota, owned by the tenant's uid;
    /// see [`UsersRoot::prepare`]), off the async workers.
    pub async fn prepare_workspace(&self, user: &UserId) -> Result<UserFolder> {
        let users = self.inner.users.clone();
        let user = user.clone();
        blocking(move || users.prepare(&user)).await
    }

    /// Records activity for `user` if it has a live sandbox (file tools run on the host, but
    /// they are activity all the same).
    pub fn mark_active(&self, user: &UserId) {
        let persist = self.inner.slots.get(user).and_then(|slot| {
            let mut st = slot.state.lock();
            st.live.is_some().then(|| touch(&mut st)).flatten()
        });
        self.persist(user, persist);
    }

    /// Force-removes a container by name or id; Ok(false) when it was already gone.
    async fn remove_container(&self, name: &str) -> Result<bool> {
        Ok(self.inner.engine.remove(name).await?.existed())
    }

    /// Every container labelled with this pool's id, in any state.
    async fn list_ours(&self) -> Result<Vec<Listed>> {
        let filter = Filter::Labels(vec![
            (LABEL_MANAGED_BY.to_owned(), spec::MANAGED_BY.to_owned()),
            (LABEL_POOL.to_owned(), self.inner.config.pool_id.clone()),
        ]);
        Ok(self.inner.engine.list(&filter).await?)
    }
}

/// The variables curl, pip, Python, Node and Go read for a proxy, pointing at `proxy`.
fn proxy_env(proxy: std::net::SocketAddr) -> Vec<(String, String)> {
    let url = format!("http://{proxy}");
    let local = "localhost,127.0.0.1,::1";
    [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "PIP_PROXY",
    ]
    .into_iter()
    .map(|k| (k.to_owned(), url.clone()))
    .chain(["NO_PROXY", "no_proxy"].map(|k| (k.to_owned(), local.to_owned())))
    .collect()
}

/// Runs blocking file system work on tokio's blocking pool, never on an async worker.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(Error::io(
            "run host file work",
            "-",
            std::io::Error::other(e.to_string()),
        ))
    })
}

impl SandboxPool {
    /// Whose container `c` is: its user label, or for a claimed spare its claim record (with the
    /// user's name, which the claim's last step gives it).
    fn owner_of(&self, c: &Listed) -> Option<UserId> {
        if !c.labels.contains_key(spec::LABEL_SPARE) {
            return summary_user(c);
        }
        self.inner
            .spares
            .claims
            .user_of(&c.id)
            .filter(|user| c.name == self.container_name(user))
    }
}

/// Whether `name` is `len` lowercase hex digits: a name the pool made (a slot token, a container
/// id), checked before it names a path.
pub(crate) fn is_lower_hex(name: &str, len: usize) -> bool {
    name.len() == len && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The names in `dir` that are `len` lowercase hex digits (none if it cannot be read).
pub(crate) fn hex_names_in(dir: &std::path::Path, len: usize) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| is_lower_hex(name, len))
        .collect()
}

fn summary_user(c: &Listed) -> Option<UserId> {
    UserId::parse(c.labels.get(spec::LABEL_USER)?).ok()
}

/// A slot nobody holds, with no sandbox, bring-up or call.
fn slot_unused(slot: &Arc<Slot>) -> bool {
    Arc::strong_count(slot) == 1
        && slot.gate.try_lock().is_ok()
        && slot
            .state
            .try_lock()
            .is_some_and(|st| st.live.is_none() && !st.starting && st.in_flight == 0)
}

#[cfg(test)]
pub(crate) mod tests;
