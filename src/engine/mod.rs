//! The container engine, behind one facade: everything the pool and the executors ask of Docker,
//! as typed answers.
//!
//! [`Engine`] is the seam. [`DockerEngine`] speaks to a real engine through bollard, with the
//! deadline on every call and the engine's status codes and quirks turned into typed results
//! here and nowhere else: `inspect` answers `None` for a container that is not there, `remove`
//! says [`Removed::Gone`] or [`Removed::InProgress`], `create` says [`Created::NameTaken`], an exec
//! into a stopped or missing container is [`ExecStart::ContainerGone`]. [`FakeEngine`] keeps
//! containers in memory, so admission, the pool's state machine and the routes are tested without
//! dockerd. Nothing above this module names bollard's client.
//!
//! Streams (a followed log, an exec's output) carry no deadline of their own: their readers
//! decide how long they wait, with their own semantics (a call's timeout, a start timeout).

mod docker;
pub mod fake;

use std::collections::HashMap;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use futures_util::Stream;
use tokio::io::AsyncWrite;

pub use crate::error::{EngineError, Op};
pub use docker::DockerEngine;
pub use fake::FakeEngine;

/// A container's create request, in the engine's own terms (built by `pool::spec`).
pub type ContainerSpec = bollard::models::ContainerCreateBody;

/// The result type of every engine call.
pub type EngineResult<T> = std::result::Result<T, EngineError>;

/// A shared handle on an engine.
pub type SharedEngine = std::sync::Arc<dyn Engine>;

/// What `create` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// Made, with this id.
    Created(String),
    /// Something of that name exists already (made by a racing creator, or by someone else).
    NameTaken,
}

/// What `rename` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renamed {
    /// It has the new name now.
    Renamed,
    /// Another container has that name.
    NameTaken,
    /// The container is not there.
    Gone,
}

/// What `remove` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// Removed now.
    Removed,
    /// It was not there.
    Gone,
    /// Someone else is removing it.
    InProgress,
}

impl Removed {
    /// Whether it existed when asked (removed now or by someone else).
    pub fn existed(self) -> bool {
        self != Removed::Gone
    }
}

/// A container's state, as the engine reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Created, never started.
    Created,
    /// Running.
    Running,
    /// Frozen by the engine.
    Paused,
    /// Being restarted by its restart policy.
    Restarting,
    /// Being removed.
    Removing,
    /// Stopped.
    Exited,
    /// Failed to stop or be removed.
    Dead,
    /// Anything else the engine may say.
    Unknown,
}

impl State {
    /// The engine's own word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Created => "created",
            State::Running => "running",
            State::Paused => "paused",
            State::Restarting => "restarting",
            State::Removing => "removing",
            State::Exited => "exited",
            State::Dead => "dead",
            State::Unknown => "unknown",
        }
    }
}

/// One run of a running container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// When this run started.
    pub started_at: SystemTime,
    /// When the previous run ended; None if the container never stopped.
    pub previous_end: Option<SystemTime>,
    /// The host pid of its first process.
    pub pid: i32,
}

/// A container as `inspect` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// The engine's id.
    pub id: String,
    /// Its name, without a leading slash.
    pub name: String,
    /// Its labels.
    pub labels: HashMap<String, String>,
    /// Its state.
    pub state: State,
    /// The current run, when it is running.
    pub run: Option<Run>,
    /// The last exit status, when it has one.
    pub exit_code: Option<i64>,
    /// The engine's error for it (a failed start), when there is one.
    pub error: Option<String>,
    /// The kernel's OOM killer struck in it (under gVisor: the whole sandbox was killed).
    pub oom_killed: bool,
    /// Its IPv4 address on each network it joined, by network name (while it runs).
    pub addresses: HashMap<String, std::net::IpAddr>,
}

/// A container as `list` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The engine's id.
    pub id: String,
    /// Its name, without a leading slash.
    pub name: String,
    /// Its labels.
    pub labels: HashMap<String, String>,
    /// Its state.
    pub state: State,
}

/// Which containers `list` returns (any state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// Those carrying every one of these `key=value` labels.
    Labels(Vec<(String, String)>),
    /// Those whose name contains this (the engine's name filter; callers check exactly).
    NameContains(String),
}

/// A network as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Network {
    /// The engine's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its driver ("bridge").
    pub driver: String,
    /// Whether it has no way out.
    pub internal: bool,
    /// Driver options (bridge name, inter-container traffic).
    pub options: HashMap<String, String>,
    /// `(subnet, gateway)` of each address pool.
    pub subnets: Vec<(String, Option<String>)>,
    /// When it was created.
    pub created: Option<SystemTime>,
    /// Its labels (which pool made it).
    pub labels: HashMap<String, String>,
}

/// A network to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    /// Its name.
    pub name: String,
    /// No way out.
    pub internal: bool,
    /// Driver options.
    pub options: HashMap<String, String>,
    /// Labels.
    pub labels: HashMap<String, String>,
}

/// A process to start in a container by exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSpec {
    /// The argument vector.
    pub cmd: Vec<String>,
    /// `uid:gid` to run as.
    pub user: String,
    /// The whole environment, `KEY=VALUE`.
    pub env: Vec<String>,
    /// The working directory.
    pub workdir: String,
    /// Attach its stdin.
    pub stdin: bool,
}

/// A piece of an attached process's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// From its standard output.
    Stdout(Vec<u8>),
    /// From its standard error.
    Stderr(Vec<u8>),
}

/// What an attached exec yields, until it ends.
pub type Output = Pin<Box<dyn Stream<Item = EngineResult<Chunk>> + Send>>;
/// An attached exec's standard input.
pub type Input = Pin<Box<dyn AsyncWrite + Send>>;
/// A followed log, in pieces as the engine sends them (lines may be split across pieces).
pub type LogStream = Pin<Box<dyn Stream<Item = EngineResult<Vec<u8>>> + Send>>;

/// The engine's runtimes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtimes {
    /// Their names, sorted.
    pub names: Vec<String>,
    /// The one a container gets when its create body names none.
    pub default: Option<String>,
}

/// Ids of containers as they die (see [`Engine::deaths`]).
pub type DeathStream = Pin<Box<dyn Stream<Item = EngineResult<String>> + Send>>;

/// A started exec with its streams attached.
pub struct Attached {
    /// The exec's id (for `exec_state`).
    pub id: String,
    /// Its stdout and stderr.
    pub output: Output,
    /// Its stdin (closed at once when the spec did not ask for it).
    pub input: Input,
}

/// What `exec` did.
pub enum ExecStart {
    /// Started, attached.
    Attached(Attached),
    /// The container is not there or not running: nothing started.
    ContainerGone,
}

/// An exec's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecState {
    /// Whether its process still runs.
    pub running: bool,
    /// Its exit status, once it ended.
    pub exit_code: Option<i64>,
    /// Its host pid, while it runs (0 or None when unknown).
    pub pid: Option<i64>,
}

/// Everything the pool and the executors ask of a container engine. Every call is bounded by the
/// engine's deadline ([`Engine::timeout`]) and answers typed results; the engine's own status
/// codes never leave the implementation.
pub trait Engine: Send + Sync + 'static {
    /// The engine's address, for messages.
    fn host(&self) -> &str;
    /// The API version in use.
    fn api_version(&self) -> String;
    /// The deadline of one call.
    fn timeout(&self) -> Duration;

    /// Whether the engine answers.
    fn ping(&self) -> BoxFuture<'_, EngineResult<()>>;
    /// The OCI runtimes the engine has registered (`runc`, and `runsc` once daemon.json names
    /// it), and its default.
    fn runtimes(&self) -> BoxFuture<'_, EngineResult<Runtimes>>;
    /// The id of `image`, or None when the engine does not have it.
    fn image_id<'a>(&'a self, image: &'a str) -> BoxFuture<'a, EngineResult<Option<String>>>;

    /// The networks named exactly `name`, oldest first.
    fn networks_named<'a>(&'a self, name: &'a str) -> BoxFuture<'a, EngineResult<Vec<Network>>>;
    /// Creates a bridge network. [`Created::NameTaken`] when a racing creator got there first.
    fn create_network<'a>(&'a self, spec: &'a NetworkSpec) -> BoxFuture<'a, EngineResult<Created>>;
    /// Removes a network by id.
    fn remove_network<'a>(&'a self, id: &'a str) -> BoxFuture<'a, EngineResult<Removed>>;

    /// A container by name or id; None when it is not there.
    fn inspect<'a>(&'a self, container: &'a str) -> BoxFuture<'a, EngineResult<Option<Container>>>;
    /// Creates (does not start) a container named `name`.
    fn create<'a>(
        &'a self,
        name: &'a str,
        spec: &'a ContainerSpec,
    ) -> BoxFuture<'a, EngineResult<Created>>;
    /// Starts a created or stopped container. False when it is not there.
    fn start<'a>(&'a self, container: &'a str) -> BoxFuture<'a, EngineResult<bool>>;
    /// Freezes every process of a running container (the cgroup freezer: no CPU, memory kept).
    /// False when it is not there; already paused is done.
    fn pause<'a>(&'a self, container: &'a str) -> BoxFuture<'a, EngineResult<bool>>;
    /// Thaws a paused container. False when it is not there; not paused is done.
    fn unpause<'a>(&'a self, container: &'a str) -> BoxFuture<'a, EngineResult<bool>>;
    /// Gives a container (by name or id) a new name: how a warm spare becomes a user's sandbox
    /// (labels cannot change after create, a name can).
    fn rename<'a>(
        &'a self,
        container: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, EngineResult<Renamed>>;
    /// Force-removes a container (and its anonymous volumes) by name or id.
    fn remove<'a>(&'a self, container: &'a str) -> BoxFuture<'a, EngineResult<Removed>>;
    /// Every container that matches, in any state.
    fn list<'a>(&'a self, filter: &'a Filter) -> BoxFuture<'a, EngineResult<Vec<Listed>>>;
    /// The last `lines` lines of a container's log (stdout and stderr), at most `max_bytes`.
    fn log_tail<'a>(
        &'a self,
        container: &'a str,
        lines: usize,
        max_bytes: usize,
    ) -> BoxFuture<'a, EngineResult<String>>;
    /// The container's log from `since` on, followed, each line prefixed with its RFC 3339
    /// timestamp and a space (as the engine stamps them).
    fn follow_log(&self, container: &str, since: SystemTime) -> LogStream;

    /// The ids of containers labelled `label=value` as they die (the engine's `die` events), from
    /// now on, with no deadline. It ends, or yields an error, when the connection does: the
    /// caller connects again.
    fn deaths(&self, label: &str, value: &str) -> DeathStream;

    /// Creates and starts an exec, attached.
    fn exec<'a>(
        &'a self,
        container: &'a str,
        spec: ExecSpec,
    ) -> BoxFuture<'a, EngineResult<ExecStart>>;
    /// An exec's state; None when the exec (or its container) is gone.
    fn exec_state<'a>(&'a self, exec_id: &'a str)
        -> BoxFuture<'a, EngineResult<Option<ExecState>>>;

    /// Connects a created container to one more network (API 1.41 creates a container on one
    /// network only). False when the container is not there; already connected is done.
    fn connect_network<'a>(
        &'a self,
        network: &'a str,
        container: &'a str,
    ) -> BoxFuture<'a, EngineResult<bool>>;
    /// Attaches to a running container's stdin, stdout and stderr (its PID 1's, for a container
    /// created with `OpenStdin`): how the daemon talks to the egress proxy. The `id` of the
    /// answer is the container's. None when it is not there.
    fn attach<'a>(&'a self, container: &'a str) -> BoxFuture<'a, EngineResult<Option<Attached>>>;
}
