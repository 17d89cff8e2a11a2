//! `Config`: every setting the pool reads, its default, and its validation.
//!
//! The settings are declared once, as clap arguments grouped by concern ([`Settings`] and its
//! flattened groups): each names its environment variable, its default and its value parser.
//! That one declaration gives the variables ([`variables`], which a test holds RUN.md to), the
//! flags of `serve`, and the parse. Read once at startup with [`Config::from_env`]; a bad value is
//! an error naming the variable and the value, so an operator never runs with a setting they did
//! not mean. An empty variable counts as unset.

use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches};
use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretString};
pub use zcbot_egress::pattern::Pattern;

use crate::error::{Error, Result};

/// Validated settings of one pool. Build it with [`Config::from_env`] or [`Config::from_lookup`].
#[derive(Debug, Clone)]
pub struct Config {
    /// `ZCBOT_SANDBOX_IMAGE`: the sandbox image (default `zcbot-sandbox:latest`).
    pub image: String,
    /// `ZCBOT_USERS_ROOT`: host folder with one folder per user, each bind-mounted at `/workspace`
    /// (default `/var/lib/zcbot-sandbox/users`).
    pub users_root: PathBuf,
    /// `ZCBOT_STATE_DIR`: where the pool keeps its durable last-activity record
    /// (default `/var/lib/zcbot-sandbox/state`).
    pub state_dir: PathBuf,
    /// `ZCBOT_SANDBOX_NETWORK`: the internal bridge network (default `zcbot-sandbox-net`).
    pub network: String,
    /// `ZCBOT_POOL_ID`: separates pools on one host; a pool only ever touches containers labelled
    /// with its own id (default `default`).
    pub pool_id: String,
    /// `ZCBOT_SANDBOX_IDLE`: a container idle this long is reaped (default 5m).
    pub idle: Duration,
    /// `ZCBOT_SANDBOX_REAP_EVERY`: how often the reaper looks (default 60s).
    pub reap_every: Duration,
    /// `ZCBOT_SANDBOX_PAUSE_AFTER`: a sandbox idle this long is paused (its processes frozen,
    /// memory kept) until the next call; None (`0`) never pauses (default 60s).
    pub pause_after: Option<Duration>,
    /// `ZCBOT_SANDBOX_MEMORY`: memory limit in bytes; swap is set equal, so no swap (default 512MiB).
    pub memory_bytes: i64,
    /// `ZCBOT_SANDBOX_CPUS`: CPU limit in cores (default 1.0).
    pub cpus: f64,
    /// `ZCBOT_SANDBOX_PIDS`: most processes in one container (default 256).
    pub pids: i64,
    /// `ZCBOT_SANDBOX_TMPFS_SIZE`: size of the container's `/tmp` tmpfs in bytes (default 64MiB).
    pub tmpfs_bytes: i64,
    /// `ZCBOT_SANDBOX_UID`: `uid:gid` every tenant runs as when the daemon cannot give each its
    /// own (not root), and the owner whose folders a root daemon migrates to the tenants' own
    /// uids (default 1000:1000, the single uid of earlier releases).
    pub uid: u32,
    /// The gid half of `ZCBOT_SANDBOX_UID`.
    pub gid: u32,
    /// `ZCBOT_SANDBOX_UID_RANGE`: `FIRST-LAST`, the host uids (and gids) tenants get, one each,
    /// allocated once and kept in the state folder (default 200000-299999). No host account may
    /// use them: the daemon refuses to start if one does.
    pub uid_range: UidRange,
    /// `ZCBOT_SANDBOX_DISK`: bytes one user's folder may hold, enforced by the kernel where the
    /// users root allows it (btrfs with quotas; default 1GiB).
    pub disk_bytes: u64,
    /// `ZCBOT_REQUIRE_DISK_QUOTA`: refuse to start when the users root cannot enforce
    /// `ZCBOT_SANDBOX_DISK` (default off: start with a loud warning).
    pub require_disk_quota: bool,
    /// `ZCBOT_FILE_TIMEOUT`: the deadline of one file tool call (default 30s).
    pub file_timeout: Duration,
    /// `ZCBOT_MAX_FILE`: the largest file `PUT`/`GET /v1/users/{user}/files/{path}` moves
    /// (default 256MiB), streamed beside the JSON body limit.
    pub max_file: u64,
    /// `ZCBOT_TRANSFER_TIMEOUT`: how long one file upload or download may take in all (default
    /// 10m); an upload's body may also pause at most `ZCBOT_HTTP_BODY_TIMEOUT` between pieces.
    pub transfer_timeout: Duration,
    /// `ZCBOT_FILE_MAX_ENTRIES`: folder entries one file call may visit (default 1000000).
    pub file_max_entries: u64,
    /// `ZCBOT_FILE_WORKERS`: file calls running at once on the host, all users together
    /// (default 8; each user has at most 2 of them).
    pub file_workers: usize,
    /// `ZCBOT_HTTP_HEADER_TIMEOUT`: how long a client may take to send a request's headers
    /// (default 10s).
    pub http_header_timeout: Duration,
    /// `ZCBOT_HTTP_BODY_TIMEOUT`: how long a client may take to send a request's body, once its
    /// headers are in (default 30s).
    pub http_body_timeout: Duration,
    /// `ZCBOT_HTTP_IDLE_TIMEOUT`: how long a kept-alive connection may sit idle between requests
    /// (default 60s).
    pub http_idle_timeout: Duration,
    /// `ZCBOT_HTTP_MAX_CONNECTIONS`: open connections at most; more are refused at once with 503
    /// (default 1024).
    pub http_max_connections: usize,
    /// `ZCBOT_SANDBOX_MAX`: most containers at once (default 100).
    pub max_containers: usize,
    /// `ZCBOT_SPARES`: warm spares kept started for new users, within `ZCBOT_SANDBOX_MAX`
    /// (default 2; 0 makes none).
    pub spares: usize,
    /// `ZCBOT_PG_IPS`: database addresses the sandbox must never reach (comma or space separated).
    pub pg_ips: Vec<IpNet>,
    /// `ZCBOT_SANDBOX_BLOCK_CIDRS`: more ranges the sandbox must never reach.
    pub block_cidrs: Vec<IpNet>,
    /// `DOCKER_HOST`: the engine's address (default the local unix socket).
    pub docker_host: Option<String>,
    /// `ZCBOT_DOCKER_TIMEOUT`: deadline of every single Docker call (default 30s).
    pub docker_timeout: Duration,
    /// `ZCBOT_SANDBOX_START_TIMEOUT`: how long a new container may take to report its rules in
    /// place (default 30s).
    pub start_timeout: Duration,
    /// `ZCBOT_SANDBOX_BACKEND`: where `shell` and `run_python` run (default `host`).
    pub backend: Backend,
    /// `ZCBOT_EXEC_TRANSPORT`: how process calls reach the sandbox (default `channel`).
    pub transport: Transport,
    /// `ZCBOT_EXEC_TIMEOUT`: a call's timeout when the caller gives none (default 120s).
    pub exec_timeout: Duration,
    /// `ZCBOT_EXEC_TIMEOUT_MAX`: the longest timeout a caller may ask for (default 600s).
    pub exec_timeout_max: Duration,
    /// `ZCBOT_OUTPUT_CAP`: bytes kept per output stream, head and tail (default 1MiB).
    pub output_cap: usize,
    /// `ZCBOT_KILL_GRACE`: time between SIGTERM and SIGKILL when a call is stopped (default 500ms);
    /// also how long interrupted code in a Python session has to stop before the session is killed.
    pub kill_grace: Duration,
    /// `ZCBOT_PYTHON_SESSIONS_MAX`: Python sessions (`run_python` with `session`) one user may
    /// have at once (default 4).
    pub python_sessions_max: usize,
    /// `ZCBOT_PYTHON_SESSION_IDLE`: a Python session that ran no code this long is ended (default
    /// 30m).
    pub python_session_idle: Duration,
    /// `ZCBOT_USER_MAX_JOBS`: background jobs one user may have running at once (default 4).
    pub user_max_jobs: usize,
    /// `ZCBOT_JOB_TIMEOUT`: a background job's timeout when it gives none, and the longest it
    /// may ask for (default 24h).
    pub job_timeout: Duration,
    /// `ZCBOT_LISTEN`: where `serve` listens: `HOST:PORT` (a host name resolved once, here), or a
    /// unix socket as an absolute path or `unix:PATH` (default `127.0.0.1:8787`).
    pub listen: Listen,
    /// `ZCBOT_API_TOKEN`: when set, every request needs `Authorization: Bearer <token>`. A secret:
    /// its `Debug` prints `[REDACTED]`, so logging the config never leaks it.
    pub api_token: Option<SecretString>,
    /// `ZCBOT_MAX_BODY`: the largest request body (default 4MiB).
    pub max_body: usize,
    /// `ZCBOT_USER_MAX_CALLS`: calls one user may have in flight (default 4); more get 429.
    pub user_max_calls: usize,
    /// `ZCBOT_SHUTDOWN_GRACE`: how long calls in flight may finish after SIGTERM (default 30s).
    pub shutdown_grace: Duration,
    /// `ZCBOT_REQUIRE_HOST_FIREWALL`: refuse to start when the host firewall cannot be installed
    /// (default off: start with a loud warning).
    pub require_host_firewall: bool,
    /// `ZCBOT_SELF_CHECK`: at startup (docker backend), a probe sandbox tries the network escapes
    /// and the daemon refuses to start if any succeeds (default 1).
    pub self_check: bool,
    /// `ZCBOT_SANDBOX_EGRESS`: `none` (default; no way out at all), `public` (public addresses
    /// only, on a separate non-internal network) or `allowlist` (named hosts only, through the
    /// pool's egress proxy).
    pub egress: Egress,
    /// `ZCBOT_EGRESS_ALLOW`: in `allowlist` mode, the host patterns sandboxes may reach
    /// (`example.org`, `*.example.org`, optional `:port`; ports 80 and 443 when none is given).
    /// Each user's list can be narrowed, never widened.
    pub egress_allow: Vec<Pattern>,
    /// `ZCBOT_EGRESS_NETWORK`: the outbound network the egress proxy joins (default
    /// `<ZCBOT_SANDBOX_NETWORK>-egress`, created if missing).
    pub egress_network: String,
    /// `ZCBOT_EGRESS_RESOLVE`: a test knob: names the proxy resolves to these addresses instead
    /// of asking DNS. The operator's explicit word, so they skip the private-range check.
    pub egress_resolve: Vec<(String, IpAddr)>,
    /// `ZCBOT_EGRESS_IMAGE`: the egress proxy's image (default `zcbot-egress:latest`).
    pub egress_image: String,
    /// `ZCBOT_EGRESS_USER_CONNECTIONS`: connections one user may hold open through the proxy
    /// (default 64).
    pub egress_user_connections: u32,
    /// `ZCBOT_CONTAINER_RULES`: who installs each container's own rules: `host` (the daemon,
    /// through the container's network namespace; needs root), `entry` (the container, which then
    /// keeps NET_ADMIN), or `auto` (default: host when the daemon is root).
    pub container_rules: RulesSetting,
    /// `ZCBOT_SANDBOX_RUNTIME`: the OCI runtime sandboxes run under: `runc` (default) or `runsc`
    /// (gVisor: its own kernel between the tenant's code and the host's). Part of the config
    /// hash; startup checks the engine has it registered.
    pub runtime: Runtime,
    /// `ZCBOT_SECCOMP`: the sandboxes' seccomp profile: `zcbot` (default, [`crate::seccomp`]) or
    /// `default` (the engine's). Nothing turns seccomp off.
    pub seccomp: Seccomp,
}

/// The `ZCBOT_SANDBOX_RUNTIME` setting: the engine runtime sandboxes are created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// The engine's usual runtime: the tenant's calls reach the host kernel (through seccomp).
    Runc,
    /// gVisor: a user-space kernel serves the tenant's calls.
    Runsc,
}

impl Runtime {
    /// The name the engine knows the runtime by (daemon.json `runtimes`).
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Runc => "runc",
            Runtime::Runsc => "runsc",
        }
    }
}

/// The `ZCBOT_SECCOMP` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Seccomp {
    /// This project's allowlist ([`crate::seccomp`]).
    Zcbot,
    /// The engine's default profile, for an operator whose workload it cannot run.
    Default,
}

/// The `ZCBOT_CONTAINER_RULES` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RulesSetting {
    /// Host when the daemon is root, else entry.
    Auto,
    /// Always from the host (startup fails without root).
    Host,
    /// Always by the entry.
    Entry,
}

/// What a sandbox may reach beyond itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// Nothing: an internal network and default-deny rules.
    None,
    /// Public addresses only: every private, local, reserved range and the host are rejected.
    Public,
    /// Named hosts only (`ZCBOT_EGRESS_ALLOW`), through the pool's egress proxy: the sandbox's
    /// one reachable address is the proxy's port.
    Allowlist,
}

impl Egress {
    /// The word used in variables and the entry's arguments.
    pub fn as_str(self) -> &'static str {
        match self {
            Egress::None => "none",
            Egress::Public => "public",
            Egress::Allowlist => "allowlist",
        }
    }
}

impl Config {
    /// The Docker network the sandboxes use: `ZCBOT_SANDBOX_NETWORK`, or
    /// `<ZCBOT_SANDBOX_NETWORK>-public` for the public egress policy (a different network, since
    /// it cannot be internal). The allowlist policy shares the internal network of `none`: its
    /// one way out is the proxy container, which also joins [`Config::egress_network`].
    pub fn network_name(&self) -> String {
        match self.egress {
            Egress::None | Egress::Allowlist => self.network.clone(),
            Egress::Public => format!("{}-public", self.network),
        }
    }
}

/// The uids a pool gives its tenants (gid = uid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    /// First uid of the range.
    pub first: u32,
    /// Last uid of the range (inclusive).
    pub last: u32,
}

impl UidRange {
    /// How many uids the range holds.
    pub(crate) fn len(&self) -> u64 {
        u64::from(self.last - self.first) + 1
    }

    /// Whether `uid` lies in the range.
    pub fn contains(&self, uid: u32) -> bool {
        (self.first..=self.last).contains(&uid)
    }
}

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// Where the daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address.
    Tcp(std::net::SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "http://{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Where tool calls run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// On the host, as the daemon's user: for development; isolates nothing.
    Host,
    /// In the user's sandbox container.
    Docker,
}

/// How the docker backend reaches a sandbox for a process call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// One Docker exec per call (50-70 ms of engine work each).
    Exec,
    /// Calls multiplexed over one long-lived exec per container (about a millisecond each);
    /// falls back to `Exec` for a call when the channel cannot be opened.
    Channel,
}

// ---------------------------------------------------------------------------------------------
// The declaration: one clap `Args` group per concern, flattened into `Settings`. The field names
// are the flags of `serve`; `env` is the variable; `default_value` is the documented default.
// ---------------------------------------------------------------------------------------------

// Every setting, as parsed, before the checks that span several of them. These groups carry
// plain comments, not doc comments: clap would make a group's doc the help of `serve`.
#[derive(Args, Debug, Clone)]
struct Settings {
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
    #[command(flatten)]
    network: NetworkArgs,
    #[command(flatten)]
    files: FilesArgs,
    #[command(flatten)]
    http: HttpArgs,
    #[command(flatten)]
    exec: ExecArgs,
}

// The Docker engine and the image.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Engine")]
struct EngineArgs {
    /// The sandbox image; containers run it by id.
    #[arg(long, env = "ZCBOT_SANDBOX_IMAGE", default_value = "zcbot-sandbox:latest", value_parser = parse_image)]
    image: String,
    /// The engine's address (default: the local unix socket).
    #[arg(long, env = "DOCKER_HOST", value_parser = parse_docker_host)]
    docker_host: Option<String>,
    /// Deadline of every single Docker call.
    #[arg(long, env = "ZCBOT_DOCKER_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    docker_timeout: Duration,
    /// How long a new sandbox may take to report its rules in place.
    #[arg(long, env = "ZCBOT_SANDBOX_START_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    start_timeout: Duration,
    /// Separates pools on one host; a pool touches only containers labelled with its id.
    #[arg(long, env = "ZCBOT_POOL_ID", default_value = "default", value_parser = parse_pool_id)]
    pool_id: String,
}

// Each sandbox's limits, its tenant's uid, and how long it lives.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Sandbox limits")]
struct SandboxArgs {
    /// A sandbox idle this long is reaped.
    #[arg(long, env = "ZCBOT_SANDBOX_IDLE", default_value = "5m", value_parser = positive_duration)]
    idle: Duration,
    /// How often the reaper looks.
    #[arg(long, env = "ZCBOT_SANDBOX_REAP_EVERY", default_value = "60s", value_parser = positive_duration)]
    reap_every: Duration,
    /// A sandbox idle this long is paused until its next call (0: never).
    #[arg(long, env = "ZCBOT_SANDBOX_PAUSE_AFTER", default_value = "60s", value_parser = parse_duration_or_off)]
    pause_after: Duration,
    /// Memory limit (swap is set equal, so no swap).
    #[arg(long = "memory", value_name = "SIZE", env = "ZCBOT_SANDBOX_MEMORY", default_value = "512MiB", value_parser = bytes::<i64>(6 << 20))]
    memory_bytes: i64,
    /// CPU limit in cores (0.01 to this host's core count).
    #[arg(long, env = "ZCBOT_SANDBOX_CPUS", default_value = "1.0", value_parser = parse_cpus)]
    cpus: f64,
    /// Most processes in one sandbox.
    #[arg(long, env = "ZCBOT_SANDBOX_PIDS", default_value = "256", value_parser = int::<i64>(8, 1 << 22))]
    pids: i64,
    /// Size of the sandbox's /tmp tmpfs.
    #[arg(long = "tmpfs-size", value_name = "SIZE", env = "ZCBOT_SANDBOX_TMPFS_SIZE", default_value = "64MiB", value_parser = bytes::<i64>(1 << 20))]
    tmpfs_bytes: i64,
    /// Most sandboxes at once.
    #[arg(long, env = "ZCBOT_SANDBOX_MAX", default_value = "100", value_parser = int::<usize>(1, 100_000))]
    max_containers: usize,
    /// Warm spares kept started for new users (0: none).
    #[arg(long, env = "ZCBOT_SPARES", default_value = "2", value_parser = int::<usize>(0, 1000))]
    spares: usize,
    /// UID:GID every tenant runs as when the daemon is not root (root is refused).
    #[arg(long, env = "ZCBOT_SANDBOX_UID", default_value = "1000:1000", value_parser = parse_uid_gid)]
    uid: UidGid,
    /// FIRST-LAST: the host uids (and gids) tenants get, one each.
    #[arg(long, env = "ZCBOT_SANDBOX_UID_RANGE", default_value = "200000-299999", value_parser = parse_uid_range)]
    uid_range: UidRange,
    /// Bytes one user's folder may hold.
    #[arg(long = "disk", value_name = "SIZE", env = "ZCBOT_SANDBOX_DISK", default_value = "1GiB", value_parser = bytes::<u64>(16 << 20))]
    disk_bytes: u64,
    /// 1: refuse to start when the users root cannot enforce the disk quota.
    #[arg(long, env = "ZCBOT_REQUIRE_DISK_QUOTA", default_value = "0", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "1")]
    require_disk_quota: bool,
    /// The engine runtime: runc, or runsc (gVisor; register it first, see RUN.md).
    #[arg(long, env = "ZCBOT_SANDBOX_RUNTIME", default_value = "runc", value_parser = one_of(&[("runc", Runtime::Runc), ("runsc", Runtime::Runsc)]))]
    runtime: Runtime,
    /// The seccomp profile: zcbot (this project's allowlist) or default (the engine's).
    #[arg(long, env = "ZCBOT_SECCOMP", default_value = "zcbot", value_parser = parse_seccomp)]
    seccomp: Seccomp,
}

// The sandbox network, its egress and the host's enforcement.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Network and egress")]
struct NetworkArgs {
    /// The internal bridge network.
    #[arg(long, env = "ZCBOT_SANDBOX_NETWORK", default_value = "zcbot-sandbox-net", value_parser = parse_network)]
    network: String,
    /// none (no way out), public (public addresses only, on a separate network) or allowlist
    /// (the hosts of ZCBOT_EGRESS_ALLOW, through the egress proxy).
    #[arg(long, env = "ZCBOT_SANDBOX_EGRESS", default_value = "none", value_parser = one_of(&[("none", Egress::None), ("public", Egress::Public), ("allowlist", Egress::Allowlist)]))]
    egress: Egress,
    /// allowlist: the hosts sandboxes may reach, comma separated: example.org, *.example.org,
    /// each with an optional :port (80 and 443 when none).
    #[arg(long, env = "ZCBOT_EGRESS_ALLOW", value_parser = parse_allow)]
    egress_allow: Option<AllowList>,
    /// allowlist: the outbound network the egress proxy joins [default: <network>-egress].
    #[arg(long, env = "ZCBOT_EGRESS_NETWORK", value_parser = parse_network)]
    egress_network: Option<String>,
    /// allowlist, a test knob: name=ip pairs the proxy uses instead of DNS (comma separated);
    /// these addresses skip the private-range check.
    #[arg(long, env = "ZCBOT_EGRESS_RESOLVE", value_parser = parse_resolve)]
    egress_resolve: Option<ResolveList>,
    /// allowlist: the egress proxy's image (scripts/build-image.sh builds it).
    #[arg(long, env = "ZCBOT_EGRESS_IMAGE", default_value = "zcbot-egress:latest", value_parser = parse_image)]
    egress_image: String,
    /// allowlist: connections one user may hold open through the proxy.
    #[arg(long, env = "ZCBOT_EGRESS_USER_CONNECTIONS", default_value = "64", value_parser = int::<u32>(1, 100_000))]
    egress_user_connections: u32,
    /// Database addresses a sandbox must never reach (comma or space separated).
    #[arg(long, env = "ZCBOT_PG_IPS", value_parser = parse_cidr_list)]
    pg_ips: Option<CidrList>,
    /// More ranges a sandbox must never reach.
    #[arg(long, env = "ZCBOT_SANDBOX_BLOCK_CIDRS", value_parser = parse_cidr_list)]
    block_cidrs: Option<CidrList>,
    /// Who installs each sandbox's own rules: auto, host or entry.
    #[arg(long, env = "ZCBOT_CONTAINER_RULES", default_value = "auto", value_parser = one_of(&[("auto", RulesSetting::Auto), ("host", RulesSetting::Host), ("entry", RulesSetting::Entry)]))]
    container_rules: RulesSetting,
    /// 1: refuse to start when the host firewall cannot be installed.
    #[arg(long, env = "ZCBOT_REQUIRE_HOST_FIREWALL", default_value = "0", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "1")]
    require_host_firewall: bool,
    /// 1: a probe sandbox tries the network escapes at startup; any success stops the daemon.
    #[arg(long, env = "ZCBOT_SELF_CHECK", default_value = "1", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "1")]
    self_check: bool,
}

// The users' folders, the durable state, and the file tools.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Files")]
struct FilesArgs {
    /// Host folder with one folder per user, mounted at /workspace (absolute).
    #[arg(long, env = "ZCBOT_USERS_ROOT", default_value = "/var/lib/zcbot-sandbox/users", value_parser = parse_abs_path)]
    users_root: PathBuf,
    /// The durable last-activity record and the tenants' uids (absolute).
    #[arg(long, env = "ZCBOT_STATE_DIR", default_value = "/var/lib/zcbot-sandbox/state", value_parser = parse_abs_path)]
    state_dir: PathBuf,
    /// The deadline of one file tool call.
    #[arg(long, env = "ZCBOT_FILE_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    file_timeout: Duration,
    /// Folder entries one file call may visit.
    #[arg(long, env = "ZCBOT_FILE_MAX_ENTRIES", default_value = "1000000", value_parser = int::<u64>(100, 1 << 40))]
    file_max_entries: u64,
    /// File calls running at once on the host, all users together.
    #[arg(long, env = "ZCBOT_FILE_WORKERS", default_value = "8", value_parser = int::<usize>(1, 1024))]
    file_workers: usize,
    /// The largest file one upload or download moves.
    #[arg(long, env = "ZCBOT_MAX_FILE", default_value = "256MiB", value_parser = bytes::<u64>(1024))]
    max_file: u64,
    /// How long one file upload or download may take in all.
    #[arg(long, env = "ZCBOT_TRANSFER_TIMEOUT", default_value = "10m", value_parser = positive_duration)]
    transfer_timeout: Duration,
}

// The HTTP server: where it listens, who may call it, and how long a client may take.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "HTTP server")]
struct HttpArgs {
    /// HOST:PORT, or a unix socket path (/path or unix:/path).
    #[arg(long, env = "ZCBOT_LISTEN", default_value = "127.0.0.1:8787", value_parser = parse_listen)]
    listen: ListenSpec,
    /// Every request needs `Authorization: Bearer <token>`. A variable only: `hide` marks it so
    /// ([`Variable::env_only`]), and `serve` refuses the flag.
    #[arg(long, env = "ZCBOT_API_TOKEN", hide = true, value_parser = parse_token)]
    api_token: Option<SecretString>,
    /// The largest request body.
    #[arg(long, env = "ZCBOT_MAX_BODY", default_value = "4MiB", value_parser = bytes::<usize>(1024))]
    max_body: usize,
    /// Calls one user may have in flight (429 beyond).
    #[arg(long, env = "ZCBOT_USER_MAX_CALLS", default_value = "4", value_parser = int::<usize>(1, 10_000))]
    user_max_calls: usize,
    /// How long calls in flight may finish after SIGTERM.
    #[arg(long, env = "ZCBOT_SHUTDOWN_GRACE", default_value = "30s", value_parser = positive_duration)]
    shutdown_grace: Duration,
    /// How long a client may take to send a request's headers.
    #[arg(long, env = "ZCBOT_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    http_header_timeout: Duration,
    /// How long a client may take to send a request's body, once its headers are in.
    #[arg(long, env = "ZCBOT_HTTP_BODY_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    http_body_timeout: Duration,
    /// How long a kept-alive connection may sit idle between requests.
    #[arg(long, env = "ZCBOT_HTTP_IDLE_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    http_idle_timeout: Duration,
    /// Open connections at most; more are refused at once with 503.
    #[arg(long, env = "ZCBOT_HTTP_MAX_CONNECTIONS", default_value = "1024", value_parser = int::<usize>(1, 1_000_000))]
    http_max_connections: usize,
}

// Where and how tool calls run.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Executor")]
struct ExecArgs {
    /// Where shell and run_python run: host (development only) or docker.
    #[arg(long, env = "ZCBOT_SANDBOX_BACKEND", default_value = "host", value_parser = one_of(&[("host", Backend::Host), ("docker", Backend::Docker)]))]
    backend: Backend,
    /// How process calls reach the sandbox: channel or exec.
    #[arg(long, env = "ZCBOT_EXEC_TRANSPORT", default_value = "channel", value_parser = one_of(&[("exec", Transport::Exec), ("channel", Transport::Channel)]))]
    transport: Transport,
    /// A call's timeout when the caller gives none.
    #[arg(long, env = "ZCBOT_EXEC_TIMEOUT", default_value = "120s", value_parser = positive_duration)]
    exec_timeout: Duration,
    /// The longest timeout a caller may ask for.
    #[arg(long, env = "ZCBOT_EXEC_TIMEOUT_MAX", default_value = "600s", value_parser = positive_duration)]
    exec_timeout_max: Duration,
    /// Bytes kept per output stream, head and tail.
    #[arg(long, env = "ZCBOT_OUTPUT_CAP", default_value = "1MiB", value_parser = bytes::<usize>(1024))]
    output_cap: usize,
    /// Time between SIGTERM and SIGKILL when a call is stopped.
    #[arg(long, env = "ZCBOT_KILL_GRACE", default_value = "500ms", value_parser = positive_duration)]
    kill_grace: Duration,
    /// Python sessions one user may have at once.
    #[arg(long, env = "ZCBOT_PYTHON_SESSIONS_MAX", default_value = "4", value_parser = int::<usize>(1, 64))]
    python_sessions_max: usize,
    /// A Python session that ran no code this long is ended.
    #[arg(long, env = "ZCBOT_PYTHON_SESSION_IDLE", default_value = "30m", value_parser = positive_duration)]
    python_session_idle: Duration,
    /// Background jobs one user may have running at once.
    #[arg(long, env = "ZCBOT_USER_MAX_JOBS", default_value = "4", value_parser = int::<usize>(1, 256))]
    user_max_jobs: usize,
    /// A background job's default and longest timeout.
    #[arg(long, env = "ZCBOT_JOB_TIMEOUT", default_value = "24h", value_parser = positive_duration)]
    job_timeout: Duration,
}

/// The `uid:gid` pair of `ZCBOT_SANDBOX_UID`.
#[derive(Debug, Clone, Copy)]
struct UidGid(u32, u32);

/// A parsed `ZCBOT_PG_IPS` or `ZCBOT_SANDBOX_BLOCK_CIDRS` (a newtype: clap reads a bare `Vec` as
/// a repeated flag).
#[derive(Debug, Clone)]
struct CidrList(Vec<IpNet>);

/// One setting as declared: what RUN.md documents and what `serve` takes as a flag.
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    /// The environment variable, e.g. `ZCBOT_SANDBOX_IDLE`.
    pub name: &'static str,
    /// The flag of `serve`, without its dashes, e.g. `idle`.
    pub flag: &'static str,
    /// The default as an operator writes it; `None` when unset means "none" or the engine's own.
    pub default: Option<&'static str>,
    /// A secret: `serve` refuses it as a flag, which any host account could read in `ps`.
    pub env_only: bool,
    /// The clap id, to ask the matches where a value came from.
    id: &'static str,
}

/// The declaration as a clap command, built once: the source of [`variables`].
static DECLARED: LazyLock<Vec<Variable>> = LazyLock::new(|| {
    let cmd = Settings::augment_args(clap::Command::new("zcbot-sandbox"));
    // Built once per process from string literals: leaking them gives the `'static` names that
    // `Error::Config` carries.
    let leak = |s: &str| -> &'static str { Box::leak(s.to_owned().into_boxed_str()) };
    cmd.get_arguments()
        .filter_map(|a| {
            let name = a.get_env()?.to_str()?;
            Some(Variable {
                name: leak(name),
                flag: leak(a.get_long()?),
                default: a
                    .get_default_values()
                    .first()
                    .and_then(|d| d.to_str())
                    .map(leak),
                env_only: a.is_hide_set(),
                id: leak(a.get_id().as_str()),
            })
        })
        .collect()
});

/// Every setting the configuration reads, in declaration order, from the clap declaration itself
/// (a test holds RUN.md's table to it both ways).
pub fn variables() -> &'static [Variable] {
    &DECLARED
}

/// The declaration as a command that reads no environment: clap's `env` reads the process
/// environment when the argument is built, which [`Config::from_lookup`] must never do. The
/// variable goes into the help instead.
fn without_env(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|a| {
        let Some(var) = a.get_env().and_then(|e| e.to_str()).map(str::to_owned) else {
            return a;
        };
        let help = a.get_help().map(ToString::to_string).unwrap_or_default();
        a.env(None).help(format!("{help} [env: {var}]"))
    })
}

impl Config {
    /// Reads and validates every variable from the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads and validates every variable through `get` (tests pass a map here); the process
    /// environment is never read, so a stray variable cannot change a test's config.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        Self::parse(|_| None, get)
    }

    /// Adds every setting to `cmd` as a flag (`serve` uses it): `--idle 90s` for
    /// `ZCBOT_SANDBOX_IDLE`, and so on; the help shows each one's variable and default.
    pub fn flags(cmd: clap::Command) -> clap::Command {
        without_env(Settings::augment_args(cmd))
    }

    /// Reads the process environment, with the flags given in `matches` (of a command made with
    /// [`Config::flags`]) taking precedence over their variables.
    pub fn from_env_and_flags(matches: &ArgMatches) -> Result<Self> {
        let given = |v: &Variable| -> Option<OsString> {
            if matches.value_source(v.id) != Some(ValueSource::CommandLine) {
                return None;
            }
            matches.get_raw(v.id)?.next().map(ToOwned::to_owned)
        };
        if let Some(secret) = variables()
            .iter()
            .find(|v| v.env_only && given(v).is_some())
        {
            return Err(Error::Config {
                var: secret.name,
                value: "(hidden)".into(),
                reason: format!(
                    "a flag shows the secret to every host account in ps: set the variable {} \
                     instead of --{}",
                    secret.name, secret.flag
                ),
            });
        }
        Self::parse(given, |k| std::env::var(k).ok())
    }

    /// One parse for every source: each setting takes its flag if `flag` has one, else its
    /// variable (trimmed; empty counts as unset), else its default; then the checks that span
    /// several settings.
    fn parse(
        flag: impl Fn(&Variable) -> Option<OsString>,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        let mut argv = Vec::new();
        for v in variables() {
            let value = flag(v).or_else(|| {
                get(v.name)
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .map(OsString::from)
            });
            if let Some(value) = value {
                // `--flag=value`, so a value starting with '-' is a value, not a flag.
                let mut arg = OsString::from(format!("--{}=", v.flag));
                arg.push(value);
                argv.push(arg);
            }
        }
        let cmd = without_env(Settings::augment_args(
            clap::Command::new("zcbot-sandbox").no_binary_name(true),
        ));
        let matches = cmd.try_get_matches_from(argv).map_err(config_error)?;
        let settings = Settings::from_arg_matches(&matches).map_err(config_error)?;
        settings.check()
    }

    /// The engine address used for connecting and quoted in errors.
    pub fn docker_host_display(&self) -> String {
        self.docker_host
            .clone()
            .unwrap_or_else(|| "unix:///var/run/docker.sock".to_owned())
    }
}

impl Settings {
    /// The checks that span several settings, then the public shape.
    fn check(self) -> Result<Config> {
        let Settings {
            engine,
            sandbox,
            network,
            files,
            http,
            exec,
        } = self;
        let UidGid(uid, gid) = sandbox.uid;
        if exec.exec_timeout > exec.exec_timeout_max {
            return Err(Error::Config {
                var: "ZCBOT_EXEC_TIMEOUT",
                value: humantime::format_duration(exec.exec_timeout).to_string(),
                reason: "must not be longer than ZCBOT_EXEC_TIMEOUT_MAX".into(),
            });
        }
        if sandbox.runtime == Runtime::Runsc && sandbox.seccomp == Seccomp::Default {
            // gVisor applies every SCMP_ACT_ERRNO rule as EPERM: the engine's profile answers
            // clone3 with EPERM instead of its ENOSYS, and glibc then cannot start a thread.
            return Err(Error::Config {
                var: "ZCBOT_SECCOMP",
                value: "default".into(),
                reason: "under ZCBOT_SANDBOX_RUNTIME=runsc the engine's profile breaks every \
                         thread (gVisor turns its clone3 rule into EPERM): use zcbot"
                    .into(),
            });
        }
        if sandbox.uid_range.contains(uid) {
            // The old single owner's folders would look like some tenant's own.
            return Err(Error::Config {
                var: "ZCBOT_SANDBOX_UID_RANGE",
                value: sandbox.uid_range.to_string(),
                reason: format!("must not hold ZCBOT_SANDBOX_UID ({uid})"),
            });
        }
        let listen = http.listen.check(http.api_token.is_some())?;
        let egress_allow = network.egress_allow.map(|l| l.0).unwrap_or_default();
        match network.egress {
            Egress::Allowlist if egress_allow.is_empty() => {
                return Err(Error::Config {
                    var: "ZCBOT_EGRESS_ALLOW",
                    value: String::new(),
                    reason: "ZCBOT_SANDBOX_EGRESS=allowlist needs at least one host pattern \
                             (e.g. pypi.org,files.pythonhosted.org); for no network at all use \
                             ZCBOT_SANDBOX_EGRESS=none"
                        .into(),
                })
            }
            Egress::None | Egress::Public if !egress_allow.is_empty() => {
                return Err(Error::Config {
                    var: "ZCBOT_EGRESS_ALLOW",
                    value: egress_allow
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                    reason: format!(
                        "is only read with ZCBOT_SANDBOX_EGRESS=allowlist, and the mode is {}: \
                         set the mode or unset the list",
                        network.egress.as_str()
                    ),
                })
            }
            _ => {}
        }
        let egress_network = network
            .egress_network
            .unwrap_or_else(|| format!("{}-egress", network.network));
        if egress_network == network.network {
            return Err(Error::Config {
                var: "ZCBOT_EGRESS_NETWORK",
                value: egress_network,
                reason: "must not be the sandbox network (ZCBOT_SANDBOX_NETWORK): the proxy's \
                         outbound side needs a network of its own"
                    .into(),
            });
        }
        if http
            .api_token
            .as_ref()
            .is_some_and(|t| t.expose_secret().len() < 16)
        {
            return Err(Error::Config {
                var: "ZCBOT_API_TOKEN",
                value: "(hidden)".into(),
                reason: "must be at least 16 characters".into(),
            });
        }
        Ok(Config {
            image: engine.image,
            users_root: files.users_root,
            state_dir: files.state_dir,
            network: network.network,
            pool_id: engine.pool_id,
            idle: sandbox.idle,
            reap_every: sandbox.reap_every,
            pause_after: Some(sandbox.pause_after).filter(|d| !d.is_zero()),
            memory_bytes: sandbox.memory_bytes,
            cpus: sandbox.cpus,
            pids: sandbox.pids,
            tmpfs_bytes: sandbox.tmpfs_bytes,
            uid,
            gid,
            uid_range: sandbox.uid_range,
            disk_bytes: sandbox.disk_bytes,
            require_disk_quota: sandbox.require_disk_quota,
            file_timeout: files.file_timeout,
            file_max_entries: files.file_max_entries,
            file_workers: files.file_workers,
            max_file: files.max_file,
            transfer_timeout: files.transfer_timeout,
            http_header_timeout: http.http_header_timeout,
            http_body_timeout: http.http_body_timeout,
            http_idle_timeout: http.http_idle_timeout,
            http_max_connections: http.http_max_connections,
            max_containers: sandbox.max_containers,
            spares: sandbox.spares,
            pg_ips: network.pg_ips.map(|l| l.0).unwrap_or_default(),
            block_cidrs: network.block_cidrs.map(|l| l.0).unwrap_or_default(),
            docker_host: engine.docker_host,
            docker_timeout: engine.docker_timeout,
            start_timeout: engine.start_timeout,
            backend: exec.backend,
            transport: exec.transport,
            exec_timeout: exec.exec_timeout,
            exec_timeout_max: exec.exec_timeout_max,
            output_cap: exec.output_cap,
            kill_grace: exec.kill_grace,
            python_sessions_max: exec.python_sessions_max,
            python_session_idle: exec.python_session_idle,
            user_max_jobs: exec.user_max_jobs,
            job_timeout: exec.job_timeout,
            listen,
            api_token: http.api_token,
            max_body: http.max_body,
            user_max_calls: http.user_max_calls,
            shutdown_grace: http.shutdown_grace,
            require_host_firewall: network.require_host_firewall,
            self_check: network.self_check,
            egress: network.egress,
            egress_allow,
            egress_network,
            egress_resolve: network.egress_resolve.map(|l| l.0).unwrap_or_default(),
            egress_image: network.egress_image,
            egress_user_connections: network.egress_user_connections,
            container_rules: network.container_rules,
            runtime: sandbox.runtime,
            seccomp: sandbox.seccomp,
        })
    }
}

/// A clap error as the library's: the variable of the argument that failed, its value, and what
/// a good value looks like (the value parser's message).
fn config_error(err: clap::Error) -> Error {
    use clap::error::{ContextKind, ContextValue};
    let context = |kind| match err.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    // The argument reads `--flag <NAME>`.
    let var = context(ContextKind::InvalidArg)
        .and_then(|arg| {
            let flag = arg
                .split_whitespace()
                .next()?
                .strip_prefix("--")?
                .to_owned();
            variables().iter().find(|v| v.flag == flag).map(|v| v.name)
        })
        .unwrap_or("configuration");
    let secret = variables().iter().any(|v| v.name == var && v.env_only);
    let value = if secret {
        "(hidden)".to_owned()
    } else {
        context(ContextKind::InvalidValue).unwrap_or_default()
    };
    let reason = match std::error::Error::source(&err) {
        Some(source) => source.to_string(),
        None => err.kind().to_string(),
    };
    Error::Config { var, value, reason }
}

// ---------------------------------------------------------------------------------------------
// Value parsers: each takes the text (trimmed) and says what a good value looks like.
// ---------------------------------------------------------------------------------------------

fn parse_image(v: &str) -> std::result::Result<String, String> {
    let v = v.trim();
    if v.chars().any(char::is_whitespace) {
        Err("an image reference has no spaces".into())
    } else {
        Ok(v.to_owned())
    }
}

fn parse_docker_host(v: &str) -> std::result::Result<String, String> {
    Ok(v.trim().to_owned())
}

fn parse_token(v: &str) -> std::result::Result<SecretString, std::convert::Infallible> {
    // The length is checked with the other settings, where the error can hide the value.
    Ok(SecretString::from(v.trim()))
}

fn parse_seccomp(v: &str) -> std::result::Result<Seccomp, String> {
    match v.trim() {
        "zcbot" => Ok(Seccomp::Zcbot),
        "default" => Ok(Seccomp::Default),
        _ => Err(
            "must be zcbot (this project's profile) or default (the engine's): \
                  nothing turns seccomp off"
                .into(),
        ),
    }
}

fn parse_network(v: &str) -> std::result::Result<String, String> {
    docker_name(v.trim(), 56).map(str::to_owned)
}

/// One of a few words, for the settings that choose: "must be auto, host or entry" otherwise.
fn one_of<T>(
    choices: &'static [(&'static str, T)],
) -> impl Fn(&str) -> std::result::Result<T, String> + Clone
where
    T: Copy + Send + Sync + 'static,
{
    move |v: &str| {
        let v = v.trim();
        if let Some((_, value)) = choices.iter().find(|(word, _)| *word == v) {
            return Ok(*value);
        }
        let words: Vec<&str> = choices.iter().map(|(word, _)| *word).collect();
        let (last, rest) = words.split_last().expect("a choice has words");
        Err(format!("must be {} or {last}", rest.join(", ")))
    }
}

fn parse_bool(v: &str) -> std::result::Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" => Ok(false),
        _ => Err("must be 1 or 0".into()),
    }
}

/// `ZCBOT_LISTEN` as written, a host name already resolved: which address to bind is decided
/// with the token in view ([`ListenSpec::check`]).
#[derive(Debug, Clone)]
enum ListenSpec {
    /// `HOST:PORT` as written, and every address it resolves to (one for an IP).
    Tcp(String, Vec<std::net::SocketAddr>),
    /// A unix socket path.
    Unix(PathBuf),
}

impl ListenSpec {
    /// The address to bind: the first IPv4 one a name resolves to, else its first. Every address
    /// the name resolves to must be loopback unless a token is set: the same name may resolve
    /// otherwise tomorrow, or for the client.
    fn check(self, token: bool) -> Result<Listen> {
        let (text, addrs) = match self {
            ListenSpec::Unix(path) => return Ok(Listen::Unix(path)),
            ListenSpec::Tcp(text, addrs) => (text, addrs),
        };
        if let Some(open) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            if !token {
                return Err(Error::Config {
                    var: "ZCBOT_LISTEN",
                    value: text,
                    reason: format!(
                        "anyone who reaches the API can run code as any user: listening beyond \
                         loopback ({} is not loopback) needs ZCBOT_API_TOKEN",
                        open.ip()
                    ),
                });
            }
        }
        let first = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .expect("a resolved name has an address");
        Ok(Listen::Tcp(first))
    }
}

fn parse_listen(v: &str) -> std::result::Result<ListenSpec, String> {
    let v = v.trim();
    if let Some(path) = v.strip_prefix("unix:") {
        return parse_abs_path(path).map(ListenSpec::Unix);
    }
    if v.starts_with('/') {
        return parse_abs_path(v).map(ListenSpec::Unix);
    }
    const HOW: &str = "write HOST:PORT (127.0.0.1:8787, [::1]:8787 or localhost:8787) or a unix \
                       socket path";
    if let Ok(addr) = v.parse::<std::net::SocketAddr>() {
        return Ok(ListenSpec::Tcp(v.to_owned(), vec![addr]));
    }
    let (host, port) = v.rsplit_once(':').ok_or(HOW)?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("bad port {port:?}: {HOW}"))?;
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == ':') {
        return Err(HOW.into());
    }
    let addrs: Vec<_> = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .map_err(|e| format!("the host name {host} does not resolve ({e}): {HOW}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!(
            "the host name {host} resolves to no address: {HOW}"
        ));
    }
    Ok(ListenSpec::Tcp(v.to_owned(), addrs))
}

/// How a duration is written: the one rule, for every message that refuses one.
pub const DURATION_SPELLING: &str =
    "seconds (30, 0.5) or a number with a unit (500ms, 90s, 2m, 1h 30m)";

/// Every duration the program reads, the variables, the CLI's flags and the API's `timeout`
/// alike: a bare number is seconds (`30`, `0.5`), else humantime's spelling (`500ms`, `90s`,
/// `2m`, `1h 30m`). One function, so `30` cannot mean seconds in one place and an error in
/// another. Zero parses; whoever cannot use it says so.
pub fn parse_duration(v: &str) -> std::result::Result<Duration, String> {
    let v = v.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let secs: f64 = v
            .parse()
            .map_err(|_| format!("write {DURATION_SPELLING}"))?;
        return Duration::try_from_secs_f64(secs).map_err(|_| format!("{v} seconds is too long"));
    }
    humantime::parse_duration(v).map_err(|e| format!("{e}: write {DURATION_SPELLING}"))
}

/// A setting's duration ([`parse_duration`]), never zero.
fn positive_duration(v: &str) -> std::result::Result<Duration, String> {
    let d = parse_duration(v)?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

/// A duration, or `0` for off (zero).
fn parse_duration_or_off(v: &str) -> std::result::Result<Duration, String> {
    if v.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    positive_duration(v)
}

fn parse_abs_path(v: &str) -> std::result::Result<PathBuf, String> {
    let p = PathBuf::from(v.trim());
    if !p.is_absolute() {
        return Err("must be an absolute path".into());
    }
    if p.components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err("must not contain '..'".into());
    }
    Ok(p)
}

/// A whole number from `min` to `max`, as the field's type.
fn int<T>(min: i64, max: i64) -> impl Fn(&str) -> std::result::Result<T, String> + Clone
where
    T: TryFrom<i64> + Clone + Send + Sync + 'static,
{
    move |v: &str| {
        let hint = || format!("must be a whole number from {min} to {max}");
        let n: i64 = v.trim().parse().map_err(|_| hint())?;
        if !(min..=max).contains(&n) {
            return Err(hint());
        }
        T::try_from(n).map_err(|_| hint())
    }
}

/// The one size parser, for every size setting, as the field's type, at least `min` bytes.
fn bytes<T>(min: u64) -> impl Fn(&str) -> std::result::Result<T, String> + Clone
where
    T: TryFrom<u64> + Clone + Send + Sync + 'static,
{
    move |v: &str| {
        let n = parse_bytes(v, min)?;
        T::try_from(n).map_err(|_| "too large".to_owned())
    }
}

/// Sizes follow Docker's convention: a bare number is bytes, and every unit is binary
/// (k = KiB = KB = 1024 bytes; likewise m, g). At most `i64::MAX`, what the engine takes.
fn parse_bytes(v: &str, min: u64) -> std::result::Result<u64, String> {
    let hint = "write a size such as 512MiB, 512m, 1g or 1073741824";
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().map_err(|_| hint.to_owned())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(hint.to_owned()),
    };
    let bytes = n
        .checked_mul(mult)
        .filter(|&b| i64::try_from(b).is_ok())
        .ok_or_else(|| "too large".to_owned())?;
    if bytes < min {
        return Err(format!("must be at least {min} bytes"));
    }
    Ok(bytes)
}

fn parse_cpus(v: &str) -> std::result::Result<f64, String> {
    let cpus: f64 = v
        .trim()
        .parse()
        .map_err(|_| "must be a number of cores such as 0.5 or 2".to_owned())?;
    let host = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    if !(0.01..=host).contains(&cpus) {
        return Err(format!(
            "must be from 0.01 to {host} (this host's core count)"
        ));
    }
    Ok(cpus)
}

fn parse_uid_gid(v: &str) -> std::result::Result<UidGid, String> {
    let hint = "write UID:GID such as 1000:1000 (root, uid 0, is refused)";
    let v = v.trim();
    let (u, g) = v.split_once(':').unwrap_or((v, v));
    let uid: u32 = u.parse().map_err(|_| hint.to_owned())?;
    let gid: u32 = g.parse().map_err(|_| hint.to_owned())?;
    if uid == 0 || gid == 0 {
        return Err(hint.to_owned());
    }
    Ok(UidGid(uid, gid))
}

fn parse_uid_range(v: &str) -> std::result::Result<UidRange, String> {
    let hint = "write FIRST-LAST such as 200000-299999 (ids no host account uses, above 65535)";
    let (a, b) = v.trim().split_once('-').ok_or_else(|| hint.to_owned())?;
    let first: u32 = a.trim().parse().map_err(|_| hint.to_owned())?;
    let last: u32 = b.trim().parse().map_err(|_| hint.to_owned())?;
    // Below 65536 live the distribution's and the site's accounts (and nobody, 65534);
    // u32::MAX is the kernel's "no id" and must never be handed out.
    if first < 65_536 || last < first || last == u32::MAX {
        return Err(hint.to_owned());
    }
    Ok(UidRange { first, last })
}

/// A byte count as an operator writes it (`1 GiB`, `512 MiB`, `1000 bytes`).
pub fn format_bytes(n: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= size && n.is_multiple_of(size) {
            return format!("{} {unit}", n / size);
        }
    }
    format!("{n} bytes")
}

fn parse_pool_id(v: &str) -> std::result::Result<String, String> {
    let v = v.trim();
    let ok = !v.is_empty()
        && v.len() <= 32
        && v.as_bytes()[0].is_ascii_alphanumeric()
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(v.to_owned())
    } else {
        Err("1 to 32 characters of a-z, 0-9 and '-', starting with a letter or digit".into())
    }
}

fn docker_name(v: &str, max: usize) -> std::result::Result<&str, String> {
    let ok = !v.is_empty()
        && v.len() <= max
        && v.as_bytes()[0].is_ascii_alphanumeric()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(v)
    } else {
        Err(format!(
            "1 to {max} characters of letters, digits, '_', '.' and '-', starting with a letter or digit"
        ))
    }
}

/// A list of addresses or CIDR ranges, comma or space separated; a bare address is one host.
/// `ZCBOT_EGRESS_ALLOW`'s patterns.
#[derive(Debug, Clone)]
struct AllowList(Vec<Pattern>);

fn parse_allow(v: &str) -> std::result::Result<AllowList, String> {
    zcbot_egress::pattern::parse_list(v)
        .map(AllowList)
        .map_err(|e| e.to_string())
}

/// `ZCBOT_EGRESS_RESOLVE`'s pairs.
#[derive(Debug, Clone)]
struct ResolveList(Vec<(String, IpAddr)>);

fn parse_resolve(v: &str) -> std::result::Result<ResolveList, String> {
    let mut out = Vec::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, ip) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not name=ip"))?;
        let name = zcbot_egress::pattern::normalize_host(name.trim())
            .map_err(|e| format!("{item:?}: {e}"))?;
        let ip: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("{item:?}: {:?} is not an IP address", ip.trim()))?;
        out.push((name, ip));
    }
    if out.len() > 256 {
        return Err("at most 256 name=ip pairs".into());
    }
    Ok(ResolveList(out))
}

fn parse_cidr_list(v: &str) -> std::result::Result<CidrList, String> {
    v.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .map(|n| n.trunc())
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{s:?} is neither an IP address nor a CIDR range"))
        })
        .collect::<std::result::Result<_, _>>()
        .map(CidrList)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn every_default_is_the_documented_value() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.image, "zcbot-sandbox:latest");
        assert_eq!(c.users_root, PathBuf::from("/var/lib/zcbot-sandbox/users"));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/zcbot-sandbox/state"));
        assert_eq!(c.network, "zcbot-sandbox-net");
        assert_eq!(c.pool_id, "default");
        assert_eq!(c.idle, secs(300));
        assert_eq!(c.reap_every, secs(60));
        assert_eq!(c.pause_after, Some(secs(60)));
        assert_eq!(c.memory_bytes, 512 << 20);
        assert_eq!(c.cpus, 1.0);
        assert_eq!(c.pids, 256);
        assert_eq!(c.tmpfs_bytes, 64 << 20);
        assert_eq!((c.uid, c.gid), (1000, 1000));
        assert_eq!(
            c.uid_range,
            UidRange {
                first: 200_000,
                last: 299_999
            }
        );
        assert_eq!(c.disk_bytes, 1 << 30);
        assert!(!c.require_disk_quota);
        assert_eq!(c.file_timeout, secs(30));
        assert_eq!((c.max_file, c.transfer_timeout), (256 << 20, secs(600)));
        assert_eq!(c.file_max_entries, 1_000_000);
        assert_eq!(c.file_workers, 8);
        assert_eq!(c.http_header_timeout, secs(10));
        assert_eq!(c.http_body_timeout, secs(30));
        assert_eq!(c.http_idle_timeout, secs(60));
        assert_eq!(c.http_max_connections, 1024);
        assert_eq!(c.max_containers, 100);
        assert_eq!(c.spares, 2);
        assert!(c.pg_ips.is_empty() && c.block_cidrs.is_empty());
        assert_eq!(c.docker_host, None);
        assert_eq!(c.docker_host_display(), "unix:///var/run/docker.sock");
        assert_eq!(c.docker_timeout, secs(30));
        assert_eq!(c.start_timeout, secs(30));
        assert_eq!(c.backend, Backend::Host);
        assert_eq!(c.transport, Transport::Channel);
        assert_eq!(c.exec_timeout, secs(120));
        assert_eq!(c.exec_timeout_max, secs(600));
        assert_eq!(c.output_cap, 1 << 20);
        assert_eq!(c.kill_grace, Duration::from_millis(500));
        assert_eq!(
            (c.python_sessions_max, c.python_session_idle),
            (4, secs(1800))
        );
        assert_eq!((c.user_max_jobs, c.job_timeout), (4, secs(86_400)));
        assert_eq!(c.listen, Listen::Tcp("127.0.0.1:8787".parse().unwrap()));
        assert!(c.api_token.is_none());
        assert_eq!(c.max_body, 4 << 20);
        assert_eq!(c.user_max_calls, 4);
        assert_eq!(c.shutdown_grace, secs(30));
        assert!(!c.require_host_firewall);
        assert!(c.self_check);
        assert_eq!(c.egress, Egress::None);
        assert_eq!(c.container_rules, RulesSetting::Auto);
        assert_eq!(c.runtime, Runtime::Runc);
        assert_eq!(c.seccomp, Seccomp::Zcbot);
        assert_eq!(format_bytes(c.disk_bytes), "1 GiB");
    }

    #[test]
    fn the_allowlist_mode_needs_its_list_and_only_it_reads_one() {
        let c = cfg(&[
            ("ZCBOT_SANDBOX_EGRESS", "allowlist"),
            ("ZCBOT_EGRESS_ALLOW", " pypi.org, *.pythonhosted.org:443 "),
            ("ZCBOT_EGRESS_RESOLVE", "site.test=172.30.0.5"),
        ])
        .unwrap();
        assert_eq!(c.egress, Egress::Allowlist);
        let allow: Vec<String> = c.egress_allow.iter().map(ToString::to_string).collect();
        assert_eq!(allow, ["pypi.org", "*.pythonhosted.org:443"]);
        assert_eq!(c.egress_network, "zcbot-sandbox-net-egress");
        assert_eq!(c.network_name(), "zcbot-sandbox-net");
        assert_eq!(
            c.egress_resolve,
            [("site.test".to_owned(), "172.30.0.5".parse().unwrap())]
        );
        for (vars, says) in [
            (
                &[("ZCBOT_SANDBOX_EGRESS", "allowlist")][..],
                "needs at least one host pattern",
            ),
            (
                &[("ZCBOT_EGRESS_ALLOW", "pypi.org")][..],
                "only read with ZCBOT_SANDBOX_EGRESS=allowlist",
            ),
            (
                &[
                    ("ZCBOT_SANDBOX_EGRESS", "allowlist"),
                    ("ZCBOT_EGRESS_ALLOW", "10.0.0.1"),
                ][..],
                "ZCBOT_EGRESS_ALLOW",
            ),
            (
                &[
                    ("ZCBOT_SANDBOX_EGRESS", "allowlist"),
                    ("ZCBOT_EGRESS_ALLOW", "a.org"),
                    ("ZCBOT_EGRESS_NETWORK", "zcbot-sandbox-net"),
                ][..],
                "must not be the sandbox network",
            ),
            (
                &[("ZCBOT_EGRESS_RESOLVE", "site.test")][..],
                "is not name=ip",
            ),
        ] {
            let err = cfg(vars).unwrap_err().to_string();
            assert!(err.contains(says), "{vars:?}: {err}");
        }
    }

    #[test]
    fn the_declaration_lists_every_variable_once_with_a_flag() {
        let vars = variables();
        assert_eq!(vars.len(), 58, "{vars:?}");
        let mut names: Vec<_> = vars.iter().map(|v| v.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), vars.len(), "a variable is declared twice");
        let idle = vars
            .iter()
            .find(|v| v.name == "ZCBOT_SANDBOX_IDLE")
            .unwrap();
        assert_eq!((idle.flag, idle.default), ("idle", Some("5m")));
        let host = vars.iter().find(|v| v.name == "DOCKER_HOST").unwrap();
        assert_eq!(host.default, None);
    }

    #[test]
    fn the_token_never_prints() {
        let token = "0123456789abcdef-TOKENVALUE";
        let c = cfg(&[("ZCBOT_LISTEN", "0.0.0.0:9000"), ("ZCBOT_API_TOKEN", token)]).unwrap();
        assert_eq!(c.api_token.as_ref().map(|t| t.expose_secret()), Some(token));
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains(token), "{shown}");
        assert!(shown.contains("REDACTED"), "{shown}");
    }

    #[test]
    fn listening_beyond_loopback_needs_a_token() {
        let err = cfg(&[("ZCBOT_LISTEN", "0.0.0.0:8787")]).unwrap_err();
        assert!(err.to_string().contains("ZCBOT_API_TOKEN"), "{err}");
        let c = cfg(&[("ZCBOT_LISTEN", "unix:/run/zcbot.sock")]).unwrap();
        assert_eq!(c.listen, Listen::Unix("/run/zcbot.sock".into()));
        let c = cfg(&[("ZCBOT_LISTEN", "/run/zcbot.sock")]).unwrap();
        assert_eq!(c.listen, Listen::Unix("/run/zcbot.sock".into()));
        let err = cfg(&[("ZCBOT_API_TOKEN", "short")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ZCBOT_API_TOKEN") && !err.contains("short"),
            "{err}"
        );
    }

    #[test]
    fn a_host_name_is_resolved_and_every_address_it_has_must_be_loopback_without_a_token() {
        let c = cfg(&[("ZCBOT_LISTEN", "localhost:8913")]).unwrap();
        assert_eq!(c.listen, Listen::Tcp("127.0.0.1:8913".parse().unwrap()));
        let err = cfg(&[("ZCBOT_LISTEN", "no-such-host.invalid:8913")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ZCBOT_LISTEN") && err.contains("does not resolve"),
            "{err}"
        );
        for bad in ["localhost", "localhost:http", ":8913"] {
            let err = cfg(&[("ZCBOT_LISTEN", bad)]).unwrap_err().to_string();
            assert!(err.contains("HOST:PORT"), "{bad}: {err}");
        }
        // A name with one address beyond loopback needs the token, whichever address is bound.
        let addrs = vec![
            "127.0.0.1:8913".parse().unwrap(),
            "10.1.2.3:8913".parse().unwrap(),
        ];
        let spec = ListenSpec::Tcp("both:8913".into(), addrs);
        let err = spec.clone().check(false).unwrap_err().to_string();
        assert!(
            err.contains("10.1.2.3") && err.contains("ZCBOT_API_TOKEN"),
            "{err}"
        );
        assert_eq!(
            spec.check(true).unwrap(),
            Listen::Tcp("127.0.0.1:8913".parse().unwrap())
        );
        let v6_first = vec!["[::1]:1".parse().unwrap(), "127.0.0.1:1".parse().unwrap()];
        assert_eq!(
            ListenSpec::Tcp("l:1".into(), v6_first)
                .check(false)
                .unwrap(),
            Listen::Tcp("127.0.0.1:1".parse().unwrap())
        );
    }

    #[test]
    fn uid_inside_the_tenant_range_is_refused() {
        let err = cfg(&[
            ("ZCBOT_SANDBOX_UID", "250000"),
            ("ZCBOT_SANDBOX_UID_RANGE", "200000-299999"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("ZCBOT_SANDBOX_UID_RANGE") && err.contains("250000"),
            "{err}"
        );
    }

    #[test]
    fn durations_in_their_spellings() {
        for (text, want) in [
            ("90s", secs(90)),
            ("5m", secs(300)),
            ("1h", secs(3600)),
            ("1h 30m", secs(5400)),
            ("250ms", Duration::from_millis(250)),
            (" 2m ", secs(120)),
            // A bare number is seconds, as the API's timeout always took it.
            ("30", secs(30)),
            ("0.5", Duration::from_millis(500)),
        ] {
            let c = cfg(&[("ZCBOT_SANDBOX_IDLE", text)]).unwrap();
            assert_eq!(c.idle, want, "{text:?}");
        }
        // 0 turns pausing off; any other zero is still refused.
        let c = cfg(&[("ZCBOT_SANDBOX_PAUSE_AFTER", "0")]).unwrap();
        assert_eq!(c.pause_after, None);
        let c = cfg(&[("ZCBOT_SANDBOX_PAUSE_AFTER", "5m")]).unwrap();
        assert_eq!(c.pause_after, Some(secs(300)));
        assert!(cfg(&[("ZCBOT_SANDBOX_PAUSE_AFTER", "0s")]).is_err());
        for bad in ["30x", "1e3", "-5", "1.2.3", "99999999999999999999999"] {
            let err = cfg(&[("ZCBOT_SANDBOX_IDLE", bad)]).unwrap_err().to_string();
            assert!(
                err.contains("ZCBOT_SANDBOX_IDLE") && err.contains("too long")
                    || err.contains(DURATION_SPELLING),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn sizes_in_their_spellings_are_binary() {
        for (text, want) in [
            ("1073741824", 1u64 << 30),
            ("1g", 1 << 30),
            ("1G", 1 << 30),
            ("1GiB", 1 << 30),
            ("1gb", 1 << 30),
            ("512m", 512 << 20),
            ("512 MiB", 512 << 20),
            ("65536k", 64 << 20),
            ("67108864b", 64 << 20),
        ] {
            let c = cfg(&[("ZCBOT_SANDBOX_DISK", text)]).unwrap();
            assert_eq!(c.disk_bytes, want, "{text:?}");
        }
        // The same parser serves every size setting.
        let c = cfg(&[
            ("ZCBOT_SANDBOX_MEMORY", "1g"),
            ("ZCBOT_SANDBOX_TMPFS_SIZE", "16m"),
            ("ZCBOT_OUTPUT_CAP", "64KiB"),
            ("ZCBOT_MAX_BODY", "2048"),
        ])
        .unwrap();
        assert_eq!(c.memory_bytes, 1 << 30);
        assert_eq!(c.tmpfs_bytes, 16 << 20);
        assert_eq!(c.output_cap, 64 << 10);
        assert_eq!(c.max_body, 2048);
    }

    #[test]
    fn parses_the_other_kinds() {
        let c = cfg(&[
            ("ZCBOT_SANDBOX_UID", "1234"),
            ("ZCBOT_SANDBOX_UID_RANGE", "300000-300099"),
            ("ZCBOT_PG_IPS", "10.1.2.3, fd00::5"),
            ("ZCBOT_SANDBOX_BLOCK_CIDRS", "203.0.113.7/24 2001:db8::/32"),
            ("ZCBOT_SANDBOX_MAX", ""),
            ("ZCBOT_SANDBOX_PIDS", "   "),
            ("ZCBOT_SANDBOX_CPUS", "0.5"),
            ("ZCBOT_REQUIRE_DISK_QUOTA", "yes"),
            ("ZCBOT_SELF_CHECK", "0"),
            ("ZCBOT_REQUIRE_HOST_FIREWALL", "TRUE"),
            ("ZCBOT_SANDBOX_BACKEND", "docker"),
            ("ZCBOT_EXEC_TRANSPORT", "exec"),
            ("ZCBOT_SANDBOX_EGRESS", "public"),
            ("ZCBOT_CONTAINER_RULES", "entry"),
            ("DOCKER_HOST", "tcp://10.0.0.9:2375"),
            ("ZCBOT_POOL_ID", "blue-2"),
            ("ZCBOT_SANDBOX_NETWORK", "my_net.1"),
            ("ZCBOT_FILE_MAX_ENTRIES", "500"),
        ])
        .unwrap();
        assert_eq!((c.uid, c.gid), (1234, 1234));
        assert_eq!(c.uid_range.to_string(), "300000-300099");
        assert_eq!(c.max_containers, 100, "empty means unset");
        assert_eq!(c.pids, 256, "blank means unset");
        assert_eq!(
            c.pg_ips,
            vec![
                "10.1.2.3/32".parse::<IpNet>().unwrap(),
                "fd00::5/128".parse().unwrap()
            ]
        );
        assert_eq!(c.block_cidrs[0], "203.0.113.0/24".parse::<IpNet>().unwrap());
        assert_eq!(c.cpus, 0.5);
        assert!(c.require_disk_quota && c.require_host_firewall && !c.self_check);
        assert_eq!(c.backend, Backend::Docker);
        assert_eq!(c.transport, Transport::Exec);
        assert_eq!(c.egress, Egress::Public);
        assert_eq!(c.network_name(), "my_net.1-public");
        assert_eq!(c.container_rules, RulesSetting::Entry);
        assert_eq!(c.docker_host.as_deref(), Some("tcp://10.0.0.9:2375"));
        assert_eq!(c.pool_id, "blue-2");
        assert_eq!(c.file_max_entries, 500);
    }

    #[test]
    fn seccomp_cannot_be_turned_off_and_gvisor_takes_only_our_profile() {
        let err = cfg(&[("ZCBOT_SECCOMP", "unconfined")]).unwrap_err();
        assert!(
            err.to_string().contains("nothing turns seccomp off"),
            "{err}"
        );
        let err = cfg(&[
            ("ZCBOT_SANDBOX_RUNTIME", "runsc"),
            ("ZCBOT_SECCOMP", "default"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("ZCBOT_SECCOMP"), "{err}");
        let c = cfg(&[("ZCBOT_SANDBOX_RUNTIME", "runsc")]).unwrap();
        assert_eq!((c.runtime, c.seccomp), (Runtime::Runsc, Seccomp::Zcbot));
        let c = cfg(&[("ZCBOT_SECCOMP", "default")]).unwrap();
        assert_eq!((c.runtime, c.seccomp), (Runtime::Runc, Seccomp::Default));
    }

    #[test]
    fn bad_values_name_the_variable_and_value() {
        for (var, value) in [
            ("ZCBOT_SANDBOX_IDLE", "soon"),
            ("ZCBOT_SANDBOX_IDLE", "0s"),
            ("ZCBOT_SANDBOX_MEMORY", "lots"),
            ("ZCBOT_SANDBOX_MEMORY", "1k"),
            ("ZCBOT_SANDBOX_MEMORY", "99999999999g"),
            ("ZCBOT_SANDBOX_MEMORY", "-1"),
            ("ZCBOT_SANDBOX_CPUS", "0"),
            ("ZCBOT_SANDBOX_CPUS", "9999"),
            ("ZCBOT_SANDBOX_PIDS", "-1"),
            ("ZCBOT_SANDBOX_UID", "0:0"),
            ("ZCBOT_SANDBOX_UID", "bob"),
            ("ZCBOT_SANDBOX_MAX", "0"),
            ("ZCBOT_SANDBOX_IMAGE", "two words"),
            ("ZCBOT_USERS_ROOT", "relative/dir"),
            ("ZCBOT_USERS_ROOT", "/srv/../etc"),
            ("ZCBOT_STATE_DIR", "state"),
            ("ZCBOT_SANDBOX_NETWORK", "bad name"),
            ("ZCBOT_POOL_ID", "Has.Dot"),
            ("ZCBOT_PG_IPS", "10.0.0.1,db.example"),
            ("ZCBOT_SANDBOX_BLOCK_CIDRS", "10.0.0.0/99"),
            ("ZCBOT_SANDBOX_BACKEND", "podman"),
            ("ZCBOT_EXEC_TRANSPORT", "pigeon"),
            ("ZCBOT_CONTAINER_RULES", "nobody"),
            ("ZCBOT_OUTPUT_CAP", "10"),
            ("ZCBOT_MAX_BODY", "1 TB"),
            ("ZCBOT_EXEC_TIMEOUT", "1h"),
            ("ZCBOT_LISTEN", "0.0.0.0:8787"),
            ("ZCBOT_LISTEN", "localhost"),
            ("ZCBOT_USER_MAX_CALLS", "0"),
            ("ZCBOT_SANDBOX_EGRESS", "open"),
            ("ZCBOT_SANDBOX_UID_RANGE", "1000-2000"),
            ("ZCBOT_SANDBOX_UID_RANGE", "300000-200000"),
            ("ZCBOT_SANDBOX_UID_RANGE", "lots"),
            ("ZCBOT_SANDBOX_UID_RANGE", "999-299999"),
            ("ZCBOT_SANDBOX_DISK", "1k"),
            ("ZCBOT_REQUIRE_DISK_QUOTA", "maybe"),
            ("ZCBOT_SELF_CHECK", "2"),
            ("ZCBOT_FILE_WORKERS", "0"),
            ("ZCBOT_FILE_MAX_ENTRIES", "ten"),
            ("ZCBOT_HTTP_MAX_CONNECTIONS", "0"),
            ("ZCBOT_HTTP_HEADER_TIMEOUT", "never"),
            ("ZCBOT_KILL_GRACE", "-5s"),
            ("ZCBOT_SANDBOX_RUNTIME", "kata"),
            ("ZCBOT_SECCOMP", "unconfined"),
        ] {
            let err = cfg(&[(var, value)]).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains(var) && msg.contains(value),
                "{var}={value}: {msg}"
            );
            assert_eq!(err.kind(), "config");
        }
    }

    #[test]
    fn a_bad_value_says_what_a_good_one_looks_like() {
        let cases = [
            ("ZCBOT_SANDBOX_IDLE", "soon", DURATION_SPELLING),
            ("ZCBOT_SANDBOX_MEMORY", "lots", "such as 512MiB"),
            ("ZCBOT_SANDBOX_MEMORY", "1k", "at least 6291456 bytes"),
            ("ZCBOT_SANDBOX_PIDS", "7", "from 8 to 4194304"),
            ("ZCBOT_SANDBOX_BACKEND", "podman", "must be host or docker"),
            (
                "ZCBOT_CONTAINER_RULES",
                "root",
                "must be auto, host or entry",
            ),
            ("ZCBOT_USERS_ROOT", "x", "absolute path"),
        ];
        for (var, value, hint) in cases {
            let msg = cfg(&[(var, value)]).unwrap_err().to_string();
            assert!(
                msg.starts_with(&format!("invalid {var}={value:?}: ")),
                "{msg}"
            );
            assert!(msg.contains(hint), "{var}={value}: {msg}");
        }
    }

    /// Run with a hostile environment by `from_lookup_never_reads_the_process_environment`, and
    /// on its own with the runner's.
    #[test]
    fn lookup_sees_only_its_map() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.image, "zcbot-sandbox:latest");
        assert_eq!(c.idle, secs(300));
        if std::env::var_os("ZCBOT_CONFIG_TEST_CHILD").is_some() {
            // ... while from_env does read the environment.
            let err = Config::from_env().unwrap_err().to_string();
            assert!(err.contains("ZCBOT_SANDBOX_IDLE"), "{err}");
        }
    }

    #[test]
    fn from_lookup_never_reads_the_process_environment() {
        // A child process, so the variables never touch this process's environment (setting
        // them here would race every other test thread's reads).
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "config::tests::lookup_sees_only_its_map"])
            .env("ZCBOT_CONFIG_TEST_CHILD", "1")
            .env("ZCBOT_SANDBOX_IMAGE", "from-the-environment:1")
            .env("ZCBOT_SANDBOX_IDLE", "not-a-duration")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn flags_win_over_variables_and_the_token_is_no_flag() {
        let cmd = Config::flags(clap::Command::new("serve").no_binary_name(true));
        let m = cmd
            .clone()
            .try_get_matches_from(["--idle", "7s", "--memory=1g", "--self-check"])
            .unwrap();
        let given = |v: &Variable| -> Option<OsString> {
            (m.value_source(v.id) == Some(ValueSource::CommandLine))
                .then(|| m.get_raw(v.id).unwrap().next().unwrap().to_owned())
        };
        let env = |k: &str| (k == "ZCBOT_SANDBOX_IDLE").then(|| "9s".to_owned());
        let c = Config::parse(given, env).unwrap();
        assert_eq!(c.idle, secs(7));
        assert_eq!(c.memory_bytes, 1 << 30);
        assert!(c.self_check);
        let m = cmd
            .try_get_matches_from(["--api-token", "0123456789abcdef-TOKENVALUE"])
            .unwrap();
        let err = Config::from_env_and_flags(&m).unwrap_err().to_string();
        assert!(
            err.contains("ZCBOT_API_TOKEN") && !err.contains("TOKENVALUE"),
            "{err}"
        );
    }
}
